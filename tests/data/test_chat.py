"""Chat data on two real tokenizers with two different templates: ChatML on qwen-real (the teacher), Zephyr-style
turns on smollm2-real (the student). The loss mask is checked against a slow reference that finds the content
strings in each rendered text."""

import pytest
import torch

from sakd.align.tokens import start_token_id
from sakd.data.chat import ChatEncoder, RowSkipped, collate_chat, configure_template, pack, render
from sakd.data.chat_dataset import encode_all

pytestmark = pytest.mark.real_tokenizers

SYSTEM = {"role": "system", "content": "You answer in one line."}
CONVS = {
    "single": [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "Paris is the capital of France."}],
    "multi": [SYSTEM,
              {"role": "user", "content": "Name a fruit."},
              {"role": "assistant", "content": "An apple, for instance."},
              {"role": "user", "content": "And a colour?"},
              {"role": "assistant", "content": "Deep crimson, like the apple."}],
    "emoji_cjk": [{"role": "user", "content": "Say hello in Japanese."},
                  {"role": "assistant", "content": "こんにちは！東京から 🙂🚀 — naïve café."}],
}


@pytest.fixture(scope="module")
def toks():
    from sakd.models.tokenizers import load_tokenizer

    teacher, student = load_tokenizer("qwen-real"), load_tokenizer("smollm2-real")
    configure_template(teacher, "chatml", "teacher")
    configure_template(student, "turns", "student")
    return student, teacher


def _encoder(toks, seq_len=256, teacher_seq_len=256, **kw):
    s, t = toks
    return ChatEncoder(s, t, start_token_id(s), start_token_id(t), seq_len, teacher_seq_len, **kw)


def slow_content_ranges(text: str, messages, roles) -> set[int]:
    """Byte offsets of the contents of ``roles`` in ``text``: each content string searched for, in order,
    after the previous one (the obvious way, no sentinels)."""
    out, pos = set(), 0
    for m in messages:
        i = text.index(m["content"], pos)
        pos = i + len(m["content"])
        if m["role"] in roles:
            a = len(text[:i].encode())
            out |= set(range(a, a + len(m["content"].encode())))
    return out


def covered(enc_ids_starts_ends, ks) -> set[int]:
    starts, ends = enc_ids_starts_ends
    out = set()
    for k in ks:
        out |= set(range(starts[k], ends[k]))
    return out


def _encoded(tok, messages):
    from sakd.data.chat import encode_side

    side = encode_side(tok, messages, start_token_id(tok))
    return side.enc


@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_loss_mask_covers_exactly_the_trained_contents_on_both_sides(toks, name, train_on_prompt):
    s_tok, t_tok = toks
    msgs = CONVS[name]
    item = _encoder(toks, train_on_prompt=train_on_prompt).encode(msgs)
    roles = ("assistant", "user") if train_on_prompt else ("assistant",)
    s_enc, t_enc = _encoded(s_tok, msgs), _encoded(t_tok, msgs)
    s_text, t_text = render(s_tok, msgs)[0], render(t_tok, msgs)[0]
    assert s_text != t_text  # two genuinely different templates
    s_want, t_want = slow_content_ranges(s_text, msgs, roles), slow_content_ranges(t_text, msgs, roles)

    s_chunk_tokens = [k for a, b, _, _ in item["chunks"] for k in range(a, b)]
    t_chunk_tokens = [k for _, _, c, d in item["chunks"] for k in range(c, d)]
    assert covered((s_enc.byte_starts, s_enc.byte_ends), s_chunk_tokens) == s_want
    assert covered((t_enc.byte_starts, t_enc.byte_ends), t_chunk_tokens) == t_want
    # the CE targets: the same student tokens, plus the end-of-turn token after each assistant content
    ce = [k for k, on in enumerate(item["s_loss"]) if on]
    eot = sorted(set(ce) - set(s_chunk_tokens))
    assert set(s_chunk_tokens) <= set(ce)
    assert [s_tok.convert_ids_to_tokens(item["s_ids"][k]) for k in eot] == ["<|endoftext|>"] * sum(
        m["role"] == "assistant" for m in msgs)
    for k in eot:  # right after an assistant content
        assert any(s_enc.byte_starts[k] == len(s_text[:s_text.index(m["content"]) + len(m["content"])].encode())
                   for m in msgs if m["role"] == "assistant")
    # each chunk covers the same content bytes on both sides
    for a, b, c, d in item["chunks"]:
        sb = s_text.encode()[s_enc.byte_starts[a]:s_enc.byte_ends[b - 1]]
        tb = t_text.encode()[t_enc.byte_starts[c]:t_enc.byte_ends[d - 1]]
        assert sb == tb and sb


def test_chatml_end_of_turn_is_im_end(toks):
    s_tok, t_tok = toks
    enc = ChatEncoder(t_tok, s_tok, start_token_id(t_tok), start_token_id(s_tok), 256, 256)  # qwen as the student
    item = enc.encode(CONVS["multi"])
    chunked = {k for a, b, _, _ in item["chunks"] for k in range(a, b)}
    extra = [t_tok.convert_ids_to_tokens(item["s_ids"][k]) for k, on in enumerate(item["s_loss"]) if on and k not in chunked]
    assert extra == ["<|im_end|>", "<|im_end|>"]


