"""Writing files that exist whole or not at all: the one atomic writer of the package.

``write_atomic(path, write)`` calls ``write(tmp)`` on a hidden temporary name beside ``path``
(``.NAME.tmp-PID``), fsyncs it, renames it over ``path`` (``os.replace``: atomic on POSIX and Windows) and
fsyncs the folder, so that a crash or a full disk leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    """The folder of sakd's own caches (real tokenizers, mapping tables): ``$SAKD_CACHE_DIR``, else
    ``~/.cache/sakd``."""
    return Path(os.environ.get("SAKD_CACHE_DIR") or Path.home() / ".cache" / "sakd")


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that renames and new entries in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path`` (module docstring); the folder must exist."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, atomically."""
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))
