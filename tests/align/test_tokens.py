"""Byte spans of tokens and the chunks where two tokenisations meet.

Invariants checked on random Unicode text (hypothesis) against references
written the slow obvious way, plus hand-checked examples."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from sakd.align.tokens import AlignmentError, Encoded, align, chunk_stats, encode_with_bytes, tokenizer_info
from sakd.align.vocab import token_strings
from sakd.demo.tokenizers import train_teacher_tokenizer
from sakd.errors import UserError

# Pieces that stress the alignment: multi-byte characters that byte-level BPE
# splits, combining marks, ZWJ emoji, flags, whitespace runs, special-token text.
FRAGMENTS = [
    "the", " the", "Hamlet", "HAMLET.", " ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\r\n",
    "—", " — ", "“", "”", "’", "'s", "'ll", "é", "e\u0301", "\u0301", "\u0308", "Å", "ß", "ﬁ", "Ω",
    "日本語", "中", " 日本", "😀", " 😀", "👩\u200d👩\u200d👧", "🇫🇷", "12", " 2024", "3.14", "...",
    "\u00a0", "\u2028", "▁", "<s>", "<|endoftext|>", "<|im_start|>", "x", "ǘ",
]


def texts(chars):
    return st.lists(st.one_of(st.sampled_from(FRAGMENTS), chars), max_size=24).map("".join)


# Demo pair: anything but surrogates/unassigned (byte fallback and a full byte alphabet).
DEMO_CHARS = st.characters(blacklist_categories=("Cs", "Cn"))
# Real pair: SmolLM2 has no token for some control bytes (0x04, 0x06, ...) and the
# lead bytes 0xF1/0xF2 (planes 4-11, all unassigned) -- see test_smollm2_refuses_bytes_it_cannot_spell.
REAL_CHARS = st.characters(blacklist_categories=("Cs", "Cn", "Cc", "Co"))


_STRINGS: dict[int, list] = {}


def strings_of(tok) -> list:
    """token_strings once per tokenizer (151,669 ids for Qwen: too slow per example)."""
    if id(tok) not in _STRINGS:
        _STRINGS[id(tok)] = token_strings(tok)
    return _STRINGS[id(tok)]


def start_id(tok) -> int:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def check_encoding(tok, text: str, enc: Encoded) -> None:
    """The encoding is the tokenizer's own, contiguous, and every token spells its span."""
    data = text.encode("utf-8")
    assert enc.has_start_token and enc.ids[0] == start_id(tok)
    assert (enc.byte_starts[0], enc.byte_ends[0]) == (0, 0)
    assert enc.ids[1:] == tok(text, add_special_tokens=False)["input_ids"]
    pos = 0
    strings = strings_of(tok)
    meta = tokenizer_info(tok).metaspace
    for k in range(1, len(enc)):
        assert enc.byte_starts[k] == pos, "tokens must be contiguous"
        span = data[enc.byte_starts[k]:enc.byte_ends[k]]
        canon = strings[enc.ids[k]]
        if canon is not None:  # added tokens have no canonical bytes
            spelled = {canon, canon[1:] if canon[:1] == b" " else canon}  # [1:]: a prepended space
            if meta:  # SentencePiece writes a literal "▁" of the text as "▁" too
                spelled.add(span.replace(meta.encode(), b" "))
                ok = span.replace(meta.encode(), b" ") in spelled or span in spelled
            else:
                ok = span in spelled
            assert ok, (k, span, canon)
        pos = enc.byte_ends[k]
    assert pos == len(data)


def next_token(enc: Encoded, byte: int) -> int:
    """Slow reference: the first text token that starts at or after ``byte``."""
    return next(k for k in range(enc.first_text_token, len(enc)) if enc.byte_starts[k] >= byte)


