"""An fp16 teacher (what a P100 / T4 runs) through every loss term and every routing mode, live and from a
cache, on CPU (CPU fp16 kernels exist): the values must match the fp32 teacher's, the gradients be finite."""

import pytest
import torch

from sakd.train import objective
from sakd.config import load_config
from sakd.data.text import Collator, pad_id
from sakd.train.distill import distill, setup
from tests.conftest import tiny_overrides

ALL_TERMS = {"loss.ce_weight": 0.5, "loss.chunk_weight": 0.5, "loss.hidden.weight": 0.5,
             "loss.attention.weight": 0.5, "loss.contrastive.weight": 0.5}


class CpuAcc:
    autocast = staticmethod(lambda: torch.autocast("cpu", enabled=False))
    unwrap_model = staticmethod(lambda m: m)
    num_processes = 1


def _terms(tiny_assets, tmp_path, dtype: str, mode: str):
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / dtype, **ALL_TERMS, **{
        "model.teacher_dtype": dtype, "moe.mode": mode, "moe.sample_prob": 0.5}))
    torch.manual_seed(0)
    run = setup(cfg, log=lambda *_: None)
    assert next(run.teacher.parameters()).dtype == getattr(torch, dtype)
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(4)])
    weights = objective.term_weights(cfg, 10)
    router = {}
    if mode == "sar":
        from sakd.models import moe

        sar = moe.SARRouter(run.teacher, lr=1e-2)
        before = {k: v.detach().clone() for k, v in sar.master.items()}
        router = objective.sar_router_step(sar, run.teacher, run.student, batch, run.vocab.shared_s,
                                           run.vocab.shared_t, cfg, CpuAcc, len(run.teacher_tok))
        assert not router["sar_skipped"] and all(not torch.equal(before[k], sar.master[k]) for k in before)
    sched = {"experts": 2, "sample_prob": 0.5, "temperature": 1.0} if mode == "ka" else {}
    loss, terms, flags = objective.micro_step_loss(
        run.teacher, run.student, run.aux, batch, run.vocab.shared_s, run.vocab.shared_t, cfg, weights,
        objective.count_targets([batch], cfg), CpuAcc, sched, torch.Generator().manual_seed(0),
        len(run.teacher_tok))
    loss.backward()
    grads = [p.grad for p in list(run.student.parameters()) + list(run.aux.parameters())]
    return {k: float(v) for k, v in terms.items()}, flags, loss, grads, router  # terms: tensors until read


@pytest.mark.parametrize("mode", ["topk", "ka", "all", "sar"])
def test_fp16_teacher_gives_the_fp32_teachers_terms(tiny_assets, tmp_path, mode):
    t16, flags, loss, grads, router = _terms(tiny_assets, tmp_path, "float16", mode)
    t32, _, _, _, router32 = _terms(tiny_assets, tmp_path, "float32", mode)
    assert set(t16) == {"kd", "ce", "chunk", "hidden", "attention", "contrastive"} == set(t32)
    assert flags["nonfinite_teacher"] == 0 and torch.isfinite(loss)
    for k in t32:
        assert t16[k] == pytest.approx(t32[k], rel=2e-2, abs=1e-4), (k, t16[k], t32[k])
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if mode == "sar":
        assert router["sar_kl"] == pytest.approx(router32["sar_kl"], rel=2e-2)
        assert router["sar_loss_scale"] > 1  # the fp16 router step runs under its own GradScaler


def test_fp16_teacher_cache_matches_fp32_and_trains(tiny_assets, tmp_path):
    """Cached: a top-k cache built from the fp16 teacher holds the fp32 teacher's log-probs (to fp16
    precision), and a run trains from it."""
    from sakd.teacher_cache.builder import build_cache
    from sakd.teacher_cache.reader import TeacherCache

    caches = {}
    for dtype in ("float16", "float32"):
        cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / f"run-{dtype}", **{
            "model.teacher_dtype": dtype, "data.max_examples": 8, "loss.chunk_weight": 0.5}))
        build_cache(cfg, tmp_path / f"cache-{dtype}", k=16, codec="float32", log=lambda *_: None)
        caches[dtype] = TeacherCache(tmp_path / f"cache-{dtype}", None)
    a, b = (caches[d].batch(list(range(8)), 160) for d in ("float16", "float32"))
    assert torch.equal(a["lengths"], b["lengths"])
    real = torch.arange(160)[None, :] < a["lengths"][:, None]  # [B, t_len]: the spans' teacher positions
    same_top1 = (a["topk_ids"][..., 0] == b["topk_ids"][..., 0])[real].float().mean()
    assert same_top1 > 0.97
    torch.testing.assert_close(a["token_logprob"][real], b["token_logprob"][real], atol=3e-2, rtol=0)
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / "from-cache", **{
        "model.teacher_cache": tmp_path / "cache-float16", "data.max_examples": 8, "loss.chunk_weight": 0.5}))
    result = distill(cfg, progress=False, log=lambda *_: None)
    assert result["steps"] == 3 and result["student_bpb_final"] < result["student_bpb_initial"] + 0.05
