"""Sliding-window bits per byte: the window plan's invariants, and the batched scorer against a slow
float64 reference that scores every token with its own forward pass."""

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sakd.align.tokens import encode_with_bytes
from sakd.config import EvalConfig
from sakd.evaluate.bpb import (DEFAULT_CONTEXT_BYTES, nll_bits, pad_windows, scoring_windows, sliding_nll, start_token_id,
                           token_byte_starts, window_plan)

TEXT_TAIL = "Naïve café — 東京 🙂 über straße\n"


def _check_plan(starts, max_len, budget):
    plan = window_plan(starts, max_len, budget)
    n = len(starts)
    scored = [j for _, s, e in plan for j in range(s, e)]
    assert scored == list(range(n))  # every token once, in order
    assert plan[0][:2] == (0, 0)
    short = 0
    for c, s, e in plan:
        assert 0 <= c <= s < e <= n and e - c <= max_len - 1  # the start token + at most max_len - 1 tokens
        if s == 0:
            continue
        if starts[s] - starts[c] >= min(budget, starts[s]):
            # the shortest context that covers the budget: one token less would not
            assert c == s or starts[s] - starts[c + 1] < budget
            for j in range(s, e):
                assert starts[j] - starts[c] >= min(budget, starts[j])
        else:  # the budget needs more tokens than the window holds: half a window of context
            assert s - c == (max_len - 1) // 2
            short += 1
    return plan, short


def test_window_plan_invariants_on_random_token_lengths():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 400)
        lengths = [rng.choice([0, 1, 1, 2, 3, 4, 7, 12]) for _ in range(n)]  # zero-length tokens too
        starts = [sum(lengths[:k]) for k in range(n)]
        max_len, budget = rng.randint(3, 80), rng.choice([0, 1, 5, 16, 40, 100, 1000])
        plan, short = _check_plan(starts, max_len, budget)
        if budget == 0:  # independent windows of max_len - 1 tokens
            assert [(c, s) for c, s, _ in plan] == [(s, s) for s in range(0, n, max_len - 1)]


def test_window_plan_falls_back_to_half_a_window_only_when_the_budget_cannot_fit():
    starts = list(range(100))  # one byte per token
    plan, short = _check_plan(starts, 11, 20)  # 20 bytes need 20 tokens > 10 - 1
    assert short == len(plan) - 1 and all(s - c == 5 for c, s, _ in plan[1:])
    plan, short = _check_plan(starts, 31, 20)
    assert short == 0 and all(s - c == 20 for c, s, _ in plan[1:])
    with pytest.raises(ValueError, match="eval.seq_len >= 3"):
        window_plan(starts, 2, 0)
    with pytest.raises(ValueError, match="context_bytes=-1"):
        window_plan(starts, 10, -1)


def test_eval_config_default_is_the_evaluator_default():
    assert EvalConfig().context_bytes == DEFAULT_CONTEXT_BYTES


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    out = {}
    for side in ("teacher", "student"):
        tok = AutoTokenizer.from_pretrained(tiny_assets[side])
        model = AutoModelForCausalLM.from_pretrained(tiny_assets[side], dtype=torch.float32).eval()
        out[side] = (model, tok)
    texts = [tiny_assets["heldout"].read_text(encoding="utf-8")[:360] + TEXT_TAIL,
             "Short one.\n", tiny_assets["heldout"].read_text(encoding="utf-8")[2000:2160]]
    return out, texts


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_scored_tokens_partition_the_bytes_with_the_same_byte_budget(tiny, side):
    (models, texts), budget = tiny, 40
    _, tok = models[side]
    for text in texts:
        enc = encode_with_bytes(tok, text)
        ids, starts = token_byte_starts(tok, text)
        assert ids == enc.ids and starts == enc.byte_starts
        plan = window_plan(starts, 80, budget)  # 40 bytes fit in 78 tokens of either
        spans = [(enc.byte_starts[j], enc.byte_ends[j]) for _, s, e in plan for j in range(s, e)]
        assert spans[0][0] == 0 and spans[-1][1] == len(text.encode("utf-8"))
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous: the bytes, once each
        for c, s, e in plan:
            assert all(starts[j] - starts[c] >= min(budget, starts[j]) for j in range(s, e))


