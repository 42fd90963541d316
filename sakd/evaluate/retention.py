"""Knowledge retention: how close the student's predictions are to the teacher's, measured
only where the two tokenisations can be compared.

Two models with different tokenizers predict different things at "the same position",
so position k of one side is never compared with position k of the other. Instead each
held-out span is tokenized by both sides and cut into byte-aligned chunks (sakd/data/text.py):

* 1:1 chunks (one token on each side): the student logits at chunk_s_start - 1 and the
  teacher logits at chunk_t_start - 1 both predict the text from the same byte on. Over the
  shared vocabulary (token strings both sides have; sakd/align/vocab.py), renormalised on
  both sides (p = softmax(teacher logits[shared_t]), q = softmax(student logits[shared_s])):

      KL(p || q) = sum_i p_i (log p_i - log q_i)            nats per 1:1 position
      top-1 agreement: argmax_i p_i == argmax_i q_i
      top-5 agreement: argmax_i p_i is among the 5 largest q_i

* multi-token chunks: whole-chunk log-likelihoods (sakd.losses.crosstok.chunk_logprobs)
  log P_T(chunk), log P_S(chunk) of the observed text; the gap |log P_T - log P_S| in nats
  per chunk, and summed / ln 2 / the chunks' UTF-8 bytes in bits per byte.

1:1 comparisons run in float64 on rows gathered from the models' logits; chunk
log-likelihoods in float32 (summed per chunk, then float64).
"""

from __future__ import annotations

import math

import torch

from sakd.align.tokens import encode_with_bytes, start_token_id
from sakd.align.vocab import build_vocab_map
from sakd.data.text import bytes_per_token, collate, cut_spans, encode_pair, pad_id, teacher_span_len
from sakd.errors import UserError
from sakd.losses.crosstok import chunk_logprobs, one_to_one_positions

UNITS = {
    "kl_nats_per_position": "mean forward KL(teacher || student) at 1:1 chunks over the shared vocabulary, "
                            "renormalised on both sides; nats per 1:1 position",
    "top1_agreement": "fraction of 1:1 positions where the teacher's top-1 shared token is the student's top-1",
    "top5_agreement": "fraction of 1:1 positions where the teacher's top-1 shared token is in the student's top-5",
    "teacher_mass_outside_shared": "mean teacher probability (full vocabulary) on tokens the student lacks, "
                                   "at 1:1 positions; a fraction",
    "chunk_gap_nats_per_chunk": "mean |log P_teacher(chunk) - log P_student(chunk)| over multi-token chunks; nats",
    "chunk_gap_signed_nats_per_chunk": "mean log P_teacher(chunk) - log P_student(chunk) over multi-token chunks; "
                                       "nats (> 0: the student finds the text less likely)",
    "chunk_gap_bits_per_byte": "sum |log2 P_teacher - log2 P_student| over multi-token chunks / their UTF-8 bytes",
    "frac_student_tokens_one_to_one": "fraction of scored student tokens that form a 1:1 chunk",
    "frac_teacher_tokens_one_to_one": "fraction of scored teacher tokens that form a 1:1 chunk",
}


# ----------------------------------------------------------------------------- pure functions

