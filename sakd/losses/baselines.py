"""Baselines for the benchmark only (``loss.baseline``, benchmarks/quality.py): never a product loss.

``uld_loss`` (Boizard et al. 2024, sorted-probability L1 at index-matched positions), ``gold_hybrid_loss``
(TRL's GOLD hybrid ULD at 1:1 chunks) and ``truncation_kd`` (teacher
logits cut to the student's first ids: id-by-id, wrong whenever the vocabularies differ, kept to show
it). Same return convention as sakd/losses/crosstok.py: ``(loss_sum, n)``."""

from __future__ import annotations

import math

import torch

from sakd.errors import UserError
from sakd.losses.batch import count as _count, one_to_one_positions
from sakd.losses.divergences import compute_dtype, kd_loss

def _index_matched_positions(s_mask: torch.Tensor, t_mask: torch.Tensor):
    """ULD's position matching: the i-th predicting position of one side against the i-th
    of the other, up to the shorter side's count (per example). Position k predicts token k+1."""
    n = torch.minimum(s_mask[:, 1:].sum(1), t_mask[:, 1:].sum(1))                   # [B]
    L = min(s_mask.shape[1], t_mask.shape[1]) - 1
    keep = torch.arange(L, device=s_mask.device)[None, :] < n[:, None]             # [B, L]
    b, k = keep.nonzero(as_tuple=True)
    return b, k, k


def _sorted_l1(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Σ_i |sort↓(q)_i - sort↓(p)_i| per row, the shorter row padded with zeros."""
    q = q.sort(-1, descending=True).values
    p = p.sort(-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


def uld_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, s_mask: torch.Tensor, t_mask: torch.Tensor, *,
             temperature: float = 1.0, aligned: bool = False, batch=None, t_vocab_size: int | None = None,
             chunk_rows: int = 256):
    """BASELINE — Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer
    Distillation: the Universal Logit Distillation Loss for LLMs", eq. 5): per position,
    Σ_i |sort↓(q_S)_i - sort↓(p_T)_i| with the shorter vocabulary zero-padded (a closed-form
    1-Wasserstein distance with equal transport costs). It ignores which token carries the mass.

    Positions: as in ULD, position-by-INDEX — the i-th predicting position of the student
    against the i-th of the teacher, both truncated to the shorter length. That is not an
    alignment: after the first multi-token chunk the two sides predict different text.
    ``aligned=True`` (needs ``batch``) uses the 1:1 chunk positions instead.

    s_mask / t_mask [B, L] bool include the start token. Teacher detached (baselines
    train the student only). Returns (loss_sum, n positions)."""
    if aligned:
        if batch is None:
            raise UserError("uld_loss(aligned=True) needs the batch (its chunk table)")
        b, s_pos, t_pos = one_to_one_positions(batch)
    else:
        b, s_pos, t_pos = _index_matched_positions(s_mask, t_mask)
    vt = t_logits.shape[-1] if t_vocab_size is None else int(t_vocab_size)
    total = s_logits.new_zeros((), dtype=torch.float32)
    for a in range(0, b.numel(), chunk_rows):
        i = slice(a, a + chunk_rows)
        q = torch.softmax(s_logits[b[i], s_pos[i]].float() / temperature, -1)
        p = torch.softmax(t_logits[b[i], t_pos[i], :vt].detach().float() / temperature, -1)
        total = total + _sorted_l1(q, p).sum()
    return total, _count(b.numel(), s_logits)


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ a (log a - log b) per row, with 0 · log 0 = 0 where log a = -inf (a top-k-truncated teacher's
    columns outside its top-k, sakd/losses/cached.py; never the case for finite logits)."""
    terms = log_a.exp() * (log_a - log_b)
    return torch.where(torch.isneginf(log_a), torch.zeros_like(terms), terms).sum(-1)


def _jsd_on_log_probs(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized JSD per row on given log-probabilities (which need not sum to 1):
    beta·KL(p‖m) + (1-beta)·KL(q‖m), m = beta·p + (1-beta)·q; beta 0 / 1: KL(p‖q) / KL(q‖p)."""
    if beta == 0:
        return _kl_terms(log_p, log_q)
    if beta == 1:
        return _kl_terms(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _kl_terms(log_p, log_m) + (1 - beta) * _kl_terms(log_q, log_m)


def gold_weights(n_shared: int, vt: int, matched_weight: float | None = None,
                 unmatched_weight: float | None = None) -> tuple[float, float]:
    """(w_m, w_u) of the GOLD hybrid loss: TRL's defaults w_m = S / V_t (the shared fraction of the teacher
    vocabulary), w_u = 1 - w_m, unless given."""
    w_m = n_shared / vt if matched_weight is None else float(matched_weight)
    return w_m, 1.0 - w_m if unmatched_weight is None else float(unmatched_weight)


def gold_hybrid_parts(log_q_shared: torch.Tensor, log_p_shared: torch.Tensor, q_rest: torch.Tensor,
                      p_rest: torch.Tensor, *, beta: float, w_m: float, w_u: float) -> torch.Tensor:
    """GOLD's hybrid ULD loss of N rows (TRL ``ULDLoss._compute_hybrid_uld_loss``) from its parts, per row [N]:

        matched   = generalized JSD(beta)(log_q_shared [N, S], log_p_shared [N, S])   (not renormalised)
        unmatched = Σ_i |sort↓(q_rest)_i - sort↓(p_rest)_i|  (zero-padded)
        loss      = w_m · matched + w_u · unmatched

    The rest vectors are probabilities in any column order and of any width: the sorted L1 zero-pads the
    shorter, so columns of probability 0 may be left out. log_p_shared may hold -inf (probability 0: a
    top-k-truncated teacher); the JSD then counts 0 · log 0 = 0 (beta = 1, KL(q‖p), is +inf there). The live
    loss (``gold_hybrid_loss``) and the cached one (``cached.cached_gold_kd``) both call it."""
    matched = _jsd_on_log_probs(log_q_shared, log_p_shared, beta)
    unmatched = _sorted_l1(q_rest, p_rest)
    return w_m * matched + w_u * unmatched


# GOLD's row block, at most (loss.chunk_rows may only lower it): 256 rows was gold_hybrid_loss's own block when
# the loop still ignored loss.chunk_rows, and stayed the ceiling when commit 8fc1a8a ("chunk_rows honoured") passed it.
GOLD_CHUNK_ROWS = 256


def gold_chunk_rows(chunk_rows: int) -> int:
    """GOLD's row block for ``loss.chunk_rows``: that value, at most ``GOLD_CHUNK_ROWS``."""
    return min(int(chunk_rows), GOLD_CHUNK_ROWS)


def gold_hybrid_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, batch, shared_s: torch.Tensor,
                     shared_t: torch.Tensor, *, temperature: float = 1.0, beta: float = 0.5,
                     matched_weight: float | None = None, unmatched_weight: float | None = None,
                     t_vocab_size: int | None = None, chunk_rows: int = GOLD_CHUNK_ROWS):
    """BASELINE — GOLD's hybrid ULD loss (TRL ``trl/experimental/gold``, ``ULDLoss._compute_hybrid_uld_loss``),
    at 1:1 chunk positions only (GOLD also merges multi-token groups into one distribution;
    that is not reproduced here).

    Per position, with q = softmax(s/T) over the student vocabulary and p = softmax(t/T)
    over the teacher's (NOT renormalised on the shared part, as in TRL), ``gold_hybrid_parts``:
        matched   = generalized JSD(beta) between q[shared_s] and p[shared_t]
        unmatched = Σ_i |sort↓(q[rest_s])_i - sort↓(p[rest_t])_i|  (zero-padded)
        loss      = w_m · matched + w_u · unmatched
    TRL's default weights (when None): w_m = S / V_t (the shared fraction of the teacher
    vocabulary), w_u = 1 - w_m. Teacher detached. Returns (loss_sum, n positions)."""
    b, s_pos, t_pos = one_to_one_positions(batch)
    vt = t_logits.shape[-1] if t_vocab_size is None else int(t_vocab_size)
    w_m, w_u = gold_weights(shared_t.numel(), vt, matched_weight, unmatched_weight)
    shared_s, shared_t = shared_s.to(s_logits.device), shared_t.to(t_logits.device)
    rest_s = torch.ones(s_logits.shape[-1], dtype=torch.bool, device=s_logits.device)
    rest_s[shared_s] = False
    rest_t = torch.ones(vt, dtype=torch.bool, device=t_logits.device)
    rest_t[shared_t] = False
    dtype = compute_dtype(s_logits)
    total = s_logits.new_zeros((), dtype=dtype)
    for a in range(0, b.numel(), chunk_rows):
        i = slice(a, a + chunk_rows)
        log_q = torch.log_softmax(s_logits[b[i], s_pos[i]].to(dtype) / temperature, -1)
        log_p = torch.log_softmax(t_logits[b[i], t_pos[i], :vt].detach().to(dtype) / temperature, -1)
        total = total + gold_hybrid_parts(log_q[:, shared_s], log_p[:, shared_t], log_q[:, rest_s].exp(),
                                          log_p[:, rest_t].exp(), beta=beta, w_m=w_m, w_u=w_u).sum()
    return total, _count(b.numel(), s_logits)


