"""FSDP2 (``train.distributed=fsdp``) with 2 CPU processes (gloo): the student sharded, the same training as
one process, full-tensor checkpoints in the one-process format, and an exact resume.

What runs here is the real path of a GPU launch: ``sakd distill`` under ``accelerate launch``, Accelerate's
``fsdp2_prepare_model`` (one unit per decoder layer, the tied embeddings + output layer + final norm in one
unit), its FSDP2 ``clip_grad_norm_`` / ``no_sync``, torch's ``fully_shard`` with its reduce-scatter. One
switch differs: Accelerate 1.15 turns FSDP on only for accelerator devices (AcceleratorState.__init__), so
on CPU processes sakd sets ``distributed_type = FSDP`` itself (sakd/train/fsdp.py, build_accelerator).
What this cannot show: NCCL, CUDA streams and the overlap of all-gathers with compute, mixed precision
(bf16/fp16 parameters in the FSDP units, sakd's CPU runs are fp32), memory per GPU, CPU offload.

Tolerance of the comparison with one process: the same as the DDP test (tests/test_two_process.py), for the
same reason. The two runs compute the same sums in another order: one process sums the gradient over its 4
examples in one backward, FSDP sums two processes' gradients of 2 examples each in a reduce-scatter (and
divides by 2, undone by the loss's factor N). float32 reordering moves a value by ~1e-7 relative; AdamW's
division by sqrt(v) turns that into up to ~1e-6 on weights whose gradient is near zero, so weights are
compared at rtol 1e-5 with atol 5e-6, and the global gradient norm and logged terms at rtol 1e-5. The
updates are ~1e-3 (test_the_training_moved_far_more_than_the_tolerance). Resume is compared bitwise.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, tiny_overrides
from tests.train.process_runs import (COMMON, STEPS, accelerate_launch, assert_logged_close, assert_same_students,
                                      assets_in, launch_env, student_weights)

EXACT = {**COMMON, "train.save_every": 1, "train.keep_checkpoints": STEPS}
FSDP = {"train.distributed": "fsdp", "train.batch_size": 2}
RESUME_AT = 3
CLOCK_KEYS = {"seconds", "tokens_per_s", "data_wait_s"}


def _distill(assets, out: Path, processes: int, *flags, **extra) -> subprocess.CompletedProcess:
    head = [sys.executable] if processes == 1 else [*accelerate_launch(processes)]
    r = subprocess.run([*head, "-m", "sakd.cli", "distill", "--no-progress", *flags,
                        *tiny_overrides(assets, out, **EXACT, **extra)],
                       capture_output=True, text=True, cwd=ROOT, env=launch_env(), timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


@functools.lru_cache(maxsize=None)
def _runs(assets_dir: str, base: str) -> dict:
    assets, base = assets_in(assets_dir), Path(base)
    one = _distill(assets, base / "one", 1, **{"train.batch_size": 4})
    two = _distill(assets, base / "fsdp", 2, **FSDP)
    # resume: a fresh run folder holding only the FSDP run's checkpoint of step RESUME_AT
    resumed = base / "resumed"
    src = base / "fsdp" / "checkpoints" / f"step-{RESUME_AT:06d}"
    shutil.copytree(src, resumed / "checkpoints" / src.name)
    again = _distill(assets, resumed, 2, "--resume", **FSDP)
    return {"one": (one, base / "one"), "fsdp": (two, base / "fsdp"), "resumed": (again, resumed)}


@pytest.fixture
def runs(tiny_assets, tmp_path_factory):
    return _runs(str(tiny_assets["dir"].resolve()), str(tmp_path_factory.getbasetemp() / "fsdp"))


def _history(out: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in CLOCK_KEYS}
            for h in json.loads((out / "history.json").read_text())["history"]]


@pytest.mark.slow
def test_the_student_is_sharded_in_two(runs):
    out = runs["fsdp"][0].stdout
    assert "2 x 1 accumulation x 2 process(es)" in out, out[-2000:]
    m = re.search(r"FSDP2: process 0 holds ([\d,]+) of the student's ([\d,]+) parameters", out)
    assert m, out[-2000:]
    local, total = (int(g.replace(",", "")) for g in m.groups())
    # every tensor is split along its first dimension (all even here): exactly half each, not a DDP replica
    assert local * 2 == total


@pytest.mark.slow
def test_fsdp_trains_the_same_student_as_one_process(runs):
    one, two = runs["one"][1], runs["fsdp"][1]
    assert_same_students(one, two, rtol=1e-5, atol=5e-6)  # tolerance: see the module docstring
    h1 = _history(one)
    assert len(h1) == STEPS
    # after the reduce-scatter: global quantities, comparable step by step (AdamW would hide a constant factor
    # on the gradient, the gradient norm does not)
    assert_logged_close(h1, _history(two), ("grad_norm", "kd", "ce", "hidden"), rtol=1e-5)
    # the export is an ordinary Hugging Face folder: the model's own class, not FSDP's wrapper class
    arch = json.loads((two / "student" / "config.json").read_text())["architectures"]
    assert arch == json.loads((one / "student" / "config.json").read_text())["architectures"]


@pytest.mark.slow
def test_the_training_moved_far_more_than_the_tolerance(runs, tiny_assets):
    init, w = student_weights(tiny_assets["dir"]), student_weights(runs["fsdp"][1])
    assert max(float((w[k] - init[k]).abs().max()) for k in w) > 1e-3  # 200 x atol


@pytest.mark.slow
def test_checkpoints_hold_full_tensors_in_the_one_process_format(runs):
    from sakd.train.checkpoint import load_checkpoint

    t1, s1 = load_checkpoint(runs["one"][1] / "checkpoints" / f"step-{STEPS:06d}")
    t2, s2 = load_checkpoint(runs["fsdp"][1] / "checkpoints" / f"step-{STEPS:06d}")
    assert t1.keys() == t2.keys()
    for part in t1:
        assert {k: v.shape for k, v in t1[part].items()} == {k: v.shape for k, v in t2[part].items()}, part
        for k in t1[part]:
            torch.testing.assert_close(t2[part][k], t1[part][k], rtol=1e-5, atol=5e-6, msg=k)
    o1, o2 = s1["optimizer"], s2["optimizer"]
    assert o1["state"].keys() == o2["state"].keys()
    assert [len(g["params"]) for g in o1["param_groups"]] == [len(g["params"]) for g in o2["param_groups"]]
    for i in o1["state"]:  # AdamW's moments whole (gathered), keyed by parameter index as one process keys them
        for name in ("exp_avg", "exp_avg_sq"):
            a, b = o1["state"][i][name], o2["state"][i][name]
            assert type(b) is torch.Tensor and a.shape == b.shape, (i, name)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8, msg=f"{i} {name}")


@pytest.mark.slow
def test_resume_from_an_fsdp_checkpoint_is_bitwise_exact(runs):
    full, resumed = runs["fsdp"][1], runs["resumed"][1]
    assert f"resume: continuing from step-{RESUME_AT:06d} (step {RESUME_AT})" in runs["resumed"][0].stdout
    assert_same_students(full, resumed)
    ha, hb = _history(full), _history(resumed)
    assert [h["step"] for h in hb] == list(range(1, STEPS + 1)) and ha == hb
    ca = load_file(str(full / "checkpoints" / f"step-{STEPS:06d}" / "aux.safetensors"))
    cb = load_file(str(resumed / "checkpoints" / f"step-{STEPS:06d}" / "aux.safetensors"))
    assert all(torch.equal(ca[k], cb[k]) for k in ca)  # the projectors (outside the sharded student) too


def test_fsdp_version_1_and_on_policy_are_refused_before_anything_starts(monkeypatch):
    from sakd.errors import UserError
    from sakd.train.fsdp import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets ...
    monkeypatch.setenv("FSDP_VERSION", "1")            # ... with its default --fsdp_version 1
    with pytest.raises(UserError, match="fsdp_version 1 .*fsdp_version: 2"):
        build_accelerator("no", "ddp", on_policy=False)
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match="loss.on_policy_prob > 0 with FSDP"):
        build_accelerator("no", "ddp", on_policy=True)


def test_the_shipped_accelerate_config_asks_for_fsdp2_per_decoder_layer():
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(ROOT / "configs" / "accelerate" / "fsdp.yaml"))
    assert str(c.distributed_type).endswith("FSDP")
    assert str(c.fsdp_config["fsdp_version"]) == "2"
    assert c.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert c.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.slow
def test_a_time_limit_stops_every_process_and_the_resume_is_exact(runs, tiny_assets, tmp_path):
    """train.max_time under FSDP: both processes stop at the same step (the stop flag is all-reduced), the
    checkpoint is gathered by both, only the main process writes the run files; resuming ends bitwise equal
    to the uninterrupted FSDP run (train.max_time may change on resume)."""
    out = tmp_path / "stopped"
    r = _distill(tiny_assets, out, 2, **FSDP, **{"train.max_time": "1s"})  # set-up alone takes longer
    assert re.search(r"stopping at step 1: train.max_time=1s reached", r.stdout), r.stdout[-2000:]
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-000001"]
    assert len(json.loads((out / "history.json").read_text())["history"]) == 1
    again = _distill(tiny_assets, out, 2, "--resume", **FSDP)
    assert "resume: continuing from step-000001 (step 1)" in again.stdout
    assert_same_students(runs["fsdp"][1], out)
    assert _history(runs["fsdp"][1]) == _history(out)