def check_chunks(es: Encoded, et: Encoded, chunks, text: str, mode: str) -> list[int]:
    """Partition, equal byte spans, texts concatenate; returns the chunk end bytes."""
    data = text.encode("utf-8")
    if not data:
        assert chunks == []
        return []
    assert chunks[0][0] == 1 and chunks[0][2] == 1
    assert chunks[-1][1] == len(es) and chunks[-1][3] == len(et)
    pieces, ends = [], []
    for c, (sa, sb, ta, tb) in enumerate(chunks):
        assert sa < sb and ta < tb, "every chunk holds tokens of both sides"
        if c:
            assert (sa, ta) == (chunks[c - 1][1], chunks[c - 1][3]), "chunks are consecutive"
        lo, hi = es.byte_starts[sa], es.byte_ends[sb - 1]
        assert (lo, hi) == (et.byte_starts[ta], et.byte_ends[tb - 1]), "same bytes on both sides"
        assert hi > lo
        pieces.append(data[lo:hi])
        ends.append(hi)
    assert b"".join(pieces) == data
    common = sorted((set(es.byte_ends[1:]) & set(et.byte_ends[1:])) - {0})
    if mode == "boundary":
        assert ends == common, "a chunk closes at EVERY byte where both sides end"
    else:
        expected = [x for x in common if x == len(data) or (
            es.word_start[next_token(es, x)] and et.word_start[next_token(et, x)])]
        assert ends == expected
    return ends


def check_pair(student, teacher, text: str) -> None:
    es = encode_with_bytes(student, text, start_token=start_id(student))
    et = encode_with_bytes(teacher, text, start_token=start_id(teacher))
    check_encoding(student, text, es)
    check_encoding(teacher, text, et)
    fine = check_chunks(es, et, align(es, et), text, "boundary")
    coarse = check_chunks(es, et, align(es, et, mode="word"), text, "word")
    assert set(coarse) <= set(fine), "word chunks are unions of boundary chunks"


FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(texts(DEMO_CHARS))
def test_demo_pair_partitions_random_text(demo_pair, raw):
    check_pair(*demo_pair, unicodedata.normalize("NFC", raw))


@pytest.mark.real_tokenizers
@FAST
@given(texts(REAL_CHARS))
def test_real_pair_partitions_random_text(real_pair, raw):
    check_pair(*real_pair, unicodedata.normalize("NFC", raw))


@settings(max_examples=60, deadline=None)
@given(texts(DEMO_CHARS))
def test_unnormalized_text_aligns_or_is_refused_by_name(demo_pair, raw):
    """The demo teacher normalizes to NFC: text it changes is either still aligned
    exactly or refused with an error naming that tokenizer; NFC text never is."""
    student, teacher = demo_pair
    try:
        check_pair(student, teacher, raw)
    except AlignmentError as e:
        assert unicodedata.normalize("NFC", raw) != raw
        assert "demo-teacher" in str(e) and "normalize" in str(e)


