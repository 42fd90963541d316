"""Fields of a collated cross-tokenizer batch, read the same way by every loss.

A batch is a dict (the loop's collator) or an object with the same attributes (tests, the cache). The
chunk fields come from sakd/align/tokens.py: chunk c covers student tokens ``chunk_s_start[c] ..
chunk_s_end[c] - 1`` and teacher tokens ``chunk_t_start[c] .. chunk_t_end[c] - 1`` (the same bytes)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def field(batch, name: str) -> torch.Tensor:
    """The collated batch may be a dict or an object with attributes."""
    return batch[name] if isinstance(batch, Mapping) else getattr(batch, name)


def count(n, like: torch.Tensor) -> torch.Tensor:
    """A target count as a long scalar on ``like``'s device (an int or a tensor)."""
    return torch.as_tensor(n, dtype=torch.long, device=like.device)


def one_to_one(batch) -> torch.Tensor:
    """[B, C] bool: chunks that are exactly one token on each side."""
    s0, s1 = field(batch, "chunk_s_start"), field(batch, "chunk_s_end")
    t0, t1 = field(batch, "chunk_t_start"), field(batch, "chunk_t_end")
    return field(batch, "chunk_mask") & (s1 - s0 == 1) & (t1 - t0 == 1)


def one_to_one_positions(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(example, student position, teacher position), each [N], of the logits that
    predict every 1:1 chunk (one token on each side): chunk_s_start - 1 and
    chunk_t_start - 1. Both predict the text from the same byte on, and the token
    they should give is the same string."""
    b, c = one_to_one(batch).nonzero(as_tuple=True)
    return b, field(batch, "chunk_s_start")[b, c] - 1, field(batch, "chunk_t_start")[b, c] - 1
