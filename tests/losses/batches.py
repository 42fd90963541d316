"""Hand-built collated batches in the format of sakd/data/text.py, for the loss tests.

``make_batch``: the losses only read the chunk tables and the token→chunk maps, so a batch can be
described by its chunk structure alone: per example, a list of chunks given as
(student tokens, teacher tokens). Token ids are drawn at random (never 0, which is
used as the start token of both sides and as padding). No tokenizer is involved;
this keeps the loss tests independent of sakd/data/text.py.

``byte_level_teacher`` / ``metaspace_student`` / ``text_batch``: hand vocabularies for the float64 reference
tests of the every-position losses (test_mapped.py, test_projected.py), each test choosing its words: a
byte-level BPE teacher that splits a multi-byte character (``cafÃ`` + ``©``), a Metaspace student with byte
fallback (``<0xNN>``), and the batch of real texts that sakd/data/text.py makes from them. ``phi_ref`` is
their slow φ: the first student token of a byte string."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sakd.align.tokens import bytes_to_unicode
from sakd.data.text import collate, encode_pair

B2U = bytes_to_unicode()


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


# ------------------------------------------------------------------------- hand vocabularies

def bpe_spec(words: list[str], base: list[str], specials: list[str]) -> dict:
    """vocab and merges of a BPE whose multi-character tokens are ``words`` (built left to right)."""
    vocab = {t: i for i, t in enumerate(specials + base)}
    merges = []
    for w in words:
        cur = w[0]
        for c in w[1:]:
            if cur + c not in vocab:
                vocab[cur + c] = len(vocab)
                merges.append((cur, c))
            cur = cur + c
    return {"vocab": vocab, "merges": merges}


def byte_level_teacher(words: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 / Qwen style) with the tokens ``words`` (text, in order) and ``" caf"`` + the first
    byte of ``"é"``: a character split across two tokens."""
    bl = lambda s: "".join(B2U[b] for b in s.encode("utf-8"))  # noqa: E731
    pieces = [bl(w) for w in words] + [bl(" caf") + B2U[0xC3]]
    spec = bpe_spec(pieces, [B2U[b] for b in range(256)], ["<|endoftext|>"])
    tok = Tokenizer(models.BPE(vocab=spec["vocab"], merges=spec["merges"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def metaspace_student(chars: list[str], words: list[str]) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (``▁`` for spaces, prefix space on the first word, byte fallback ``<0xNN>``)
    with the characters ``chars`` and the tokens ``words``."""
    base = [f"<0x{b:02X}>" for b in range(256)] + list(dict.fromkeys(chars))
    spec = bpe_spec(words, base, ["<unk>", "<s>", "</s>"])
    tok = Tokenizer(models.BPE(vocab=spec["vocab"], merges=spec["merges"], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def start_id(tok) -> int:
    """The token a span starts with: BOS, else EOS (the byte-level teacher has no BOS)."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def text_batch(s_tok, t_tok, texts: list[str]) -> dict[str, torch.Tensor]:
    """The collated batch of ``texts`` (one span each, up to 200 tokens a side), as sakd/data/text.py makes it."""
    items = [encode_pair(t, s_tok, t_tok, start_id(s_tok), start_id(t_tok), 200, 200) for t in texts]
    return collate(items, s_tok.pad_token_id, t_tok.pad_token_id)


def phi_ref(suffix: bytes, s_tok, s_str) -> int:
    """First student token of ``suffix``: the tokenizer's own when it spells a prefix, else the longest prefix
    (an ordinary token over a byte-fallback one, then the lowest id); -1: none."""
    try:
        ids = s_tok.backend_tokenizer.encode(suffix.decode("utf-8"), add_special_tokens=False).ids
        if ids and s_str[ids[0]] and suffix.startswith(s_str[ids[0]]):
            return ids[0]
    except UnicodeDecodeError:
        pass
    best, best_key = -1, None
    for u, b in enumerate(s_str):
        if b and suffix.startswith(b):
            key = (len(b), not s_tok.convert_ids_to_tokens(u).startswith("<0x"), -u)
            if best_key is None or key > best_key:
                best, best_key = u, key
    return best