def test_prompt_longer_than_seq_len_skips_or_keeps_the_later_exchange(toks):
    long_user = {"role": "user", "content": "word " * 200}
    enc = _encoder(toks, seq_len=96, teacher_seq_len=96)
    with pytest.raises(RowSkipped, match="prompt longer than seq_len"):
        enc.encode([long_user, {"role": "assistant", "content": "Short answer."}])
    msgs = [SYSTEM, long_user, {"role": "assistant", "content": "First answer."},
            {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Second answer."}]
    item = enc.encode(msgs)
    s_tok = toks[0]
    text = s_tok.decode([i for i, on in zip(item["s_ids"], item["s_loss"]) if on])
    assert "Second answer." in text and "First answer." not in text
    assert len(item["s_ids"]) <= 96 and len(item["t_ids"]) <= 96
    assert "You answer in one line." in s_tok.decode(item["s_ids"])  # the system message is kept
    assert enc.counts["exchanges dropped (prompt longer than seq_len)"] == 1


def test_rows_without_assistant_are_skipped_and_counted(toks):
    enc = _encoder(toks)
    items, counts = encode_all(enc, [CONVS["single"], [{"role": "user", "content": "Hello?"}],
                                     [SYSTEM, {"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]])
    assert len(items) == 1 and counts == {"no assistant turn": 2}


def test_packing_keeps_examples_apart(toks):
    enc = _encoder(toks)
    items = [enc.encode(CONVS[n]) for n in ("single", "multi", "emoji_cjk", "single")]
    rows = pack(items, 256, 256)
    assert len(rows) < len(items)
    assert sum(r["examples"] for r in rows) == len(items)
    for r in rows:
        assert len(r["s_ids"]) <= 256 and len(r["t_ids"]) <= 256
        starts_s = [i for i, p in enumerate(r["s_pos"]) if p == 0] + [len(r["s_ids"])]
        starts_t = [i for i, p in enumerate(r["t_pos"]) if p == 0] + [len(r["t_ids"])]
        assert len(starts_s) == len(starts_t) == r["examples"] + 1
        for a, b, c, d in r["chunks"]:  # a chunk never crosses an example boundary, on either side
            ex_s = max(i for i, x in enumerate(starts_s) if x <= a)
            ex_t = max(i for i, x in enumerate(starts_t) if x <= c)
            assert ex_s == ex_t and b <= starts_s[ex_s + 1] and d <= starts_t[ex_t + 1]
    batch = {"s_ids": torch.zeros(len(rows), 300, dtype=torch.long), "t_ids": torch.zeros(len(rows), 310, dtype=torch.long)}
    collate_chat(batch, rows)
    assert batch["s_loss_mask"].sum() == sum(sum(x["s_loss"]) for x in items)
    for b, r in enumerate(rows):  # the padding restarts its positions: it never joins the last example
        assert batch["s_pos"][b, len(r["s_ids"])] == 0 and batch["t_pos"][b, len(r["t_ids"])] == 0


def _per_example_logprobs(model, rows, side: str, packed: bool):
    """Log-probabilities of every token the losses read, per example, from packed or unpacked rows: the CE
    targets on the student side, the chunked tokens on the teacher side."""
    from sakd.data.text import collate

    out = []
    for r in rows:
        batch = collate([r], 0, 0)
        kw = ({"position_ids": batch[f"{side}_pos"], "attention_mask": None} if packed
              else {"attention_mask": batch[f"{side}_mask"].long()})
        logp = torch.log_softmax(model(input_ids=batch[f"{side}_ids"], **kw, use_cache=False).logits.double(), -1)[0]
        ids = r[f"{side}_ids"]
        if side == "s":
            read = [k for k, on in enumerate(r["s_loss"]) if on]
        else:
            read = sorted({k for _, _, c, d in r["chunks"] for k in range(c, d)})
        bounds = [i for i, p in enumerate(r.get(f"{side}_pos", [0])) if p == 0] + [len(ids)]
        for a, b in zip(bounds, bounds[1:]):
            out.append([float(logp[k - 1, ids[k]]) for k in read if a < k < b])
    return out


@pytest.mark.parametrize("side", ["s", "t"])
def test_packing_equals_unpacked_per_example(toks, side):
    """The tiny student's log-probability of every CE target, and the tiny MoE teacher's of every chunked token,
    are the same whether the example is alone in its row or packed with others (positions restart, no
    attention across examples)."""
    from transformers import AutoModelForCausalLM

    from sakd.models.tiny import llama_config, qwen3_moe_config

    torch.manual_seed(0)
    config = (llama_config(len(toks[0]), hidden=32, layers=2, heads=4, intermediate=64) if side == "s" else
              qwen3_moe_config(len(toks[1]), hidden=32, layers=2, heads=4, experts=3, experts_per_tok=1,
                               intermediate=32))
    model = AutoModelForCausalLM.from_config(config).eval()
    enc = _encoder(toks)
    items = [enc.encode(CONVS[n]) for n in ("single", "multi", "emoji_cjk")]
    rows = pack(items, 256, 256)
    assert len(rows) == 1
    with torch.no_grad():
        alone = _per_example_logprobs(model, items, side, packed=False)
        together = _per_example_logprobs(model, rows, side, packed=True)
        leaky = _per_example_logprobs(model, [{k: v for k, v in rows[0].items() if k not in ("s_pos", "t_pos")}],
                                      side, packed=False)
    assert [len(x) for x in alone] == [len(x) for x in together] and all(alone)
    for a, b in zip(alone, together):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-5)
    # without restarting positions and the per-example mask, the last example would see the others
    assert not torch.allclose(torch.tensor(leaky[0][-5:]), torch.tensor(together[-1][-5:]), atol=1e-5)
