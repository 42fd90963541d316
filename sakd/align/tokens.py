"""Tokens as byte spans of the text, and the chunks where two tokenisations meet.

Two tokenizers cut the same text differently, so their positions cannot be
compared one by one (never interpolate along the sequence). What they share is
the text itself: every token covers a span of the text's UTF-8 bytes, and
wherever a student token and a teacher token END AT THE SAME BYTE, the text
before that byte has been consumed by both. Those common ends cut both token
sequences into chunks: chunk c holds student tokens ``[s_start, s_end)`` and
teacher tokens ``[t_start, t_end)``, and both cover exactly the same bytes.
(The chunking of cross-tokenizer distillation by approximate likelihood
matching: Minixhofer, Vulić & Ponti 2025, "Universal Cross-Tokenizer
Distillation via Approximate Likelihood Matching", arXiv:2503.20083.)

Byte spans come from each token's OWN bytes as a running sum, not from the
tokenizer's character offsets: a byte-level BPE may split one multi-byte
character (an em-dash is 3 bytes) across tokens, and then several tokens report
the same character offsets. The offsets are still used, as a cross-check.
"""

from __future__ import annotations

import bisect
import re
import weakref
from dataclasses import dataclass

from sakd.errors import UserError


class AlignmentError(UserError):
    """A tokenisation cannot be put on the text's byte axis; the message names the tokenizer."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by every byte-level BPE
    (``Ġ`` is byte 0x20, ``Ċ`` is 0x0A): printable Latin-1 bytes map to themselves,
    the other 68 bytes to U+0100 onwards in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CHAR_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _state(component) -> str:
    """A tokenizers component (normalizer, pre-tokenizer, decoder) as its JSON text ('' if absent)."""
    if component is None:
        return ""
    state = component.__getstate__()
    return state.decode("utf-8") if isinstance(state, bytes) else str(state)


class TokenizerInfo:
    """How one tokenizer writes bytes into its token strings.

    - byte-level BPE (GPT-2, Qwen, SmolLM): every character of a token string is
      one byte through :func:`bytes_to_unicode`;
    - SentencePiece style (Llama, the demo student): ``▁`` is a space and, with
      byte fallback, ``<0xNN>`` is the single byte NN;
    - anything else: the token string's UTF-8 bytes.
    Added tokens (special or not) have no canonical bytes: they are cut out of
    the text before the model sees it, and their span is taken from the offsets.
    """

    def __init__(self, tokenizer):
        self.name = tokenizer_name(tokenizer)
        backend = tokenizer.backend_tokenizer
        pre, dec, norm = _state(backend.pre_tokenizer), _state(backend.decoder), _state(backend.normalizer)
        self.byte_level = '"ByteLevel"' in pre or '"ByteLevel"' in dec
        meta = re.search(r'"type":\s*"Metaspace",\s*"replacement":\s*"([^"]+)"', pre)
        if meta:
            self.metaspace = meta.group(1)
        elif "▁" in norm or "▁" in dec:
            self.metaspace = "▁"
        else:
            self.metaspace = None
        # A text starting with a literal "▁" gets no prepended one (Metaspace checks the replaced text).
        self.metaspace_bytes = self.metaspace.encode("utf-8") if self.metaspace else b" "
        self.byte_fallback = bool(getattr(backend.model, "byte_fallback", False))
        # A ``Prepend`` normalizer (legacy Llama) adds a space even before a text
        # that already starts with one; Metaspace/ByteLevel add one only if missing.
        self.prepend_always = '"Prepend"' in norm
        self.normalizer = backend.normalizer
        self.added_ids = frozenset(int(i) for i in tokenizer.added_tokens_decoder)
        self.size = len(tokenizer)
        self._cache: dict[int, bytes | None] = {}

    def canonical(self, token: str) -> bytes | None:
        """The bytes a (non-added) token string stands for; None if it names no bytes."""
        if self.byte_level:
            try:
                return bytes(_CHAR_TO_BYTE[c] for c in token)
            except KeyError:
                return None
        if self.byte_fallback:
            m = _BYTE_FALLBACK.fullmatch(token)
            if m:
                return bytes([int(m.group(1), 16)])
        if self.metaspace:
            token = token.replace(self.metaspace, " ")
        return token.encode("utf-8")

    def is_byte_fallback(self, token: str) -> bool:
        return self.byte_fallback and _BYTE_FALLBACK.fullmatch(token) is not None

    def bytes_of(self, token_id: int, token: str) -> bytes | None:
        if token_id not in self._cache:
            self._cache[token_id] = None if token_id in self.added_ids else self.canonical(token)
        return self._cache[token_id]

    def normalizer_changes(self, text: str) -> bool:
        return self.normalizer is not None and self.normalizer.normalize_str(text) != text


_INFO: "weakref.WeakKeyDictionary[object, TokenizerInfo]" = weakref.WeakKeyDictionary()


def tokenizer_info(tokenizer) -> TokenizerInfo:
    """Cached per tokenizer object (building it reads the added-token table); rebuilt if
    tokens were added since."""
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise AlignmentError(
            f"tokenizer {tokenizer_name(tokenizer)} is not a fast tokenizer; offsets needed: "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True) from a directory with tokenizer.json"
        )
    info = _INFO.get(tokenizer)
    if info is None or info.size != len(tokenizer):
        info = _INFO[tokenizer] = TokenizerInfo(tokenizer)
    return info


@dataclass
class Encoded:
    """One text tokenized, every token placed on the text's UTF-8 byte axis.

    Token k covers ``text_bytes[byte_starts[k]:byte_ends[k]]``; the spans of the
    text tokens are contiguous and cover the whole text. A start token (BOS/EOS
    prepended by :func:`encode_with_bytes`) sits at index 0 with the empty span 0..0.
    A synthetic prefix space (``▁H`` at the start of a SentencePiece text covers
    only ``H``) is not in the text, so a lone synthetic ``▁`` has an empty span.
    """

    ids: list[int]
    byte_starts: list[int]
    byte_ends: list[int]
    word_start: list[bool]
    has_start_token: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def first_text_token(self) -> int:
        return 1 if self.has_start_token else 0

    @property
    def byte_range(self) -> tuple[int, int]:
        """(first byte, end byte) covered by the text tokens; (0, 0) for an empty text."""
        k = self.first_text_token
        return (self.byte_starts[k], self.byte_ends[-1]) if len(self.ids) > k else (0, 0)


def _char_byte_maps(text: str, name: str) -> tuple[bytes, list[int], list[int]]:
    """UTF-8 bytes, char index -> byte offset (len+1 entries), byte offset -> index of its char."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise AlignmentError(f"text given to tokenizer {name} is not valid Unicode ({e.reason} at "
                             f"character {e.start}); clean the input text") from None
    if len(data) == len(text):  # ASCII: one byte per character, both maps are the identity
        ident = list(range(len(text) + 1))
        return data, ident, ident
    char_to_byte = [0] * (len(text) + 1)
    byte_to_char = [0] * (len(data) + 1)
    pos = 0
    for i, ch in enumerate(text):
        o = ord(ch)
        width = 1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4
        for j in range(width):
            byte_to_char[pos + j] = i
        pos += width
        char_to_byte[i + 1] = pos
    byte_to_char[len(data)] = len(text)
    return data, char_to_byte, byte_to_char


