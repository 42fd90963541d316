"""On-policy generation on chat data (sakd/train/chat_onpolicy.py): the student writes the assistant's turn, the
conversation with that reply is encoded like any data set row, and what cannot be used keeps the data
set's reply, counted."""

import pytest
import torch

from sakd.data.chat import configure_template, pack
from sakd.train.chat_onpolicy import generate_chat_items, reply_text, split_prompt, student_reply, turn_end_marker
from sakd.train.distill import distill, setup
from sakd.models.load import load_tokenizer
from tests.train.test_chat_loop import _cfg, chat_file  # noqa: F401  (the fixture)

QUIET = dict(log=lambda *_: None)
ROW = ("s_ids", "t_ids", "chunks", "s_loss", "s_pos", "t_pos", "convs")


@pytest.mark.parametrize("template,marker", [("chatml", "<|im_end|>"), ("turns", "EOS"),
                                             ("sakd/demo/assets/student-chat.jinja", "EOS")])
def test_turn_end_marker_is_what_the_template_writes_after_an_assistant_content(tiny_assets, template, marker):
    from tests.conftest import ROOT

    tok = load_tokenizer(str(tiny_assets["student"]), "student")
    configure_template(tok, template if template in ("chatml", "turns") else str(ROOT / template), "student")
    assert turn_end_marker(tok) == (tok.eos_token if marker == "EOS" else marker)


def test_reply_text_cuts_at_the_first_stop_and_normalises():
    assert reply_text("Hello there<|im_end|>\n<|im_start|>user", ["<|im_end|>", "</s>"], "NFC") == "Hello there"
    assert reply_text("a</s>b<|im_end|>", ["<|im_end|>", "</s>"], "NFC") == "a"
    assert reply_text("no stop at all", ["<|im_end|>"], "NFC") == "no stop at all"
    # a decomposed accent composed (the data's normal form), a half character at the end dropped
    assert reply_text("cafe\u0301 \ufffd", ["</s>"], "NFC") == "caf\u00e9 "
    assert split_prompt([{"role": "user", "content": "q"}]) is None
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    assert split_prompt(msgs) == (msgs[:4], [])


def _run(tiny_assets, tmp_path, chat_file, **extra):
    cfg = _cfg(tiny_assets, tmp_path, chat_file, **{"data.seq_len": 256, "loss.logit": "mapped_kl", **extra})
    return cfg, setup(cfg, **QUIET)


def test_rows_hold_the_students_replies_encoded_like_data_set_rows(tiny_assets, tmp_path, chat_file):
    """Each returned row is exactly the encoder's packing of its conversations; those keep the data set's
    prompts and carry the reply the student samples for them (replayed with the same seed)."""
    cfg, run = _run(tiny_assets, tmp_path, chat_file)
    ds = run.train
    idx = [0, 3]
    torch.manual_seed(123)
    rows, kept = generate_chat_items(run.student, ds, idx, new_tokens=12, temperature=1.0)
    assert len(rows) == len(idx) and kept == 0
    replies = []
    for i, row in zip(idx, rows):
        assert len(row["convs"]) == len(ds[i]["convs"]) == 2  # two examples a row, as in the data set
        for new, old in zip(row["convs"], ds[i]["convs"]):
            assert new[:-1] == old[:-1] and new[-1]["role"] == "assistant"
            replies.append(new[-1]["content"])
        again = pack([ds.encoder.encode(c) for c in row["convs"]], ds.seq_len, ds.teacher_seq_len)
        assert len(again) == 1 and {k: again[0][k] for k in ROW} == {k: row[k] for k in ROW}
    old_replies = [c[-1]["content"] for i in idx for c in ds[i]["convs"]]
    assert replies != old_replies
    # the first reply is the student's sample given the student's own rendering of the prompt
    torch.manual_seed(123)
    tok = ds.student_tok
    stops = [s for s in {turn_end_marker(tok), tok.eos_token} if s]
    first = student_reply(run.student, tok, split_prompt(ds[0]["convs"][0])[0], start=ds.encoder.s_start,
                          max_len=ds.seq_len, new_tokens=12, temperature=1.0, stop_ids=[tok.eos_token_id], stops=stops,
                          normal_form=ds.normal_form)
    assert first == replies[0]


def test_a_prompt_that_leaves_no_room_keeps_the_data_set_reply_counted(tiny_assets, tmp_path, chat_file):
    cfg, run = _run(tiny_assets, tmp_path, chat_file)
    ds = run.train
    rows, kept = generate_chat_items(run.student, ds, [1, 2], new_tokens=ds.seq_len, temperature=1.0)
    assert kept == 4  # 2 rows x 2 conversations
    for i, row in zip([1, 2], rows):
        assert {k: row[k] for k in ROW} == {k: ds[i][k] for k in ROW}
    from sakd.train.onpolicy import generate_items  # the loop's entry point counts them for result.json

    counters = {"on_policy_dataset_replies": 1}
    generate_items(run.student, ds, [1, 2], new_tokens=ds.seq_len, temperature=1.0, counters=counters)
    assert counters == {"on_policy_dataset_replies": 5}


def test_sakd_distill_trains_on_policy_on_chat_data(tiny_assets, tmp_path, chat_file):
    cfg = _cfg(tiny_assets, tmp_path, chat_file, **{"data.seq_len": 256, "loss.logit": "mapped_kl",
                                                     "loss.on_policy_prob": 1.0, "loss.on_policy_tokens": 8,
                                                     "train.max_steps": 2})
    res = distill(cfg, progress=False, **QUIET)
    hist = __import__("json").loads((tmp_path / "out" / "history.json").read_text())["history"]
    assert res["steps"] == 2 and all(r["on_policy"] for r in hist)
    assert res["student_bpb_final"] != res["student_bpb_initial"]


def test_a_template_that_refuses_the_prompt_keeps_the_data_set_reply(tiny_assets, tmp_path, chat_file, monkeypatch):
    """A template that raises on a generation prompt or on the marker probe (e.g. "roles must alternate") must
    not stop a run hours in: the data set's reply stays, counted; the end-of-turn marker falls back to EOS."""
    cfg, run = _run(tiny_assets, tmp_path, chat_file)
    ds = run.train

    render = ds.student_tok.apply_chat_template

    def refuse(messages, *a, **kw):
        if kw.get("add_generation_prompt") or "SAKD-REPLY" in messages[-1]["content"]:
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        return render(messages, *a, **kw)

    monkeypatch.setattr(ds.student_tok, "apply_chat_template", refuse)
    assert turn_end_marker(ds.student_tok) == ds.student_tok.eos_token
    rows, kept = generate_chat_items(run.student, ds, [0], new_tokens=8, temperature=1.0)
    assert kept == 2 and {k: rows[0][k] for k in ROW} == {k: ds[0][k] for k in ROW}
