"""Where two vocabularies meet: token ids that name the same bytes.

Ids are private to a tokenizer: id 1879 is " world" in Qwen and something else
in SmolLM2. Two ids are comparable only if their tokens stand for the same
bytes, so the map is built on CANONICAL BYTES: a byte-level ``Ġworld`` and a
SentencePiece ``▁world`` both name ``b" world"``; ``<0x41>`` names ``b"A"``.

The prototype compared the teacher's first 49,152 logits with the student's
(truncation); :func:`same_id_same_string` counts how many of those id pairs
actually name the same string (for the real Qwen3 and SmolLM2 vocabularies:
next to none, see docs/cross-tokenizer.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sakd.align.tokens import tokenizer_info


def token_bytes(tokenizer, added_text: bool = False) -> tuple[list[bytes | None], list[bool]]:
    """Canonical bytes of every id (None: added/special token or a hole) and
    whether the id is a ``<0xNN>`` byte-fallback token.

    ``added_text``: an added token that is not special stands for its content's UTF-8 bytes (it is matched
    on the raw text: Gemma 3's ``"\n"`` and ``"\n\n"`` tokens, Qwen3's ``<think>``); the mapping tables
    (sakd/align/mapping.py) use this, so that text spelt by such tokens gets a target (issue 19, item 6)."""
    info = tokenizer_info(tokenizer)
    vocab = tokenizer.get_vocab()  # token string -> id, added tokens included
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    strings: list[bytes | None] = [None] * size
    fallback = [False] * size
    text_added = {int(i): a.content for i, a in tokenizer.added_tokens_decoder.items()
                  if added_text and not a.special and a.content}
    for tok, i in vocab.items():
        if i in text_added:
            strings[i] = text_added[i].encode("utf-8")
            continue
        if i in info.added_ids:
            continue
        strings[i] = info.canonical(tok)
        fallback[i] = info.is_byte_fallback(tok)
    return strings, fallback


def token_strings(tokenizer) -> list[bytes | None]:
    """Canonical bytes per id: byte-level tokens through GPT-2's byte table, ``▁`` as
    a space, ``<0xNN>`` as the byte NN; special and other added tokens: None."""
    return token_bytes(tokenizer)[0]


def byte_index(strings: list[bytes | None], fallback: list[bool]) -> dict[bytes, int]:
    """bytes -> one id. Within a vocabulary several ids may name the same bytes
    (``<0x41>`` and ``A``, ``<0x20>`` and ``▁``): keep the ordinary token over the
    byte-fallback one, then the lowest id, so that the map is one-to-one."""
    index: dict[bytes, int] = {}
    for i, b in enumerate(strings):
        if b is None:
            continue
        j = index.get(b)
        if j is None or (fallback[j] and not fallback[i]):
            index[b] = i
    return index


@dataclass
class VocabMap:
    """``shared_s[k]`` (student id) and ``shared_t[k]`` (teacher id) name the same bytes.

    Shapes: ``shared_s``, ``shared_t``: [S] long, in increasing student id.
    ``student_vocab``/``teacher_vocab``: ``len(tokenizer)`` of each side (the
    model's logit width may be larger; columns past it name no token)."""

    shared_s: torch.Tensor
    shared_t: torch.Tensor
    student_vocab: int
    teacher_vocab: int

    def __len__(self) -> int:
        return int(self.shared_s.numel())


def build_vocab_map(student_tok, teacher_tok) -> VocabMap:
    """Pairs of ids naming identical canonical bytes, one-to-one.

    Identical vocabularies (the same token -> id table) map every id to itself, specials and
    byte-fallback duplicates included, so that same-tokenizer distillation is exactly ordinary
    full-vocabulary KD."""
    if student_tok.get_vocab() == teacher_tok.get_vocab():
        ids = torch.arange(len(student_tok), dtype=torch.long)
        return VocabMap(ids, ids.clone(), len(student_tok), len(teacher_tok))
    s_index = byte_index(*token_bytes(student_tok))
    t_index = byte_index(*token_bytes(teacher_tok))
    pairs = sorted((s_index[b], t_index[b]) for b in s_index.keys() & t_index.keys())
    shared_s = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    shared_t = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return VocabMap(shared_s, shared_t, len(student_tok), len(teacher_tok))


def same_id_same_string(student_tok, teacher_tok) -> int:
    """How many student ids name the same bytes as the teacher's token with the SAME
    id: the number of columns that truncating teacher logits to the student's
    vocabulary would compare correctly."""
    s, t = token_strings(student_tok), token_strings(teacher_tok)
    return sum(1 for i in range(min(len(s), len(t))) if s[i] is not None and s[i] == t[i])
