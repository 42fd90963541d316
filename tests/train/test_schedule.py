"""sakd/train/schedule.py: the optimizer update never lets a non-finite gradient reach the weights."""

import math

import pytest
import torch

from sakd.train.schedule import optimizer_update


class _Fp32Acc:
    """What optimizer_update needs of an fp32 Accelerator: no GradScaler, clip_grad_norm_."""

    scaler = None

    @staticmethod
    def clip_grad_norm_(params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_step_never_reaches_adamw_whatever_grad_clip_is(grad_clip, bad):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    counters = {"skipped_steps": 0}
    w.grad = torch.tensor([0.5, bad, 0.5])
    norm, skipped = optimizer_update(_Fp32Acc, opt, sched, grad_clip, counters)
    assert skipped and counters["skipped_steps"] == 1
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0, 3.0]))  # the weights are untouched
    assert not opt.state.get(w)  # AdamW's moments never saw the step (a NaN there poisons every later step)
    assert w.grad is None and sched.last_epoch == 1  # dropped; the schedule still advanced
    assert norm is not None and not math.isfinite(norm)


@pytest.mark.parametrize("grad_clip", [0.0, 10.0])
def test_a_finite_step_is_taken_and_its_norm_reported(grad_clip):
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    w.grad = torch.tensor([3.0, 4.0])
    norm, skipped = optimizer_update(_Fp32Acc, opt, sched, grad_clip, {"skipped_steps": 0})
    assert not skipped and norm == pytest.approx(5.0)  # |(3, 4)| = 5, below both clips: no clipping
    assert torch.allclose(w.detach(), torch.tensor([1.0 - 1.5, 1.0 - 2.0]))
