"""Helpers only the tests use (moved out of the package): importable from any test, since tests/ holds the
root conftest.py and pytest puts that folder on sys.path."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2MoeConfig

from sakd.models.moe import _layers


def qwen2_moe_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                     experts: int = 4, experts_per_tok: int = 2, intermediate: int = 64, **kw) -> Qwen2MoeConfig:
    """A Qwen2-MoE (with a shared expert) for routing parity tests."""
    return Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
        moe_intermediate_size=intermediate, shared_expert_intermediate_size=intermediate,
        num_experts=experts, num_experts_per_tok=experts_per_tok, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=512, **kw,
    )


def router_parameters(teacher: nn.Module) -> list[nn.Parameter]:
    """The router weights [E, H] of every MoE block, in block order."""
    return [l.gate.weight for l in _layers(teacher)]


def mean_loss(loss_sum: torch.Tensor, n) -> torch.Tensor:
    """loss_sum / n, and 0 (not NaN) when n == 0."""
    return loss_sum / (n.clamp_min(1) if torch.is_tensor(n) else max(int(n), 1))
