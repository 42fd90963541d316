"""Distillation losses: pure functions of tensors (see each module's docstring)."""

from sakd.losses.divergences import (
    forward_kl,
    generalized_jsd,
    kd_loss,
    reverse_kl,
    sparse_forward_kl,
    tvd,
)

__all__ = ["forward_kl", "reverse_kl", "generalized_jsd", "tvd", "sparse_forward_kl", "kd_loss"]
