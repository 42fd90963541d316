"""The sampled teacher cache (``sakd cache-teacher --codec sampled``): N tokens drawn from the teacher.

Instead of the k most likely ids (top-k: a biased picture of the teacher, its tail cut and its head
renormalised), every teacher position j stores N = ``draws`` ids drawn WITH REPLACEMENT from the
teacher's distribution at the KD temperature T, p_T = softmax(logits_j / T), as (id, count) pairs, one
pair per distinct id. The counts are multinomial, so

    E[count_v / N] = p_T(v)      for every id v, and Σ_v count_v / N = 1 in every draw,

and any loss LINEAR in the teacher's probabilities (the cross-entropy Σ_v p(v) · (-log q(v)), whose
student gradient is that of the forward KL) is estimated without bias by putting count_v / N in place of
p(v). This is the Random-Sampling KD of Anshumann et al., "Sparse Logit Sampling: Accelerating
Knowledge Distillation in LLMs" (ACL 2025, arXiv 2503.16870): with the teacher itself as the proposal,
the importance weights are the empirical frequencies and the expected gradient is the full-KD gradient;
about 12 samples per position matched full KD in their pre-training runs. ``DRAWS`` = 12 follows them.

What each loss needs from the cache beyond the counts (sakd/losses/cached.py, cached_mapped.py,
projected.py say how it is used):

    shared_logmass    log M_j = log Σ_{v ∈ shared} p_T(v), EXACT (computed from the logits at build
                      time). shared_kl renormalises the teacher over the shared columns; dividing the
                      sampled shared counts by the exact M (not by their own sum, a ratio estimator
                      biased at finite N) keeps every target weight unbiased: E[count_v / (N M)] = p_v / M.
    token_logprob_T   log p_T(t_{j+1}) at row j (at T; stored only when T != 1, else token_logprob is
                      it): mapped_kl / projected_kl give the realised teacher token's own cell its EXACT
                      mass p(t_i) / Z and use the draws only for the other candidates, so that the
                      realised path's mass M_j can be moved out of that cell (M_j <= p(t_i) / Z) without
                      a clamp (a clamp against a sampled share would be biased).

Z_j (``mapped_logz``) and M_j (``mapped_path``) are exact scalars already (sakd/teacher_cache/manifest.py).

Layout on disk (per shard; a span's entries are byte-aligned so that a span is a byte slice):
    entries      uint8: per distinct (position, id), ``id_bits(V) + count_bits(N)`` bits, the value
                 (id << count_bits) | (count - 1), least significant bit first; positions in order,
                 ids ascending inside a position. A position's counts sum to N, which is how the
                 decoder finds where each position ends: nothing per position is stored.
    e_offsets    int64 [spans + 1]: entries before each span;  b_offsets: bytes before each span.
Qwen3's 151,936 ids take 18 bits, N = 12 counts 4 bits: 22 bits per distinct id, at most 33 bytes a
position (when all 12 draws differ), plus the scalars (fp16): shared_logmass, token_logprob,
mapped_logz per student token (and token_logprob_T when T != 1).

The draws are reproducible: inverse-CDF sampling (float64 cumulative sums) of uniforms from a CPU
generator seeded by (train.seed, the span, the routing sample): the same cache whichever process builds
it, and after a resume (up to the logits themselves: another device or batch size can move a draw that
lies within float rounding of a CDF step).
"""

from __future__ import annotations

import hashlib
import math

import torch

from sakd.teacher_cache.codec import from_bits, pack_bits, to_bits, unpack_bits

DRAWS = 12  # Anshumann et al. (ACL 2025): ~12 sampled tokens per position match full KD


def id_bits(vocab: int) -> int:
    return max(1, (vocab - 1).bit_length())


def count_bits(draws: int) -> int:
    return max(1, (draws - 1).bit_length())  # count - 1 in [0, N - 1]


def bytes_per_token(vocab: int, draws: int, temperature: float, samples: int = 1,
                    student_per_teacher: float = 1.15) -> float:
    """At most this many bytes per teacher token (every draw a distinct id)."""
    scalars = 2 + 2 + (2 if temperature != 1.0 else 0)
    return samples * (draws * (id_bits(vocab) + count_bits(draws)) / 8 + scalars + 2 * student_per_teacher)


def uniforms(seed: int, span: int, sample: int, n: int, draws: int) -> torch.Tensor:
    """[n, draws] float64 uniforms of one span's draws, from a CPU generator seeded by a hash of (train.seed,
    the span's index, the KA routing sample): unrelated to the KA routing draws, and the same whichever
    batch, process or device computes the span."""
    h = hashlib.sha256(f"sakd-sampled-cache:{seed}:{span}:{sample}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") >> 1)
    return torch.rand(n, draws, generator=g, dtype=torch.float64)


