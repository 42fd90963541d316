"""Chat data through the loop on the tiny models: packed rows, CE on the loss mask only, assistant-only
held-out bits per byte, and what refuses on chat data (the baselines that pair positions by index)."""

import json

import pytest
import torch

from sakd.train import objective
from sakd.config import load_config
from sakd.data.text import Collator, pad_id
from sakd.train.distill import distill, setup
from sakd.errors import UserError
from tests.conftest import tiny_overrides


def _conversations(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"messages": [
            {"role": "user", "content": f"Tell me of the king, number {i}."},
            {"role": "assistant", "content": "To be, or not to be, that is the question." if i % 2 else
             "The king is dead; long live the king. Naïve café — 東京 🙂"},
        ]})
    return rows


@pytest.fixture()
def chat_file(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _conversations(40)), encoding="utf-8")
    return str(p)


def _cfg(tiny_assets, tmp_path, chat_file, **extra):
    return load_config(None, tiny_overrides(tiny_assets, tmp_path / "out", **{
        "data.source": chat_file, "data.eval_source": chat_file, "data.seq_len": 96, "loss.ce_weight": 1.0,
        "loss.chunk_weight": 0.5, **extra}))


@pytest.mark.parametrize("logit", ["shared_kl", "mapped_kl"])
def test_chat_run_trains_on_packed_rows_with_assistant_only_targets(tiny_assets, tmp_path, chat_file, logit):
    cfg = _cfg(tiny_assets, tmp_path, chat_file, **{"loss.logit": logit})
    lines = []
    run = setup(cfg, log=lines.append)
    text = "\n".join(map(str, lines))
    assert "format messages (auto-detected)" in text and "pad fraction" in text
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(2)])
    assert "s_pos" in batch and (batch["s_pos"] == 0).sum() > 2  # several examples per row
    counts = objective.count_targets([batch], cfg, run.vocab.mapping)
    ce = int(batch["s_loss_mask"][:, 1:].sum())
    assert counts["ce"] == ce and 0 < ce < int(batch["s_mask"][:, 1:].sum()) // 2
    # the CE targets are exactly the chunked tokens plus one end-of-turn token per example... or none where
    # the template's turn end is not a single added token (ChatML markers are plain text to these tokenizers)
    chunked = int(((batch["chunk_s_end"] - batch["chunk_s_start"]) * batch["chunk_mask"]).sum())
    assert ce >= chunked
    res = distill(cfg, progress=False, log=lambda *_: None)
    assert res["steps"] == 3 and res["student_bpb_final"] > 0


@pytest.mark.parametrize("override,fragment", [
    ({"loss.baseline": "uld"}, "loss.baseline uld"),
    ({"loss.baseline": "truncation"}, "loss.baseline truncation"),
])
def test_what_chat_data_refuses(tiny_assets, tmp_path, chat_file, override, fragment):
    with pytest.raises(UserError, match=fragment):
        setup(_cfg(tiny_assets, tmp_path, chat_file, **override), log=lambda *_: None)