@torch.no_grad()
def _reference_bits(path, tok, texts, max_len, budget):
    """Every token by its own float64 forward pass over the start token and the context the plan
    gives it (the window's tokens before it)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    nats, n = 0.0, 0
    for text in texts:
        ids, starts = token_byte_starts(tok, text)
        for c, s, e in window_plan(starts, max_len, budget):
            for j in range(s, e):
                x = torch.tensor([[start_token_id(tok)] + ids[c:j + 1]])
                row = model(input_ids=x).logits[0, -2, :len(tok)]
                nats += float(torch.logsumexp(row, 0) - row[ids[j]])
                n += 1
    return nats / math.log(2), n


@pytest.mark.parametrize("side,max_len,budget,batch,keep", [
    ("student", 32, 16, 3, True), ("teacher", 28, 16, 4, True), ("student", 20, 0, 2, True),
    ("teacher", 32, 1000, 5, False)])  # 1000 bytes cannot fit: half-window contexts; no logits_to_keep
def test_batched_sliding_nll_equals_a_slow_float64_reference(tiny, tiny_assets, side, max_len, budget, batch, keep,
                                                             monkeypatch):
    models, texts = tiny
    model, tok = models[side]
    if not keep:
        monkeypatch.setattr("sakd.evaluate.bpb._keeps_logits", lambda m: False)
    r = sliding_nll(model, tok, texts, max_len, batch, "cpu", budget)
    ref_bits, ref_n = _reference_bits(tiny_assets[side], tok, texts, max_len, budget)
    assert r["tokens"] == ref_n == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert r["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert r["bits"] == pytest.approx(ref_bits, rel=2e-6)
    assert r["windows"] > len(texts) and r["forward_tokens"] >= r["tokens"] + r["windows"]
    assert (r["short_context_tokens"] > 0) == (budget == 1000)
    bits, n_bytes, n_tok = nll_bits(model, tok, texts, max_len, batch, "cpu", budget)
    assert (bits, n_bytes, n_tok) == pytest.approx((r["bits"], r["bytes"], r["tokens"]), rel=1e-12)


def test_zero_budget_is_the_old_independent_windows(tiny):
    models, texts = tiny
    model, tok = models["student"]
    model.train()
    nats = 0.0
    with torch.no_grad():
        for w in scoring_windows(tok, texts, 24):
            ids, _ = pad_windows([w])
            row = model(input_ids=ids).logits[0, :-1].double()
            nats += float((torch.logsumexp(row, -1) - row.gather(-1, ids[0, 1:, None]).squeeze(-1)).sum())
    assert nll_bits(model, tok, texts, 24, 5, "cpu", 0)[0] == pytest.approx(nats / math.log(2), rel=1e-6)
    assert model.training  # put back as it was
    model.eval()


def test_context_lowers_the_demo_teachers_bits_per_byte():
    """The committed demo teacher is a trained model: with 384 bytes of context before every scored
    token it predicts the held-out plays better than with windows restarted after a start token."""
    from sakd.data.text import heldout_texts, read_source
    from sakd.demo.run import ASSETS

    texts = heldout_texts(read_source("sakd:shakespeare-heldout").texts, 12_000)
    tok = AutoTokenizer.from_pretrained(ASSETS / "teacher")
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", dtype=torch.float32)
    with_context = sliding_nll(model, tok, texts, 256, 16, "cpu", 384)
    independent = sliding_nll(model, tok, texts, 256, 16, "cpu", 0)
    assert with_context["tokens"] == independent["tokens"] and with_context["short_context_tokens"] == 0
    assert with_context["bits"] < independent["bits"] * 0.998
