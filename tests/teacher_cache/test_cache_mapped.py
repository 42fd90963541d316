"""mapped_kl from the teacher cache against the live loss: equal (value and gradient) when the cache
holds the whole teacher distribution exactly (k = V, float32 codec), close with the default packed
top-64; the cached loss through ``cached_step_loss`` and a KA cache's sampled routings."""

import pytest
import torch

from sakd.data.text import span_data
from sakd.teacher_cache import reader as tc
from sakd.teacher_cache.builder import build_cache
from sakd.align.mapping import mapping_tables
from sakd.config import load_config
from sakd.data.text import Collator, pad_id
from sakd.losses.cached_mapped import cached_mapped_kd
from sakd.losses.mapped import mapped_kd, mapped_positions
from sakd.models.load import load_teacher
from tests.conftest import tiny_overrides

T = 2.0
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def setup(tiny_assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("cache_mapped")
    cfg = load_config(None, tiny_overrides(tiny_assets, d / "run", **{"loss.temperature": T,
                                                                      "loss.logit": "mapped_kl"}))
    data = span_data(cfg, **QUIET)
    vt = len(data.teacher_tok)
    build_cache(cfg, d / "full", k=vt, codec="float32", **QUIET)
    build_cache(cfg, d / "c64", k=64, **QUIET)
    build_cache(cfg, d / "f64", k=64, codec="float32", **QUIET)
    teacher = load_teacher(str(tiny_assets["teacher"]), torch.device("cpu"), "float32")
    tables = mapping_tables(data.student_tok, data.teacher_tok)
    return {"cfg": cfg, "data": data, "dir": d, "teacher": teacher, "tables": tables, "vt": vt}


def _inputs(s, idx, seed):
    data = s["data"]
    batch = Collator(pad_id(data.student_tok), pad_id(data.teacher_tok))([data.train[i] for i in idx])
    with torch.no_grad():
        t_logits = s["teacher"](input_ids=batch["t_ids"], attention_mask=batch["t_mask"].long()).logits
    g = torch.Generator().manual_seed(seed)
    s_logits = (3 * torch.randn(*batch["s_ids"].shape, len(data.student_tok), generator=g)).requires_grad_(True)
    return batch, t_logits[..., :s["vt"]], s_logits


@pytest.mark.parametrize("extend", [True, False])
def test_full_vocabulary_cache_equals_the_live_mapped_kd(setup, extend):
    idx = [3, 0, 17, 40, 41, 22, 50, 61]
    batch, t_logits, s_logits = _inputs(setup, idx, 0)
    pos = mapped_positions(batch, setup["tables"])
    assert int(pos.ext.sum()) >= 2 and int((pos.k > 0).sum()) > 10  # every kind of position occurs
    live, n_live = mapped_kd(s_logits, t_logits, batch, setup["tables"], temperature=T, extend=extend)
    (g_live,) = torch.autograd.grad(live, s_logits)
    cb = tc.TeacherCache(setup["dir"] / "full").batch(idx, batch["t_ids"].shape[1], check=batch)
    got, n = cached_mapped_kd(s_logits, cb, batch, setup["tables"], temperature=T, extend=extend)
    (g,) = torch.autograd.grad(got, s_logits)
    assert int(n) == int(n_live) == len(pos) and live.item() > 1.0
    assert got.item() == pytest.approx(live.item(), rel=1e-4)
    torch.testing.assert_close(g, g_live, rtol=1e-4, atol=1e-6)


def test_packed_top64_is_close_to_the_exact_top64(setup):
    """What the packed codec costs: the same top-64 loss from quantised log-probs vs exact float32
    ones (the untrained tiny teacher is flat, so top-64 itself is far from the live loss here; the
    demo's trained teacher is measured in benchmarks/perf.py)."""
    idx = [5, 6, 7, 8]
    batch, _, s_logits = _inputs(setup, idx, 1)
    out = {}
    for name in ("c64", "f64"):
        cb = tc.TeacherCache(setup["dir"] / name).batch(idx, batch["t_ids"].shape[1], check=batch)
        loss, n = cached_mapped_kd(s_logits, cb, batch, setup["tables"], temperature=T)
        out[name] = (loss, torch.autograd.grad(loss, s_logits)[0])
    assert out["f64"][0].item() > 1.0
    assert out["c64"][0].item() == pytest.approx(out["f64"][0].item(), rel=0.05)
    cos = torch.nn.functional.cosine_similarity(out["c64"][1].flatten(), out["f64"][1].flatten(), dim=0)
    assert cos > 0.99, cos


def test_cached_step_loss_reads_mapped_kl_from_the_cache(setup):
    """The loop's cached step (cached_step.cached_step_loss) with loss.logit=mapped_kl: its kd term is
    the live mapped_kd divided by the count, with the tables the cache loads itself."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from sakd.train import objective
    from sakd.train.cached_step import cached_step_loss

    cfg = setup["cfg"]
    idx = [9, 10]
    batch, t_logits, _ = _inputs(setup, idx, 2)
    student = AutoModelForCausalLM.from_pretrained(str(cfg.model.student))
    cb = tc.TeacherCache(setup["dir"] / "full").batch(idx, batch["t_ids"].shape[1], check=batch)
    counts = objective.count_targets([batch], cfg, setup["tables"])
    _, terms, _ = cached_step_loss(student, cb, batch, None, None, cfg, {"kd": 1.0}, counts,
                                   Accelerator(cpu=True))
    with torch.no_grad():
        s_logits = student(input_ids=batch["s_ids"], attention_mask=batch["s_mask"].long()).logits
    live, n = mapped_kd(s_logits, t_logits, batch, setup["tables"], temperature=T, extend=cfg.loss.mapped_extend)
    assert counts["kd"] == counts["ce"] and int(n) > 0  # one KD normaliser: the student's target tokens
    assert terms["kd"] == pytest.approx(live.item() / counts["kd"], rel=1e-4)