def test_split_multibyte_character_gets_exact_byte_ends(train_paragraphs):
    """A teacher that never saw an em-dash spells it as 3 byte tokens. All three report
    the same character offsets (1, 2); the byte ends must be 2, 3, 4."""
    ascii_teacher = train_teacher_tokenizer(iter(train_paragraphs), vocab_size=400)
    text = "a—b"  # bytes: a=0, — = 1..4 (e2 80 94), b=4
    enc = encode_with_bytes(ascii_teacher, text)
    assert ascii_teacher.convert_ids_to_tokens(enc.ids) == ["a", "â", "Ģ", "Ķ", "b"]
    assert enc.byte_starts == [0, 1, 2, 3, 4]
    assert enc.byte_ends == [1, 2, 3, 4, 5]
    offsets = ascii_teacher(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert [tuple(o) for o in offsets] == [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]  # offsets alone: ends 4, 4, 4


@pytest.mark.real_tokenizers
def test_real_pair_chunk_over_split_cjk_character(real_pair):
    """SmolLM2 cuts " 日" (4 bytes) into Ġæ | Ĺ | ¥; Qwen has it as one token."""
    student, teacher = real_pair
    es = encode_with_bytes(student, "a 日本", start_token=0)
    et = encode_with_bytes(teacher, "a 日本", start_token=151643)
    assert student.convert_ids_to_tokens(es.ids[1:]) == ["a", "Ġæ", "Ĺ", "¥", "æľ¬"]
    assert es.byte_ends == [0, 1, 3, 4, 5, 8]
    assert teacher.convert_ids_to_tokens(et.ids[1:]) == ["a", "ĠæĹ¥", "æľ¬"]
    assert et.byte_ends == [0, 1, 5, 8]
    assert align(es, et) == [(1, 2, 1, 2), (2, 5, 2, 3), (5, 6, 3, 4)]
    assert align(es, et, mode="word") == [(1, 2, 1, 2), (2, 6, 2, 4)]


def test_sentencepiece_prefix_space_is_not_in_the_text(demo_pair):
    student, teacher = demo_pair
    enc = encode_with_bytes(student, "Hello world")
    toks = student.convert_ids_to_tokens(enc.ids)
    assert toks[0].startswith("▁H")  # the prepended ▁ covers no byte of the text
    assert enc.byte_starts[0] == 0 and enc.byte_ends[0] == len(toks[0]) - 1
    # A lone prepended ▁ before byte-fallback tokens is empty and joins the next chunk.
    enc = encode_with_bytes(student, "😀", start_token=1)
    assert student.convert_ids_to_tokens(enc.ids) == ["<s>", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert enc.byte_ends == [0, 0, 1, 2, 3, 4]
    et = encode_with_bytes(teacher, "😀", start_token=0)
    assert et.byte_ends == [0, 1, 2, 3, 4]
    assert align(enc, et) == [(1, 3, 1, 2), (3, 4, 2, 3), (4, 5, 3, 4), (5, 6, 4, 5)]
    assert align(enc, et, mode="word") == [(1, 6, 1, 5)]


def test_special_token_inside_text(demo_pair):
    """"<s>" is one special token for the student and three pieces for the teacher."""
    student, teacher = demo_pair
    es = encode_with_bytes(student, "a<s>b", start_token=1)
    et = encode_with_bytes(teacher, "a<s>b", start_token=0)
    assert student.convert_ids_to_tokens(es.ids) == ["<s>", "▁a", "<s>", "b"]
    assert es.byte_ends == [0, 1, 4, 5]
    assert teacher.convert_ids_to_tokens(et.ids) == ["<|endoftext|>", "a", "<", "s", ">", "b"]
    assert align(es, et) == [(1, 2, 1, 2), (2, 3, 2, 5), (3, 4, 5, 6)]


def test_word_mode_closes_only_before_word_starts(demo_pair):
    student, teacher = demo_pair
    text = "Hello world,\nmy lord"
    es, et = encode_with_bytes(student, text, 1), encode_with_bytes(teacher, text, 0)
    data = text.encode()
    words = [data[es.byte_starts[c[0]]:es.byte_ends[c[1] - 1]] for c in align(es, et, mode="word")]
    assert words == [b"Hello", b" world,\n", b"my", b" lord"]  # the teacher has ",\n" as one token
    assert len(align(es, et)) > len(words)


def test_word_start_flags(demo_pair):
    _, teacher = demo_pair
    enc = encode_with_bytes(teacher, "ab cd\nef", start_token=0)
    data = b"ab cd\nef"
    spans = [data[a:b] for a, b in zip(enc.byte_starts, enc.byte_ends)]
    for k, span in enumerate(spans):
        expected = k <= 1 or span[:1] in (b" ", b"\n") or data[enc.byte_starts[k] - 1:enc.byte_starts[k]] == b"\n"
        assert enc.word_start[k] == expected, (k, span)


def test_no_start_token_partitions_from_zero(demo_pair):
    student, teacher = demo_pair
    es, et = encode_with_bytes(student, "to be, or not"), encode_with_bytes(teacher, "to be, or not")
    chunks = align(es, et)
    assert chunks[0][0] == 0 and chunks[0][2] == 0
    assert chunks[-1][1] == len(es) and chunks[-1][3] == len(et)


def test_chunk_stats_hand_counted():
    chunks = [(1, 2, 1, 2), (2, 5, 2, 3), (5, 6, 3, 4)]
    stats = chunk_stats(chunks)
    assert stats["chunks"] == 3
    assert stats["one_to_one_chunks"] == 2
    assert stats["student_tokens"] == 5 and stats["teacher_tokens"] == 3
    assert stats["student_tokens_in_one_to_one"] == 2
    assert stats["frac_student_in_one_to_one"] == pytest.approx(2 / 5)
    assert stats["frac_teacher_in_one_to_one"] == pytest.approx(2 / 3)
    assert stats["max_student_tokens_per_chunk"] == 3


def test_trimmed_offsets_and_prefix_space_variants(demo_pair):
    """GPT-2-style conventions: offsets trimmed of leading spaces, and a prepended Ġ."""
    _, teacher = demo_pair
    trimmed = Tokenizer.from_str(teacher.backend_tokenizer.to_str())
    trimmed.post_processor = processors.ByteLevel(trim_offsets=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=trimmed)
    text = "Hello  world \n x"
    enc = encode_with_bytes(tok, text)
    spans = [text.encode()[a:b] for a, b in zip(enc.byte_starts, enc.byte_ends)]
    assert spans == [bytes(strings_of(tok)[i]) for i in enc.ids]  # leading spaces stay in the spans
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(text[s:e] != span.decode() for (s, e), span in zip(offsets, spans))  # offsets were trimmed
    prefixed = Tokenizer.from_str(teacher.backend_tokenizer.to_str())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=prefixed)
    enc = encode_with_bytes(tok, "Hello world")
    assert tok.convert_ids_to_tokens(enc.ids)[0].startswith("Ġ")
    assert enc.byte_starts[0] == 0 and enc.byte_ends[-1] == 11


def test_refuses_normalizer_change(demo_pair):
    _, teacher = demo_pair
    with pytest.raises(AlignmentError, match="demo-teacher.*NFC"):
        encode_with_bytes(teacher, "cafe\u0301 ǘ")
    enc = encode_with_bytes(teacher, unicodedata.normalize("NFC", "cafe\u0301 ǘ"))
    assert enc.byte_ends[-1] == len("café ǘ".encode())


def test_refuses_tokenizer_that_drops_whitespace():
    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.name_or_path = "word-level"
    with pytest.raises(AlignmentError, match=r"word-level drops bytes 1\.\.2"):
        encode_with_bytes(tok, "a b")


def test_refuses_slow_tokenizer():
    class Slow:
        is_fast = False
        name_or_path = "my-slow-tokenizer"

    with pytest.raises(AlignmentError, match="my-slow-tokenizer is not a fast tokenizer; offsets needed"):
        encode_with_bytes(Slow(), "text")


def test_refuses_offsets_that_disagree_with_bytes(demo_pair):
    """A tokenizer whose offsets contradict its own bytes is refused, not trusted."""
    _, teacher = demo_pair

    class Lying:
        def __init__(self, tok):
            self.tok, self.is_fast, self.name_or_path = tok, True, "lying-tokenizer"
            self.backend_tokenizer, self.added_tokens_decoder = tok.backend_tokenizer, tok.added_tokens_decoder

        def __call__(self, text, **kw):
            out = dict(self.tok(text, **kw))
            out["offset_mapping"] = [(0, len(text))] * len(out["input_ids"])
            return out

        def convert_ids_to_tokens(self, ids):
            return self.tok.convert_ids_to_tokens(ids)

        def __len__(self):
            return len(self.tok)

    with pytest.raises(AlignmentError, match="lying-tokenizer.*refusing to guess"):
        encode_with_bytes(Lying(teacher), "to be or not")


def test_align_refuses_different_texts_and_unknown_mode(demo_pair):
    student, teacher = demo_pair
    with pytest.raises(AlignmentError, match="different texts"):
        align(encode_with_bytes(student, "to be"), encode_with_bytes(teacher, "to be!"))
    es, et = encode_with_bytes(student, "x"), encode_with_bytes(teacher, "x")
    with pytest.raises(UserError, match="'words'"):
        align(es, et, mode="words")