def truncation_kd(s_logits: torch.Tensor, t_logits: torch.Tensor, s_mask: torch.Tensor,
                  temperature: float = 1.0, *, chunk_rows: int = 1024):
    """BASELINE, BROKEN ON PURPOSE — the earlier prototype's loss, kept to measure how wrong it is.

    Forward KL between the student's distribution and the teacher's logits cut to the
    first V_s ids, position k against position k (both truncated to the shorter length,
    s_mask[:, 1:] selecting predicting positions). Why it is wrong:
      * ids: teacher id j and student id j name unrelated strings (on the real pair 17 of
        39,237 shared strings have the same id), so the KL pulls the student toward tokens
        chosen by accident of numbering;
      * vocabulary: dropping teacher ids ≥ V_s and renormalising discards real teacher mass
        and inflates the rest;
      * positions: after the first multi-token chunk, position k covers different bytes on
        the two sides, so the two distributions predict different text (and where the
        teacher's text is shorter, student positions meet teacher padding).
    Teacher detached. Returns (loss_sum, n positions)."""
    vs = s_logits.shape[-1]
    if t_logits.shape[-1] < vs:
        raise UserError(f"truncation_kd needs a teacher vocabulary >= the student's ({t_logits.shape[-1]} < {vs})")
    L = min(s_logits.shape[1], t_logits.shape[1])
    mask = s_mask[:, 1:L]
    loss = kd_loss("forward_kl", s_logits[:, :L - 1], t_logits[:, :L - 1, :vs].detach(), mask,
                   temperature=temperature, reduction="sum", chunk_rows=chunk_rows)
    return loss, mask.sum()
