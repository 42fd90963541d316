"""The training state saves and loads itself: every field of TrainState round-trips through a checkpoint."""

import dataclasses
import random

import numpy as np
import torch
from torch import nn

from sakd.train.checkpoint import load_checkpoint, save_checkpoint
from sakd.train.schedule import EpochOrder, lr_lambda
from sakd.train.state import TrainState

# Fields a checkpoint saves but does not load back: the configuration is THIS run's (resume compares
# the saved one with it, sakd.train.distill._check_resume_config), and the SAR router is round-tripped by
# tests/models/test_moe.py (SARRouter.state_dict) and the SAR resume test in tests/train/test_reliability.py.
NOT_LOADED = {"config", "sar"}


class TinyStudent(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(11, 4, generator=g))
        self.norm = nn.Parameter(torch.randn(4, generator=g))
        self.config = type("Config", (), {"tie_word_embeddings": False})()

    def forward(self, x):
        return (self.embed[x] * self.norm).sum()


def _state(seed: int) -> TrainState:
    student = TinyStudent(seed)
    aux = nn.ModuleDict({"hidden": nn.Linear(4, 3)})
    opt = torch.optim.AdamW([{"params": list(student.parameters())}, {"params": list(aux.parameters()), "lr": 1e-2}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(2, 10, 0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (4 + seed))
    return TrainState(horizon=10, config={"train": {"max_steps": 10}}, student=student, aux=aux, optimizer=opt,
                      scheduler=sched, scaler=scaler, ka_gen=torch.Generator().manual_seed(seed),
                      order=EpochOrder(13, seed=seed))


def _value(name: str, v):
    """A field's value, comparable with ==."""
    if isinstance(v, nn.Module):
        return {k: t.tolist() for k, t in v.state_dict().items()}
    if isinstance(v, torch.Generator):
        return v.get_state().tolist()
    if isinstance(v, EpochOrder):
        return v.state()
    if hasattr(v, "state_dict"):
        return repr(v.state_dict())
    return v


def test_every_field_round_trips_through_a_checkpoint(tmp_path):
    a = _state(0)
    for _ in range(3):  # a few real steps: optimizer moments, scheduler, data order, KA draws, RNG
        (a.student(torch.tensor([1, 2, 3])) + a.aux["hidden"](torch.ones(4)).sum()).backward()
        a.optimizer.step()
        a.scheduler.step()
        a.optimizer.zero_grad()
        a.order.next(5)
        torch.rand(3, generator=a.ka_gen)
    a.step, a.horizon, a.teacher_bpb = 3, 40, 2.25
    a.history = [{"step": s, "kd": 1.0 / s} for s in (1, 2, 3)]
    a.evals = [{"step": 0, "student_bpb": 3.5}]
    a.counters = {"nonfinite_teacher": 1, "skipped_steps": 2, "recomputed_fp32": 1}
    a.data = a.order.state()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    sd = a.state_dict()
    save_checkpoint(tmp_path, a.step, sd["tensors"], sd["state"], keep=1)
    rng_next = (random.random(), float(np.random.rand()), float(torch.rand(())))

    b = _state(1)  # other weights, seeds and positions everywhere
    fields = [f.name for f in dataclasses.fields(TrainState) if f.name not in NOT_LOADED]
    differ = [n for n in fields if _value(n, getattr(a, n)) != _value(n, getattr(b, n))]
    assert differ == fields, f"the test leaves {sorted(set(fields) - set(differ))} at their defaults"
    tensors, state = load_checkpoint(tmp_path / "step-000003")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    b.load_state_dict({"tensors": tensors, "state": state}, log=lambda *_: None)
    for n in fields:
        assert _value(n, getattr(b, n)) == _value(n, getattr(a, n)), n
    # the global RNG streams continue where the checkpoint left them
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == rng_next
    # and saving again gives the same state
    again = b.state_dict()["state"]
    for k in ("step", "horizon", "history", "evals", "counters", "teacher_bpb", "data"):
        assert again[k] == sd["state"][k], k


def test_state_dict_names_every_saved_field():
    """A field added to TrainState must reach the checkpoint: state_dict covers every field."""
    s = _state(0)
    sd = s.state_dict()
    saved = set(sd["state"]) | set(sd["tensors"])
    by_key = {"ka_gen": "ka_rng_ranks", "order": None, "sar": None}  # order: its position is "data"; sar: under SAR only
    for f in dataclasses.fields(TrainState):
        key = by_key.get(f.name, f.name)
        if key is not None:
            assert key in saved, f.name


def test_student_mismatch_names_missing_and_unexpected_tensors():
    s = _state(0)
    assert s.student_mismatch({"student": s.student.state_dict()}) == ([], [])
    missing, unexpected = s.student_mismatch({"student": {"embed": torch.zeros(1), "other": torch.zeros(1)}})
    assert missing == ["norm"] and unexpected == ["other"]


def test_resume_accepts_a_checkpoint_from_before_a_key_was_added_at_its_default():
    """A checkpoint written before ``loss.baseline`` existed resumes; the key set to a baseline does not."""
    import pytest

    from sakd.config import load_config, to_dict
    from sakd.train.distill import _check_resume_config
    from sakd.errors import UserError

    saved = to_dict(load_config(None, []))
    del saved["loss"]["baseline"]
    _check_resume_config("ckpt", saved, to_dict(load_config(None, [])))
    with pytest.raises(UserError, match="loss.baseline"):
        _check_resume_config("ckpt", saved, to_dict(load_config(None, ["loss.baseline=uld"])))


def test_each_process_takes_back_its_own_global_rng_states(tmp_path):
    """Under DDP/FSDP the loop gathers every process's Python / NumPy / torch RNG states (``rng_ranks``); on
    resume process r restores entry r. A checkpoint of fewer processes (or from before ``rng_ranks``: only
    the main process's ``rng``) gives the main process's states to the others."""
    from sakd.train.checkpoint import rng_state

    a = _state(0)
    a.data = a.order.state()
    ranks = []
    for seed in (3, 4):  # two processes' states
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        ranks.append(rng_state())
    random.seed(3), np.random.seed(3), torch.manual_seed(3)  # the main process saves: its own states
    sd = a.state_dict(ka_states=[a.ka_gen.get_state()] * 2, rng_states=ranks)
    save_checkpoint(tmp_path, 0, sd["tensors"], sd["state"], keep=1)
    tensors, state = load_checkpoint(tmp_path / "step-000000")

    def draws_after_load(state, rank):
        random.seed(9), np.random.seed(9), torch.manual_seed(9)
        _state(1).load_state_dict({"tensors": tensors, "state": state}, log=lambda *_: None, rank=rank)
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    def draws_of(seed):
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    assert draws_after_load(state, 0) == draws_of(3) and draws_after_load(state, 1) == draws_of(4)
    assert draws_after_load(state, 2) == draws_of(3)  # a third process: the main one's
    old = {k: v for k, v in state.items() if k != "rng_ranks"}  # the format before per-process states
    old["rng"] = state["rng_ranks"][0]
    assert draws_after_load(old, 0) == draws_after_load(old, 1) == draws_of(3)


def test_a_checkpoint_holds_each_rng_state_once_and_an_old_one_still_loads(tmp_path):
    """The global RNG states and the KA stream are saved per process only (``rng_ranks``, ``ka_rng_ranks``),
    not again as the main process's ``rng`` / ``ka_rng``. A checkpoint from before per-process states holds
    ``rng`` / ``ka_rng`` alone, the main process's: it takes both back, and so does every process its global
    RNG states (another process has no KA stream in it and keeps its own)."""
    a = _state(0)
    a.data = a.order.state()
    torch.rand(5, generator=a.ka_gen)
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    sd = a.state_dict()
    assert not {"rng", "ka_rng"} & set(sd["state"])
    assert len(sd["state"]["rng_ranks"]) == len(sd["state"]["ka_rng_ranks"]) == 1
    save_checkpoint(tmp_path, 0, sd["tensors"], sd["state"], keep=1)
    tensors, state = load_checkpoint(tmp_path / "step-000000")
    old = {k: v for k, v in state.items() if k not in ("rng_ranks", "ka_rng_ranks")}
    old["rng"], old["ka_rng"] = state["rng_ranks"][0], state["ka_rng_ranks"][0]

    def draws(state=None, rank=0):
        random.seed(9), np.random.seed(9), torch.manual_seed(9)
        b = _state(1)
        if state is None:  # the saved streams, continued
            b.ka_gen.set_state(a.ka_gen.get_state())
            random.seed(3), np.random.seed(3), torch.manual_seed(3)
        elif state:
            b.load_state_dict({"tensors": tensors, "state": state}, log=lambda *_: None, rank=rank)
        return (random.random(), float(np.random.rand()), float(torch.rand(())),
                torch.rand(4, generator=b.ka_gen).tolist())

    assert draws(state) == draws(old) == draws()
    assert draws(old, rank=1)[:3] == draws()[:3]
    fresh = draws({})  # nothing loaded: every stream differs from the saved ones
    assert all(x != y for x, y in zip(fresh, draws()))