def one_to_one_stats(s_logits: torch.Tensor, t_logits: torch.Tensor, batch, shared_s: torch.Tensor,
                     shared_t: torch.Tensor, *, t_vocab_size: int | None = None, k: int = 5,
                     chunk_rows: int = 256) -> dict[str, torch.Tensor]:
    """Per 1:1 position (N of them, in ``one_to_one_positions`` order), float64 / bool [N]:
    "kl" = KL(p || q) in nats, "top1" (argmax p == argmax q), "topk" (argmax p in the top-k of q),
    "outside" = teacher probability outside the shared vocabulary (full teacher vocabulary,
    columns >= t_vocab_size dropped), and the index tensors "b", "s_pos", "t_pos".

    s_logits [B, Ls, Vs], t_logits [B, Lt, Vt]; shared_s / shared_t [S] long (same order).
    Rows are processed ``chunk_rows`` at a time, so memory is O(chunk_rows x V) in float64."""
    b, s_pos, t_pos = one_to_one_positions(batch)
    vt = t_logits.shape[-1] if t_vocab_size is None else int(t_vocab_size)
    S = shared_s.numel()
    if S == 0:
        raise UserError("the two tokenizers share no token string: retention over the shared vocabulary is undefined")
    shared_s, shared_t = shared_s.to(s_logits.device), shared_t.to(t_logits.device)
    kk = min(k, S)
    out = {"kl": [], "top1": [], "topk": [], "outside": []}
    for a in range(0, b.numel(), chunk_rows):
        bb, sp, tp = b[a:a + chunk_rows], s_pos[a:a + chunk_rows], t_pos[a:a + chunk_rows]
        s_full = s_logits[bb, sp].double()                       # [n, Vs]
        t_full = t_logits[bb.to(t_logits.device), tp.to(t_logits.device), :vt].double()  # [n, Vt]
        logq = torch.log_softmax(s_full[:, shared_s], -1)        # [n, S] renormalised over shared
        t_shared = t_full[:, shared_t]
        logp = torch.log_softmax(t_shared, -1)
        out["kl"].append((logp.exp() * (logp - logq.to(logp.device))).sum(-1).cpu())
        t_top = logp.argmax(-1).cpu()
        s_top = logq.topk(kk, dim=-1).indices.cpu()              # [n, kk], largest first
        out["top1"].append(s_top[:, 0] == t_top)
        out["topk"].append((s_top == t_top[:, None]).any(-1))
        out["outside"].append((-torch.expm1(torch.logsumexp(t_shared, -1) - torch.logsumexp(t_full, -1))).cpu())
    res = {key: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64 if key in ("kl", "outside")
                                                     else torch.bool) for key, v in out.items()}
    res.update({"b": b.cpu(), "s_pos": s_pos.cpu(), "t_pos": t_pos.cpu()})
    return res


