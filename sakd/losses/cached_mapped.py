"""``loss.logit=mapped_kl`` from a teacher cache (sakd/teacher_cache/reader.py) instead of live teacher logits.

The live loss (sakd/losses/mapped.py, ``mapped_kd``) builds, at every student position j with a
target, Q_j(u) = Σ_{v ∈ S, φ(v, k) = u} p_i(v) / Z_j over the candidates S (k = 0: every teacher
token with a student image; k > 0: the byte-prefix range of t_i), then moves the realised path's
mass M_j from the cell φ(t_i, k) to the realised student token t_j (the extension; also where
φ(t_i, k) != t_j, with M_j = p_i(t_i) / Z_j). The cache holds,
at teacher row i - 1, the top-k ids and log-probs at T and the exact rest mass, and per student
token the two scalars that the top-k cannot give: log Z_j (exact: the build sums every candidate)
and log(p_i(t_i) · path_j) (exact), so that M_j = exp(that - log Z_j) is the live value.

From them: the top-k ids that are candidates give the cells Σ p(v)/Z at φ(v, k) (several ids may
land on one cell); the candidates' mass outside the top-k, R_j = 1 - Σ_{top-k cand} p(v)/Z, is one
"rest" bucket; M_j leaves t_i's own share (or, when t_i is outside the top-k, the rest bucket) for
the cell t_j. The loss is the exact forward KL between Q_j and q_j = softmax(s_j / T) coarsened to
the same buckets: the hit cells and "every other student token",

    Σ_c Q_c (log Q_c - log q_c) + R (log R - log q_rest),   q_rest = 1 - Σ_c q_c (a log-sum-exp).

Approximation: only how R spreads over the student's cells is lost (the loss treats it as one
bucket, so by the data-processing inequality it is <= the live KL when R would land outside the hit
cells); with k = V_teacher, R = 0 and the loss equals the live ``mapped_kd`` (tested). Packed caches
add the quantisation of the log-probs (sakd/teacher_cache/codec.py) and fp16 rounding of the scalars.
Forward KL only (the divergence the cache supports; ``check_cached_config``).

A sampled cache (sakd/teacher_cache/sampled.py; ``token_logprob_T`` in the cache batch) holds N draws
from p_i with counts instead of the top-k. Q_j is linear in p_i, so putting count_v / N in place of
p_i(v) gives an unbiased Q̂_j cell by cell, PROVIDED it is not renormalised (Z_j is exact, stored; no
"rest", no division by Σ Q̂, which is 1 only on average: a ratio estimator would be biased at finite N).
The extension moves M_j out of t_i's own cell; against a sampled share that needs a clamp
(min(M_j, count/N/Z)), which is biased, so t_i's share is taken EXACTLY from the stored log p_T(t_i)
(``token_logprob_T``) and the draws of t_i itself are dropped: Q̂_j = p_i(t_i)/Z at φ(t_i, k) (M_j of it
moved to t_j: M_j <= p_i(t_i)/Z, no clamp binds) + Σ_{v ≠ t_i drawn} count_v/(N Z) at φ(v, k).
E[Q̂_j] = Q_j, and the student gradient, Σ_c Q̂_c · q - Q̂ (``sparse_forward_kl_kernel``), is linear in
Q̂: unbiased. The loss value is the plug-in KL of the draws (not unbiased; a constant for the student).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sakd.align.mapping import MappingTables
from sakd.losses.divergences import sparse_forward_kl_kernel
from sakd.losses.mapped import MappedPositions, mapped_positions
from sakd.losses.row_blocks import check_settings, RowBlockLoss


def cached_positions(s_logits: torch.Tensor, batch, tables: MappingTables, temperature: float, chunk_rows: int,
                     positions: MappedPositions | None):
    """What every cached every-position loss starts with: the settings checked, its positions (``positions`` or
    ``mapped_positions``) and their count on the student's device, and the loss to return at once when there
    are none (a zero that keeps the graph; else None). Returns (positions, n, empty loss or None)."""
    check_settings(temperature, "sum", chunk_rows)
    pos = mapped_positions(batch, tables) if positions is None else positions
    n = torch.tensor(len(pos), dtype=torch.long, device=s_logits.device)
    return pos, n, (s_logits[:, :0].sum().float() if len(pos) == 0 else None)


@torch.no_grad()
def cached_mapped_targets(cache_batch: dict, batch, tables: MappingTables, pos: MappedPositions, vs: int, *,
                          extend: bool = True):
    """The bucketed target of every position in ``pos``: (student columns [N, W] long, distinct per
    row, log Q [N, W] (-inf: no mass), log R [N]). Columns >= vs are padding (no mass). W = k + 1 (a sampled
    cache: k + 2, the realised token's exact share; log R = -inf)."""
    dev = cache_batch["topk_ids"].device
    p = MappedPositions(**{f: getattr(pos, f).to(dev) for f in pos.__dataclass_fields__})
    tab = tables.to(dev) if tables.phi.device != dev else tables
    ids = cache_batch["topk_ids"][p.b, p.i - 1]                                  # [N, k] teacher row i - 1
    lp = cache_batch["topk_logprobs"][p.b, p.i - 1].float()                       # [N, k] at T
    logz = cache_batch["mapped_logz"][p.b, p.j].float()                           # [N]
    path = cache_batch["mapped_path"][p.b, p.j].float()                           # [N]
    s_tok = batch["s_ids"].to(dev)[p.b, p.j]
    sampled = "token_logprob_T" in cache_batch
    if sampled:  # the realised teacher token t_i: its exact share replaces its draws (module docstring)
        t_i = batch["t_ids"].to(dev)[p.b, p.i]
        own = cache_batch["token_logprob_T"][p.b, p.i].float()                  # log p_T(t_i) at row i - 1
        ids = torch.cat([ids, t_i[:, None]], 1)
        lp = torch.cat([lp.masked_fill(ids[:, :-1] == t_i[:, None], -math.inf), own[:, None]], 1)
    n, k = ids.shape
    if tables.identity:  # one tokenizer: plain KD, every column a candidate, Z = 1
        sid, valid, logz = ids, torch.isfinite(lp), torch.zeros_like(logz)
        t_tok = s_tok
        src_ok = torch.zeros_like(p.ext)
    else:
        t_tok = batch["t_ids"].to(dev)[p.b, p.i]
        inv = torch.full((tab.offset.numel() - 1,), -1, dtype=torch.long, device=dev)
        inv[tab.sorted_ids] = torch.arange(tab.sorted_ids.numel(), device=dev)
        rank = inv[ids]
        f = tab.offset[t_tok] + p.k                                               # (t_i, k)
        in_range = (rank >= (tab.lo[f] + tab.eq[f])[:, None]) & (rank < tab.hi[f][:, None])
        cand = torch.where((p.k == 0)[:, None], rank >= 0, in_range)
        sid = tab.phi[(tab.offset[ids] + p.k[:, None]).clamp(max=tab.phi.numel() - 1)]
        valid = cand & (sid >= 0) & torch.isfinite(lp)
        src = tab.phi[f]
        src_ok = (p.ext | (src != s_tok)) & (src >= 0)  # as the live loss: past t_i, or φ(t_i, k) != t_j
    good = torch.isfinite(logz)
    valid &= good[:, None]
    mass = torch.where(valid, (lp - logz.masked_fill(~good, 0)[:, None]).exp(), torch.zeros_like(lp))
    rest = torch.zeros_like(logz) if sampled else (1 - mass.sum(1)).clamp_min(0)
    extra = torch.where(good, torch.zeros_like(logz), torch.ones_like(logz))      # Z = 0: the realised token
    if extend:
        e = src_ok & good & torch.isfinite(path)
        m = torch.where(e, (path - logz.masked_fill(~good, 0)).exp(), torch.zeros_like(path))
        own = valid & (ids == t_tok[:, None])                                     # t_i's share of φ(t_i, k)
        has = own.any(1)
        m = torch.where(has, torch.minimum(m, (mass * own).sum(1)), torch.minimum(m, rest))
        mass = mass - own * m[:, None]
        rest = torch.where(has, rest, rest - m)
        extra = extra + m
    cols = torch.cat([torch.where(valid, sid, vs + torch.arange(k, device=dev)), s_tok[:, None]], 1)
    vals = torch.cat([mass, extra[:, None]], 1)
    cols = torch.where(vals > 0, cols, vs + torch.arange(k + 1, device=dev))      # massless slots: padding
    if not sampled:  # top-k: the rounding of the stored log-probs renormalised away; sampled: unbiased as it is
        total = vals.sum(1) + rest
        vals, rest = vals / total[:, None], rest / total
    # One bucket per distinct student column: sort, then sum the masses of equal neighbours.
    cols, order = cols.sort(1)
    vals = vals.gather(1, order)
    head = torch.ones_like(cols, dtype=torch.bool)
    head[:, 1:] = cols[:, 1:] != cols[:, :-1]
    seg = head.long().cumsum(1) - 1
    W = cols.shape[1]
    out_c = (vs + W + torch.arange(W, device=dev)).expand(n, W).clone()          # unused slots: fresh padding
    out_c.scatter_(1, seg, cols)
    out_v = torch.zeros_like(vals).scatter_add_(1, seg, vals)
    return out_c, out_v.log(), rest.log()


def cached_mapped_kd(s_logits: torch.Tensor, cache_batch: dict, batch, tables: MappingTables, *,
                     temperature: float = 1.0, chunk_rows: int = 1024, extend: bool = True,
                     positions: MappedPositions | None = None):
    """Σ_j KL(Q_j ‖ q_j) over every student position with a mapped_kl target, from the cache
    (module docstring). s_logits [B, Ls, Vs]; cache_batch from ``TeacherCache.batch`` (one routing
    view); the positions and their count are those of ``mapped_kd`` (same ``mapped_positions``).
    Never builds [N, V_teacher]; the student rows are walked in row blocks of ``chunk_rows``.
    Returns (loss_sum, n positions)."""
    pos, n, empty = cached_positions(s_logits, batch, tables, temperature, chunk_rows, positions)
    if empty is not None:
        return empty, n
    dev = s_logits.device
    B, Ls, vs = s_logits.shape
    cols, log_q, log_rest = cached_mapped_targets(cache_batch, batch, tables, pos, vs, extend=extend)
    cols, log_q, log_rest = cols.to(dev), log_q.to(dev), log_rest.to(dev)
    pad = 2 * cols.shape[1]  # padding columns vs .. vs + 2W - 1: -inf logits, no mass on either side

    def kernel(parts, T, need):
        s, c, lq, lr = parts
        s = F.pad(s.float(), (0, pad), value=-math.inf)
        loss, (g,) = sparse_forward_kl_kernel([s, c, lq, lr], T, need)
        return loss, (g[:, :vs] if g is not None else None,)

    s_rows = (pos.b * Ls + pos.j - 1).to(dev)
    none = (None, None)
    loss = RowBlockLoss.apply(kernel, 1, ((s_rows, None), none, none, none), len(pos), chunk_rows,
                              float(temperature), None, s_logits.flatten(0, 1), cols, log_q, log_rest)
    return loss, n