def draw(logp: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: logp [n, V] log-probabilities, uniforms [n, N] float64 in [0, 1) -> ids [n, N]
    long, ascending per row. An id with probability 0 is never drawn (its CDF step is empty)."""
    cdf = logp.double().exp().cumsum(-1)
    cdf = cdf / cdf[:, -1:]  # the last step ends at 1 exactly
    ids = torch.searchsorted(cdf, uniforms.to(cdf.device, torch.float64).contiguous(), right=True)
    return ids.clamp_(max=logp.shape[-1] - 1).sort(-1).values


def sampled_rows(logits: torch.Tensor, next_ids: torch.Tensor, shared_mask: torch.Tensor, *, temperature: float,
                 uniforms: torch.Tensor) -> dict:
    """The sampled cache's quantities of n teacher positions from their logits [n, Vt]: the draws
    (``draw_ids`` [n, N]), log M (``shared_logmass``), log p(next_ids) at 1 and at T, and the row's top
    log-prob (only to check that the logits were finite)."""
    x = logits.float()
    logp = torch.log_softmax(x / temperature, -1)
    lp1 = logp if temperature == 1.0 else torch.log_softmax(x, -1)
    return {"draw_ids": draw(logp, uniforms), "top_logprob": logp.max(-1).values,
            "shared_logmass": torch.logsumexp(logp.masked_fill(~shared_mask, -math.inf), -1),
            "next_logprob": lp1.gather(-1, next_ids[:, None]).squeeze(-1),
            "next_logprob_T": logp.gather(-1, next_ids[:, None]).squeeze(-1)}


# ----------------------------------------------------------------------------- entries

def unique_counts(draw_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, N] ascending draws -> (distinct ids [E], their counts [E]) in row-major order."""
    R, N = draw_ids.shape
    head = torch.ones_like(draw_ids, dtype=torch.bool)
    head[:, 1:] = draw_ids[:, 1:] != draw_ids[:, :-1]
    start = head.flatten().nonzero().squeeze(1)  # every row starts with a head: no run crosses rows
    counts = torch.diff(start, append=torch.tensor([R * N], device=start.device))
    return draw_ids.flatten()[start], counts


def encode_entries(draw_ids: torch.Tensor, vocab: int, draws: int) -> tuple[torch.Tensor, int]:
    """One span's draws [R, N] (ascending per row) -> (packed entries uint8 [bytes], number of entries)."""
    ids, counts = unique_counts(draw_ids.long())
    cb = count_bits(draws)
    value = (ids << cb) | (counts - 1)
    return pack_bits(to_bits(value[None], id_bits(vocab) + cb))[0], int(ids.numel())


def decode_entries(data: torch.Tensor, n_entries: int, n_rows: int, vocab: int,
                   draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``encode_entries``: (ids [R, N] long, log(count / N) [R, N] float32). Each row's
    distinct ids first, ascending; its unused slots hold ids that are not in the row (distinct, so that
    a scatter over a row never writes one column twice) with log-prob -inf."""
    cb, w = count_bits(draws), id_bits(vocab) + count_bits(draws)
    value = from_bits(unpack_bits(data[None], n_entries * w), w, n_entries)[0]
    ids, counts = value >> cb, (value & ((1 << cb) - 1)) + 1
    start = counts.cumsum(0) - counts                                     # draws before each entry
    row = start // draws
    e = torch.arange(n_entries)
    first = torch.where(start % draws == 0, e, torch.zeros_like(e)).cummax(0).values
    slot = e - first                                                      # the entry's place in its row
    out_ids = torch.full((n_rows, draws), -1, dtype=torch.long)
    out_lp = torch.full((n_rows, draws), -math.inf)
    out_ids[row, slot] = ids
    out_lp[row, slot] = (counts.float() / draws).log()
    # Padding: the first free ids among 0 .. 2N - 1 (at most N of them are taken by a row).
    cand = torch.arange(2 * draws)
    taken = (cand[None, :, None] == out_ids[:, None, :]).any(-1)          # [R, 2N]
    free = cand[taken.int().argsort(dim=1, stable=True)]                      # free candidates first
    used = (out_ids >= 0).sum(1, keepdim=True)
    k = torch.arange(draws)[None, :]
    pad = free.gather(1, (k - used).clamp(min=0))
    out_ids = torch.where(k < used, out_ids, pad)
    return out_ids, out_lp


def encode_spans(parts: list, vocab: int, draws: int, samples: int) -> dict:
    """The shard's entries: each span's draws (rows position-major, sample-minor) encoded, byte-aligned."""
    data, e_off, b_off = [], [0], [0]
    for p in parts:
        d = torch.stack([p[m]["draw_ids"] for m in range(samples)], 1).flatten(0, 1)  # [n * M, N]
        b, n = encode_entries(d, vocab, draws)
        data.append(b)
        e_off.append(e_off[-1] + n)
        b_off.append(b_off[-1] + b.numel())
    return {"entries": torch.cat(data), "e_offsets": torch.tensor(e_off, dtype=torch.int64),
            "b_offsets": torch.tensor(b_off, dtype=torch.int64)}
