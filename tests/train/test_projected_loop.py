"""loss.logit=projected_kl in the loop's objective (live and cached teacher), the one KD normaliser, and the
KD term split by position kind in the log."""

import math

import pytest
import torch

from sakd.config import load_config
from sakd.data.text import Collator, pad_id
from sakd.errors import UserError
from sakd.losses.projected import cached_projected_kd, projected_kd
from sakd.teacher_cache.builder import mapped_fields
from sakd.train import objective
from sakd.train.cached_step import cached_step_loss
from sakd.train.distill import distill, setup
from tests.conftest import tiny_overrides


class CpuAcc:
    autocast = staticmethod(lambda: torch.autocast("cpu", enabled=False))
    unwrap_model = staticmethod(lambda m: m)


def _run(tiny_assets, tmp_path, logit, **extra):
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path, **{"loss.logit": logit, "loss.ce_weight": 1,
                                                                      "moe.mode": "topk", **extra}))
    return cfg, setup(cfg, log=lambda *_: None)


def _logits(run, batch):
    with torch.no_grad():
        s = run.student(input_ids=batch["s_ids"], attention_mask=batch["s_mask"].long()).logits
        t = run.teacher(input_ids=batch["t_ids"], attention_mask=batch["t_mask"].long()).logits
    return s, t[..., :len(run.teacher_tok)]


@pytest.mark.parametrize("logit", ["shared_kl", "mapped_kl", "projected_kl"])
def test_every_kd_term_is_divided_by_the_student_target_tokens(tiny_assets, tmp_path, logit):
    """kd = (the logit loss's sum) / (cross-entropy's count), whatever the method: loss.kd_weight weighs a
    position's term the same for every method."""
    cfg, run = _run(tiny_assets, tmp_path, logit, **{"loss.fused_head": False})
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(4)])
    counts = objective.count_targets([batch], cfg, run.vocab.mapping)
    assert counts["kd"] == counts["ce"] == float(batch["s_mask"][:, 1:].sum())
    weights = objective.term_weights(cfg, 10)
    _, terms, _ = objective.micro_step_loss(
        run.teacher, run.student, run.aux, batch, run.vocab.shared_s, run.vocab.shared_t, cfg, weights, counts,
        CpuAcc, {}, torch.Generator().manual_seed(0), len(run.teacher_tok), mapping=run.vocab.mapping,
        classes=run.vocab.classes)
    s, t = _logits(run, batch)
    direct = objective.logit_term_sum(logit, s, t, batch, run.vocab.shared_s, run.vocab.shared_t, cfg.loss,
                                      mapping=run.vocab.mapping, classes=run.vocab.classes)
    assert terms["kd"] == pytest.approx(float(direct) / counts["ce"], rel=1e-4)
    if logit == "projected_kl":  # the log splits it by position kind, and the parts add up
        parts = [terms[f"kd_{k}"] for k in ("one_to_one", "chunk_first", "inside")]
        assert all(p > 0 for p in parts)
        assert sum(parts) == pytest.approx(float(terms["kd"]), rel=1e-5)


def test_cached_step_reads_projected_kl_from_the_cache_fields(tiny_assets, tmp_path):
    """cached_step_loss with loss.logit=projected_kl: a full-vocabulary cache view gives the live loss."""
    cfg, run = _run(tiny_assets, tmp_path, "projected_kl")
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(3)])
    s, t = _logits(run, batch)
    vt = t.shape[-1]
    lp = torch.log_softmax(t.float(), -1)
    logz, path = mapped_fields(t, batch, run.vocab.mapping, vt=vt, temperature=1.0)
    vals, ids = lp.topk(vt, -1)
    cb = {"topk_ids": ids, "topk_logprobs": vals, "mapped_logz": logz, "mapped_path": path}
    counts = objective.count_targets([batch], cfg, run.vocab.mapping)
    _, terms, _ = cached_step_loss(run.student, cb, batch, None, None, cfg, {"kd": 1.0}, counts, CpuAcc,
                                   mapping=run.vocab.mapping, classes=run.vocab.classes)
    live, n = projected_kd(s, t, batch, run.vocab.mapping, run.vocab.classes)
    assert int(n) > 0.9 * counts["ce"]
    assert terms["kd"] == pytest.approx(float(live) / counts["ce"], rel=1e-4)
    got, _ = cached_projected_kd(s, cb, batch, run.vocab.mapping, run.vocab.classes)
    assert math.isclose(float(got), float(live), rel_tol=1e-4)
    assert sum(terms[f"kd_{k}"] for k in ("one_to_one", "chunk_first", "inside")) == pytest.approx(float(terms["kd"]))


