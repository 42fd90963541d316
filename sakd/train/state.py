"""What a checkpoint holds: the training state, one dataclass that saves and loads itself.

``TrainState.state_dict()`` gives ``{"tensors": {file stem: flat tensors}, "state": {...}}``, the two
halves that ``sakd.train.checkpoint.save_checkpoint`` writes (``*.safetensors`` and ``state.pt``);
``load_state_dict`` reads them back. Checkpoint and resume are these two calls: a field added here is
saved and loaded in one place (tests/train/test_state.py round-trips every field).

The plain values (step, history, ...) are held by value; the parts with a state of their own (the
student, the projectors, the optimizer, ...) by reference, and saved through their ``state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sakd.train.checkpoint import rng_state, set_rng_state


def _fresh_counters() -> dict:
    return {"nonfinite_teacher": 0, "skipped_steps": 0}


@dataclass
class TrainState:
    # ---- progress, by value
    step: int = 0                      # optimizer steps taken (the clock of LR, KA, checkpoints)
    horizon: int = 0                   # the step count the LR and KA schedules are drawn over
    history: list = field(default_factory=list)   # one record per step (loss terms, lr, timing, MoE telemetry)
    evals: list = field(default_factory=list)     # held-out student bits/byte: [{"step", "student_bpb"}]
    counters: dict = field(default_factory=_fresh_counters)  # skipped steps/spans, non-finite teacher passes
    teacher_bpb: float | None = None   # held-out teacher bits/byte (measured once, before step 1)
    config: dict = field(default_factory=dict)    # this run's configuration (saved; on resume, checked, not loaded)
    # ---- parts with a state_dict, by reference
    student: nn.Module | None = None   # unwrapped (not the DDP wrapper); the tied lm_head is stored once;
                                       # a LoRA student: its adapters only
    aux: nn.Module | None = None       # projectors (hidden, contrastive): saved, never exported
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None           # LambdaLR
    scaler: object = None              # GradScaler (fp16) or None
    sar: object = None                 # moe.SARRouter (its fp32 master router weights) or None
    ka_gen: torch.Generator | None = None  # KA's expert draws (on the teacher's device); one stream per process
    order: object = None               # schedule.EpochOrder: the data position is saved, not the order
    data: dict = field(default_factory=dict)  # the data position after THIS step's spans (set by the loop)
    # (the Python / NumPy / torch / CUDA RNG states are global, one set per process: saved as "rng_ranks",
    # every process's in process order, each process restoring its own; entry 0 is the main process's)

    def _student_tensors(self) -> dict:
        """The student tensors a checkpoint holds: all of them, or, when some parameters are frozen (a LoRA
        student), the trainable ones only (the frozen base is model.student's own folder, loaded again)."""
        student = self.student.state_dict()
        trainable = {n for n, p in self.student.named_parameters() if p.requires_grad}
        if len(trainable) < len(list(self.student.parameters())):
            return {k: v for k, v in student.items() if k in trainable}
        if getattr(self.student.config, "tie_word_embeddings", False):
            # the tied lm_head shares storage with the embeddings: safetensors refuses shared tensors
            student = {k: v for k, v in student.items() if k != "lm_head.weight"}
        return student

    def state_dict(self, ka_states: list | None = None, rng_states: list | None = None) -> dict:
        """``ka_states``: every process's KA generator state in process order (under DDP each process draws
        its own routings, and the loop gathers them before a save); None: this process's only.
        ``rng_states``: likewise every process's global RNG states (``checkpoint.rng_state``: dropout masks,
        on-policy sampling draw from them in each process)."""
        tensors = {"student": self._student_tensors()}
        if self.aux is not None and len(list(self.aux.parameters())):
            tensors["aux"] = self.aux.state_dict()
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "data": self.data, "rng_ranks": list(rng_states or [rng_state()]),
                 "ka_rng_ranks": ka_states or [self.ka_gen.get_state()],
                 "history": self.history, "evals": self.evals, "counters": self.counters,
                 "teacher_bpb": self.teacher_bpb, "config": self.config, "horizon": self.horizon}
        if self.sar is not None:
            sd = self.sar.state_dict()
            tensors["router"] = sd.pop("master")
            state["sar"] = sd
        return {"tensors": tensors, "state": state}

    def load_state_dict(self, sd: dict, log=print, rank: int = 0) -> None:
        """Restore everything ``state_dict`` saved; ``rank``: this process's index, whose KA stream and global
        RNG states it takes back. The student is loaded non-strictly for the tied lm_head only: call ``student_mismatch`` first
        to refuse another architecture with a message."""
        tensors, state = sd["tensors"], sd["state"]
        self.student.load_state_dict(tensors.get("student", {}), strict=False)
        if "aux" in tensors:
            self.aux.load_state_dict(tensors["aux"])
        if self.sar is not None and "router" in tensors:
            self.sar.load_state_dict({"master": tensors["router"], **state["sar"]})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.order.load(state["data"])
        self.data = dict(state["data"])
        # checkpoints before per-process states hold the main process's alone, as "rng" / "ka_rng"
        rngs = state.get("rng_ranks") or [state["rng"]]
        if rank >= len(rngs):
            log(f"resume: process {rank} has no RNG states in the checkpoint (written by {len(rngs)} process(es)); "
                "it takes the main process's")
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        ka_states = state.get("ka_rng_ranks") or [state["ka_rng"]]
        if rank >= len(ka_states):
            log(f"resume: process {rank} has no KA sampling stream in the checkpoint (written by {len(ka_states)} "
                "process(es)); it starts its own stream again")
        else:
            try:
                self.ka_gen.set_state(ka_states[rank])
            except (RuntimeError, ValueError):  # a CPU generator's state, saved before draws moved to the device
                log("resume: the KA sampling stream restarts (checkpoint saved with a CPU generator)")
        # checkpoints from before the horizon was stored: the max_steps they were written with
        self.horizon = int(state.get("horizon") or ((state.get("config") or {}).get("train") or {}).get("max_steps")
                           or self.horizon)
        self.step, self.history, self.evals = state["step"], state["history"], state["evals"]
        self.counters, self.teacher_bpb = state["counters"], state["teacher_bpb"]

    def student_mismatch(self, tensors: dict) -> tuple[list[str], list[str]]:
        """(missing, unexpected) student tensor names of a checkpoint, the tied lm_head excepted."""
        have = set(self._student_tensors())
        saved = set(tensors.get("student", {}))
        return sorted(k for k in have - saved if k != "lm_head.weight"), sorted(saved - have)