def multi_chunk_logprobs(s_logits: torch.Tensor, t_logits: torch.Tensor, batch, *, s_vocab_size: int | None = None,
                         t_vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log P_teacher, log P_student, select) for every chunk, [B, C] float64 / bool; ``select``
    marks real multi-token chunks (not 1:1, not padding), the only ones whose entries are set.
    Both logits and the batch must be on one device."""
    mask = batch["chunk_mask"]
    one = (batch["chunk_s_end"] - batch["chunk_s_start"] == 1) & (batch["chunk_t_end"] - batch["chunk_t_start"] == 1)
    sel = mask & ~one
    C = mask.shape[1]
    # float32 inside (a float64 copy of [B, L, V] logits would not fit for real vocabularies).
    lp_s = chunk_logprobs(s_logits, batch["s_ids"], batch["s_chunk"], C, select=sel, vocab_size=s_vocab_size)
    lp_t = chunk_logprobs(t_logits, batch["t_ids"], batch["t_chunk"], C, select=sel, vocab_size=t_vocab_size)
    return lp_t.double().cpu(), lp_s.double().cpu(), sel.cpu()


# ----------------------------------------------------------------------------- text -> batches

def chunk_bytes(item: dict, byte_ends: list[int]) -> list[int]:
    """UTF-8 bytes of each chunk of an ``encode_pair`` item: the student token spans it covers
    (token k ends at byte_ends[k]; the start token ends at byte 0)."""
    return [byte_ends[se - 1] - byte_ends[ss - 1] for ss, se, _, _ in item["chunks"]]


def encode_spans(texts: list[str], s_tok, t_tok, seq_len: int, teacher_seq_len: int) -> list[dict]:
    """Spans of ``texts`` sized like the training spans (sakd.train.distill.setup), each encoded by both
    tokenizers with ``encode_pair``, with the UTF-8 bytes of every chunk under "chunk_bytes"."""
    sample = [t for t in texts if t.strip()]
    if not sample:
        raise UserError("retention: no held-out text to score (empty or only whitespace)")
    bpt = min(bytes_per_token(s_tok, sample) * (seq_len - 1), bytes_per_token(t_tok, sample) * (teacher_seq_len - 1))
    s_start, t_start = start_token_id(s_tok), start_token_id(t_tok)
    items = []
    for span in cut_spans(sample, max(16, int(0.9 * bpt))):
        item = encode_pair(span, s_tok, t_tok, s_start, t_start, seq_len, teacher_seq_len)
        if not item["chunks"]:
            continue
        enc = encode_with_bytes(s_tok, span, start_token=s_start)
        item["chunk_bytes"] = chunk_bytes(item, enc.byte_ends)
        items.append(item)
    return items


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def retention(teacher, t_tok, student, s_tok, texts: list[str], *, seq_len: int = 256, batch_size: int = 8,
              teacher_seq_len: int | None = None) -> dict:
    """Retention of the teacher's predictions by the student on ``texts`` (see the module docstring).

    seq_len: student tokens per span (the teacher gets the same bytes, at most
    ``teacher_seq_len``, default 2 x seq_len, tokens). Both models run as they are (an MoE
    teacher with its own top-k routing) in eval mode; their training flags are restored.
    Returns a flat dict whose keys carry their units, plus "units" (descriptions); a mean over
    nothing (no 1:1 position, no multi-token chunk) is None."""
    vocab = build_vocab_map(s_tok, t_tok)
    t_seq = teacher_span_len(seq_len, teacher_seq_len)
    items = encode_spans(texts, s_tok, t_tok, seq_len, t_seq)
    s_pad, t_pad = pad_id(s_tok), pad_id(t_tok)
    flags = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    s_dev, t_dev = _device(student), _device(teacher)
    kl, top1, topk, outside = [], [], [], []
    gap_abs = gap_signed = gap_bytes = 0.0
    n_multi = 0
    s_tokens = t_tokens = one_chunks = 0
    bytes_scored = 0
    try:
        for a in range(0, len(items), batch_size):
            part = items[a:a + batch_size]
            batch = collate(part, s_pad, t_pad)
            s_logits = student(input_ids=batch["s_ids"].to(s_dev),
                               attention_mask=batch["s_mask"].long().to(s_dev)).logits
            t_logits = teacher(input_ids=batch["t_ids"].to(t_dev),
                               attention_mask=batch["t_mask"].long().to(t_dev)).logits
            if not (torch.isfinite(t_logits).all() and torch.isfinite(s_logits).all()):
                raise UserError("retention: a model produced non-finite logits (fp16 overflow?); "
                                "evaluate in float32 or bfloat16")
            sb = {k: v.to(s_dev) for k, v in batch.items()}
            st = one_to_one_stats(s_logits, t_logits.to(s_dev), sb, vocab.shared_s, vocab.shared_t,
                                  t_vocab_size=len(t_tok))
            kl.append(st["kl"]); top1.append(st["top1"]); topk.append(st["topk"]); outside.append(st["outside"])
            lp_t, lp_s, sel = multi_chunk_logprobs(s_logits, t_logits.to(s_dev), sb,
                                                   s_vocab_size=min(len(s_tok), s_logits.shape[-1]),
                                                   t_vocab_size=min(len(t_tok), t_logits.shape[-1]))
            diff = (lp_t - lp_s)[sel]
            gap_abs += float(diff.abs().sum())
            gap_signed += float(diff.sum())
            n_multi += int(sel.sum())
            for i, item in enumerate(part):
                for c, (ss, se, ts, te) in enumerate(item["chunks"]):
                    s_tokens += se - ss
                    t_tokens += te - ts
                    if se - ss == 1 and te - ts == 1:
                        one_chunks += 1
                    elif bool(sel[i, c]):
                        gap_bytes += item["chunk_bytes"][c]
                bytes_scored += sum(item["chunk_bytes"])
    finally:
        student.train(flags[0])
        teacher.train(flags[1])
    kl_t, top1_t, topk_t, out_t = (torch.cat(x) for x in (kl, top1, topk, outside))
    n = kl_t.numel()
    none = None  # nothing to average (e.g. no multi-token chunks): None, so that --json stays valid JSON
    return {
        "kl_nats_per_position": float(kl_t.mean()) if n else none,
        "top1_agreement": float(top1_t.double().mean()) if n else none,
        "top5_agreement": float(topk_t.double().mean()) if n else none,
        "teacher_mass_outside_shared": float(out_t.mean()) if n else none,
        "one_to_one_positions": n,
        "chunk_gap_nats_per_chunk": gap_abs / n_multi if n_multi else none,
        "chunk_gap_signed_nats_per_chunk": gap_signed / n_multi if n_multi else none,
        "chunk_gap_bits_per_byte": gap_abs / math.log(2) / gap_bytes if gap_bytes else none,
        "multi_token_chunks": n_multi,
        "multi_token_chunk_bytes": int(gap_bytes),
        "frac_student_tokens_one_to_one": one_chunks / s_tokens if s_tokens else none,
        "frac_teacher_tokens_one_to_one": one_chunks / t_tokens if t_tokens else none,
        "student_tokens": s_tokens,
        "teacher_tokens": t_tokens,
        "bytes_scored": bytes_scored,
        "spans": len(items),
        "shared_vocab": len(vocab),
        "units": dict(UNITS),
    }
