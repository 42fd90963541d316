"""The clock of a run: the resumable data order, the LR schedule, loss-weight ramps, and the optimizer update
that advances the LR schedule (``sakd.train.distill`` runs them; they are small enough to test on their own).
The KA routing schedule is ``sakd.models.moe.routing_schedule``."""

from __future__ import annotations

import math

import torch



# ----------------------------------------------------------------------------- data order

class EpochOrder:
    """A resumable data order: a seeded permutation per epoch, sharded across processes.

    The position (epoch, index) is all that must be saved to continue mid-epoch."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.index = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        usable = len(perm) - len(perm) % self.world
        return perm[self.rank:usable:self.world]

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= len(self._perm):
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation()
            take = self._perm[self.index:self.index + k - len(out)]
            out += take
            self.index += len(take)
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._perm = self._permutation()


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def optimizer_update(acc, optimizer, scheduler, grad_clip: float, counters: dict) -> tuple[float, bool]:
    """Unscale and clip (``grad_clip`` 0: no clipping), step, advance the schedule: (gradient norm before
    clipping, skipped).

    A step is SKIPPED when its gradients are not finite, whatever ``grad_clip`` is: in fp32 here (the
    gradients are dropped before the optimizer sees them), under fp16 by the GradScaler (which then lowers
    the loss scale). Both are counted in ``counters["skipped_steps"]``. The LR schedule advances either way:
    the step number is the clock of the LR and KA schedules, of checkpoints and of resume."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # The norm is needed to see a non-finite step even without clipping (max_norm=inf scales by 1).
    grad_norm = float(acc.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf))
    if not math.isfinite(grad_norm) and acc.scaler is None:
        optimizer.zero_grad(set_to_none=True)  # fp32: a non-finite gradient never reaches the weights
        skipped = True
    else:
        optimizer.step()
        skipped = acc.scaler is not None and bool(getattr(optimizer, "step_was_skipped", False))
    counters["skipped_steps"] += int(skipped)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def ramp(weight: float, ramp_steps: int, step: int) -> float:
    """Constant weight, or a linear ramp from 0 over ``ramp_steps`` steps."""
    return weight if ramp_steps <= 0 else weight * min(1.0, step / ramp_steps)
