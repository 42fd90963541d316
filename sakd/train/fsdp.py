"""FSDP2 for the student, through Accelerate (``train.distributed=fsdp``, or ``accelerate launch`` with an
FSDP config such as configs/accelerate/fsdp.yaml).

What is sharded: the student's parameters, gradients and AdamW states, each split N ways (FULL_SHARD);
Accelerate's ``fsdp2_prepare_model`` makes every decoder layer (the model's ``_no_split_modules``) its own
unit, all-gathered just before its forward and again for its backward, and puts the final norm, the output
layer and (tied) the embeddings in one unit that stays gathered from the forward to the backward.
What is not: the teacher (frozen, a plain module on every process, never passed to ``prepare``) and the
projectors of the hidden / contrastive terms (plain, their gradients averaged by hand as under DDP).

Checkpoints and the exported student hold FULL tensors in the format of a one-process run (``gathered``):
the optimizer's state is keyed by parameter index as ``torch.optim.Optimizer.state_dict`` keys it, not by
name as ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` would (which also refuses the
projectors' parameters, being outside the model). Resuming reads the full tensors on every process and
keeps each process's shard (``shard_loaded``).
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from sakd.errors import UserError


def requested(distributed: str) -> bool:
    """``train.distributed=fsdp``, or an FSDP launch (``accelerate launch --use_fsdp`` / ``--config_file`` with
    ``distributed_type: FSDP`` sets ACCELERATE_USE_FSDP)."""
    return distributed == "fsdp" or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def build_accelerator(mixed_precision: str, distributed: str, on_policy: bool) -> Accelerator:
    """The run's Accelerator: DDP (or one process) as before, or FSDP2 for the student.

    Plugin settings left unset here come from the launch's FSDP_* environment (Accelerate's config file)."""
    cpu = not torch.cuda.is_available()
    if not requested(distributed):
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise UserError(f"fsdp_version {version} (FSDP_VERSION): sakd shards the student with FSDP2 only; set "
                        "fsdp_version: 2 in the Accelerate config (see configs/accelerate/fsdp.yaml)")
    if on_policy:
        raise UserError("loss.on_policy_prob > 0 with FSDP: each process would generate its own number of "
                        "tokens, and the sharded student's forwards are collective (a hang): use "
                        "train.distributed=ddp, or loss.on_policy_prob=0")
    # one unit per decoder layer (the student's _no_split_modules) unless the launch names another policy;
    # Accelerate's own default, NO_WRAP, would all-gather the whole student at once
    wrap = os.environ.get("FSDP_AUTO_WRAP_POLICY") or "transformer_based_wrap"
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy=wrap, state_dict_type="FULL_STATE_DICT")
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu, fsdp_plugin=plugin)
    if acc.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate 1.15 turns FSDP on only for accelerator devices: in AcceleratorState.__init__ the FSDP
        # branch sits under `elif self.distributed_type in [MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]`, which
        # lacks MULTI_CPU, so on CPU processes the plugin is dropped without a word and `prepare` wraps the
        # student in DDP. torch's FSDP2 (`fully_shard`) runs on gloo, and every FSDP path of Accelerate used
        # here (fsdp2_prepare_model, clip_grad_norm_, no_sync, reduce) works on CPU: switch it on.
        # Both shared states, as AcceleratorState.__init__ ends on a GPU: a later AcceleratorState() (Accelerate
        # calls it internally) copies PartialState's distributed_type over its own.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    return acc


def is_sharded(acc) -> bool:
    """Whether the student is sharded: its forwards (evaluation included) and its state dicts are then
    collective, every process must take part."""
    return bool(getattr(acc, "is_fsdp2", False))


def prepare(acc, student: torch.nn.Module, optimizer: torch.optim.Optimizer, log=print):
    """``acc.prepare(student, optimizer)``. Under FSDP2, Accelerate maps every optimizer parameter to its
    sharded twin by the student's parameter names and refuses any other (a KeyError): the trailing groups
    holding only parameters outside the student (the projectors) are taken out and put back after."""
    if not is_sharded(acc):
        return acc.prepare(student, optimizer)
    own = {id(p) for p in student.parameters()}
    groups = optimizer.param_groups
    n = len(groups)
    while n and not any(id(p) in own for p in groups[n - 1]["params"]):
        n -= 1
    if any(id(p) not in own for g in groups[:n] for p in g["params"]):
        raise ValueError("FSDP: a parameter group mixes student and other parameters; keep the others last")
    extra = groups[n:]
    optimizer.param_groups = groups[:n]
    student, optimizer = acc.prepare(student, optimizer)
    for g in extra:
        optimizer.optimizer.param_groups.append(g)  # as they were (lr, initial_lr set by the scheduler, ...)
    local, total = local_share(student)
    if acc.is_main_process:
        log(f"FSDP2: process 0 holds {local:,} of the student's {total:,} parameters ({100 * local / total:.1f}%)")
    return student, optimizer


def local_share(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter elements this process holds, the model's parameter elements)."""
    from torch.distributed.tensor import DTensor

    ps = list(model.parameters())
    return (sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in ps),
            sum(p.numel() for p in ps))


def gathered(tree, keep: bool):
    """``tree`` (nested dicts / lists of tensors, e.g. a state dict) with every DTensor replaced by its full
    tensor on the CPU. Collective: every process calls it, in the same order; only where ``keep`` is the
    result kept (elsewhere None). A DTensor reached twice (the tied embeddings and output layer) is gathered
    once and both keys share the full tensor, as they share storage in an unsharded model."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, torch.Tensor | None] = {}

    def walk(x):
        if isinstance(x, DTensor):
            if id(x) not in seen:
                full = x.detach().full_tensor()  # all-gather: one full tensor at a time on the device
                seen[id(x)] = full.cpu() if keep else None
            return seen[id(x)]
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    out = walk(tree)
    return out if keep else None


def full_state_dict(model: torch.nn.Module, keep: bool) -> dict | None:
    """The model's state dict with full tensors (``gathered``, collective), the tied parameters (one
    Parameter under several names: the embeddings and the output layer) sharing one tensor again, so that
    ``save_pretrained`` stores them once, as it does for an unsharded model."""
    sd = gathered(model.state_dict(), keep)
    if sd is not None:
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first and name in sd and first[id(p)] in sd:
                sd[name] = sd[first[id(p)]]
            first.setdefault(id(p), name)
    return sd


def _shard_like(full: torch.Tensor, ref) -> torch.Tensor:
    """``full`` cut like the DTensor ``ref`` (every process holds ``full``: no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements,
                             src_data_rank=None)


def shard_loaded(student: torch.nn.Module, optimizer, tensors: dict, saved: dict) -> None:
    """A checkpoint's full student tensors and AdamW states (read on every process), cut in place into this
    process's shards of the sharded student; a no-op for an unsharded one."""
    from torch.distributed.tensor import DTensor

    ref = student.state_dict()
    if not any(isinstance(v, DTensor) for v in ref.values()):
        return
    sd = tensors.get("student", {})
    for k, v in sd.items():
        if isinstance(ref.get(k), DTensor):
            sd[k] = _shard_like(v, ref[k])
    params = [p for g in optimizer.param_groups for p in g["params"]]  # the indices of state_dict()["state"]
    for i, st in saved["optimizer"]["state"].items():
        p = params[int(i)]
        if isinstance(p, DTensor):
            for name, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape:  # exp_avg, exp_avg_sq (not the step count)
                    st[name] = _shard_like(v, p)
