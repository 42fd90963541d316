"""The GOLD baseline (``loss.baseline=gold``) from a teacher cache: the config check lets it through (and still
refuses ULD and truncation), a run from a full-vocabulary float32 cache has the kd terms of the
live-teacher run, and a KA cache's sampled routings are averaged."""

import json
import math

import pytest
import torch

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


def test_a_ka_cache_averages_gold_over_its_sampled_routings(tiny_assets, tmp_path):
    """moe.mode=ka caches moe.ka_samples routings per position: the cached step's kd term is the mean of
    cached_gold_kd over the routings, on the live path's normaliser (the student's target tokens), as the
    live KA averages its passes; the two routings give different losses."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from sakd.align.vocab import build_vocab_map
    from sakd.data.text import Collator, pad_id, span_data
    from sakd.losses.cached import cached_gold_kd
    from sakd.teacher_cache.reader import TeacherCache
    from sakd.train import objective
    from sakd.train.cached_step import cached_step_loss

    cfg = _cfg(tiny_assets, tmp_path / "run", **{**GOLD, "moe.mode": "ka", "moe.ka_samples": 2,
                                                 "moe.sample_prob": 0.5})
    build_cache(cfg, tmp_path / "cache", k=64, codec="float32", **QUIET)
    data = span_data(cfg, **QUIET)
    vocab = build_vocab_map(data.student_tok, data.teacher_tok)
    idx = [0, 7, 12]
    batch = Collator(pad_id(data.student_tok), pad_id(data.teacher_tok))([data.train[i] for i in idx])
    cb = TeacherCache(tmp_path / "cache").batch(idx, batch["t_ids"].shape[1], check=batch)
    assert len(cb["samples"]) == 2
    student = AutoModelForCausalLM.from_pretrained(str(cfg.model.student))
    counts = objective.count_targets([batch], cfg)
    vt = len(data.teacher_tok)
    _, terms, _ = cached_step_loss(student, cb, batch, vocab.shared_s, vocab.shared_t, cfg, {"kd": 1.0},
                                   counts, Accelerator(cpu=True), t_vocab=vt)
    with torch.no_grad():
        s_logits = student(input_ids=batch["s_ids"], attention_mask=batch["s_mask"].long()).logits
    per = [cached_gold_kd(s_logits, v, batch, vocab.shared_s, vocab.shared_t, vt=vt, temperature=cfg.loss.temperature,
                          beta=0.5)[0].item() for v in cb["samples"]]
    assert counts["kd"] == counts["ce"] and per[0] > 0 and abs(per[0] - per[1]) > 1e-6 * per[0]
    assert terms["kd"] == pytest.approx((per[0] + per[1]) / 2 / counts["kd"], rel=1e-5)
