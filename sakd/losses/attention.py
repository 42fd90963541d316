"""Attention transfer between two tokenizations, at the granularity of chunks.

Token-level attention maps of two tokenizers have different shapes and no
position-by-position correspondence. Chunks do correspond (both sides cover the
same bytes), so both maps are reduced to a chunk × chunk map:

    A_c[q, k] = Σ_{tokens x in chunk k} mean_h attn[h, end(q), x]   / (row sum)

rows are taken at the last token of query chunk q (where both models have read
the same bytes), columns add up the attention mass falling on the tokens of key
chunk k. The start token (chunk -1) is not text: its mass — often large, an
"attention sink" — is dropped and the row renormalised. Causality makes rows
zero beyond the query chunk; that is enforced explicitly.

Loss per layer pair and query chunk q: KL(A^t_q ‖ A^s_q) = Σ_k A^t log(A^t / A^s)
over key chunks k ≤ q, averaged over pairs. Source: attention-map transfer in
TinyBERT (Jiao et al. 2020, eq. 4, there MSE on token maps) and MiniLM (Wang et al.
2020, KL on attention distributions), moved to byte-aligned chunks here.

Attention maps come from ``output_attentions=True`` with ``attn_implementation="eager"``
(transformers 5.x ``sdpa`` returns none). Layer pairs use hidden_states numbering
(sakd/losses/hidden.py): layer i ≥ 1 is ``attentions[i - 1]``."""

from __future__ import annotations

import torch

from sakd.errors import UserError
from sakd.losses.batch import field as _field


def chunk_attention(attn: torch.Tensor, chunk_ends: torch.Tensor, token_chunk: torch.Tensor,
                    chunk_mask: torch.Tensor) -> torch.Tensor:
    """Head-averaged chunk × chunk attention, rows renormalised.

    attn: [B, H, L, L] (query, key); chunk_ends: [B, C] index of the LAST token of each
    chunk (i.e. chunk_*_end - 1); token_chunk: [B, L] chunk of each token, -1 for the
    start token and padding; chunk_mask: [B, C]. Returns [B, C, C] float32 (float64 if
    attn is): row q is a distribution over key chunks 0..q; rows of padded chunks are 0."""
    B, H, L, _ = attn.shape
    C = chunk_ends.shape[1]
    dtype = torch.promote_types(attn.dtype, torch.float32)
    q_idx = chunk_ends.clamp(0, L - 1)                                     # padded chunks read a dummy row
    rows = attn.gather(2, q_idx[:, None, :, None].expand(B, H, C, L))    # [B, H, C, L]
    rows = rows.to(dtype).mean(1)                                         # [B, C, L]
    keep = token_chunk >= 0                                               # drop start token and padding
    rows = rows * keep[:, None, :]
    out = rows.new_zeros(B, C, C).scatter_add_(2, token_chunk.clamp(min=0)[:, None, :].expand(B, C, L), rows)
    causal = torch.ones(C, C, dtype=torch.bool, device=out.device).tril()
    out = out * causal * chunk_mask[:, :, None] * chunk_mask[:, None, :]
    return out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def attention_transfer_loss(s_attn_layers, t_attn_layers, batch, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher chunk-attention row ‖ student row), summed over query chunks.

    s_attn_layers / t_attn_layers: tuples of [B, H, L, L] (one per layer, as returned by
    ``output_attentions=True``). pairs: (student layer, teacher layer) in hidden_states
    numbering, both ≥ 1. Teacher maps are detached.

    Returns (loss_sum, n): loss_sum sums over the n real query chunks the KL averaged
    over pairs; n is the number of real chunks (int64 0-dim tensor)."""
    pairs = list(pairs)
    if not pairs:
        raise UserError("attention_transfer_loss: no layer pairs given; use layer_map() or list pairs")
    if any(i < 1 or j < 1 for i, j in pairs):
        raise UserError(f"attention layer pairs must be >= 1 (0 is the embedding output, it has no attention): {pairs}")
    mask = _field(batch, "chunk_mask")
    s_ends, t_ends = _field(batch, "chunk_s_end") - 1, _field(batch, "chunk_t_end") - 1
    s_chunk, t_chunk = _field(batch, "s_chunk"), _field(batch, "t_chunk")
    per_chunk = None
    for i, j in pairs:
        p = chunk_attention(t_attn_layers[j - 1].detach(), t_ends, t_chunk, mask)
        q = chunk_attention(s_attn_layers[i - 1], s_ends, s_chunk, mask)
        # xlogy: 0·log 0 = 0 where the teacher row has no mass (beyond the query chunk, padding).
        tiny = torch.finfo(q.dtype).tiny
        kl = (torch.xlogy(p, p) - p * q.clamp_min(tiny).log()).sum(-1)  # [B, C]
        per_chunk = kl if per_chunk is None else per_chunk + kl
    per_chunk = per_chunk / len(pairs)
    return per_chunk[mask].sum(), mask.sum()
