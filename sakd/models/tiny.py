"""Tiny model configurations with the shapes of the real pair, scaled down.

Used by the demo, the benchmarks and the tests: models are built from these
configs, saved with ``save_pretrained`` and loaded back with ``from_pretrained``,
so that every test runs the same loading code as the real pair."""

from __future__ import annotations

from transformers import LlamaConfig, Qwen3MoeConfig


def qwen3_moe_config(vocab_size: int, hidden: int = 256, layers: int = 4, heads: int = 4,
                     experts: int = 3, experts_per_tok: int = 1, intermediate: int = 512,
                     max_positions: int = 1024, **kw) -> Qwen3MoeConfig:
    """Like Huihui-MoE-1B-A0.6B (Qwen3-MoE, 3 experts, 1 active per token), scaled down."""
    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
        intermediate_size=intermediate, moe_intermediate_size=intermediate,
        num_experts=experts, num_experts_per_tok=experts_per_tok, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=max_positions,
        tie_word_embeddings=True, rope_theta=10000.0, **kw,
    )


def llama_config(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4,
                 intermediate: int = 384, max_positions: int = 1024, **kw) -> LlamaConfig:
    """Like SmolLM-135M (Llama, tied embeddings), scaled down."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
        max_position_embeddings=max_positions, tie_word_embeddings=True, rope_theta=10000.0, **kw,
    )
