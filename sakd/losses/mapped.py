"""A teacher target at EVERY student position: the teacher's next-token distribution mapped onto the
student's vocabulary through the bytes of the text (``loss.logit=mapped_kl``).

Source: byte-level probability mapping (BPM, arXiv 2607.22334, eqs. 4-6 as reported in
../shared/RESEARCH.md §6); the underlying identity, next-byte probabilities as sums over the
teacher tokens that cover the bytes, is Phan et al., arXiv 2410.09303 (§3, "cover encodings").

Notation: teacher token i spans bytes [a_i, c_i) and is predicted by p_i (teacher logits at
position i - 1); student token j spans [b_j, e_j) and is predicted by q_j (student logits at
j - 1). For each j, take the teacher token i with a_i <= b_j < c_i, k = b_j - a_i and
π = bytes(t_i)[:k], the bytes of i already seen. The candidates S are the teacher tokens whose
bytes start with π and are longer than k (those of them consistent with the text so far);

    Q_j(u) = Σ_{v ∈ S, φ(v, k) = u} p_i(v) / Z,      Z = Σ_{v ∈ S, φ(v, k) exists} p_i(v),

with φ(v, k) the student token that starts bytes(v)[k:] (sakd/align/mapping.py). Special and
padding teacher columns are never candidates. The loss is Σ_j D(Q_j ‖ q_j) over the student's
full vocabulary (D = the configured divergence; forward KL by default).

Realised-path extension (``extend=True``, BPM's choice): where the realised student token t_j runs
past c_i, no candidate of i maps to t_j (φ(t_i, k) is a shorter prefix of it), so the target
would teach the student a tokenisation it never uses. The probability that the teacher writes
t_j's bytes along the realised path,

    M_j = p_i(t_i) / Z · Π_{i < l < m} p_l(t_l) · Σ_{v starts with bytes[a_m:e_j]} p_m(v)

(m: the teacher token holding byte e_j - 1), a lower bound on the teacher's probability of those
bytes, is moved from the cell φ(t_i, k) (which holds p_i(t_i)/Z >= M_j) to the cell t_j: the
target keeps its total mass.

Positions: every student text token whose chunk (sakd/align/tokens.py) spells the same bytes on
both sides by the tokens' own bytes; a chunk holding a synthetic prefix space (``▁H`` at a span's
start covers only ``H``), an added token, or a token with no bytes gets no target (the start of a
span, typically one chunk). ``mapped_positions`` computes them from the batch tensors alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sakd.align.mapping import MappingTables
from sakd.errors import UserError
from sakd.losses.batch import one_to_one
from sakd.losses.divergences import divergence_kernel, divergence_sum, kl_rows, log_softmax32, softmax_
from sakd.losses.row_blocks import RowBlockLoss, check_settings, head_rows

_BIG = 1 << 32  # chunk index * _BIG + byte offset inside the chunk: one sortable key per token end


@dataclass
class MappedPositions:
    """One entry per student position with a target ([N] each, long unless said)."""

    b: torch.Tensor       # example
    j: torch.Tensor       # student token index (predicted by student row j - 1)
    i: torch.Tensor       # teacher token holding b_j (predicted by teacher row i - 1)
    k: torch.Tensor       # b_j - a_i
    ext: torch.Tensor     # bool: e_j > c_i
    m: torch.Tensor       # teacher token holding byte e_j - 1
    q: torch.Tensor       # e_j - a_m: bytes of t_m the student token covers

    def __len__(self) -> int:
        return int(self.b.numel())


def _chunk_sums(chunk: torch.Tensor, values: torch.Tensor, C: int) -> torch.Tensor:
    out = torch.zeros(chunk.shape[0], C, dtype=torch.long, device=chunk.device)
    return out.scatter_add_(1, chunk.clamp(min=0), values * (chunk >= 0))


@torch.no_grad()
def mapped_positions(batch, tables: MappingTables, one_to_one_only: bool = False) -> MappedPositions:
    """The student positions that get a target, and where their bytes sit in the teacher's tokens
    (``one_to_one_only``: only the positions of 1:1 chunks, ``loss.mapped_positions=one_to_one``).

    Works on the batch format of sakd/data/text.py: token ids, the chunk of every token (-1: start
    token or padding) and the chunk table; byte lengths come from the tables (canonical bytes
    of each id), so every offset is exact inside a chunk whose two sides spell the same bytes."""
    s_ids, t_ids, s_chunk, t_chunk = batch["s_ids"], batch["t_ids"], batch["s_chunk"], batch["t_chunk"]
    dev = s_ids.device
    tables = tables.to(dev)
    s_len, t_len = tables.s_len, tables.t_len
    ls = s_len[s_ids.clamp(0, s_len.numel() - 1)] * (s_chunk >= 0)
    lt = t_len[t_ids.clamp(0, t_len.numel() - 1)] * (t_chunk >= 0)
    C = batch["chunk_mask"].shape[1]
    ok = (batch["chunk_mask"] & (_chunk_sums(s_chunk, ls, C) == _chunk_sums(t_chunk, lt, C))
          & (_chunk_sums(s_chunk, (ls == 0).long(), C) == 0) & (_chunk_sums(t_chunk, (lt == 0).long(), C) == 0))

    def rel_ends(ids_len, chunk, start_key):
        g = ids_len.cumsum(1)  # bytes up to and including each token, from the span start
        base = g.gather(1, (batch[start_key] - 1).clamp(min=0))          # [B, C]: bytes before each chunk
        return g - base.gather(1, chunk.clamp(min=0))                    # bytes inside the chunk, token end

    s_end = rel_ends(ls, s_chunk, "chunk_s_start")
    t_end = rel_ends(lt, t_chunk, "chunk_t_start")
    huge = torch.iinfo(torch.long).max // 2
    t_key = torch.where(t_chunk >= 0, t_chunk * _BIG + t_end,
                        torch.where(batch["t_mask"], torch.full_like(t_end, -1), torch.full_like(t_end, huge)))
    # Chat rows (sakd/data/chat.py): template tokens between two contents lie in no chunk; they take the key of the
    # token before them, so that the keys stay sorted for searchsorted (a no-op on text rows).
    t_key = torch.cummax(t_key, dim=1).values
    text = s_chunk >= 0
    text[:, 0] = False
    if one_to_one_only:
        text &= one_to_one(batch).gather(1, s_chunk.clamp(min=0))
    if tables.identity:  # one tokenizer: the same tokens on both sides, every text position, plain KD
        b, j = text.nonzero(as_tuple=True)
        zero = torch.zeros_like(b)
        return MappedPositions(b=b, j=j, i=j, k=zero, ext=zero.bool(), m=j, q=zero)
    sel = text & ok.gather(1, s_chunk.clamp(min=0)) & (ls > 0)
    key_end = torch.where(sel, s_chunk * _BIG + s_end, torch.zeros_like(s_end))  # [B, Ls]
    key_start = key_end - ls * sel
    i_all = torch.searchsorted(t_key, key_start, right=True)   # first teacher token ending after b_j
    m_all = torch.searchsorted(t_key, key_end, right=False)    # first teacher token ending at or after e_j
    b, j = sel.nonzero(as_tuple=True)
    i, m = i_all[b, j], m_all[b, j]
    ks, ke = key_start[b, j], key_end[b, j]
    return MappedPositions(b=b, j=j, i=i, k=ks - (t_key[b, i] - lt[b, i]), ext=ke > t_key[b, i], m=m,
                           q=ke - (t_key[b, m] - lt[b, m]))


def count_mapped(batch, tables: MappingTables, one_to_one_only: bool = False) -> int:
    return len(mapped_positions(batch, tables, one_to_one_only))


@torch.no_grad()
def path_log_mass(t2, t_ids, pos: MappedPositions, e_idx, Lt: int, vt: int, tables: MappingTables,
                   temperature: float, dtype, head: torch.Tensor | None = None) -> torch.Tensor:
    """log of Π_{i<l<m} p_l(t_l) · Σ_{v starts with bytes(t_m)[:q]} p_m(v) for the extended positions
    ``e_idx``: the realised path after teacher token i (the factor p_i(t_i)/Z is added by the caller).

    Teacher row r predicts token r + 1, so position n uses rows i..m-1: rows i..m-2 give the realised
    tokens' log-probabilities, row m-1 the prefix mass of t_m's first q bytes. All positions at once:
    the rows are gathered once, each row's log-normaliser computed once, and the variable-length prefix
    ranges are flattened and reduced by segment (no loop, no host sync)."""
    dev = t2.device
    b, i, m = pos.b[e_idx], pos.i[e_idx], pos.m[e_idx]
    n = e_idx.numel()
    if n == 0:
        return torch.zeros(0, dtype=dtype, device=dev)
    # (position, row) pairs: rows i .. m-1 of each position
    cnt = m - i                                                           # >= 1: the token runs past c_i
    owner = torch.repeat_interleave(torch.arange(n, device=dev), cnt)
    first = cnt.cumsum(0) - cnt
    r = i[owner] + torch.arange(owner.numel(), device=dev) - first[owner]
    rows = head_rows(t2, b[owner] * Lt + r, vt, dtype, head) / temperature   # [P, vt]
    lse = torch.logsumexp(rows, -1)
    last = r == m[owner] - 1
    # rows before the last: the realised next token's log-probability
    mid = (~last).nonzero().squeeze(1)
    nxt = t_ids[b[owner[mid]], r[mid] + 1]
    out = torch.zeros(n, dtype=dtype, device=dev)
    out.index_add_(0, owner[mid], rows[mid].gather(1, nxt[:, None]).squeeze(1) - lse[mid])
    # the last row: log Σ over the teacher tokens starting with bytes(t_m)[:q] (one sorted range each)
    f = tables.offset.to(dev)[t_ids[b, m]] + pos.q[e_idx]
    lo, hi = tables.lo.to(dev)[f], tables.hi.to(dev)[f]
    lens = hi - lo
    seg = torch.repeat_interleave(torch.arange(n, device=dev), lens)
    start = torch.repeat_interleave(lo - (lens.cumsum(0) - lens), lens)
    tid = tables.sorted_ids.to(dev)[start + torch.arange(int(lens.sum()), device=dev)]
    last_row = torch.empty(n, dtype=torch.long, device=dev)
    last_row[owner[last]] = last.nonzero().squeeze(1)
    vals = rows[last_row[seg], tid]
    peak = torch.full((n,), -torch.inf, dtype=dtype, device=dev).scatter_reduce_(0, seg, vals, "amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    mass = torch.zeros(n, dtype=dtype, device=dev).index_add_(0, seg, (vals - peak[seg]).exp())
    return out + mass.log() + peak - lse[last_row]


class MappedTargets:
    """Builds log Q (times T, see ``mapped_kd``) for a row block of positions, from the teacher logits."""

    def __init__(self, t_logits, batch, pos: MappedPositions, tables: MappingTables, vs: int, vt: int,
                 temperature: float, extend: bool, t_head: torch.Tensor | None = None):
        self.t2 = t_logits.detach().flatten(0, 1)
        self.head = t_head.detach()[:vt] if t_head is not None else None  # t_logits: the last hidden state then
        self.Lt, self.vs, self.vt, self.T = t_logits.shape[1], vs, vt, float(temperature)
        self.dtype = torch.promote_types(t_logits.dtype, torch.float32)
        self.tab = tables.to(t_logits.device)
        dev = t_logits.device
        self.pos = MappedPositions(**{f: getattr(pos, f).to(dev) for f in pos.__dataclass_fields__})
        p = self.pos
        t_ids = batch["t_ids"].to(dev)
        self.s_tok = batch["s_ids"].to(dev)[p.b, p.j]
        self.t_tok = t_ids[p.b, p.i]
        self.t_row = p.b * self.Lt + p.i - 1
        # φ(v, 0) for every teacher column < vt; specials and tokens without a student image -> column vs (dropped)
        self.phi0 = self.tab.column_map(vt, vs)
        self.f_i = self.tab.offset[self.t_tok] + p.k          # flat index of (t_i, k)
        self.extend = extend
        self.path = torch.zeros(len(p), dtype=self.dtype, device=dev)
        if self.extend and bool(p.ext.any()):
            e_idx = p.ext.nonzero().squeeze(1)
            self.path[e_idx] = path_log_mass(self.t2, t_ids, p, e_idx, self.Lt, vt, self.tab, self.T, self.dtype,
                                              self.head)

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, spare_column: bool = False) -> torch.Tensor:
        """idx [n]: positions; returns (Q [n, vs], normalised, with exact zeros; Z [n]: the teacher's
        probability of the bytes already seen inside token i, 1 at k = 0). ``spare_column``: Q [n, vs + 1],
        its last column 0 (a place for the caller's own use, no copy)."""
        n, vs, tab = idx.numel(), self.vs, self.tab
        # The student tokens inside one teacher token share its row: each distinct row's softmax once
        # (about a quarter fewer rows on Shakespeare); p[u] is row u, position x reads p[inv[x]].
        rows, inv = torch.unique(self.t_row[idx], return_inverse=True)
        z = head_rows(self.t2, rows, self.vt, self.dtype, self.head)  # a fresh tensor: softmax in place
        p = softmax_(z.div_(self.T) if self.T != 1.0 else z)
        del z
        k = self.pos.k[idx]
        # bytes start a teacher token (k = 0): every candidate, through φ(·, 0). Nearly every distinct row has
        # a k = 0 position: map them all, then pick; the k > 0 rows are written over below.
        Q = torch.zeros(rows.numel(), vs + 1, dtype=self.dtype, device=p.device).index_add_(1, self.phi0, p)[inv]
        r1 = (k > 0).nonzero().squeeze(1)
        if r1.numel():
            Q[r1] = 0
            f = self.f_i[idx[r1]]
            lo, hi = tab.lo[f] + tab.eq[f], tab.hi[f]                       # tokens longer than k
            lens = hi - lo
            row = torch.repeat_interleave(r1, lens)
            start = torch.repeat_interleave(lo - (lens.cumsum(0) - lens), lens)
            tid = tab.sorted_ids[start + torch.arange(int(lens.sum()), device=p.device)]
            sid = tab.phi[tab.offset[tid] + torch.repeat_interleave(k[r1], lens)]
            sid = torch.where(sid >= 0, sid, torch.full_like(sid, vs))
            Q.index_put_((row, sid), p[inv[row], tid], accumulate=True)
        full = Q
        Q = Q[:, :vs]
        Z = Q.sum(-1)
        good = Z > 0
        Q.mul_(torch.where(good, Z, torch.ones_like(Z)).reciprocal_()[:, None])
        # Z = 0 only if the teacher's probability underflows on every candidate: the realised token then.
        Q[~good] = 0
        Q[(~good).nonzero().squeeze(1), self.s_tok[idx[~good]]] = 1.0
        if self.extend:
            src_all = tab.phi[self.f_i[idx]]
            moved = self.pos.ext[idx] | (src_all != self.s_tok[idx])
            e = (moved & good & (src_all >= 0)).nonzero().squeeze(1)
            if e.numel():
                src = tab.phi[self.f_i[idx[e]]]
                mass = (p[inv[e], self.t_tok[idx[e]]].log() - Z[e].log() + self.path[idx[e]]).exp()
                mass = torch.minimum(mass, Q[e, src])
                Q[e, src] -= mass
                Q[e, self.s_tok[idx[e]]] += mass
        if spare_column:
            full[:, vs] = 0
            return full, Z
        return Q, Z


def log_with_zeros(x: torch.Tensor) -> torch.Tensor:
    """log x with log 0 = -inf. torch's log is ~10x slower on zero entries (about half of a mapped
    target's), so the zeros are lifted to the smallest normal number for the log and set back after."""
    zero = x == 0
    return x.clamp_min(torch.finfo(x.dtype).tiny).log_().masked_fill_(zero, -float("inf"))


def mapped_kd(s_logits: torch.Tensor, t_logits: torch.Tensor, batch, tables: MappingTables, *,
              divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
              t_vocab_size: int | None = None, chunk_rows: int = 1024, extend: bool = True,
              head_weight: torch.Tensor | None = None, positions: MappedPositions | None = None,
              one_to_one_only: bool = False, prefix_weight: bool = False,
              t_head_weight: torch.Tensor | None = None):
    """Σ_j D(Q_j ‖ q_j) over every student position with a target (module docstring), D the divergence
    ``divergence`` at temperature T (q_j = softmax(s_j / T); Q_j mapped from softmax(t_i / T)).

    s_logits [B, Ls, Vs] (or, with ``head_weight`` [Vs, H], the student's last hidden state [B, Ls, H]:
    the output layer is fused in); t_logits [B, Lt, Vt_cols], treated as a constant (the student is
    trained); ``t_vocab_size`` bounds the teacher columns that name tokens. With ``t_head_weight``
    [Vt_cols, H] (the teacher's output layer), t_logits is the teacher's last hidden state [B, Lt, H] and
    only the rows a row block needs are multiplied out: the teacher's [B, Lt, Vt] logits never exist. Memory:
    rows are walked in row blocks of ``chunk_rows``; neither [N, Vt] nor [N, Vs] exists for all rows at once.

    One tokenizer on both sides (``tables.identity``): exactly plain full-vocabulary KD at every
    position. ``prefix_weight`` (``loss.mapped_prefix_weight``): each position's term times Z, the teacher's
    probability that its token starts with the bytes already seen (1 where the student token starts a
    teacher token): a target conditioned on bytes the teacher did not expect counts less.
    Returns (loss_sum, n positions)."""
    check_settings(temperature, "sum", chunk_rows)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        raise UserError("loss.logit=mapped_kl needs a divergence that allows zeros in the target "
                        "(forward_kl, jsd with beta < 1, tvd), not reverse KL: set loss.divergence=forward_kl")
    pos = mapped_positions(batch, tables, one_to_one_only) if positions is None else positions
    if t_head_weight is not None and t_vocab_size is None:
        raise ValueError("t_head_weight needs t_vocab_size")
    if t_head_weight is not None and tables.identity:  # plain KD over every row: the logits, then
        t_logits, t_head_weight = t_logits.detach() @ t_head_weight.detach().to(t_logits.dtype).T, None
    vt = t_logits.shape[-1] if t_vocab_size is None else int(t_vocab_size)
    Ls, Lt = s_logits.shape[1], t_logits.shape[1]
    dev_s = s_logits.device
    s_rows = (pos.b * Ls + pos.j - 1).to(dev_s)
    n = torch.tensor(len(pos), dtype=torch.long, device=dev_s)
    if tables.identity:
        t_rows = (pos.b * Lt + pos.i - 1).to(t_logits.device)
        return divergence_sum(divergence, s_logits.flatten(0, 1), t_logits.detach().flatten(0, 1)[:, :vt],
                              s_rows=s_rows, t_rows=t_rows, head_weight=head_weight, temperature=temperature,
                              beta=beta, chunk_rows=chunk_rows), n
    vs = head_weight.shape[0] if head_weight is not None else s_logits.shape[-1]
    vs_tok = int(tables.s_len.numel())
    target = MappedTargets(t_logits, batch, pos, tables, min(vs, vs_tok), vt, temperature, extend, t_head_weight)
    base = divergence_kernel(divergence, beta)
    pad = vs - min(vs, vs_tok)  # student head columns past its tokenizer: target 0

    def kernel(parts, T, need):
        s, idx = parts
        Q, mass = target(idx)                            # Q [n, vs_tok], already at temperature T
        Q = Q.to(torch.float32)
        w = mass.to(torch.float32) if prefix_weight else None
        if pad:
            Q = torch.nn.functional.pad(Q, (0, pad))
        if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
            # KL(Q ‖ q) from Q itself: Q is normalised (no second log-softmax) and at hand (no exp of log Q)
            loss, _, g_s = kl_rows(log_with_zeros(Q), log_softmax32(s, T), False, need[0], a=Q)
        else:
            log_target = log_with_zeros(Q)
            loss, (g_s, _) = base([s, log_target.mul_(T)], T, (need[0], False))  # the kernel divides by T again
        if w is not None:
            loss = loss * w
            g_s = g_s.mul_(w[:, None]) if g_s is not None else None
        return loss, (g_s, None)

    index = ((s_rows, None), (None, None))
    loss = RowBlockLoss.apply(kernel, 1, index, len(pos), chunk_rows, float(temperature), head_weight,
                              s_logits.flatten(0, 1), torch.arange(len(pos), device=t_logits.device))
    return loss, n


@torch.no_grad()
def mapped_coverage(batch, tables: MappingTables) -> tuple[int, int]:
    """(student positions with a target, student positions that predict a text token)."""
    total = int(((batch["s_chunk"] >= 0)[:, 1:]).sum())
    return len(mapped_positions(batch, tables)), total