def encode_with_bytes(tokenizer, text: str, start_token: int | None = None) -> Encoded:
    """Tokenize ``text`` (no special tokens added) and give every token its byte span.

    Raises :class:`AlignmentError` (naming the tokenizer) where the tokens do
    not spell the text byte for byte -- a normalizer that changes the text
    (NFC on decomposed accents), a pre-tokenizer that drops whitespace -- or
    where the running byte sum disagrees with the tokenizer's own offsets.
    """
    info = tokenizer_info(tokenizer)
    data, c2b, b2c = _char_byte_maps(text, info.name)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    tokens = tokenizer.convert_ids_to_tokens(ids)

    starts, ends, synthetic = [], [], []
    pos, section_start = 0, True
    for k, (tid, tok, (s, e)) in enumerate(zip(ids, tokens, offsets)):
        own = info.bytes_of(tid, tok)
        if own is None:
            # Added token: matched on the raw text, never splits a character.
            if c2b[s] != pos:
                raise AlignmentError(
                    f"tokenizer {info.name}: token {k} {tok!r} starts at byte {c2b[s]} but the previous token "
                    f"ended at byte {pos}; its tokens do not cover the text contiguously")
            starts.append(pos)
            ends.append(c2b[e])
            synthetic.append(False)
            pos, section_start = c2b[e], True
            continue
        # A space the tokenizer prepended (SentencePiece ``▁``, ByteLevel add_prefix_space)
        # exists only at the start of a section (text start or after an added token), and
        # only where the section does not already start with a space (or a literal ``▁``).
        lead = section_start and own[:1] == b" " and (
            info.prepend_always or not (data.startswith(b" ", pos) or data.startswith(info.metaspace_bytes, pos)))
        section_start = False
        n = _match(info, tok, own, data, pos, lead)
        if n < 0 and lead:  # a literal "▁" opening the text, not a prepended space
            lead = False
            n = _match(info, tok, own, data, pos, lead)
        if n < 0:
            own = own[1:] if lead else own
            if c2b[s] > pos and data[c2b[s]:c2b[s] + len(own)] == own:
                raise AlignmentError(
                    f"tokenizer {info.name} drops bytes {pos}..{c2b[s]} of the text ({data[pos:c2b[s]]!r}): no "
                    "token covers them (its vocabulary lacks them and it has no unknown token); remove such "
                    "characters from the text or use another tokenizer")
            hint = ""
            if info.normalizer_changes(text):
                hint = (f"; its normalizer changes this text ({_state(info.normalizer)[:60]}): normalize the "
                        "text the same way before encoding (e.g. unicodedata.normalize('NFC', text))")
            raise AlignmentError(
                f"tokenizer {info.name}: token {k} {tok!r} stands for bytes {own!r} but the text has "
                f"{data[pos:pos + len(own)]!r} at byte {pos}{hint}")
        _check_offsets(info.name, k, tok, pos, pos + n, s, e, text, b2c)
        starts.append(pos)
        ends.append(pos + n)
        synthetic.append(lead)
        pos += n
    if pos != len(data):
        raise AlignmentError(f"tokenizer {info.name}: tokens cover bytes 0..{pos} of a {len(data)}-byte text")

    word = []
    for k, (a, b) in enumerate(zip(starts, ends)):
        word.append(k == 0 or synthetic[k] or (b > a and data[a] in _WHITESPACE)
                    or (a > 0 and data[a - 1] in b"\n\r"))
    if start_token is not None:
        return Encoded([start_token] + ids, [0] + starts, [0] + ends, [True] + word, has_start_token=True)
    return Encoded(ids, starts, ends, word)


