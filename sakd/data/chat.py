"""Conversations on two tokenizers: each side's own chat template, content byte ranges, chunks and loss masks.

The teacher and the student render the same conversation with DIFFERENT templates (``<|im_start|>user\\n``
on one side, ``<|user|>\\n`` on the other), so the two renderings are different texts: only the message
contents are the same bytes. Each rendering is tokenized with byte offsets (``encode_with_bytes``), the byte
range of every message's content is found in it, and the two sides are aligned INSIDE each content range
(template bytes never pair). A token that straddles a content edge (template and content bytes in one
token) is left out of both the chunks and the masks.

Losses: the chunks (KD, chunk likelihood, hidden, attention) lie in the trained contents only: the
assistant's (``data.train_on_prompt``: also the user's); ``s_loss`` marks the student's cross-entropy
targets: the same tokens, plus the student's own end-of-turn token after each assistant content (an added
token such as ``<|im_end|>``, where the template puts one right after the content), so that it learns to stop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from sakd.align.tokens import Encoded, align, encode_with_bytes, tokenizer_info
from sakd.errors import UserError

TEMPLATES = {"chatml": "chatml.jinja", "turns": "turns.jinja"}
_SENTINEL = "\u2063SAKD{}\u2063"  # invisible separator: no template edits it, no content holds it
_SENTINEL_RE = re.compile("\u2063SAKD(\\d+)\u2063")


class RowSkipped(Exception):
    """A conversation that cannot be trained on (counted by reason, never fatal)."""


def configure_template(tok, spec: str | None, side: str) -> str:
    """Give ``tok`` the chat template it renders with: ``spec`` (``chatml``, ``turns`` or a .jinja file), else
    its own, else ChatML. Returns a short name for the log."""
    if spec is None and getattr(tok, "chat_template", None):
        return "its own"
    name = spec or "chatml"
    if name in TEMPLATES:
        tok.chat_template = (Path(__file__).parent / "templates" / TEMPLATES[name]).read_text(encoding="utf-8")
        return name + ("" if spec else " (default: the tokenizer has none)")
    p = Path(name).expanduser()
    if not p.is_file():
        raise UserError(f"data.{side}_chat_template {name!r}: not chatml, turns or a .jinja file")
    tok.chat_template = p.read_text(encoding="utf-8")
    return str(p)


def render(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int] | None]]:
    """The conversation rendered by ``tok``'s chat template, and the CHARACTER range of each message's content
    in it (None for a message the template leaves out). The template is rendered once with a sentinel in place
    of each content: the pieces between sentinels are the template's own text, so a content cannot be confused
    with template text that happens to spell the same characters."""
    marked = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
    try:
        skeleton = tok.apply_chat_template(marked, tokenize=False)
        text = tok.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template that raises (e.g. "roles must alternate") on this row
        raise RowSkipped(f"chat template: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__}") from None
    parts = _SENTINEL_RE.split(skeleton)  # [piece, i, piece, j, piece, ...]
    ranges: list[tuple[int, int] | None] = [None] * len(messages)
    rebuilt, pos = [], 0
    for k, part in enumerate(parts):
        if k % 2 == 0:
            rebuilt.append(part)
            pos += len(part)
        else:
            i = int(part)
            if ranges[i] is not None:
                raise RowSkipped("the chat template writes a message twice")
            ranges[i] = (pos, pos + len(messages[i]["content"]))
            rebuilt.append(messages[i]["content"])
            pos += len(messages[i]["content"])
    if "".join(rebuilt) != text:
        raise RowSkipped("the chat template changes the message text (e.g. strips it)")
    return text, ranges


def _byte_ranges(text: str, ranges):
    out = []
    for r in ranges:
        out.append(None if r is None else (len(text[:r[0]].encode("utf-8")), len(text[:r[1]].encode("utf-8"))))
    return out


@dataclass
class Side:
    enc: Encoded
    ranges: list  # byte range of each message's content in the rendering, or None


def encode_side(tok, messages: list[dict], start: int) -> Side:
    """Render, tokenize with byte offsets; a start token is prepended when the rendering does not begin with
    an added (special) token, so that the first rendered token is predicted from something."""
    text, ranges = render(tok, messages)
    enc = encode_with_bytes(tok, text)
    if not enc.ids or enc.ids[0] not in tokenizer_info(tok).added_ids:
        enc = encode_with_bytes(tok, text, start_token=start)
    return Side(enc, _byte_ranges(text, ranges))


def tokens_inside(enc: Encoded, a: int, b: int) -> list[int]:
    """Token indices lying wholly inside bytes [a, b) (a zero-width token at a or inside counts)."""
    lo = 1 if enc.has_start_token else 0
    return [k for k in range(lo, len(enc.ids)) if enc.byte_starts[k] >= a and enc.byte_ends[k] <= b
            and not (enc.byte_starts[k] == enc.byte_ends[k] == b and b > a)]


def _sub(enc: Encoded, ks: list[int], a: int) -> Encoded:
    return Encoded([enc.ids[k] for k in ks], [enc.byte_starts[k] - a for k in ks],
                   [enc.byte_ends[k] - a for k in ks], [enc.word_start[k] for k in ks])


def content_chunks(s: Encoded, sr: tuple[int, int], t: Encoded, tr: tuple[int, int], mode: str):
    """Chunks (s_start, s_end, t_start, t_end), in token indices of the whole renderings, over one content
    that sits at bytes ``sr`` of the student rendering and ``tr`` of the teacher's (same length): the tokens
    inside it on each side, from the first to the last byte where both sides have a token edge."""
    ks, kt = tokens_inside(s, *sr), tokens_inside(t, *tr)
    edges_s = {s.byte_starts[k] - sr[0] for k in ks} | {s.byte_ends[k] - sr[0] for k in ks}
    edges_t = {t.byte_starts[k] - tr[0] for k in kt} | {t.byte_ends[k] - tr[0] for k in kt}
    common = edges_s & edges_t
    if len(common) < 2:
        return []
    lo, hi = min(common), max(common)
    ks = [k for k in ks if s.byte_starts[k] - sr[0] >= lo and s.byte_ends[k] - sr[0] <= hi]
    kt = [k for k in kt if t.byte_starts[k] - tr[0] >= lo and t.byte_ends[k] - tr[0] <= hi]
    if not ks or not kt:
        return []
    chunks = align(_sub(s, ks, sr[0]), _sub(t, kt, tr[0]), mode=mode)
    return [(a + ks[0], b + ks[0], c + kt[0], d + kt[0]) for a, b, c, d in chunks]


def end_of_turn(enc: Encoded, end_byte: int, added: frozenset) -> int | None:
    """The token right after a content that ends at ``end_byte``, if it is an added token (``<|im_end|>``,
    EOS): the student's own end-of-turn target."""
    for k in range(1 if enc.has_start_token else 0, len(enc.ids)):
        if enc.byte_starts[k] >= end_byte and enc.byte_ends[k] > enc.byte_starts[k]:
            return k if enc.byte_starts[k] == end_byte and enc.ids[k] in added else None
    return None


