"""Distillation losses: pure functions of tensors (see each module's docstring)."""

from sakd.losses.divergences import (
    forward_kl,
    generalized_jsd,
    kd_loss,
    reverse_kl,
    sparse_forward_kl,
    tvd,
)

# (the benchmark's baselines are not exported here: sakd/losses/baselines.py)
from sakd.losses.crosstok import (chunk_likelihood_loss, chunk_logprobs, one_to_one_positions,
                                  shared_vocab_kd)
from sakd.losses.hidden import HiddenProjector, hidden_state_loss, layer_map
from sakd.losses.attention import attention_transfer_loss, chunk_attention
from sakd.losses.contrastive import info_nce, mean_pool

__all__ = ["forward_kl", "reverse_kl", "generalized_jsd", "tvd", "sparse_forward_kl", "kd_loss",
           "chunk_likelihood_loss", "chunk_logprobs", "one_to_one_positions",
           "shared_vocab_kd", "HiddenProjector", "hidden_state_loss", "layer_map",
           "attention_transfer_loss", "chunk_attention", "info_nce", "mean_pool"]
