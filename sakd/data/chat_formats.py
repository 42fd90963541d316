"""Conversation data sets: the row formats peers use, read into one form, ``[{role, content}, ...]``.

Formats (``data.format``; ``auto`` picks one from the columns when unambiguous):
  text               one text column (the plain-text path of ``sakd.data.text``)
  messages           ``messages``: a list of ``{role, content}`` (TRL, axolotl, torchtune)
  sharegpt           ``conversations``: a list of ``{from, value}`` (DistillKit, axolotl; from: human/gpt/system)
  prompt_completion  ``prompt`` + ``completion``: two strings, or two lists of messages (TRL)
A malformed row is a UserError naming the source, the row number (1-based) and the field; a row that is
well formed but has no assistant turn is skipped and counted by the caller (``sakd.data.chat``).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from sakd.data import rows
from sakd.errors import UserError

ROLES = ("system", "user", "assistant")
# The offline demo's conversations: exchanges of speeches from the plays (sakd.data.corpus.conversations).
BUILTIN_CHAT = ("sakd:shakespeare-chat-train", "sakd:shakespeare-chat-heldout")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant"}


class Conversation(str):
    """A held-out conversation: as a ``str`` it is its message contents joined (so byte counts and hashes of a
    held-out list keep working); ``.messages`` is the conversation itself. ``sakd.evaluate.bpb.nll_bits`` scores
    a list of these on the assistant's content only."""

    messages: list

    def __new__(cls, messages: list[dict]):
        obj = super().__new__(cls, "\n".join(m["content"] for m in messages))
        obj.messages = messages
        return obj


def detect_format(columns: list[str], where: str) -> str:
    """The format named by a row's columns; ``text`` when no conversation column is present."""
    found = [f for f, cols in (("messages", {"messages"}), ("sharegpt", {"conversations"}),
                               ("prompt_completion", {"prompt", "completion"})) if cols <= set(columns)]
    if len(found) > 1:
        raise UserError(f"{where}: columns {', '.join(columns)} fit formats {' and '.join(found)}; set data.format")
    return found[0] if found else "text"


def _messages(value, where: str, field: str, role_key: str = "role", content_key: str = "content",
              roles: dict | None = None) -> list[dict]:
    if not isinstance(value, list):
        raise UserError(f"{where}: field {field!r} is {type(value).__name__}, not a list of messages")
    out = []
    for k, m in enumerate(value):
        f = f"{field}[{k}]"
        if not isinstance(m, dict):
            raise UserError(f"{where}: field {f} is {type(m).__name__}, not an object with {role_key!r}/{content_key!r}")
        if role_key not in m or content_key not in m:
            missing = role_key if role_key not in m else content_key
            raise UserError(f"{where}: field {f} has no {missing!r}")
        role, content = m[role_key], m[content_key]
        role = (roles or {r: r for r in ROLES}).get(role if isinstance(role, str) else "")
        if role is None:
            raise UserError(f"{where}: field {f}.{role_key} is {m[role_key]!r}; expected one of "
                            f"{', '.join(roles or ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{where}: field {f}.{content_key} is {type(content).__name__}, not a string")
        out.append({"role": role, "content": content})
    return out


def to_messages(row: dict, fmt: str, where: str) -> list[dict]:
    """One row in ``fmt`` as a list of ``{role, content}``; UserError naming ``where`` and the field."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: is {type(row).__name__}, not an object")
    need = {"messages": ("messages",), "sharegpt": ("conversations",),
            "prompt_completion": ("prompt", "completion")}[fmt]
    for f in need:
        if f not in row or row[f] is None:
            raise UserError(f"{where}: no field {f!r} (data.format is {fmt})")
    if fmt == "messages":
        return _messages(row["messages"], where, "messages")
    if fmt == "sharegpt":
        return _messages(row["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        return _messages(prompt, where, "prompt") + _messages(completion, where, "completion")
    raise UserError(f"{where}: fields 'prompt' and 'completion' must both be strings or both lists of messages "
                    f"(got {type(prompt).__name__} and {type(completion).__name__})")


def _rows(source: str, split: str, config_name: str | None, streaming: bool, max_rows: int | None):
    """(where, row) pairs of a local .jsonl/.json/.parquet file, a save_to_disk folder, or a hub dataset
    (read by ``sakd.data.rows``, as the text sources are)."""
    for n, row in enumerate(_source_rows(source, split, config_name, streaming), 1):
        if max_rows and n > max_rows:
            return
        yield f"{source} row {n}", row


def _source_rows(source: str, split: str, config_name: str | None, streaming: bool):
    if source in BUILTIN_CHAT:
        from sakd.data import corpus

        yield from corpus.conversations(held_out=source.endswith("heldout"))
        return
    p = Path(source).expanduser()
    if p.suffix in (".jsonl", ".json") and p.is_file():
        with p.open(encoding="utf-8", errors="replace") as f:  # lazily: auto-detection reads one row
            yield from (row for _, row in rows.json_rows(f, source))
    elif p.suffix == ".parquet" and p.is_file():
        yield from rows.parquet_rows(p, source)
    elif p.is_dir():
        yield from rows.dataset_folder(p, split, source)
    elif p.exists() or source.startswith((".", "/", "~")):
        raise UserError(f"{source}: not a .jsonl/.parquet file or a save_to_disk folder of conversations")
    else:
        yield from rows.hub_dataset(source, config_name, split, streaming)


def source_format(source: str, fmt: str, *, split: str = "train", config_name: str | None = None) -> str:
    """``fmt`` resolved: ``auto`` reads the first row's columns (plain-text files and the built-in corpus:
    ``text``)."""
    if fmt != "auto":
        return fmt
    if source in BUILTIN_CHAT:
        return "messages"
    if source.startswith("sakd:") or Path(source).suffix == ".txt":
        return "text"
    try:
        where, row = next(_rows(source, split, config_name, True, 1))
    except StopIteration:
        return "text"
    except UserError:
        return "text"  # the text reader gives its own error for what it cannot read
    return detect_format(list(row), where) if isinstance(row, dict) else "text"


def read_conversations(source: str, fmt: str, *, split: str = "train", config_name: str | None = None,
                       streaming: bool = False, max_rows: int | None = None,
                       normal_form: str | None = "NFC") -> list[list[dict]]:
    """Every row of ``source`` as a conversation (contents put in ``normal_form``, as texts are)."""
    out = []
    for where, row in _rows(source, split, config_name, streaming, max_rows):
        msgs = to_messages(row, fmt, where)
        if normal_form:
            for m in msgs:
                if not m["content"].isascii():
                    m["content"] = unicodedata.normalize(normal_form, m["content"])
        out.append(msgs)
    if not out:
        raise UserError(f"data source {source!r} holds no rows")
    return out
