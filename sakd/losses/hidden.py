"""Hidden-state matching at chunk ends, through a learned projection.

At the last token of a chunk both models have read exactly the same bytes of text,
so their hidden states there describe the same prefix (RESEARCH.md §2: positions are
comparable where tokens end at the same byte). Inside a multi-token chunk they have
not, so only chunk ends are compared — never interpolated positions.

Layer numbering follows ``output_hidden_states``: hidden_states has layers + 1
entries, index 0 is the embedding output and index i the output of layer i (the
last one after the final norm). A pair (i, j) maps student index i to teacher
index j in that numbering; the attention loss uses the same pairs.

Formula (per chunk end e and pair (i, j), W_ij the projection):
    mse:    (1/D_t) · ‖W_ij h^s_i(e) − h^t_j(e)‖²
    cosine: 1 − cos(W_ij h^s_i(e), h^t_j(e))
averaged over pairs, summed over chunk ends. Source: FitNets-style hint loss
(Romero et al. 2015) with the TinyBERT layer map (Jiao et al. 2020, "uniform"
strategy), restricted to byte-aligned positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sakd.errors import UserError
from sakd.losses.batch import field as _field


def layer_map(n_student_layers: int, n_teacher_layers: int, pairs=None,
              n_pairs: int | None = None) -> list[tuple[int, int]]:
    """Student→teacher layer pairs in hidden_states numbering (0 = embeddings).

    Default (TinyBERT "uniform"): every student layer i in 1..S maps to teacher layer
    round(i·T/S), so the last layers meet (S→T). ``n_pairs`` keeps n student layers
    spread evenly, i = round(k·S/n) for k = 1..n. Rounding is half-up, in integer
    arithmetic (Python's round() would round 2.5 to 2). Explicit ``pairs`` are
    validated and returned as a list of int tuples."""
    S, T = int(n_student_layers), int(n_teacher_layers)
    if S < 1 or T < 1:
        raise UserError(f"layer_map: layer counts must be >= 1, got student={S}, teacher={T}")
    if pairs is not None:
        out = [(int(i), int(j)) for i, j in pairs]
        for i, j in out:
            if not (0 <= i <= S and 0 <= j <= T):
                raise UserError(f"layer pair ({i}, {j}) is out of range: student layers are 0..{S}, "
                                f"teacher layers 0..{T} (0 = embeddings); fix the layer pairs in the config")
        if not out:
            raise UserError("layer pairs are empty: give at least one (student, teacher) pair or leave it unset")
        return out
    n = S if n_pairs is None else int(n_pairs)
    if not 1 <= n <= S:
        raise UserError(f"n_pairs={n} must be between 1 and the student's {S} layers")
    students = [(2 * k * S + n) // (2 * n) for k in range(1, n + 1)]  # round(k*S/n), half-up
    return [(i, (2 * i * T + S) // (2 * S)) for i in students]       # round(i*T/S), half-up


class HiddenProjector(nn.Module):
    """One Linear(student_dim → teacher_dim) per layer pair, in a ModuleDict.

    ``identity_init`` (only when the widths are equal) starts every projection at
    the identity, so that a student equal to the teacher has zero loss at step 0."""

    def __init__(self, student_dim: int, teacher_dim: int, pairs, *, identity_init: bool = False):
        super().__init__()
        if identity_init and student_dim != teacher_dim:
            raise UserError(f"identity_init needs equal widths, got student {student_dim} vs teacher {teacher_dim}")
        self.proj = nn.ModuleDict()
        for i, j in pairs:
            lin = nn.Linear(student_dim, teacher_dim)
            if identity_init:
                with torch.no_grad():
                    lin.weight.copy_(torch.eye(student_dim))
                    lin.bias.zero_()
            self.proj[self.key((i, j))] = lin

    @staticmethod
    def key(pair) -> str:
        # ModuleDict keys may not contain "."; "s3_t6" also reads well in state_dict names.
        return f"s{int(pair[0])}_t{int(pair[1])}"

    def forward(self, h: torch.Tensor, pair) -> torch.Tensor:  # h: [..., D_s] -> [..., D_t]
        return self.proj[self.key(pair)](h)


def chunk_end_positions(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(example, student position, teacher position) of the last token of every real chunk, each [N]."""
    b, c = _field(batch, "chunk_mask").nonzero(as_tuple=True)
    return b, _field(batch, "chunk_s_end")[b, c] - 1, _field(batch, "chunk_t_end")[b, c] - 1


def hidden_state_loss(s_hidden, t_hidden, batch, projector: HiddenProjector | None, pairs,
                      kind: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden-state distance at chunk ends, averaged over layer pairs.

    s_hidden / t_hidden: tuples of [B, Ls, D_s] / [B, Lt, D_t] (layers + 1 entries).
    projector: a HiddenProjector holding every pair, or None for the identity
    (equal widths only). Teacher states are detached.

    Returns (loss_sum, n): loss_sum sums over the N real chunks of the pair-averaged
    distance; n = N (int64 0-dim tensor). loss_sum / n is the mean per chunk end."""
    if kind not in ("mse", "cosine"):
        raise UserError(f"hidden loss kind must be 'mse' or 'cosine', got {kind!r}")
    pairs = list(pairs)
    if not pairs:
        raise UserError("hidden_state_loss: no layer pairs given; use layer_map() or list (student, teacher) pairs")
    b, s_pos, t_pos = chunk_end_positions(batch)
    dtype = torch.promote_types(s_hidden[0].dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays
    per_end = s_hidden[0].new_zeros(b.numel(), dtype=dtype)
    for i, j in pairs:
        hs = s_hidden[i][b, s_pos]                             # [N, D_s]
        hs = (hs if projector is None else projector(hs, (i, j))).to(dtype)
        ht = t_hidden[j][b, t_pos].detach().to(dtype)          # [N, D_t]
        if hs.shape[-1] != ht.shape[-1]:
            raise UserError(f"hidden widths differ for pair ({i}, {j}): {hs.shape[-1]} vs {ht.shape[-1]}; "
                            "pass a HiddenProjector")
        if kind == "mse":
            per_end = per_end + (hs - ht).pow(2).mean(-1)
        else:
            per_end = per_end + (1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8))
    per_end = per_end / len(pairs)
    return per_end.sum(), torch.tensor(b.numel(), device=per_end.device)