def test_projected_kl_trains_and_refuses_other_divergences(tiny_assets, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path, **{"loss.logit": "projected_kl",
                                                                      "train.max_steps": 2}))
    distill(cfg, progress=False, log=lambda *_: None)
    assert (tmp_path / "student" / "model.safetensors").is_file()
    with pytest.raises(UserError, match="loss.divergence=forward_kl"):
        load_config(None, tiny_overrides(tiny_assets, tmp_path, **{"loss.logit": "projected_kl",
                                                                   "loss.divergence": "jsd"}))


def test_a_cache_built_for_mapped_kl_trains_projected_kl(tiny_assets, tmp_path):
    """The cache holds no loss-specific key: one built under loss.logit=mapped_kl (packed top-64) feeds a
    projected_kl run, whose log splits the KD term by position kind."""
    import json

    from sakd.teacher_cache.builder import build_cache

    base = {"moe.mode": "topk", "loss.ce_weight": 1, "train.max_steps": 2}
    build = load_config(None, tiny_overrides(tiny_assets, tmp_path / "b", **base, **{"loss.logit": "mapped_kl"}))
    build_cache(build, tmp_path / "cache", k=64, log=lambda *_: None)
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / "run", **base, **{
        "loss.logit": "projected_kl", "model.teacher_cache": str(tmp_path / "cache")}))
    distill(cfg, progress=False, log=lambda *_: None)
    history = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
    step = [r for r in history if "kd_inside" in r]
    assert step and all(r["kd_one_to_one"] + r["kd_chunk_first"] + r["kd_inside"] == pytest.approx(r["kd"], rel=1e-5)
                        for r in step)


def test_ka_passes_share_one_student_side_in_the_objective(tiny_assets, tmp_path, monkeypatch):
    """moe.mode=ka with the fused heads: the objective hands projected_kl the M passes in ONE call, and the
    terms (kd, its per-kind parts) and the student's gradient equal those of one call per pass."""
    cfg, run = _run(tiny_assets, tmp_path, "projected_kl", **{
        "moe.mode": "ka", "moe.ka_samples": 2, "moe.sample_prob": 0.5, "loss.fused_head": True})
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(4)])
    counts = objective.count_targets([batch], cfg, run.vocab.mapping)
    weights = objective.term_weights(cfg, 10)
    acc = run.accelerator
    obj = objective.Objective(cfg, acc, run.student, teacher=run.teacher, aux=run.aux, vocab=run.vocab,
                              t_vocab=len(run.teacher_tok), ka_gen=torch.Generator())
    sched = obj.routing_schedule(0, 10)
    real, calls = objective.projected_kd, []

    def loss_and_grads(split: bool):
        def recorded(s, t, *a, **kw):
            calls.append(len(t) if isinstance(t, list) else 1)
            if isinstance(t, list):  # KA drew two different routings: the passes' targets differ
                assert not torch.equal(t[0], t[1])
            if split and isinstance(t, list):
                out = [real(s, x, *a, **kw) for x in t]
                return sum(o[0] for o in out), out[0][1]
            return real(s, t, *a, **kw)
        monkeypatch.setattr(objective, "projected_kd", recorded)
        run.student.zero_grad()
        total, terms, _ = objective.micro_step_loss(
            run.teacher, run.student, run.aux, batch, obj.shared_s, obj.shared_t, cfg, weights, counts, acc, sched,
            torch.Generator().manual_seed(5), len(run.teacher_tok), mapping=run.vocab.mapping, t_head=obj.t_head,
            classes=run.vocab.classes)
        total.backward()
        return {k: float(v) for k, v in terms.items()}, [p.grad.clone() for p in run.student.parameters()]

    one, g_one = loss_and_grads(False)
    assert calls == [2]  # both passes in one call
    each, g_each = loss_and_grads(True)
    assert set(one) == set(each) >= {"kd", "ce", "kd_one_to_one", "kd_chunk_first", "kd_inside"}
    for k in one:
        assert one[k] == pytest.approx(each[k], rel=1e-6), k
    for a, b in zip(g_one, g_each):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
