"""A run's chat data: conversations read, rendered by both sides, encoded, counted and packed once at start-up.

``sakd.data.text.span_data`` hands over to ``chat_data`` when ``data.format`` (or what ``auto`` finds in the
columns) is a conversation format; the loop then sees a dataset with the same items as the text path plus
``s_loss`` (the student's cross-entropy targets) and, packed, ``s_pos``/``t_pos``.
"""

from __future__ import annotations

import json
import random

import torch

from sakd.align.tokens import AlignmentError, start_token_id
from sakd.data.chat import ChatEncoder, RowSkipped, configure_template, pack, pad_fraction
from sakd.data.chat_formats import Conversation, read_conversations
from sakd.errors import UserError


class ChatDataset(torch.utils.data.Dataset):
    """Encoded (and packed) conversations. Every row was checked at start-up: ``skipped`` stays empty, the
    rows that could not be used are in ``counts`` (by reason)."""

    def __init__(self, items: list[dict], student_tok, teacher_tok, seq_len: int, teacher_seq_len: int,
                 counts: dict, encoder: ChatEncoder | None = None, normal_form: str = "NFC", packed: bool = False):
        self.items, self.counts = items, counts
        # what on-policy generation needs to make rows like these from the student's own replies
        self.encoder, self.normal_form, self.packed = encoder, normal_form, packed
        self.student_tok, self.teacher_tok = student_tok, teacher_tok
        self.seq_len, self.teacher_seq_len = seq_len, teacher_seq_len
        self.skipped: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    @property
    def fingerprints(self) -> list[str]:
        """One string per (packed) row: its token ids on both sides, chunks, loss mask and positions, i.e.
        everything the teacher sees and every target a cached loss reads (a teacher cache is keyed by them)."""
        keys = ("s_ids", "t_ids", "chunks", "s_loss", "s_pos", "t_pos")
        return [json.dumps([x.get(k) for k in keys], separators=(",", ":")) for x in self.items]


def refuse_unsupported(cfg) -> None:
    """What does not work on chat data refuses with one line naming the setting."""
    key = "baseline" if getattr(cfg.loss, "baseline", None) else "logit"
    if getattr(cfg.loss, key) in ("uld", "truncation"):
        raise UserError(f"loss.{key} {getattr(cfg.loss, key)} pairs positions by index, not by content: on chat "
                        "data use loss.logit mapped_kl or shared_kl (or loss.baseline gold)")


def split_conversations(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0 or len(convs) < 2:
        return convs, []
    idx = list(range(len(convs)))
    random.Random(seed).shuffle(idx)
    held = set(idx[:max(1, int(len(convs) * fraction))])
    return [c for i, c in enumerate(convs) if i not in held], [convs[i] for i in sorted(held)]


def heldout_conversations(convs: list, max_bytes: int) -> list[Conversation]:
    """Whole held-out conversations with an assistant turn, up to about ``max_bytes`` of content."""
    out, total = [], 0
    for c in convs:
        if not any(m["role"] == "assistant" and m["content"] for m in c):
            continue
        conv = Conversation(c)
        n = len(conv.encode("utf-8"))
        if out and total + n > max_bytes:
            break
        out.append(conv)
        total += n
    return out


def encode_all(encoder: ChatEncoder, convs: list) -> tuple[list[dict], dict]:
    items, counts = [], encoder.counts
    for c in convs:
        try:
            items.append(encoder.encode(c))
        except RowSkipped as e:
            counts[str(e)] = counts.get(str(e), 0) + 1
        except AlignmentError:
            counts["cannot be byte-aligned"] = counts.get("cannot be byte-aligned", 0) + 1
    return items, counts


def chat_data(cfg, fmt: str, form: str, student_tok, teacher_tok, teacher_seq_len: int, log=print):
    """(train ChatDataset, held-out conversations) of a run on conversation data."""
    d = cfg.data
    refuse_unsupported(cfg)
    for tok, spec, side in ((student_tok, d.student_chat_template, "student"),
                            (teacher_tok, d.teacher_chat_template, "teacher")):
        log(f"data: {side} chat template: {configure_template(tok, spec, side)}")
    read = dict(split=d.split, config_name=d.config_name, normal_form=form)
    convs = read_conversations(d.source, fmt, streaming=d.streaming, max_rows=None, **read)
    if d.eval_source:  # its own format: data.format=auto detects each source on its own
        from sakd.data.chat_formats import source_format

        eval_fmt = source_format(d.eval_source, d.format, split=d.split, config_name=d.config_name)
        held = read_conversations(d.eval_source, fmt if eval_fmt == "text" else eval_fmt, **read)
    else:
        convs, held = split_conversations(convs, d.eval_fraction, cfg.train.seed)
    if d.max_examples:
        convs = convs[: d.max_examples]
    enc = ChatEncoder(student_tok, teacher_tok, start_token_id(student_tok), start_token_id(teacher_tok), d.seq_len,
                      teacher_seq_len, d.chunk_mode, d.train_on_prompt)
    items, counts = encode_all(enc, convs)
    how = "auto-detected" if d.format == "auto" else "data.format"
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(counts.items())) or "none"
    log(f"data: format {fmt} ({how}): {len(convs):,} conversations, {len(items):,} used; skipped or cut: {skipped}; "
        f"losses on {'assistant and user' if d.train_on_prompt else 'assistant'} content")
    if not items:
        raise UserError(f"data source {d.source!r}: no conversation can be trained on ({skipped})")
    before = pad_fraction(items, cfg.train.batch_size)
    if d.pack:
        n = len(items)
        items = pack(items, d.seq_len, teacher_seq_len)
        log(f"data: packing: {n:,} examples into {len(items):,} rows of <= {d.seq_len} student tokens; student pad "
            f"fraction {before:.1%} before, {pad_fraction(items, cfg.train.batch_size):.1%} after")
    else:
        log(f"data: student pad fraction {before:.1%} (data.pack off)")
    return (ChatDataset(items, student_tok, teacher_tok, d.seq_len, teacher_seq_len, counts, enc, form, d.pack),
            heldout_conversations(held, cfg.eval.max_bytes))