@dataclass
class ChatEncoder:
    """Encodes one conversation into a training item (see ``sakd.data.text.collate``)."""

    student_tok: object
    teacher_tok: object
    s_start: int
    t_start: int
    seq_len: int
    teacher_seq_len: int
    chunk_mode: str = "boundary"
    train_on_prompt: bool = False
    counts: dict = field(default_factory=dict)

    def trained_roles(self) -> tuple[str, ...]:
        return ("assistant", "user") if self.train_on_prompt else ("assistant",)

    def encode(self, messages: list[dict]) -> dict:
        """An item; raises RowSkipped (no assistant turn, prompt longer than seq_len, ...)."""
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise RowSkipped("no assistant turn")
        while True:
            s = encode_side(self.student_tok, messages, self.s_start)
            t = encode_side(self.teacher_tok, messages, self.t_start)
            first = next(i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"])
            if s.ranges[first] is None or t.ranges[first] is None:
                raise RowSkipped("the chat template leaves out the assistant turn")
            if (s.ranges[first][0] < _end_byte(s.enc, self.seq_len)
                    and t.ranges[first][0] < _end_byte(t.enc, self.teacher_seq_len)):
                break
            # The prompt before the first assistant turn does not fit: drop the oldest exchange (keeping the
            # system message) while a later assistant turn remains, else skip the row.
            nxt = [i for i, m in enumerate(messages) if i > first and m["role"] == "assistant"]
            if not nxt:
                raise RowSkipped("prompt longer than seq_len")
            self.counts["exchanges dropped (prompt longer than seq_len)"] = \
                self.counts.get("exchanges dropped (prompt longer than seq_len)", 0) + 1
            keep_from = next((i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"), nxt[0])
            messages = [m for m in messages[:first] if m["role"] == "system"] + messages[keep_from:]
        return self._item(messages, s, t)

    def _item(self, messages, s: Side, t: Side) -> dict:
        n_s, n_t = min(len(s.enc.ids), self.seq_len), min(len(t.enc.ids), self.teacher_seq_len)
        added = tokenizer_info(self.student_tok).added_ids
        chunks, eot = [], []
        for i, m in enumerate(messages):
            if m["role"] not in self.trained_roles() or not m["content"] or s.ranges[i] is None or t.ranges[i] is None:
                continue
            cs = content_chunks(s.enc, s.ranges[i], t.enc, t.ranges[i], self.chunk_mode)
            kept = [c for c in cs if c[1] <= n_s and c[3] <= n_t]
            chunks += kept
            if m["role"] == "assistant" and kept and len(kept) == len(cs):
                k = end_of_turn(s.enc, s.ranges[i][1], added)
                if k is not None and k < n_s:
                    eot.append(k)
        if not chunks:
            raise RowSkipped("no assistant content fits in seq_len")
        loss = [False] * n_s
        for a, b, _, _ in chunks:
            loss[a:b] = [True] * (b - a)
        for k in eot:
            loss[k] = True
        n_bytes = sum(s.enc.byte_ends[b - 1] - s.enc.byte_starts[a] for a, b, _, _ in chunks)
        return {"s_ids": s.enc.ids[:n_s], "t_ids": t.enc.ids[:n_t], "chunks": chunks, "n_bytes": n_bytes,
                "s_loss": loss, "convs": [messages]}


def _end_byte(enc: Encoded, n: int) -> int:
    """The byte where the first ``n`` tokens of a rendering end."""
    return enc.byte_ends[min(n, len(enc.ids)) - 1]


# ----------------------------------------------------------------------------- packing

def pack(items: list[dict], seq_len: int, teacher_seq_len: int) -> list[dict]:
    """Short examples packed, in order, into rows of at most ``seq_len`` student and ``teacher_seq_len``
    teacher tokens. Position ids restart at every example (transformers then keeps attention inside each
    example: ``find_packed_sequence_indices``); chunks are shifted, never merged, so none crosses two."""
    rows: list[dict] = []
    cur = None
    for x in items:
        if cur is not None and (len(cur["s_ids"]) + len(x["s_ids"]) > seq_len
                                or len(cur["t_ids"]) + len(x["t_ids"]) > teacher_seq_len):
            rows.append(cur)
            cur = None
        if cur is None:
            cur = {"s_ids": [], "t_ids": [], "chunks": [], "n_bytes": 0, "s_loss": [], "s_pos": [], "t_pos": [],
                   "examples": 0, "convs": []}
        ds, dt = len(cur["s_ids"]), len(cur["t_ids"])
        cur["chunks"] += [(a + ds, b + ds, c + dt, d + dt) for a, b, c, d in x["chunks"]]
        for k in ("s_ids", "t_ids", "s_loss"):
            cur[k] = cur[k] + x[k]
        cur["s_pos"] += list(range(len(x["s_ids"])))
        cur["t_pos"] += list(range(len(x["t_ids"])))
        cur["n_bytes"] += x["n_bytes"]
        cur["examples"] += 1
        cur["convs"] += x.get("convs", [])
    if cur is not None:
        rows.append(cur)
    return rows


def pad_fraction(items: list[dict], batch_size: int, key: str = "s_ids") -> float:
    """Share of padding in batches of ``batch_size`` consecutive items (each padded to its batch's longest)."""
    pad = total = 0
    for a in range(0, len(items), batch_size):
        lens = [len(x[key]) for x in items[a:a + batch_size]]
        total += max(lens) * len(lens)
        pad += max(lens) * len(lens) - sum(lens)
    return pad / max(total, 1)


def collate_chat(out: dict, items: list[dict]) -> None:
    """Add the chat fields to a collated batch (``sakd.data.text.collate``): ``s_loss_mask`` [B, Ls] (the student's
    cross-entropy targets) and, for packed rows, ``s_pos``/``t_pos`` [B, L] position ids (padding continues
    as its own sequence, so it never joins an example)."""
    import torch

    B, Ls = out["s_ids"].shape
    Lt = out["t_ids"].shape[1]
    out["s_loss_mask"] = torch.zeros(B, Ls, dtype=torch.bool)
    packed = any("s_pos" in x for x in items)
    if packed:
        out["s_pos"] = torch.zeros(B, Ls, dtype=torch.long)
        out["t_pos"] = torch.zeros(B, Lt, dtype=torch.long)
    for b, x in enumerate(items):
        n = len(x.get("s_loss", []))
        if n:
            out["s_loss_mask"][b, :n] = torch.tensor(x["s_loss"])
        for key, L in (("s_pos", Ls), ("t_pos", Lt)) if packed else ():
            pos = x.get(key) or list(range(len(x[key[0] + "_ids"])))
            out[key][b, :len(pos)] = torch.tensor(pos, dtype=torch.long)
            out[key][b, len(pos):] = torch.arange(L - len(pos))


def model_inputs(batch: dict, side: str) -> dict:
    """Forward arguments: packed chat rows give position ids and no 2-D mask (transformers builds the
    per-example causal mask from the restarting positions, only with use_cache=False: a cache turns that
    detection off); everything else the usual attention mask."""
    if f"{side}_pos" in batch:
        return {"position_ids": batch[f"{side}_pos"], "attention_mask": None}
    return {"attention_mask": batch[f"{side}_mask"].long()}
