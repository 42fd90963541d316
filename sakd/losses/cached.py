"""Logit losses from a sparse teacher cache (``sakd/teacher_cache/reader.py``) instead of live teacher logits.

The cache holds, per teacher position j (the distribution that predicts token j + 1):

    topk_ids [k], topk_logprobs [k]   the teacher's k most likely ids and log p_T(id) at the KD temperature T
    rest_logprob                      log Σ_{v ∉ top-k} p_T(v)                     (at T)
    shared_rest_logprob               log Σ_{v ∈ shared, v ∉ top-k} p_T(v)          (at T; shared = vocabulary map)
    token_logprob (per token j ≥ 1)   log P_T(t_ids[j] | t_ids[<j]) at temperature 1 (0 for j = 0 and padding)

and ``TeacherCache.batch`` returns them padded like a collated batch's teacher side. Nothing here
ever builds a [rows, V_teacher] tensor. Same return conventions as ``sakd.losses.crosstok``:
``(loss_sum, n)`` with n an int64 0-dim tensor.
"""

from __future__ import annotations

import math

import torch

from sakd.errors import UserError
from sakd.losses.baselines import GOLD_CHUNK_ROWS, gold_hybrid_parts, gold_weights
from sakd.losses.batch import count as _count, field as _field
from sakd.losses.crosstok import (alm_from_chunk_logprobs, alm_selection, chunk_logprobs,
                                  one_to_one_positions)
from sakd.losses.divergences import compute_dtype, sparse_forward_kl