def _match(info: TokenizerInfo, token: str, own: bytes, data: bytes, pos: int, lead: bool) -> int:
    """How many text bytes from ``pos`` the token spells (-1: it does not). ``lead``:
    its first byte is a prepended space that is not in the text. SentencePiece
    writes a space as ``▁``, so a ``▁`` may also stand for a literal "▁" in the text."""
    body = own[1:] if lead else own
    if data.startswith(body, pos):
        return len(body)
    rep = info.metaspace
    if not rep or rep not in token or info.is_byte_fallback(token):
        return -1
    p = pos
    for c in token[1:] if lead else token:
        if c == rep and data.startswith(b" ", p):
            p += 1
        elif data.startswith(c.encode("utf-8"), p):
            p += len(c.encode("utf-8"))
        else:
            return -1
    return p - pos


def _check_offsets(name, k, tok, a, b, s, e, text, b2c) -> None:
    """The tokenizer's character offsets (s, e) must name the characters that bytes a..b touch.

    Tolerated: offsets trimmed of whitespace at either end (``trim_offsets``), and
    any offsets touching position a for an empty (synthetic-space) token."""
    if b == a:
        if s <= b2c[a] <= e:
            return
    else:
        cs, ce = b2c[a], b2c[b - 1] + 1
        if (s, e) == (cs, ce):
            return
        if cs <= s <= e <= ce and not text[cs:s].strip() and not text[e:ce].strip():
            return
    raise AlignmentError(
        f"tokenizer {name}: token {k} {tok!r} covers bytes {a}..{b} by its own bytes (characters "
        f"{b2c[a]}..{b2c[max(b - 1, a)] + 1}) but its offsets say characters {s}..{e}; refusing to guess")


def align(student: Encoded, teacher: Encoded, mode: str = "boundary") -> list[tuple[int, int, int, int]]:
    """Chunks ``(s_start, s_end, t_start, t_end)``: half-open token ranges that
    partition the text tokens of both sides (1..n with a start token, else 0..n).

    ``boundary``: a chunk closes at every byte where a student token and a
    teacher token both end. ``word``: only at such a byte where the next token on
    both sides starts a new word (or at the end of the text), so chunks are
    whole words: coarser, never finer, than ``boundary``.
    Empty tokens (a synthetic ``▁``) join the chunk of the text that follows them.
    """
    if mode not in ("boundary", "word"):
        raise UserError(f"alignment mode {mode!r} is unknown: use 'boundary' or 'word'")
    for enc in (student, teacher):
        if not (len(enc.ids) == len(enc.byte_starts) == len(enc.byte_ends) == len(enc.word_start)):
            raise AlignmentError("an Encoded has lists of different lengths; build it with encode_with_bytes")
    if student.byte_range != teacher.byte_range:
        raise AlignmentError(f"student tokens cover bytes {student.byte_range} and teacher tokens "
                             f"{teacher.byte_range}: they encode different texts")
    (first, total), s0, t0 = student.byte_range, student.first_text_token, teacher.first_text_token
    if total == first:
        return []
    common = set(student.byte_ends[s0:]) & set(teacher.byte_ends[t0:])
    bounds = sorted(x for x in common if x > first)
    if mode == "word":
        bounds = [x for x in bounds if x == total
                  or (_next_starts_word(student, s0, x) and _next_starts_word(teacher, t0, x))]
    s_ranges, t_ranges = _ranges(student, s0, bounds), _ranges(teacher, t0, bounds)
    out = []
    for (sa, sb), (ta, tb) in zip(s_ranges, t_ranges):
        # Zero-length tokens (a synthetic "▁") at the start of a chunk on BOTH sides pair up as their
        # own empty 1:1 chunks, so that one tokenizer against itself gives only 1:1 chunks.
        while sb - sa > 1 and tb - ta > 1 and _empty(student, sa) and _empty(teacher, ta):
            out.append((sa, sa + 1, ta, ta + 1))
            sa, ta = sa + 1, ta + 1
        out.append((sa, sb, ta, tb))
    return out


