"""loss.fused_head on the teacher side: where shared_kl alone reads the teacher's logits, the teacher's
output layer computes the shared vocabulary's columns only ([B, Lt, S], not [B, Lt, Vt]); shared_kl
renormalises over those columns, so every term and the logged outside mass are unchanged. Where mapped_kl
alone reads them, the loss takes the teacher's last hidden state and multiplies out the rows it uses."""

import pytest
import torch

from sakd.data.text import Collator, pad_id
from sakd.train.distill import setup
from sakd.train.heads import teacher_head, teacher_head_use
from sakd.train.objective import _teacher_pass, count_targets, micro_step_loss
from sakd.config import load_config
from tests.conftest import tiny_overrides

QUIET = dict(log=lambda *_: None)


def _terms(run, cfg, batch, weights, t_head, mode_sched=None):
    counts = count_targets([batch], cfg, run.vocab.mapping)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        _, terms, flags = micro_step_loss(run.teacher, run.student, run.aux, batch, run.vocab.shared_s,
                                          run.vocab.shared_t, cfg, weights, counts, run.accelerator,
                                          mode_sched or {}, gen, len(run.teacher_tok), log_mass=True,
                                          mapping=run.vocab.mapping, t_head=t_head)
    return {k: float(v) for k, v in terms.items()}, flags  # the terms are tensors until the loop reads them


def _same_terms_as_the_logits_path(run, cfg, batch, weights, head, mode) -> tuple[dict, dict]:
    """The terms with the fused teacher head equal those from the model's own logits (rtol 1e-5), under the
    same KA draws; returns both runs' flags."""
    sched = {"experts": 2, "sample_prob": 0.5, "temperature": 1.0} if mode == "ka" else {}
    ref, ref_flags = _terms(run, cfg, batch, weights, None, sched)
    got, flags = _terms(run, cfg, batch, weights, head, sched)
    assert ref["kd"] > 1e-3
    for name in weights:
        assert got[name] == pytest.approx(ref[name], rel=1e-5), name
    return flags, ref_flags


@pytest.mark.parametrize("mode", ["topk", "ka"])
def test_shared_columns_only_give_the_same_terms(tiny_assets, tmp_path, mode):
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / "o", **{
        "loss.logit": "shared_kl", "loss.temperature": 2.0, "moe.mode": mode, "loss.ce_weight": 1.0}))
    run = setup(cfg, **QUIET)
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(4)])
    weights = {"kd": 1.0, "ce": 1.0}
    assert teacher_head_use(cfg.loss, weights) == "shared"
    head = teacher_head(run.teacher, run.vocab.shared_t, True)
    S, vt = run.vocab.shared_t.numel(), len(run.teacher_tok)
    assert head[1].shape == (S, head[0].shape[1]) and S < vt
    out, _ = _teacher_pass(run.teacher, batch, "topk", {}, None, None, False, False, head[1])
    assert out.logits.shape == (*batch["t_ids"].shape, S)  # the [B, Lt, Vt] logits never exist
    full = run.teacher(input_ids=batch["t_ids"], attention_mask=batch["t_mask"].long()).logits
    torch.testing.assert_close(out.logits, full[..., run.vocab.shared_t], rtol=1e-5, atol=1e-5)
    flags, ref_flags = _same_terms_as_the_logits_path(run, cfg, batch, weights, head, mode)
    assert flags["teacher_mass_outside_shared"] == pytest.approx(ref_flags["teacher_mass_outside_shared"], rel=1e-5)
    assert 0.01 < flags["teacher_mass_outside_shared"] < 1


@pytest.mark.parametrize("extra,weights,use", [
    ({"loss.logit": "mapped_kl"}, {"kd": 1.0, "ce": 1.0}, "rows"),  # every column, only the rows it uses
    ({}, {"kd": 1.0, "chunk": 0.5}, None),                          # the chunk likelihood needs the logits
    ({"loss.logit": "mapped_kl"}, {"kd": 1.0, "chunk": 0.5}, None),
    ({"loss.gap_weighting": True}, {"kd": 1.0}, None),
    ({"loss.fused_head": False}, {"kd": 1.0}, None),
    ({}, {"kd": 1.0, "hidden": 0.5}, None),
])
def test_what_the_teacher_head_computes_follows_its_readers(tiny_assets, tmp_path, extra, weights, use):
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / "o", **extra))
    assert teacher_head_use(cfg.loss, weights) == use
    assert teacher_head_use(cfg.loss, weights, identity=True) == (None if use == "rows" else use)


@pytest.mark.parametrize("mode", ["topk", "ka"])
def test_mapped_kl_from_the_teacher_hidden_state_gives_the_same_terms(tiny_assets, tmp_path, mode):
    """"rows": the teacher's body runs alone and mapped_kl multiplies out the rows it uses; the terms equal
    those from the model's own logits."""
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / "o", **{
        "loss.logit": "mapped_kl", "loss.temperature": 2.0, "moe.mode": mode, "loss.ce_weight": 1.0}))
    run = setup(cfg, **QUIET)
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(4)])
    weights = {"kd": 1.0, "ce": 1.0}
    head = teacher_head(run.teacher, run.vocab.shared_t, True)
    out, _ = _teacher_pass(run.teacher, batch, "topk", {}, None, None, False, False, True)
    assert out.logits is None and out.last_hidden.shape == (*batch["t_ids"].shape, head[0].shape[1])
    _same_terms_as_the_logits_path(run, cfg, batch, weights, head, mode)
