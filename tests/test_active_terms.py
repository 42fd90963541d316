"""One rule for which loss terms a run trains with (``LossConfig.active_terms``): the loop, `sakd plan` and the
teacher-cache check agree with it, and with a reference written out here, on a grid of configurations."""

import functools
import itertools

import pytest

from sakd.config import TEACHER_TERMS, load_config
from sakd.errors import UserError
from sakd.models.tiny import llama_config, qwen3_moe_config
import sakd.plan
from sakd.plan import plan
from sakd.teacher_cache.manifest import check_cached_config
from sakd.train import objective
from sakd.train.distill import needs_attention_maps
from sakd.train.heads import fused_head_terms

# (loss.logit, loss.baseline) x kd x ce x chunk x hidden (ramped) x attention x contrastive
METHODS = [("shared_kl", ""), ("mapped_kl", ""), ("none", ""), ("shared_kl", "uld")]
GRID = list(itertools.product(METHODS, (0, 1.0), (0, 1.0), (0, 0.5), (0, 0.5), (0, 0.5), (0, 0.5)))


def _reference(logit, baseline, kd, ce, chunk, hidden, attention, contrastive) -> set[str]:
    """The rule written out: a term is on when its weight is above 0; the logit loss also needs a method."""
    on = {"kd": kd > 0 and (baseline or logit) != "none", "ce": ce > 0, "chunk": chunk > 0, "hidden": hidden > 0,
          "attention": attention > 0, "contrastive": contrastive > 0}
    return {k for k, v in on.items() if v}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """config.json-only tiny models: all `sakd plan` reads."""
    d = tmp_path_factory.mktemp("terms")
    llama_config(512, hidden=64, layers=2, heads=4, intermediate=128).save_pretrained(d / "s")
    qwen3_moe_config(640, hidden=64, layers=2, heads=4, experts=3, experts_per_tok=1,
                     intermediate=64).save_pretrained(d / "t")
    return [f"model.student={d / 's'}", f"model.teacher={d / 't'}", "data.seq_len=32", "train.batch_size=2"]


def _configs(models):
    for (logit, baseline), kd, ce, chunk, hidden, attention, contrastive in GRID:
        over = [f"loss.logit={logit}", f"loss.baseline={baseline}", f"loss.kd_weight={kd}", f"loss.ce_weight={ce}",
                f"loss.chunk_weight={chunk}", f"loss.hidden.weight={hidden}", "loss.hidden.ramp_steps=10",
                f"loss.attention.weight={attention}", f"loss.contrastive.weight={contrastive}",
                "loss.divergence=reverse_kl"]  # a divergence a top-k cache refuses, so the cache check shows kd
        try:
            cfg = load_config(None, models + over)
        except UserError:  # no term at all, or loss.kd_weight > 0 with loss.logit=none
            assert not _reference(logit, baseline, kd, ce, chunk, hidden, attention, contrastive) or (
                kd > 0 and logit == "none")
            continue
        yield cfg, _reference(logit, baseline, kd, ce, chunk, hidden, attention, contrastive)


def _cache_refusal(cfg) -> str | None:
    try:
        check_cached_config(cfg)
    except UserError as e:
        return str(e)
    return None


def test_the_loop_the_plan_and_the_cache_check_agree_on_the_active_terms(models, monkeypatch):
    # the two models are the same at every grid point: read and count them once (the loss terms do not enter)
    monkeypatch.setattr(sakd.plan, "load_model_config", functools.cache(sakd.plan.load_model_config))
    counted, count = {}, sakd.plan.count_parameters
    monkeypatch.setattr(sakd.plan, "count_parameters",
                        lambda c: counted[id(c)] if id(c) in counted else counted.setdefault(id(c), count(c)))
    s_config = llama_config(512, hidden=64, layers=2, heads=4, intermediate=128)
    t_config = qwen3_moe_config(640, hidden=64, layers=2, heads=4, experts=3, experts_per_tok=1, intermediate=64)
    n = 0
    for cfg, want in _configs(models):
        n += 1
        terms = cfg.loss.active_terms()
        assert terms == want, (cfg.loss, terms)
        # the loop: its weights at every step (a ramped term at weight 0 still counts), its trainable parts,
        # whether it runs the teacher and asks for attention maps
        for step in (0, 5, 10_000):
            assert set(objective.term_weights(cfg, step)) == want
        assert set(objective.build_aux_modules(cfg, s_config, t_config)) == want & {"hidden", "contrastive"}
        assert needs_attention_maps(cfg) == ("attention" in want)
        assert bool(TEACHER_TERMS & terms) == bool(want - {"ce"})
        # sakd plan: a term's memory is counted exactly when the term is on
        p = plan(cfg, device="cpu", card_gb=1e-6)  # a card nothing fits: no search for the largest micro-batch
        c = p["components"]
        assert (c["kd_grad_buffers"] > 0) == ("kd" in want)
        assert (c["ce_buffers_forward"] > 0) == ("ce" in want)
        assert (c["alm_chunk_temporaries"] > 0) == ("chunk" in want)
        assert (c["teacher_attention_maps"] > 0) == ("attention" in want)
        assert (c["teacher_hidden_states"] > 0) == bool(want & {"hidden", "contrastive"})
        assert p["fused_head"] == fused_head_terms(cfg.loss, kd="kd" in want, chunk="chunk" in want)
        # the teacher-cache check refuses the first term a top-k cache cannot feed, and nothing else
        refusal = _cache_refusal(cfg)
        if "kd" in want:
            assert refusal and ("loss.baseline=uld" if cfg.loss.baseline else "loss.divergence=reverse_kl") in refusal
        elif want & {"hidden", "attention", "contrastive"}:
            first = next(k for k in ("hidden", "attention", "contrastive") if k in want)
            assert refusal and f"loss.{first}.weight" in refusal, refusal
        else:
            assert refusal is None, refusal
    assert n > 200, n  # most of the 256 grid points are valid configurations
