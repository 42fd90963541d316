"""The vocabulary map: ids of two tokenizers that name the same bytes."""

from __future__ import annotations

import re

import pytest
import torch

from sakd.align.vocab import build_vocab_map, same_id_same_string, token_strings


def student_bytes_slow(tok, i: int) -> bytes | None:
    """Reference for a SentencePiece-style token, written out by hand."""
    if i in tok.added_tokens_decoder:
        return None
    s = tok.convert_ids_to_tokens(i)
    m = re.fullmatch(r"<0x([0-9A-F]{2})>", s)
    return bytes([int(m.group(1), 16)]) if m else s.replace("▁", " ").encode()


def teacher_bytes_slow(tok, i: int) -> bytes | None:
    """Reference for a byte-level token: the decoder's own text (only where it is valid UTF-8)."""
    return tok.backend_tokenizer.decode([i], skip_special_tokens=False).encode()


def test_token_strings_conventions(demo_pair):
    student, teacher = demo_pair
    s, t = token_strings(student), token_strings(teacher)
    assert len(s) == len(student) and len(t) == len(teacher)
    assert s[:3] == [None, None, None]  # <unk> <s> </s>
    assert s[student.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert s[student.convert_tokens_to_ids("<0xE2>")] == b"\xe2"
    assert s[student.convert_tokens_to_ids("▁the")] == b" the"
    assert t[teacher.convert_tokens_to_ids("<|endoftext|>")] is None
    assert t[teacher.convert_tokens_to_ids("Ġthe")] == b" the"
    assert t[teacher.convert_tokens_to_ids("Ċ")] == b"\n"
    assert t[teacher.convert_tokens_to_ids("â")] == b"\xe2"  # one byte of a 3-byte character


def test_demo_map_pairs_name_identical_bytes(demo_pair):
    student, teacher = demo_pair
    vm = build_vocab_map(student, teacher)
    assert vm.shared_s.dtype == torch.long and vm.shared_s.shape == vm.shared_t.shape
    assert (vm.student_vocab, vm.teacher_vocab) == (len(student), len(teacher))
    checked = 0
    for i, j in zip(vm.shared_s.tolist(), vm.shared_t.tolist()):
        b = student_bytes_slow(student, i)
        assert b is not None and b == token_strings(teacher)[j]
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert teacher_bytes_slow(teacher, j) == b
        checked += 1
    assert checked > 300  # the rest are single bytes 0x80-0xFF (fallback tokens vs byte tokens)
    # one-to-one
    assert len(set(vm.shared_s.tolist())) == len(vm) == len(set(vm.shared_t.tolist()))
    # complete: every byte string both vocabularies have is in the map
    s_set = {b for b in token_strings(student) if b is not None}
    t_set = {b for b in token_strings(teacher) if b is not None}
    assert len(vm) == len(s_set & t_set)
    assert len(vm) > 300  # the two demo vocabularies overlap a lot, not fully


def test_duplicate_strings_keep_the_ordinary_token(demo_pair):
    """"A" and "<0x41>" both name b"A": the map keeps "A"; a byte only the fallback
    spells (0xF0) keeps the fallback token."""
    student, teacher = demo_pair
    vm = build_vocab_map(student, teacher)
    pairs = dict(zip(vm.shared_s.tolist(), vm.shared_t.tolist()))
    a, a_fallback = student.convert_tokens_to_ids("A"), student.convert_tokens_to_ids("<0x41>")
    assert pairs[a] == teacher.convert_tokens_to_ids("A")
    assert a_fallback not in pairs
    assert pairs[student.convert_tokens_to_ids("<0xF0>")] == teacher.convert_tokens_to_ids("ð")


def test_identical_tokenizers_give_identity(demo_pair):
    student, teacher = demo_pair
    # one vocabulary on both sides: every id maps to itself (specials and byte-fallback duplicates too),
    # so that same-tokenizer distillation is ordinary full-vocabulary KD
    for tok in (teacher, student):
        vm = build_vocab_map(tok, tok)
        assert vm.shared_s.tolist() == list(range(len(tok))) and vm.shared_t.tolist() == list(range(len(tok)))
    ordinary = [i for i in range(len(teacher)) if i not in teacher.added_tokens_decoder]
    assert same_id_same_string(teacher, teacher) == len(ordinary)


def test_same_id_same_string_counts_coinciding_ids(demo_pair):
    student, teacher = demo_pair
    s, t = token_strings(student), token_strings(teacher)
    slow = 0
    for i in range(min(len(s), len(t))):
        if s[i] is not None and s[i] == t[i]:
            slow += 1
    assert same_id_same_string(student, teacher) == slow
    assert slow < 0.05 * len(student)  # ids are private to a tokenizer


@pytest.mark.real_tokenizers
def test_real_shared_vocabulary(real_pair):
    """SmolLM2 (student, 49,152) vs Qwen3 (teacher, 151,669).

    Measured: 39,234 byte strings in common. Matching raw token strings gives
    39,237: the same plus the three added tokens both define by the same text
    (<|endoftext|>, <|im_start|>, <|im_end|>), which name no bytes of the text."""
    student, teacher = real_pair
    vm = build_vocab_map(student, teacher)
    assert 39_200 <= len(vm) <= 39_300
    raw = set(student.get_vocab()) & set(teacher.get_vocab())
    assert len(raw) == len(vm) + 3
    s, t = token_strings(student), token_strings(teacher)
    assert all(s[i] == t[j] for i, j in zip(vm.shared_s.tolist(), vm.shared_t.tolist()))
    assert vm.shared_t.max() < 151_643 and vm.shared_s.max() < 49_152


@pytest.mark.real_tokenizers
def test_real_truncation_compares_17_ids(real_pair):
    """Truncating Qwen logits to the first 49,152 ids compares id i with id i: only 17
    of those pairs are the same token (control bytes 0x07-0x12, "  ", "an", " D",
    "opt", " Michael"); the other 49,135 columns compare unrelated tokens."""
    student, teacher = real_pair
    assert same_id_same_string(student, teacher) == 17
    s, t = token_strings(student), token_strings(teacher)
    same = [s[i] for i in range(len(s)) if s[i] is not None and s[i] == t[i]]
    assert b" Michael" in same and b"\n" in same
