"""How the teacher cache stores one position's top-k teacher distribution (``sakd/teacher_cache/reader.py``).

Two codecs, both fixed width per position (a span is a row slice; decoding is vectorised):

``packed`` (the default), about 146 bytes for k = 64 ids of Qwen3's 151,936 columns:
  * the k ids as a SET, Elias-Fano coded (Elias 1974; Fano 1971; as in Vigna, "Quasi-succinct
    indices", WSDM 2013): sorted ascending, each id split into L = floor(log2(V / k)) low bits
    (stored as they are) and its high part, written in unary into a bit vector of k + (V - 1 >> L) + 1
    bits. 2 + log2(V / k) bits per id instead of ceil(log2 V) = 18: the set of 64 of 151,936 ids
    takes 139 + 64 * 11 bits = 106 bytes (the information-theoretic minimum, log2 C(V, k), is 101).
    The order of the ids is not stored; their log-probs give it back.
  * the log-probs in the same (id) order, as 5-bit levels of the distance to the row's top log-prob,
    Δ = top - log p >= 0, on a square-root scale: Δ̂ = (level · s)², s = sqrt(Δ_max) / 31, Δ_max = 24
    nats. Fine steps where the mass is (Δ = 1 ± 0.16, Δ = 0.1 ± 0.05), coarse ones in the tail, whose
    mass is below e^-9 of the top's; the top itself (level 0) is exact. DistillKit (arcee-ai,
    ``distillkit/compression``) stores ids in ceil(log2 V) bits and sorted log-probs as a polynomial
    plus quantised residuals; with the set coded apart from the order, 5 bits per log-prob suffice.
  * the row's top log-prob in float16 (stored beside the row, ``top_logprob``).
  On decoding, the non-top probabilities are rescaled so that the k probabilities and the stored
  rest mass (``rest_logprob``, exact up to fp16) sum to 1: quantisation moves mass between the top-k
  ids, never into or out of them.

``float32``: ids int32 and log-probs float32, exact (for references and tests; 8 bytes per id).
"""

from __future__ import annotations

import math

import torch

LEVEL_BITS = 5
DELTA_MAX = 24.0  # nats below the row's top log-prob: anything further reads as DELTA_MAX
CODECS = ("packed", "float32", "sampled")  # sampled: sakd/teacher_cache/sampled.py


def ef_low_bits(vocab: int, k: int) -> int:
    return max(0, (vocab // k).bit_length() - 1)


def ef_high_bits(vocab: int, k: int) -> int:
    return k + ((vocab - 1) >> ef_low_bits(vocab, k)) + 1


def row_bytes(vocab: int, k: int) -> int:
    """Bytes of one packed row (ids + levels), without the per-position scalars."""
    return math.ceil((ef_high_bits(vocab, k) + k * ef_low_bits(vocab, k) + k * LEVEL_BITS) / 8)


# ----------------------------------------------------------------------------- bits

def to_bits(x: torch.Tensor, width: int) -> torch.Tensor:
    """[N, m] non-negative ints -> [N, m * width] uint8 bits, least significant first."""
    if width == 0:
        return torch.zeros(x.shape[0], 0, dtype=torch.uint8, device=x.device)
    shifts = torch.arange(width, device=x.device)
    return ((x.long()[..., None] >> shifts) & 1).to(torch.uint8).flatten(1)


def from_bits(bits: torch.Tensor, width: int, m: int) -> torch.Tensor:
    """[N, m * width] bits -> [N, m] long."""
    if width == 0:
        return torch.zeros(bits.shape[0], m, dtype=torch.long, device=bits.device)
    b = bits.long().view(bits.shape[0], -1, width)
    return (b << torch.arange(width, device=bits.device)).sum(-1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[N, n] bits -> [N, ceil(n / 8)] uint8."""
    n = bits.shape[1]
    pad = (-n) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    return (bits.view(bits.shape[0], -1, 8).long() << torch.arange(8, device=bits.device)).sum(-1).to(torch.uint8)


def unpack_bits(data: torch.Tensor, n: int) -> torch.Tensor:
    """[N, bytes] uint8 -> [N, n] uint8 bits."""
    bits = (data.long()[..., None] >> torch.arange(8, device=data.device)) & 1
    return bits.flatten(1)[:, :n].to(torch.uint8)


# ----------------------------------------------------------------------------- packed rows

def encode_packed(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N, k] (distinct per row, < vocab), logprobs [N, k] -> (rows [N, row_bytes] uint8,
    top log-prob [N] float32)."""
    n_rows, k = ids.shape
    ids, order = ids.long().sort(-1)
    lp = logprobs.float().gather(1, order)
    top = lp.max(-1).values
    step = math.sqrt(DELTA_MAX) / (2 ** LEVEL_BITS - 1)
    delta = (top[:, None] - lp).clamp(0, DELTA_MAX)
    level = (delta.sqrt() / step).round().long().clamp(0, 2 ** LEVEL_BITS - 1)
    low = ef_low_bits(vocab, k)
    high = torch.zeros(n_rows, ef_high_bits(vocab, k), dtype=torch.uint8, device=ids.device)
    high.scatter_(1, (ids >> low) + torch.arange(k, device=ids.device), 1)
    bits = torch.cat([high, to_bits(ids & ((1 << low) - 1), low), to_bits(level, LEVEL_BITS)], 1)
    return pack_bits(bits), top


def decode_packed(rows: torch.Tensor, top: torch.Tensor, rest_logprob: torch.Tensor, vocab: int,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``encode_packed`` up to the quantisation: (ids [N, k] long ascending,
    log-probs [N, k] float32), rescaled so that Σ p + exp(rest_logprob) = 1 (module docstring)."""
    n_rows = rows.shape[0]
    low, nh = ef_low_bits(vocab, k), ef_high_bits(vocab, k)
    bits = unpack_bits(rows, nh + k * (low + LEVEL_BITS))
    pos = bits[:, :nh].nonzero()[:, 1].view(n_rows, k)  # row-major: each row's k set bits, ascending
    ids = ((pos - torch.arange(k, device=rows.device)) << low) | from_bits(bits[:, nh:nh + k * low], low, k)
    level = from_bits(bits[:, nh + k * low:], LEVEL_BITS, k)
    step = math.sqrt(DELTA_MAX) / (2 ** LEVEL_BITS - 1)
    lp = top.float()[:, None] - (level.float() * step) ** 2
    # Rescale the non-top ids so that the k probabilities + the rest mass sum to 1.
    is_top = level == 0
    p = lp.exp()
    p_top = (p * is_top).sum(-1)
    p_other = (p * ~is_top).sum(-1)
    want = (1 - rest_logprob.float().exp() - p_top).clamp_min(0)
    scale = torch.where(p_other > 0, want / p_other.clamp_min(1e-30), torch.ones_like(p_other))
    lp = torch.where(is_top, lp, lp + scale.clamp_min(1e-30).log()[:, None])
    return ids, lp