def shared_positions(shared_t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Position of each teacher id in the shared list (shared_t[pos] == id), -1 where the id is not shared.

    ids: any shape, long. The lookup table has max(shared_t) + 1 entries (not [rows, V])."""
    size = int(shared_t.max()) + 1
    table = torch.full((size,), -1, dtype=torch.long, device=shared_t.device)
    table[shared_t] = torch.arange(shared_t.numel(), device=shared_t.device)
    inside = ids < size
    return torch.where(inside, table.to(ids.device)[ids.clamp(max=size - 1)], torch.full_like(ids, -1))


def cached_shared_kd(s_logits: torch.Tensor, cache_batch: dict, batch, shared_s: torch.Tensor,
                     shared_t: torch.Tensor, *, temperature: float = 1.0, chunk_rows: int = 1024):
    """Forward KL on the shared vocabulary at 1:1 chunks, from a top-k teacher cache.

    The dense loss (``crosstok.shared_vocab_kd``, forward_kl) compares, at every 1:1 chunk,
    p = softmax(t[shared_t] / T) and q = softmax(s[shared_s] / T) over the S shared strings. From the
    cache, with A = the teacher's top-k ids that are shared (mapped to their shared position) and
    U = shared_rest mass (shared ids outside the top-k; stored exactly by the cache writer):

        M        = Σ_{a∈A} p_T(a) + U                  teacher mass on the shared vocabulary (exact)
        p̂_a      = p_T(a) / M   (a ∈ A),   p̂_rest = U / M                  (|A| + 1 buckets, sum 1)
        q̂_a      = q(a)         (a ∈ A),   q̂_rest = 1 - Σ_A q(a)   (student shared mass off A, as a
                                                                     log-sum-exp, not 1 - Σ)
        loss     = Σ_a p̂_a (log p̂_a - log q̂_a) + p̂_rest (log p̂_rest - log q̂_rest)

    i.e. the exact KL between the two shared-vocabulary distributions coarsened to the same |A| + 1
    buckets. Approximation: the only information lost is how the teacher's shared mass U outside
    its top-k is spread over individual ids — the loss treats it as one bucket, so by the
    data-processing inequality it is <= the dense loss, with equality when every shared id with
    teacher mass is in the top-k (in particular k = V_teacher; then U = 0 and q̂_rest = 0).
    The renormalisation by M is exact (not estimated), because the cache stores U. Teacher top-k
    ids outside the shared vocabulary drop out, as in the dense loss. Log-probs rounded to fp16 in
    the cache add |Δ log p| ≲ 1e-3 per bucket.

    Shapes: s_logits [B, Ls, Vs]; cache_batch from ``TeacherCache.batch`` (topk_ids [B, Lt, k],
    topk_logprobs [B, Lt, k], shared_rest_logprob [B, Lt]); shared_s/shared_t [S]. T divides the
    student logits here; the cache's log-probs are already at T (the manifest records it).
    Materialises the student's [N, S] shared rows as the dense loss does; the teacher side stays
    [N, k]. Gradient: student only. Returns (loss_sum, n) with n = number of 1:1 chunks, the same
    count as ``shared_vocab_kd``.

    A sampled cache (sakd/teacher_cache/sampled.py; ``shared_logmass`` in ``cache_batch``): the ids are
    the N draws from p_T, log p their log(count / N), U = 0, and M is the EXACT log-mass stored by the
    builder, not the draws' own shared sum (that ratio would be biased at finite N). Then
    p̂_a = count_a / (N M) has E[p̂_a] = p_T(a) / M, the dense target, for every shared id a, and the
    student gradient of the loss, Σ_a p̂_a · q - p̂ (sparse_forward_kl_kernel: "P q - p"), is linear in
    p̂: its expectation is the dense gradient q - p (Anshumann et al., ACL 2025). Σ_a p̂_a is 1 only on
    average; the loss value is the plug-in KL of the draws (the teacher's entropy estimated from them),
    not an unbiased estimate of the dense value, which is a constant for the student."""
    b, s_pos, t_pos = one_to_one_positions(batch)
    n = b.numel()
    S = shared_s.numel()
    if n == 0 or S == 0:
        # An exact 0 that still belongs to the graph (an empty gather: no NaN from inf logits).
        return s_logits[b, s_pos, :0].sum().float(), _count(n, s_logits)
    dev = s_logits.device
    shared_s, shared_t = shared_s.to(dev), shared_t.to(dev)
    b, s_pos, t_pos = b.to(dev), s_pos.to(dev), t_pos.to(dev)
    ids = cache_batch["topk_ids"].to(dev)[b, t_pos]                                  # [N, k]
    lp = cache_batch["topk_logprobs"].to(dev)[b, t_pos].float()                      # [N, k]
    u = cache_batch["shared_rest_logprob"].to(dev)[b, t_pos].float()                 # [N]
    k = ids.shape[-1]
    pos = shared_positions(shared_t, ids)                                            # [N, k]
    valid = pos >= 0
    lp = lp.masked_fill(~valid, -math.inf)
    if "shared_logmass" in cache_batch:  # a sampled cache: divide by the exact M (docstring), no rest bucket
        log_m = cache_batch["shared_logmass"].to(dev)[b, t_pos].float()
    else:
        log_m = torch.logsumexp(torch.cat([lp, u[:, None]], 1), 1)                   # [N]
    empty = torch.isinf(log_m)  # no teacher mass on the shared vocabulary: the row contributes 0
    log_m = log_m.masked_fill(empty, 0.0)
    lp_hat = (lp - log_m[:, None]).masked_fill(empty[:, None], -math.inf)
    rest_hat = (u - log_m).masked_fill(empty, -math.inf)
    # Non-shared top-k slots point at k extra -inf student columns (one per slot, so ids stay
    # distinct per row): q = 0 there, so they leave the student's rest bucket unchanged, and p = 0.
    s_rows = s_logits[b[:, None], s_pos[:, None], shared_s[None, :]]                # [N, S]
    pad = torch.full((n, k), -math.inf, dtype=s_rows.dtype, device=dev)
    col = torch.where(valid, pos, S + torch.arange(k, device=dev)[None, :])
    loss = sparse_forward_kl(torch.cat([s_rows, pad], 1), col, lp_hat, rest_hat, None, temperature,
                             reduction="sum", chunk_rows=chunk_rows)
    return loss, _count(n, s_logits)


def cached_chunk_logprobs(cache_batch: dict, batch, select: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher log-likelihood of every chunk from the cache: [B, C],
    log P_T(c) = Σ_{teacher tokens j in c} token_logprob[j] (the same sum ``crosstok.chunk_logprobs``
    computes from logits; token_logprob[j] is already log P_T(t_j | t_<j) at temperature 1)."""
    tok_chunk = _field(batch, "t_chunk")
    tl = cache_batch["token_logprob"].to(tok_chunk.device).float()
    C = _field(batch, "chunk_mask").shape[1]
    tok = tok_chunk >= 0
    tok[:, 0] = False
    if select is not None:
        tok &= select.gather(1, tok_chunk.clamp(min=0))
    b, j = tok.nonzero(as_tuple=True)
    out = tl.new_zeros(tl.shape[0], C)
    return out.index_put((b, tok_chunk[b, j]), tl[b, j], accumulate=True)


def cached_chunk_likelihood(s_logits: torch.Tensor, cache_batch: dict, batch, *, temperature: float = 100.0,
                            only_multi: bool = True, weight: str = "student_tokens", subtract_entropy: bool = True,
                            epsilon: float = 1e-6, chunk_rows: int = 1024):
    """``crosstok.chunk_likelihood_loss`` (ALM, binary-CE form) with the teacher's chunk log-probs
    read from the cache (``cached_chunk_logprobs``) instead of computed from teacher logits.
    Same arguments (``temperature`` is the ALM binarisation temperature, loss.chunk_temperature),
    same formula, same return value (loss_sum, weight_sum)."""
    mask, n_s, n_t, sel = alm_selection(batch, weight, temperature, only_multi)
    lp_s = chunk_logprobs(s_logits, _field(batch, "s_ids"), _field(batch, "s_chunk"), mask.shape[1], select=sel,
                          chunk_rows=chunk_rows)
    lp_t = cached_chunk_logprobs(cache_batch, batch, sel).to(device=lp_s.device, dtype=lp_s.dtype)
    return alm_from_chunk_logprobs(lp_s, lp_t, n_s, n_t, sel, temperature=temperature, weight=weight,
                                   subtract_entropy=subtract_entropy, epsilon=epsilon)


def cached_gold_kd(s_logits: torch.Tensor, cache_batch: dict, batch, shared_s: torch.Tensor, shared_t: torch.Tensor,
                   *, vt: int, temperature: float = 1.0, beta: float = 0.5,
                   chunk_rows: int = GOLD_CHUNK_ROWS):
    """BASELINE — GOLD's hybrid ULD loss at 1:1 chunks (``baselines.gold_hybrid_loss``) from a top-k cache.

    The teacher's row at each 1:1 position is its top-k log-probs (at T, as cached) and probability 0 on the
    other V_t - k ids: a TOP-K-TRUNCATED teacher p̃ (p̃ = p_T on the top-k, 0 elsewhere, NOT renormalised:
    Σ p̃ = 1 - R, R = exp(rest_logprob)), in the live loss's formula (``baselines.gold_hybrid_parts``; the JSD
    counts 0 · log 0 = 0). The [N, V_t] row is never built: its shared columns are the top-k ids that are
    shared, put at their shared positions ([N, S], -inf elsewhere), and its other columns enter the sorted L1
    as the k top-k values off the shared vocabulary (the zeros it leaves out pair with zeros). With k = V_t
    it is the live loss.
    Bound against the full-logit loss, per row, with U = exp(shared_rest_logprob) (teacher mass on shared
    ids outside the top-k) and R - U (on the other ids): sorting is a contraction in L1, so the unmatched
    sorted L1 moves by at most R - U; for 0 < beta < 1 the matched JSD's derivative in p_i is
    beta · log(p_i / m_i) (m = beta p + (1 - beta) q ≤ 1), so it moves by at most beta · U · (1 + ln(1/beta) +
    ln(S / U)) (S = shared ids): a term of order the rest mass (times a log), 0 when the top-k holds all the
    mass. beta = 0 (KL(p‖q) on the shared part) moves by Σ_{shared ∉ top-k} p_i log(p_i / q_i), not bounded by
    U alone; beta = 1 (KL(q‖p̃)) is +inf, refused by ``check_cached_config``. A sampled cache is refused:
    its log(count / N) would enter the nonlinear loss (sorting, JSD) biased.

    Shapes: s_logits [B, Ls, Vs]; cache_batch from ``TeacherCache.batch`` (topk_ids, topk_logprobs [B, Lt, k]);
    ``vt``: the teacher vocabulary (w_m = S / V_t, as in the live loss). ``chunk_rows`` rows at a time: the
    student's [chunk_rows, Vs] rows, the teacher's [chunk_rows, S + 1]. Gradient: student only.
    Returns (loss_sum, n) with n = number of 1:1 chunks, as ``gold_hybrid_loss``."""
    if "shared_logmass" in cache_batch:
        raise UserError("loss.baseline=gold needs a top-k teacher cache (codec packed or float32), not a sampled "
                        "one: rebuild it with sakd cache-teacher --codec packed, or drop the cache")
    b, s_pos, t_pos = one_to_one_positions(batch)
    n = b.numel()
    if n == 0:  # an exact 0 that still belongs to the graph
        return s_logits[b, s_pos, :0].sum().to(compute_dtype(s_logits)), _count(n, s_logits)
    dev = s_logits.device
    shared_s, shared_t = shared_s.to(dev), shared_t.to(dev)
    b, s_pos, t_pos = b.to(dev), s_pos.to(dev), t_pos.to(dev)
    S, w_m, w_u = shared_t.numel(), *gold_weights(shared_t.numel(), vt)
    dtype = compute_dtype(s_logits)
    rest_s = torch.ones(s_logits.shape[-1], dtype=torch.bool, device=dev)
    rest_s[shared_s] = False
    ids = cache_batch["topk_ids"].to(dev)[b, t_pos]                                   # [N, k]
    lp = cache_batch["topk_logprobs"].to(dev)[b, t_pos].to(dtype)                    # [N, k]
    pos = shared_positions(shared_t, ids) if S else torch.full_like(ids, -1)         # [N, k], -1: not shared
    total = s_logits.new_zeros((), dtype=dtype)
    for a in range(0, n, chunk_rows):
        i = slice(a, a + chunk_rows)
        log_q = torch.log_softmax(s_logits[b[i], s_pos[i]].to(dtype) / temperature, -1)
        shared = pos[i] >= 0
        # column S takes the non-shared slots (all -inf there, whatever the write order), then is dropped
        log_p_shared = torch.full((log_q.shape[0], S + 1), -math.inf, dtype=dtype, device=dev)
        log_p_shared.scatter_(1, pos[i].masked_fill(~shared, S), lp[i].masked_fill(~shared, -math.inf))
        p_rest = lp[i].masked_fill(shared, -math.inf).exp()                          # [rows, k]
        total = total + gold_hybrid_parts(log_q[:, shared_s], log_p_shared[:, :S], log_q[:, rest_s].exp(), p_rest,
                                          beta=beta, w_m=w_m, w_u=w_u).sum()
    return total, _count(n, s_logits)
