"""A stand-in on CPU for the fp16 GPU run (T4, P100): one full ``train_step`` with the student under
``torch.autocast("cpu", dtype=torch.float16)``, a ``torch.amp.GradScaler("cpu")`` behind Accelerate's own
optimizer wrapper, and a float16 teacher, for every routing mode (``moe.MODES``) and from the teacher cache.

What Accelerate does under ``mixed_precision="fp16"`` on a GPU (it has neither autocast nor a scaler on the
CPU) is rebuilt here from its parts: the autocast context, ``scaler.scale(loss).backward()``,
``scaler.unscale_`` before clipping, and ``accelerate.optimizer.AcceleratedOptimizer`` stepping through the
scaler (which sets ``step_was_skipped``)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer

from sakd.config import load_config
from sakd.config import to_dict
from sakd.data.text import Collator, pad_id
from sakd.models import moe
from sakd.train.distill import build_optimizer, setup, train_step
from sakd.train.objective import Objective
from sakd.train.schedule import EpochOrder
from sakd.train.state import TrainState
from tests.conftest import tiny_overrides

QUIET = dict(log=lambda *_: None)
TERMS = {"loss.ce_weight": 0.5, "loss.hidden.weight": 0.5, "train.batch_size": 2, "train.grad_accum": 2}


class Fp16CpuAccelerator:
    """The Accelerator methods the loop calls, doing on the CPU what Accelerate does for fp16 on a GPU."""
    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device, init_scale: float):
        self.device = device
        self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        self.optimizer = None

    def prepare_optimizer(self, optimizer):
        self.optimizer = AcceleratedOptimizer(optimizer, device_placement=False, scaler=self.scaler)
        return self.optimizer

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.float16)

    def unwrap_model(self, model):
        return model

    def no_sync(self, model):
        return nullcontext()

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def clip_grad_norm_(self, params, max_norm):
        self.scaler.unscale_(self.optimizer.optimizer)  # Accelerator.unscale_gradients
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reduce(self, tensor, reduction="sum"):
        return tensor


def _cfg(assets, out, mode, **extra):
    sar = {"moe.router_lr": 1e-2} if mode == "sar" else {}
    ka = {"moe.sample_prob": 0.5} if mode == "ka" else {}
    return load_config(None, tiny_overrides(assets, out, **{"moe.mode": mode, **TERMS, **sar, **ka, **extra}))


def _one_step(cfg, init_scale: float = 2.0 ** 16):
    """One train_step of ``cfg`` in fp16: (terms, skipped, grad_norm, scale after, student moved?, the step's
    weights before, the student, the optimizer)."""
    run = setup(cfg, **QUIET)
    if run.teacher is not None:
        run.teacher.half()  # the GPU's teacher dtype (model.teacher_dtype auto: float16 below sm_80)
    acc = Fp16CpuAccelerator(run.accelerator.device, init_scale)
    optimizer, scheduler = build_optimizer(run.student, run.aux, cfg.train)
    optimizer = acc.prepare_optimizer(optimizer)
    sar = (moe.SARRouter(run.teacher, lr=cfg.moe.router_lr, balance_coef=cfg.moe.balance_coef)
           if cfg.moe.mode == "sar" else None)
    ka_gen = torch.Generator().manual_seed(17)
    order = EpochOrder(len(run.train), cfg.train.seed)
    state = TrainState(horizon=cfg.train.max_steps, config=to_dict(cfg), student=run.student, aux=run.aux,
                       optimizer=optimizer, scheduler=scheduler, scaler=acc.scaler, sar=sar, ka_gen=ka_gen,
                       order=order, data=order.state())
    obj = Objective(cfg, acc, run.student, teacher=run.teacher, teacher_cache=run.teacher_cache, aux=run.aux,
                    vocab=run.vocab, t_vocab=len(run.teacher_tok), ka_gen=ka_gen, sar=sar)
    collate = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))
    idx = [order.next(cfg.train.batch_size) for _ in range(cfg.train.grad_accum)]
    micro = [collate([run.train[i] for i in ids]) for ids in idx]
    before = {n: p.detach().clone() for n, p in run.student.named_parameters()}
    terms, _, _, grad_norm, skipped = train_step(obj, micro, idx, state, run.student, list(run.aux.parameters()),
                                                 acc, cfg.train.grad_clip)
    moved = any(not torch.equal(p, before[n]) for n, p in run.student.named_parameters())
    return terms, skipped, grad_norm, acc.scaler.get_scale(), moved, state


@pytest.mark.parametrize("mode", moe.MODES)
def test_an_fp16_step_trains_in_every_routing_mode(tiny_assets, tmp_path, mode):
    terms, skipped, grad_norm, scale, moved, state = _one_step(_cfg(tiny_assets, tmp_path / "o", mode))
    assert {"kd", "ce", "hidden"} <= set(terms) and all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    assert terms["kd"] > 0 and terms["ce"] > 0
    assert not skipped and torch.isfinite(torch.tensor(grad_norm)) and grad_norm > 0
    # the scaler stepped the optimizer (AdamW's step count) and kept its scale (no inf; growth after 2000 steps)
    assert scale == 2.0 ** 16 and moved
    assert all(int(s["step"]) == 1 for s in state.optimizer.optimizer.state.values())
    assert state.counters["skipped_steps"] == 0 and state.counters["nonfinite_teacher"] == 0


def test_an_fp16_step_reads_the_teacher_cache(tiny_assets, tmp_path):
    from sakd.teacher_cache.builder import build_cache

    cfg = _cfg(tiny_assets, tmp_path / "build", "topk", **{"loss.hidden.weight": 0})
    build_cache(cfg, tmp_path / "cache", k=32, **QUIET)
    cached = _cfg(tiny_assets, tmp_path / "o", "topk", **{"loss.hidden.weight": 0,
                                                          "model.teacher_cache": tmp_path / "cache"})
    terms, skipped, grad_norm, scale, moved, state = _one_step(cached)
    assert set(terms) == {"kd", "ce"} and all(0 < v < float("inf") for v in terms.values())
    assert not skipped and scale == 2.0 ** 16 and moved
    assert all(int(s["step"]) == 1 for s in state.optimizer.optimizer.state.values())


def test_an_fp16_step_whose_scaled_gradients_overflow_is_skipped_and_the_scale_lowered(tiny_assets, tmp_path):
    """A loss scale of 2^127 overflows the scaled fp32 gradients: the scaler skips the optimizer step (the
    weights stay), halves the scale, and the loop counts the skipped step (as on a GPU)."""
    terms, skipped, grad_norm, scale, moved, state = _one_step(_cfg(tiny_assets, tmp_path / "o", "topk"),
                                                               init_scale=2.0 ** 127)
    assert all(0 < v < float("inf") for v in terms.values())  # the loss itself is finite; its scaled grads not
    assert skipped and not moved and scale == 2.0 ** 126
    assert state.counters["skipped_steps"] == 1 and not state.optimizer.optimizer.state
