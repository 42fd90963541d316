"""Hand-built collated batches in the format of sakd/data/text.py, for the loss tests.

The losses only read the chunk tables and the token→chunk maps, so a batch can be
described by its chunk structure alone: per example, a list of chunks given as
(student tokens, teacher tokens). Token ids are drawn at random (never 0, which is
used as the start token of both sides and as padding). No tokenizer is involved;
this keeps the loss tests independent of sakd/data/text.py."""

from __future__ import annotations

import torch


def make_batch(examples: list[list[tuple[int, int]]], *, s_vocab: int = 11, t_vocab: int = 13,
               seed: int = 0, same_ids: bool = False) -> dict[str, torch.Tensor]:
    """Collate examples given as chunk structures [(n_student_tokens, n_teacher_tokens), ...].

    Index 0 of both sides is the start token (id 0); chunk c of an example covers the
    next n_s student and n_t teacher tokens. ``same_ids`` copies the student ids to the
    teacher (only valid when every chunk has n_s == n_t), which makes the pair look like
    one tokenizer seen twice."""
    g = torch.Generator().manual_seed(seed)
    B = len(examples)
    Ls = 1 + max(sum(n_s for n_s, _ in ex) for ex in examples)
    Lt = 1 + max(sum(n_t for _, n_t in ex) for ex in examples)
    C = max(len(ex) for ex in examples)
    out = {
        "s_ids": torch.zeros(B, Ls, dtype=torch.long), "s_mask": torch.zeros(B, Ls, dtype=torch.bool),
        "t_ids": torch.zeros(B, Lt, dtype=torch.long), "t_mask": torch.zeros(B, Lt, dtype=torch.bool),
        "s_chunk": torch.full((B, Ls), -1, dtype=torch.long), "t_chunk": torch.full((B, Lt), -1, dtype=torch.long),
        "chunk_mask": torch.zeros(B, C, dtype=torch.bool),
    }
    for key in ("chunk_s_start", "chunk_s_end", "chunk_t_start", "chunk_t_end"):
        out[key] = torch.zeros(B, C, dtype=torch.long)
    for b, ex in enumerate(examples):
        s_pos, t_pos = 1, 1  # position 0 is the start token
        for c, (n_s, n_t) in enumerate(ex):
            assert n_s >= 1 and n_t >= 1
            out["chunk_s_start"][b, c], out["chunk_s_end"][b, c] = s_pos, s_pos + n_s
            out["chunk_t_start"][b, c], out["chunk_t_end"][b, c] = t_pos, t_pos + n_t
            out["chunk_mask"][b, c] = True
            out["s_chunk"][b, s_pos:s_pos + n_s] = c
            out["t_chunk"][b, t_pos:t_pos + n_t] = c
            s_pos, t_pos = s_pos + n_s, t_pos + n_t
        out["s_mask"][b, :s_pos] = True
        out["t_mask"][b, :t_pos] = True
        out["s_ids"][b, 1:s_pos] = torch.randint(1, s_vocab, (s_pos - 1,), generator=g)
        out["t_ids"][b, 1:t_pos] = torch.randint(1, t_vocab, (t_pos - 1,), generator=g)
    if same_ids:
        assert all(n_s == n_t for ex in examples for n_s, n_t in ex)
        out["t_ids"] = out["s_ids"].clone()
    return out


def identity_batch(lengths: list[int], vocab: int = 11, seed: int = 0) -> dict[str, torch.Tensor]:
    """One tokenizer on both sides: chunk k is token k on both sides, identical ids."""
    return make_batch([[(1, 1)] * n for n in lengths], s_vocab=vocab, t_vocab=vocab, seed=seed, same_ids=True)


# A mixed structure used by several tests: 1:1 chunks, 1:n, n:1, n:m and a padded example.
MIXED = [
    [(1, 1), (2, 1), (1, 1), (1, 3), (2, 2), (1, 1)],
    [(1, 1), (1, 2), (3, 1)],
]
