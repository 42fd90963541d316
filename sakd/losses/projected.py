"""``loss.logit=projected_kl``: a teacher target at every student position, compared on the classes the
teacher can speak about: no tokenisation bias, no suppression (issue 19, item 2).

Sources: X-Token's P-KL (arXiv 2605.21699: project the finer distribution onto the coarser partition
before the KL), BPM (arXiv 2607.22334, eqs. 4-6 as in ../shared/RESEARCH.md §6: the teacher's next-token
distribution carried onto the student's tokens through the bytes, and the realised path's mass moved to the
realised token), the chain rule of the KL divergence (Cover & Thomas, Thm. 2.5.3).

Notation as in sakd/losses/mapped.py: student position j (token t_j, bytes [b_j, e_j), predicted by
q_j = softmax(s_{j-1} / T)) lies in teacher token i (k = b_j - a_i bytes already seen, π = bytes(t_i)[:k]),
predicted by p_i = softmax(t_{i-1} / T); S_j = the teacher tokens that start with π and are longer than k
(k = 0: every ordinary teacher token); φ(v, k) = the student token that starts bytes(v)[k:]
(sakd/align/mapping.py). cls(u) = the class of student token u: the longest prefix of its bytes spelt by a
token of φ's image (sakd/align/classes.py; ``"\\nThe"`` is in the class of ``"\\n"``).

Target, on labels (class representatives, plus t_j itself):

    P_j(c) = Σ_{v ∈ S_j, cls(φ(v, k)) = c} p_i(v) / Z_j,      Z_j = Σ_{v ∈ S_j, φ(v, k) exists} p_i(v),

then the realised path's mass M_j = p_i(t_i) / Z_j · Π_{i<l<m} p_l(t_l) · Σ_{v starts with bytes[a_m:e_j]} p_m(v)
(the product only where t_j runs past t_i; mapped_kl's extension, the same M_j) moves from the label
src = cls(φ(t_i, k)) to the label t_j wherever src ≠ t_j: min(M_j, P_j(src)).

Student, on the same partition: the buckets B_c = {u : cls(u) = c}, except that where t_j is not a class
representative and received mass it is its own bucket {t_j} (taken out of B_cls(t_j)); tokens without a
class form one bucket with target 0. With q̄_j(B) = Σ_{u ∈ B} q_j(u),

    L = Σ_j w_j Σ_B P_j(B) log(P_j(B) / q̄_j(B)),     w_j = Z_j if k > 0 else 1.

By the chain rule this is KL over the classes plus, in the realised class c* = cls(t_j),
P_j(c*) · KL((a, 1 - a) ‖ (q(t_j) / q̄(c*), 1 - q(t_j) / q̄(c*))) with a = M_j / P_j(c*): the within-class
distribution is given on the realised path only (BPM's move), the other tokens of a class share its mass as
one bucket and are neither pushed up nor down among themselves. dL/dz_u = w_j q(u) (1 - P(B(u)) / q̄(B(u))).

What the review items of issue 19 became:
1. tokenisation bias: a student token outside φ's image gets its class's mass (it is no longer a zero-target
   token); the realised token gets the realised path's mass even where the teacher's tokenisation of the
   suffix alone differs from the student's in context.
2. suppression: only whole classes the teacher gives no mass are pushed down; nothing inside a class is.
3. the extension: the realised token's share is still the lower bound M_j, but the rest of its class keeps
   the class's remaining mass as a bucket, not zero.
5. inside a teacher token (k > 0) the conditional p(v)/Z_j is weighted by Z_j, the teacher's probability
   of the branch it describes (tokens longer than π; the chain rule of the KL over the teacher token's bytes
   weights each conditional by the probability of its prefix), so a conditional the teacher did not expect
   (Z ≈ 0.02 after "MACB|ET") counts 0.02, not 1. The candidates EQUAL to π end the teacher token at b_j: the
   next-byte distribution of that branch lives in a teacher row that was never computed, so it is not part
   of the conditional (its probability is not in Z, so it is not in the weight either).

One tokenizer on both sides: every label is a token, S_j is the whole vocabulary, Z = 1, k = 0: plain KD.
The teacher-cache form is ``cached_projected_kd`` (the cache's top-k plus the exact Z_j and M_j that
``sakd cache-teacher`` already stores for mapped_kl: the same fields, no rebuild).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sakd.align.classes import ClassTables
from sakd.align.mapping import MappingTables
from sakd.losses.batch import field, one_to_one
from sakd.losses.cached_mapped import cached_mapped_targets, cached_positions
from sakd.losses.divergences import softmax32
from sakd.losses.mapped import MappedPositions, MappedTargets, mapped_kd, mapped_positions
from sakd.losses.row_blocks import check_settings, overwrites_block, RowBlockLoss

KINDS = ("one_to_one", "chunk_first", "inside")  # 1:1 chunk; k = 0 in a longer chunk; k > 0


def label_tables(tables: MappingTables, classes: ClassTables) -> MappingTables:
    """``tables`` with φ replaced by the class of φ: the mapped target built on it is P_j over labels."""
    store = classes.__dict__.setdefault("_label_tables", {})
    key = (id(tables), tables.phi.device)
    if key not in store:
        cls = classes.to(tables.phi.device)
        store[key] = replace(tables, phi=cls.cell)
    return store[key]


@torch.no_grad()
def position_kinds(batch, pos: MappedPositions) -> torch.Tensor:
    """[N] long: 0 one_to_one, 1 chunk_first, 2 inside (``KINDS``). (In a chunk longer than 1:1 a student
    token with k = 0 is the chunk's first: a teacher token ending where it starts would close the chunk.)"""
    dev = pos.b.device
    s_chunk = field(batch, "s_chunk").to(dev)
    one = one_to_one(batch).to(dev).gather(1, s_chunk.clamp(min=0))[pos.b, pos.j]
    return torch.where(one, 0, torch.where(pos.k == 0, 1, 2))


def _split_rows(smap: torch.Tensor, tj: torch.Tensor, has_mass: torch.Tensor) -> torch.Tensor:
    """Rows whose realised token is its own bucket: not a class representative, and given mass."""
    return ((smap[tj] != tj) & has_mass).nonzero().squeeze(1)


def _student_buckets(s, T, moved, tj, e, spare: int = 1):
    """q [n, V], q̄ [n, V + spare] (column V: tokens without a class; column t_j of a split row: {t_j}; columns
    past V: 0). A token that is its own class's label is its own column: only the ``moved`` columns
    (ClassTables.moved_columns) are summed into their labels' columns and zeroed. ``s``: the kernel's row block;
    its softmax is taken in place where RowBlockLoss marked it ``_owned`` (the kernels are ``overwrites_block``,
    and gather their rows: a fresh tensor, never the caller's)."""
    cols, dest, where = moved
    q = softmax32(s, T)
    qb = torch.nn.functional.pad(q, (0, spare))
    qn = q.index_select(1, cols)
    qn[e, where[tj[e]]] = 0                      # a split row's t_j stays its own bucket
    qb.index_add_(1, dest, qn)
    qb[:, cols] = 0
    qb[e, tj[e]] = q[e, tj[e]]
    return q, qb


def _grad(q, ratio, w, moved, tj, e):
    """q(u) (w - ratio[B(u)]) per token, in place in q: ``ratio`` [n, V + 1] per bucket column (Σ_m w_m P_m(B) /
    q̄(B) over the passes, the weights already in), ``w`` [n] (Σ_m w_m)."""
    cols, dest, _ = moved
    r = torch.sub(w[:, None], ratio[:, :q.shape[1]])
    r[:, cols] = w[:, None] - ratio.index_select(1, dest)
    r[e, tj[e]] = w[e] - ratio[e, tj[e]]
    return q.mul_(r)


def _pass_terms(P, qb, smap, tj, e):
    """One pass's (terms [n, V + 1]: P log(P / q̄) per bucket column, ratio [n, V + 1]: P / q̄), q̄ with every
    row of ``e`` split (t_j its own bucket). Where this pass gives t_j no mass, t_j is in its class's bucket
    c = cls(t_j) for this pass: both columns then read P(c) / (q̄(c) + q(t_j)) (no host read: a ``where``)."""
    tiny = torch.finfo(qb.dtype).tiny
    ratio = P / qb                                    # P / q̄ per bucket: 0 where P = 0
    # Σ_B P log(P / q̄) from the gradient's ratio: P log(max(ratio, tiny)) is 0 where P = 0 (buckets the
    # teacher gives nothing, empty label columns) without a log of zero (torch's log is slow there), and
    # one log instead of two xlogy (3x slower than log + multiply on CPU)
    terms = ratio.clamp_min(tiny).log_().mul_(P)
    if e.numel():
        t, c = tj[e], smap[tj[e]]
        own = P[e, t] > 0
        pc = P[e, c]
        merged = pc / (qb[e, c] + qb[e, t])
        ratio_c = torch.where(own, ratio[e, c], merged)
        terms[e, c] = torch.where(own, terms[e, c], merged.clamp_min(tiny).log().mul_(pc))
        ratio[e, t] = torch.where(own, ratio[e, t], merged)
        ratio[e, c] = ratio_c
    return terms, ratio


def _result(loss_rows, kinds, log):
    if log is not None:
        d = loss_rows.detach()
        for n, name in enumerate(KINDS):
            m = kinds == n
            log[name] = log.get(name, 0.0) + d[m].sum()
            log[name + "_n"] = log.get(name + "_n", 0) + m.sum()


def projected_kd(s_logits: torch.Tensor, t_logits, batch, tables: MappingTables,
                 classes: ClassTables, *, temperature: float = 1.0, t_vocab_size: int | None = None,
                 chunk_rows: int = 1024, head_weight: torch.Tensor | None = None,
                 positions: MappedPositions | None = None, t_head_weight: torch.Tensor | None = None,
                 log: dict | None = None):
    """Σ_j w_j KL(P_j ‖ q̄_j) over every student position with a target (module docstring), live teacher.

    Shapes and options as ``mapped_kd`` (s_logits [B, Ls, Vs] or, with ``head_weight`` [Vs, H], the
    student's last hidden state; t_logits [B, Lt, Vt_cols] or, with ``t_head_weight``, the teacher's last
    hidden state; rows walked in row blocks of ``chunk_rows``). ``log``: a dict that receives, per position kind
    (``KINDS``), the sum of the terms (detached tensors) and the count (``<kind>_n``).

    ``t_logits`` may be a list of M teacher passes (KA's sampled routings, Kim et al. 2025): the result is then
    Σ_m L_m, computed with ONE student side. The student's buckets do not depend on the teacher except where
    t_j is split out (it is, in every pass, wherever any could: a pass that gives t_j no mass reads the two
    columns as one bucket, ``_pass_terms``), so each pass costs its target and one [n, V] log, and
    dΣ_m L_m / dz_u = q(u) (Σ_m w_mj - Σ_m w_mj P_mj(B(u)) / q̄_j(B(u))): one softmax, one bucket sum, one
    gradient (and with a fused head one set of head matmuls) per row block for all M passes.
    Returns (loss_sum, n positions)."""
    check_settings(temperature, "sum", chunk_rows)
    passes = list(t_logits) if isinstance(t_logits, (list, tuple)) else [t_logits]
    pos = mapped_positions(batch, tables) if positions is None else positions
    if tables.identity:  # one tokenizer: plain full-vocabulary KD at every position (w = 1, one class per token)
        out = [mapped_kd(s_logits, t, batch, tables, temperature=temperature, t_vocab_size=t_vocab_size,
                         chunk_rows=chunk_rows, head_weight=head_weight, positions=pos, t_head_weight=t_head_weight)
               for t in passes]
        return sum(x[0] for x in out), out[0][1]
    if t_head_weight is not None and t_vocab_size is None:
        raise ValueError("t_head_weight needs t_vocab_size")
    t0 = passes[0]
    vt = t0.shape[-1] if t_vocab_size is None else int(t_vocab_size)
    Ls = s_logits.shape[1]
    dev_s = s_logits.device
    n = torch.tensor(len(pos), dtype=torch.long, device=dev_s)
    if len(pos) == 0:
        return s_logits[:, :0].sum().float(), n
    vs = head_weight.shape[0] if head_weight is not None else s_logits.shape[-1]
    vs_tok = min(vs, int(tables.s_len.numel()))
    lab = label_tables(tables.to(t0.device), classes)
    targets = [MappedTargets(t, batch, pos, lab, vs_tok, vt, temperature, True, t_head_weight) for t in passes]
    smap = classes.to(dev_s).student_map(vs)
    moved = classes.to(dev_s).moved_columns(vs)
    tj_all = batch["s_ids"].to(dev_s)[pos.b.to(dev_s), pos.j.to(dev_s)]
    inside = (pos.k > 0).to(dev_s)
    kinds = position_kinds(batch, pos).to(dev_s)
    rows_out = torch.zeros(len(pos), dtype=torch.float32, device=dev_s)

    @overwrites_block
    def kernel(parts, T, need):
        s, idx = parts
        idx_s = idx.to(dev_s)
        tj = tj_all[idx_s]
        e = (smap[tj] != tj).nonzero().squeeze(1)          # rows whose t_j can be its own bucket
        q, qb = _student_buckets(s, T, moved, tj, e)
        qb.clamp_min_(torch.finfo(qb.dtype).tiny)
        loss = ratio_sum = w_sum = None
        for target in targets:
            P, Z = target(idx, spare_column=True)           # P [n, vs_tok + 1] over labels, normalised
            P = P.to(torch.float32).to(dev_s)
            if P.shape[1] < vs + 1:  # head columns past the tokenizer, and the bucket of tokens without a class: 0
                P = torch.nn.functional.pad(P, (0, vs + 1 - P.shape[1]))
            w = torch.where(inside[idx_s], Z.to(torch.float32).to(dev_s), torch.ones_like(Z, dtype=torch.float32,
                                                                                        device=dev_s))
            terms, ratio = _pass_terms(P, qb, smap, tj, e)
            del P
            term = terms.sum(-1).mul_(w)
            loss = term if loss is None else loss.add_(term)
            ratio_sum = ratio.mul_(w[:, None]) if ratio_sum is None else ratio_sum.addcmul_(ratio, w[:, None])
            w_sum = w if w_sum is None else w_sum + w
        rows_out[idx_s] = loss.detach()
        g = _grad(q, ratio_sum, w_sum, moved, tj, e) if need[0] else None
        return loss, (g, None)

    s_rows = (pos.b * Ls + pos.j - 1).to(dev_s)
    index = ((s_rows, None), (None, None))
    loss = RowBlockLoss.apply(kernel, 1, index, len(pos), chunk_rows, float(temperature), head_weight,
                              s_logits.flatten(0, 1), torch.arange(len(pos), device=t0.device))
    _result(rows_out, kinds, log)
    return loss, n


def cached_projected_kd(s_logits: torch.Tensor, cache_batch: dict, batch, tables: MappingTables,
                        classes: ClassTables, *, temperature: float = 1.0, chunk_rows: int = 1024,
                        positions: MappedPositions | None = None, log: dict | None = None):
    """``projected_kd`` from a teacher cache (sakd/teacher_cache): the top-k ids at row i - 1 give the label
    cells, the exact log Z_j and log(p_i(t_i) · path_j) stored for mapped_kl give Z_j and M_j, and the
    candidates' mass outside the top-k, R_j, is one more bucket compared with the student's mass on every
    bucket no top-k id hits (sakd/losses/cached_mapped.py, with labels in place of student ids). By the
    data-processing inequality this is <= the live loss; with k = V_teacher it equals it (tested).
    A sampled cache (sakd/teacher_cache/sampled.py): the target cells are unbiased (cached_mapped.py) and the
    gradient w q(u) (1 - P̂(B(u)) / q̄(B(u))) is linear in P̂ (its "1" is E[Σ P̂]): unbiased; inside a teacher
    token the position weight w = Z_j keeps the variance bounded where few draws hit the candidates
    (tests/losses/test_sampled_losses.py).
    s_logits [B, Ls, Vs]. Returns (loss_sum, n positions)."""
    pos, n, empty = cached_positions(s_logits, batch, tables, temperature, chunk_rows, positions)
    if empty is not None:
        return empty, n
    dev = s_logits.device
    B, Ls, vs = s_logits.shape
    cdev = cache_batch["topk_ids"].device
    lab = label_tables(tables.to(cdev), classes)
    cols, log_q, log_rest = cached_mapped_targets(cache_batch, batch, lab, pos, vs, extend=True)
    cols, log_q, log_rest = cols.to(dev), log_q.to(dev), log_rest.to(dev)
    p_cdev = MappedPositions(**{f: getattr(pos, f).to(cdev) for f in pos.__dataclass_fields__})
    logz = cache_batch["mapped_logz"][p_cdev.b, p_cdev.j].float().to(dev)
    inside = (pos.k > 0).to(dev)
    w_all = torch.where(inside & torch.isfinite(logz), logz.exp(), torch.ones_like(logz))
    smap = classes.to(dev).student_map(vs)
    moved = classes.to(dev).moved_columns(vs)
    tj_all = batch["s_ids"].to(dev)[pos.b.to(dev), pos.j.to(dev)]
    kinds = position_kinds(batch, pos).to(dev)
    rows_out = torch.zeros(len(pos), dtype=torch.float32, device=dev)

    @overwrites_block
    def kernel(parts, T, need):
        s, c, lq, lr, idx = parts
        tj, w = tj_all[idx], w_all[idx]
        p_hit = lq.exp()
        hit = (c < vs) & (p_hit > 0)
        cc = torch.where(hit, c, torch.full_like(c, vs + 1))           # misses: a scratch column past the buckets
        e = _split_rows(smap, tj, ((cc == tj[:, None]) & hit).any(1))
        q, qb = _student_buckets(s, T, moved, tj, e, spare=2)         # [n, vs + 2]
        q_hit = qb.gather(1, cc)
        q_rest = qb.scatter_(1, cc, 0.0).sum(1)                        # q̄ off the hit buckets (hits distinct)
        p_rest = lr.exp()
        d_hit = (lq - q_hit.log()).masked_fill_(~hit, 0.0)
        # Every student bucket hit (q_rest = 0): the candidates outside the top-k land on hit labels, and a
        # rest left by rounding (1 - Σ of the top-k shares) is not compared.
        p_rest = torch.where(q_rest > 0, p_rest, torch.zeros_like(p_rest))
        d_rest = torch.where(p_rest > 0, lr - q_rest.log(), torch.zeros_like(lr))
        loss = ((p_hit * d_hit).sum(1) + p_rest * d_rest) * w
        rows_out[idx] = loss.detach()
        g = None
        if need[0]:
            rest_ratio = torch.where(p_rest > 0, p_rest / q_rest, torch.zeros_like(p_rest)) * w
            ratio = rest_ratio[:, None].expand_as(qb).clone()               # w P(B) / q̄(B) per bucket column
            ratio.scatter_(1, cc, torch.where(hit, p_hit / q_hit, torch.zeros_like(p_hit)) * w[:, None])
            g = _grad(q, ratio, w, moved, tj, e)
        return loss, (g, None, None, None, None)

    s_rows = (pos.b * Ls + pos.j - 1).to(dev)
    none = (None, None)
    loss = RowBlockLoss.apply(kernel, 1, ((s_rows, None), none, none, none, none), len(pos), chunk_rows,
                              float(temperature), None, s_logits.flatten(0, 1), cols, log_q, log_rest,
                              torch.arange(len(pos), device=dev))
    _result(rows_out, kinds, log)
    return loss, n


@torch.no_grad()
def unsupported_tokens(batch, tables: MappingTables, classes: ClassTables) -> dict:
    """Student tokens that predict text (the count of ``mapped_coverage``) whose target can never give them
    mass, whatever the teacher predicts: ``projected``: no target position, or neither a class (no prefix in
    φ's image) nor the realised path (φ(t_i, k) missing) reaches them; ``outside_image``: no target
    position, or the token is not in φ's image (mapped_kl's first-token map never names it; its extension
    still moves the realised path's mass there). Returns {"projected", "outside_image", "total"} (ints)."""
    total = int(((field(batch, "s_chunk") >= 0)[:, 1:]).sum())
    pos = mapped_positions(batch, tables)
    cls = classes.to(pos.b.device)
    tab = tables.to(pos.b.device)
    tj = field(batch, "s_ids").to(pos.b.device)[pos.b, pos.j]
    ti = field(batch, "t_ids").to(pos.b.device)[pos.b, pos.i]
    src = cls.cell[tab.offset[ti] + pos.k]
    c_j = cls.cls[tj.clamp(max=cls.cls.numel() - 1)]
    image = torch.zeros(max(int(cls.cls.numel()), int(tab.phi.max()) + 1), dtype=torch.bool, device=tj.device)
    image[tab.phi[tab.phi >= 0]] = True
    missing = total - len(pos)
    return {"projected": missing + int(((c_j < 0) & (src < 0)).sum()),
            "outside_image": missing + int((~image[tj.clamp(max=image.numel() - 1)]).sum()), "total": total}


__all__ = ["KINDS", "projected_kd", "cached_projected_kd", "label_tables", "position_kinds", "unsupported_tokens"]