def test_heldout_bits_per_byte_count_assistant_content_only(tiny_assets, chat_file):
    from transformers import AutoModelForCausalLM

    from sakd.data.chat import configure_template
    from sakd.data.chat_dataset import heldout_conversations
    from sakd.data.chat_formats import read_conversations
    from sakd.evaluate.bpb import nll_bits
    from sakd.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_assets["teacher"]), "teacher")
    configure_template(tok, "chatml", "teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]).eval()
    convs = heldout_conversations(read_conversations(chat_file, "messages"), 10_000)
    bits, n_bytes, n_tok = nll_bits(model, tok, convs, 128, 4)
    assistant = sum(len(m["content"].encode()) for c in convs for m in c.messages if m["role"] == "assistant")
    # every scored byte is assistant content; only tokens straddling a content edge are left out
    assert 0.9 * assistant <= n_bytes <= assistant and bits > 0 and n_tok > 0
    with torch.no_grad():
        whole = nll_bits(model, tok, [str(c) for c in convs], 128, 4)
    assert whole[1] > 1.5 * n_bytes  # the plain-text path would have counted the user turns too


def _unpack(row: dict) -> list[dict]:
    """The examples of a packed row, each as its own item."""
    bs = [i for i, p in enumerate(row["s_pos"]) if p == 0] + [len(row["s_ids"])]
    bt = [i for i, p in enumerate(row["t_pos"]) if p == 0] + [len(row["t_ids"])]
    out = []
    for e in range(len(bs) - 1):
        (a, b), (c, d) = (bs[e], bs[e + 1]), (bt[e], bt[e + 1])
        out.append({"s_ids": row["s_ids"][a:b], "t_ids": row["t_ids"][c:d], "s_loss": row["s_loss"][a:b],
                    "n_bytes": 0, "chunks": [(w - a, x - a, y - c, z - c) for w, x, y, z in row["chunks"]
                                             if a <= w < b]})
    return out


def test_mapped_kl_on_a_packed_row_equals_the_sum_over_its_examples(tiny_assets, tmp_path, chat_file):
    """mapped_kl reads chunk tables only: on a packed row (template tokens between contents, several examples)
    it gives the sum of its examples' losses, given the same logits."""
    from sakd.losses.mapped import count_mapped, mapped_kd

    cfg = _cfg(tiny_assets, tmp_path, chat_file, **{"loss.logit": "mapped_kl", "data.seq_len": 256})
    run = setup(cfg, log=lambda *_: None)
    collate = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))
    row = run.train[0]
    parts = _unpack(row)
    assert len(parts) >= 2
    g = torch.Generator().manual_seed(0)
    packed = collate([row])
    s_logits = torch.randn(1, packed["s_ids"].shape[1], len(run.student_tok), generator=g, dtype=torch.float64)
    t_logits = torch.randn(1, packed["t_ids"].shape[1], len(run.teacher_tok), generator=g, dtype=torch.float64)
    total = mapped_kd(s_logits, t_logits, packed, run.vocab.mapping)[0]
    n, parts_sum, (a, c) = 0, 0.0, (0, 0)
    for x in parts:
        b = collate([x])
        ls, lt = len(x["s_ids"]), len(x["t_ids"])
        parts_sum = parts_sum + mapped_kd(s_logits[:, a:a + ls], t_logits[:, c:c + lt], b, run.vocab.mapping)[0]
        n += count_mapped(b, run.vocab.mapping)
        a, c = a + ls, c + lt
    assert n == count_mapped(packed, run.vocab.mapping) > 0
    torch.testing.assert_close(total, parts_sum, rtol=1e-6, atol=1e-6)  # the loss runs in float32


def test_sakd_evaluate_on_conversations_scores_assistant_content(tiny_assets, chat_file):
    from sakd.report.run import evaluate_command

    out = evaluate_command(str(tiny_assets["student"]), str(tiny_assets["teacher"]), chat_file, max_bytes=3000,
                           seq_len=128, device="cpu")
    assert out["format"] == "messages"
    for side in ("student", "teacher"):
        m = out[side]
        # about the assistant's share of the contents (~60 %), not every byte of the rendering
        assert 0.4 * out["heldout_bytes"] < m["bytes"] < 0.8 * out["heldout_bytes"] and m["bits_per_byte"] > 0


def test_sakd_distill_with_the_ce_only_baseline_reports_both_students(tiny_assets, tmp_path, chat_file):
    """eval.ce_only_baseline: after the run, the same student with cross-entropy alone (same data, steps,
    seed) in <out>/ce-only; its held-out bits per byte (assistant content) is the report's CE-only row."""
    from sakd.cli import main

    out = tmp_path / "out"
    over = tiny_overrides(tiny_assets, out, **{"data.source": chat_file, "data.eval_source": chat_file,
                                               "data.seq_len": 96, "loss.logit": "mapped_kl", "moe.mode": "ka",
                                               "eval.ce_only_baseline": True})
    assert main(["distill", "--no-progress", *over]) == 0
    rep = json.loads((out / "report.json").read_text())
    ce_res = json.loads((out / "ce-only" / "result.json").read_text())
    ce_rep = json.loads((out / "ce-only" / "report.json").read_text())
    assert rep["extra"]["student_bpb_ce_only"] == ce_res["student_bpb_final"] > 0
    assert rep["student_bpb_final"] != ce_res["student_bpb_final"]  # the teacher changed the student
    assert "assistant" in rep["units"]["teacher_bpb"]
    # the same data, steps and seed; no teacher term
    main_cfg, ce_cfg = rep["config"], ce_rep["config"]
    assert ce_cfg["data"] == main_cfg["data"] and ce_cfg["train"]["seed"] == main_cfg["train"]["seed"]
    assert ce_res["steps"] == rep["steps"] == 3
    assert ce_cfg["loss"]["logit"] == "none" and ce_cfg["loss"]["kd_weight"] == 0 and ce_cfg["moe"]["mode"] == "topk"
    hist = json.loads((out / "ce-only" / "history.json").read_text())["history"]
    assert all("kd" not in h for h in hist) and all(h["w_ce"] == 1.0 for h in hist)
    md = (out / "report.md").read_text()
    assert f"| student, cross-entropy only | {ce_res['student_bpb_final']:.4f} |" in md