def _empty(enc: Encoded, k: int) -> bool:
    return enc.byte_starts[k] == enc.byte_ends[k]


def _next_starts_word(enc: Encoded, first: int, byte: int) -> bool:
    return enc.word_start[bisect.bisect_left(enc.byte_starts, byte, lo=first)]


def _ranges(enc: Encoded, first: int, bounds: list[int]) -> list[tuple[int, int]]:
    """Token index range of each chunk: the tokens starting before the chunk's end byte
    (every token that starts before a common boundary also ends by it)."""
    out, k, n = [], first, len(enc.ids)
    for c, x in enumerate(bounds):
        k0 = k
        k = n if c == len(bounds) - 1 else bisect.bisect_left(enc.byte_starts, x, lo=k)
        out.append((k0, k))
    return out


def chunk_stats(chunks) -> dict:
    """Counts over a list of chunks: how much of the text is compared token for token (1:1)."""
    one = [c for c in chunks if c[1] - c[0] == 1 and c[3] - c[2] == 1]
    s_tokens = sum(c[1] - c[0] for c in chunks)
    t_tokens = sum(c[3] - c[2] for c in chunks)
    return {
        "chunks": len(chunks),
        "one_to_one_chunks": len(one),
        "student_tokens": s_tokens,
        "teacher_tokens": t_tokens,
        "student_tokens_in_one_to_one": len(one),
        "teacher_tokens_in_one_to_one": len(one),
        "frac_student_in_one_to_one": len(one) / s_tokens if s_tokens else 0.0,
        "frac_teacher_in_one_to_one": len(one) / t_tokens if t_tokens else 0.0,
        "max_student_tokens_per_chunk": max((c[1] - c[0] for c in chunks), default=0),
        "max_teacher_tokens_per_chunk": max((c[3] - c[2] for c in chunks), default=0),
    }


# ----------------------------------------------------------------------------- what a window starts with

# Chat checkpoints end a TURN with EOS (Qwen3 chat: ``<|im_end|>``, Llama 3 instruct: ``<|eot_id|>``); the
# document separator they were pre-trained with is this one. A window of plain text must not open with an
# end-of-turn marker.
DOCUMENT_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>")


def start_token_id(tokenizer) -> int:
    """The token every window starts with (training spans, teacher spans, evaluation windows).

    BOS when the tokenizer has one (Llama, SmolLM2); else the pre-training document separator
    (``<|endoftext|>``: Qwen3 base AND chat checkpoints, which ship no BOS and, for chat, EOS
    ``<|im_end|>``); else the pad token when it is not the unknown token; else EOS."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    vocab = tokenizer.get_vocab()
    for s in DOCUMENT_SEPARATORS:
        if s in vocab:
            return vocab[s]
    pad, unk = tokenizer.pad_token_id, getattr(tokenizer, "unk_token_id", None)
    if pad is not None and pad != unk:
        return pad
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise UserError(f"tokenizer {tokenizer_name(tokenizer)!r} has no BOS, document separator, pad or EOS token to "
                    "start a window with: add a bos_token to its tokenizer_config.json")


# ----------------------------------------------------------------------------- Unicode normal forms

_FORMS = ("NFKC", "NFKD", "NFC", "NFD")


def unicode_form(tokenizer) -> str | None:
    """The Unicode normal form the tokenizer's normalizer applies (Qwen3: NFC), None if it applies none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = _state(backend.normalizer) if backend is not None else ""
    found = [f for f in _FORMS if f'"type":"{f}"' in state.replace(" ", "")]
    return found[0] if found else None


def text_normal_form(*tokenizers) -> str:
    """The normal form texts are put in before tokenisation, so that no tokenizer's normalizer changes them
    (the byte axis is the text's own): NFKC if one tokenizer applies NFKC (NFKC text is also NFC), else NFD
    or NFKD if that is all they apply, else NFC (a no-op for tokenizers without a normalizer, and what web
    text mostly is already)."""
    forms = {f for f in (unicode_form(t) for t in tokenizers) if f}
    for f in ("NFKC", "NFC"):
        if f in forms:
            return f
    return forms.pop() if len(forms) == 1 else "NFC"
