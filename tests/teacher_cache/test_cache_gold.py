"""The GOLD baseline (``loss.baseline=gold``) from a teacher cache: the config check lets it through (and still
refuses ULD and truncation), and a run from a full-vocabulary float32 cache has, at its first step, the
kd term of the live-teacher run."""

import json
import math

import pytest

from sakd.errors import UserError
from sakd.models.load import load_tokenizer
from sakd.teacher_cache import manifest as tm
from sakd.teacher_cache.builder import build_cache
from tests.teacher_cache.tiny_cache import QUIET
from tests.teacher_cache.tiny_cache import cache_cfg as _cfg

# the teacher terms a cache cannot feed are off (check_cached_config)
GOLD = {"loss.baseline": "gold", "moe.mode": "topk", "loss.hidden.weight": 0, "loss.attention.weight": 0,
        "loss.contrastive.weight": 0, "loss.chunk_weight": 0, "loss.ce_weight": 1, "loss.beta": 0.5}


def test_check_cached_config_lets_gold_through_and_refuses_the_others(tiny_assets, tmp_path):
    tm.check_cached_config(_cfg(tiny_assets, tmp_path, **GOLD))
    for extra, match in (({"loss.baseline": "uld"}, "loss.baseline=uld needs the teacher's full logits"),
                         ({"loss.baseline": "truncation"}, "loss.baseline=truncation needs"),
                         ({"loss.beta": 1.0}, "loss.beta=1")):
        with pytest.raises(UserError, match=match) as e:
            tm.check_cached_config(_cfg(tiny_assets, tmp_path, **{**GOLD, **extra}))
        assert "\n" not in str(e.value)


def _history(out):
    return json.loads((out / "history.json").read_text())["history"]


def test_gold_trains_from_a_full_vocabulary_cache_as_from_the_live_teacher(tiny_assets, tmp_path):
    """k = V_t, float32 codec: the cached teacher row is the live one up to float32 rounding, so the first
    step's kd term (same student, same batch) matches the live run's; every step's kd is finite and > 0."""
    from sakd.train.distill import distill

    run = {**GOLD, "train.max_steps": 3}
    build = _cfg(tiny_assets, tmp_path / "b", **run)
    vt = len(load_tokenizer(str(tiny_assets["teacher"]), "teacher"))
    build_cache(build, tmp_path / "cache", k=vt, codec="float32", **QUIET)
    distill(_cfg(tiny_assets, tmp_path / "cached", **run, **{"model.teacher_cache": str(tmp_path / "cache")}),
            progress=False, log=lambda *_: None)
    distill(_cfg(tiny_assets, tmp_path / "live", **run), progress=False, log=lambda *_: None)
    cached, live = _history(tmp_path / "cached"), _history(tmp_path / "live")
    assert len(cached) == len(live) == 3
    assert all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in cached)
    assert cached[0]["kd"] == pytest.approx(live[0]["kd"], rel=1e-5)
    assert [r["kd"] for r in cached] == pytest.approx([r["kd"] for r in live], rel=1e-4)  # the same updates
