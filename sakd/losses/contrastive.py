"""Sequence-level contrastive loss (InfoNCE) between student and teacher.

Each example's text is summarised by each model as the mean of its hidden states
over the text tokens (start token and padding excluded: the start token's state
carries no information about the text, and padding carries none at all). Pooled
vectors are comparable across tokenizers because both cover the same bytes.

    z_s = normalize(s_b),  z_t = normalize(P(t_b))        (P: learned projection D_t → D_s)
    ℓ_b = −log softmax_j(z_s_b · z_t_j / τ)[b]            (student b must pick its own teacher)

Default direction is student → teacher only: the teacher side is a frozen target
(detached), the loss asks each student vector to be closer to its own teacher
vector than to the other examples' teacher vectors. ``symmetric=True`` averages in
the teacher → student direction (column softmax) as in CLIP (Radford et al. 2021).
Source: InfoNCE (van den Oord et al. 2018, eq. 4); CRD (Tian et al. 2020) for the
use in distillation. Needs B ≥ 2 to mean anything; with B = 1 the loss is 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden [B, L, D] over positions where mask [B, L] is True -> [B, D].

    For text tokens only, pass ``batch["s_chunk"] >= 0`` (resp. t_chunk): that mask
    is False at the start token and at padding. An all-False row gives zeros. The result is
    float32 for 16-bit inputs (float64 stays)."""
    # Summed in float32 at least: an fp16 teacher's states summed over hundreds of positions overflow.
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    m = mask.to(dtype)[..., None]                            # [B, L, 1]
    return (hidden.to(dtype) * m).sum(1) / m.sum(1).clamp_min(1.0)


def info_nce(s_repr: torch.Tensor, t_repr: torch.Tensor, projector: nn.Module | None,
             temperature: float = 0.07, *, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE over the batch. s_repr [B, D_s], t_repr [B, D_t] (pooled); projector maps
    D_t → D_s (None: identity, equal widths). The teacher input is detached; the
    projector learns. Computed in float32 (float64 if the inputs are).

    Returns (loss_sum, n): the sum over the B examples of ℓ_b (averaged over both
    directions when symmetric) and n = B (int64 0-dim tensor). This is a per-example,
    not a per-token quantity: weight it accordingly when adding it to token sums."""
    dtype = torch.promote_types(s_repr.dtype, torch.float32)
    t = t_repr.detach()
    if projector is not None:
        w = next(projector.parameters(), None)
        t = projector(t if w is None else t.to(w.dtype))  # an fp16 teacher's states meet an fp32 projector
    z_s = F.normalize(s_repr.to(dtype), dim=-1)
    z_t = F.normalize(t.to(dtype), dim=-1)
    logits = z_s @ z_t.T / temperature                       # [B, B]: row b = student b vs every teacher
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, target, reduction="sum")
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target, reduction="sum"))
    return loss, torch.tensor(logits.shape[0], device=logits.device)
