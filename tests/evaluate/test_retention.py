"""Retention on byte-aligned positions: every number checked against a float64 computation
written the slow obvious way (Python loops over the models' logits)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sakd.align.tokens import encode_with_bytes
from sakd.align.vocab import build_vocab_map
from sakd.data.text import collate, encode_pair, pad_id
from sakd.evaluate.bpb import start_token_id
from sakd.evaluate.retention import one_to_one_stats, retention

# Short enough to be ONE span at seq_len=256 (spans are ~0.9 x 255 tokens of text).
TEXT = ("MACBETH. So foul and fair a day I have not seen.\nBANQUO. How far is't call'd to Forres? "
        "What are these,\nSo wither'd and so wild in their attire, That look not like th' inhabitants o' th' earth,\n"
        "And yet are on't? Live you? or are you aught That man may question?")


@pytest.fixture(scope="module")
def pair(tiny_assets):
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    return (load(tiny_assets["teacher"]), AutoTokenizer.from_pretrained(tiny_assets["teacher"]),
            load(tiny_assets["student"]), AutoTokenizer.from_pretrained(tiny_assets["student"]))


def _direct_kl_top(t_row, s_row, shared_t, shared_s):
    """KL(p || q) over the shared vocabulary, renormalised on both sides, with Python floats."""
    t = [float(t_row[i]) for i in shared_t]
    s = [float(s_row[i]) for i in shared_s]
    zt = max(t) + math.log(sum(math.exp(x - max(t)) for x in t))
    zs = max(s) + math.log(sum(math.exp(x - max(s)) for x in s))
    kl = sum(math.exp(a - zt) * ((a - zt) - (b - zs)) for a, b in zip(t, s))
    t_best = max(range(len(t)), key=lambda i: t[i])
    s_order = sorted(range(len(s)), key=lambda i: -s[i])
    return kl, s_order[0] == t_best, t_best in s_order[:5]


def _logprob(logits, ids, k, vocab):
    row = logits[k - 1, :vocab].double()
    return float(row[ids[k]] - torch.logsumexp(row, 0))


@torch.no_grad()
def test_kl_and_agreement_at_a_hand_picked_one_to_one_position(pair):
    teacher, t_tok, student, s_tok = pair
    item = encode_pair(TEXT, s_tok, t_tok, start_token_id(s_tok), start_token_id(t_tok), 256, 512)
    batch = collate([item], pad_id(s_tok), pad_id(t_tok))
    s_logits = student(input_ids=batch["s_ids"]).logits
    t_logits = teacher(input_ids=batch["t_ids"]).logits
    vm = build_vocab_map(s_tok, t_tok)
    stats = one_to_one_stats(s_logits, t_logits, batch, vm.shared_s, vm.shared_t, t_vocab_size=len(t_tok))
    ones = [c for c in item["chunks"] if c[1] - c[0] == 1 and c[3] - c[2] == 1]
    assert len(ones) == stats["kl"].numel() > 5
    ss, _, ts, _ = ones[len(ones) // 2]  # a 1:1 chunk in the middle of the text
    i = int(((stats["s_pos"] == ss - 1) & (stats["t_pos"] == ts - 1)).nonzero().item())
    kl, top1, top5 = _direct_kl_top(t_logits[0, ts - 1], s_logits[0, ss - 1], vm.shared_t.tolist(),
                                    vm.shared_s.tolist())
    assert float(stats["kl"][i]) == pytest.approx(kl, rel=1e-9, abs=1e-12)
    assert kl > 0 and bool(stats["top1"][i]) == top1 and bool(stats["topk"][i]) == top5
    full = t_logits[0, ts - 1, :len(t_tok)].double().softmax(0)
    assert float(stats["outside"][i]) == pytest.approx(1 - float(full[vm.shared_t].sum()), rel=1e-9)
    # the same bytes are predicted on both sides: the chunk's tokens are the same string
    s_str = s_tok.convert_ids_to_tokens(int(batch["s_ids"][0, ss])).replace("▁", " ")
    t_str = t_tok.decode([int(batch["t_ids"][0, ts])])
    assert s_str == t_str


@torch.no_grad()
def test_retention_matches_a_direct_float64_computation(pair):
    teacher, t_tok, student, s_tok = pair
    r = retention(teacher, t_tok, student, s_tok, [TEXT], seq_len=256)
    assert r["spans"] == 1
    s = encode_with_bytes(s_tok, TEXT, start_token=start_token_id(s_tok))
    t = encode_with_bytes(t_tok, TEXT, start_token=start_token_id(t_tok))
    item = encode_pair(TEXT, s_tok, t_tok, start_token_id(s_tok), start_token_id(t_tok), 256, 512)
    assert item["s_ids"] == s.ids and item["t_ids"] == t.ids  # the whole text was scored
    s_logits = student(input_ids=torch.tensor([s.ids])).logits[0]
    t_logits = teacher(input_ids=torch.tensor([t.ids])).logits[0]
    vm = build_vocab_map(s_tok, t_tok)
    kls, top1, top5, gaps, gap_bytes = [], [], [], [], 0
    for ss, se, ts, te in item["chunks"]:
        if se - ss == 1 and te - ts == 1:
            kl, a, b = _direct_kl_top(t_logits[ts - 1], s_logits[ss - 1], vm.shared_t.tolist(), vm.shared_s.tolist())
            kls.append(kl)
            top1.append(a)
            top5.append(b)
        else:
            lp_t = sum(_logprob(t_logits, t.ids, k, len(t_tok)) for k in range(ts, te))
            lp_s = sum(_logprob(s_logits, s.ids, k, len(s_tok)) for k in range(ss, se))
            gaps.append(lp_t - lp_s)
            gap_bytes += t.byte_ends[te - 1] - t.byte_ends[ts - 1]  # counted on the TEACHER side here
    assert r["one_to_one_positions"] == len(kls) and r["multi_token_chunks"] == len(gaps) > 3
    assert r["kl_nats_per_position"] == pytest.approx(sum(kls) / len(kls), rel=1e-9)
    assert r["top1_agreement"] == pytest.approx(sum(top1) / len(top1))
    assert r["top5_agreement"] == pytest.approx(sum(top5) / len(top5))
    assert r["chunk_gap_nats_per_chunk"] == pytest.approx(sum(abs(g) for g in gaps) / len(gaps), rel=1e-5)
    assert r["chunk_gap_signed_nats_per_chunk"] == pytest.approx(sum(gaps) / len(gaps), rel=1e-5, abs=1e-6)
    assert r["chunk_gap_bits_per_byte"] == pytest.approx(sum(abs(g) for g in gaps) / math.log(2) / gap_bytes,
                                                         rel=1e-5)
    # chunks partition the text tokens of both sides and its bytes
    assert r["student_tokens"] == len(s.ids) - 1 and r["teacher_tokens"] == len(t.ids) - 1
    assert r["bytes_scored"] == len(TEXT.encode("utf-8"))
    assert r["frac_student_tokens_one_to_one"] == pytest.approx(len(kls) / (len(s.ids) - 1))
    assert 0 < r["frac_student_tokens_one_to_one"] < 1  # two different tokenizers


@torch.no_grad()
def test_student_equal_to_teacher_retains_everything(pair):
    """Same model and tokenizer on both sides: every chunk is 1:1, KL 0, agreement 1."""
    teacher, t_tok, _, _ = pair
    r = retention(teacher, t_tok, teacher, t_tok, [TEXT, TEXT[::-1]], seq_len=32, batch_size=3)
    assert r["spans"] > 2  # several spans, batched with padding
    assert r["frac_student_tokens_one_to_one"] == 1.0 and r["multi_token_chunks"] == 0
    assert r["top1_agreement"] == 1.0 and r["top5_agreement"] == 1.0
    assert abs(r["kl_nats_per_position"]) < 1e-12
    assert r["chunk_gap_nats_per_chunk"] is None and r["chunk_gap_bits_per_byte"] is None
    assert r["shared_vocab"] == len(t_tok)  # one vocabulary on both sides: every id maps to itself
