"""A stand-in on CPU for the GPU's device placement: one micro-step (loss and backward) with the default device
set to ``meta``. The models and the batch live on the CPU, so any tensor that the objective or a loss makes
without ``device=`` (``torch.zeros(n)``, ``torch.arange(n)``, ``torch.as_tensor(x)``) lands on ``meta`` and the
step fails where it meets a real tensor: the bug that on a GPU puts a tensor on the CPU next to CUDA ones."""

from __future__ import annotations

import pytest
import torch

from sakd.config import load_config
from sakd.data.text import Collator, pad_id
from sakd.train import objective
from sakd.train.distill import setup
from sakd.train.heads import teacher_head
from tests.conftest import tiny_overrides

QUIET = dict(log=lambda *_: None)
KA_SCHEDULE = {"experts": 2, "sample_prob": 0.5, "temperature": 1.5}
CASES = {
    "shared_kl, every term, KA": {"loss.logit": "shared_kl", "loss.ce_weight": 0.5, "loss.chunk_weight": 0.5,
                                  "loss.hidden.weight": 0.5, "loss.attention.weight": 0.5,
                                  "loss.contrastive.weight": 0.5, "moe.mode": "ka"},
    "shared_kl, fused heads": {"loss.logit": "shared_kl", "loss.ce_weight": 0.5, "loss.fused_head": True},
    "mapped_kl, fused heads": {"loss.logit": "mapped_kl", "loss.ce_weight": 0.5, "loss.fused_head": True},
    "projected_kl": {"loss.logit": "projected_kl", "loss.ce_weight": 0.5, "loss.fused_head": False},
    "projected_kl, fused heads": {"loss.logit": "projected_kl", "loss.ce_weight": 0.5, "loss.fused_head": True},
}


def _step(run, cfg, batch, t_head):
    """(loss, terms, gradients by name) of one micro-step."""
    for p in list(run.student.parameters()) + list(run.aux.parameters()):
        p.grad = None
    weights = objective.term_weights(cfg, 10)
    counts = objective.count_targets([batch], cfg)
    loss, terms, _ = objective.micro_step_loss(
        run.teacher, run.student, run.aux, batch, run.vocab.shared_s, run.vocab.shared_t, cfg, weights, counts,
        run.accelerator, KA_SCHEDULE if cfg.moe.mode == "ka" else {}, torch.Generator().manual_seed(0),
        len(run.teacher_tok), mapping=run.vocab.mapping, t_head=t_head, classes=getattr(run.vocab, "classes", None),
        log_mass=True)
    loss.backward()
    named = list(run.student.named_parameters()) + list(run.aux.named_parameters())
    return loss, terms, {n: p.grad for n, p in named if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_a_micro_step_makes_no_tensor_off_its_inputs_device(tiny_assets, tmp_path, case):
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path, **CASES[case]))
    run = setup(cfg, **QUIET)
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(3)])
    t_head = teacher_head(run.teacher, run.vocab.shared_t if cfg.loss.method == "shared_kl" else None,
                                    cfg.loss.fused_head)
    ref_loss, ref_terms, ref_grads = _step(run, cfg, batch, t_head)
    with torch.device("meta"):
        loss, terms, grads = _step(run, cfg, batch, t_head)
    # the same step, value for value: nothing was made on the default device, nothing was lost
    assert loss.device.type == "cpu" and torch.isfinite(loss) and torch.equal(loss, ref_loss)
    assert terms.keys() == ref_terms.keys() and "kd" in terms
    for k, v in terms.items():
        assert v.device.type == "cpu" and torch.equal(v, ref_terms[k]), k
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(run.student.parameters())) + len(
        list(run.aux.parameters()))
    for k, g in grads.items():
        assert g.device.type == "cpu" and torch.equal(g, ref_grads[k]), k
