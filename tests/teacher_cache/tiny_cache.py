"""What the teacher-cache tests share (test_cache.py: top-k; test_sampled_codec.py: sampled): the tiny run's
configuration at a KD temperature != 1, and a cache built from it. Not a test file."""

from __future__ import annotations

from pathlib import Path

from sakd.config import load_config
from sakd.data.text import span_data
from sakd.teacher_cache.builder import build_cache
from tests.conftest import tiny_overrides

T = 2.0  # a KD temperature != 1, so that T reaching the wrong quantity would show
QUIET = dict(log=lambda *_: None)


def cache_cfg(assets, out, **extra):
    """The tiny run of ``assets`` writing to ``out``, at temperature T (``extra``: more overrides)."""
    return load_config(None, tiny_overrides(assets, out, **{"loss.temperature": T, **extra}))


def build_tiny_cache(assets, d: Path, name: str, **build) -> dict:
    """The teacher cache of the tiny run (its folder ``d / "run"``), built into ``d / name`` (``build``:
    ``build_cache``'s k, codec, shard_spans): {"cfg", "dir", "manifest", "data" (the loop's span data)}."""
    cfg = cache_cfg(assets, d / "run")
    manifest = build_cache(cfg, d / name, **build, **QUIET)
    return {"cfg": cfg, "dir": d / name, "manifest": manifest, "data": span_data(cfg, **QUIET)}
