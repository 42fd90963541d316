"""What the multi-process tests share (tests/train/test_two_process.py: DDP; tests/train/test_fsdp.py: FSDP2):
the launch of several CPU processes, the runs they compare, and the comparisons. Not a test file.

Launch note (accelerate 1.15): `accelerate launch --cpu --num_processes 2` starts ONE process (its
--cpu path is the single-process launcher unless an MPI hostfile is given). Several CPU processes are
started with `--multi_gpu` on a machine without GPUs (torchrun underneath; sakd picks gloo on CPU).
The tests check the log says "2 process(es)".
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

STEPS = 5
# the hidden-state projectors (trainable, outside the student) take part: their gradients must be
# averaged across processes too
COMMON = {"train.max_steps": STEPS, "train.deterministic": "true", "loss.ce_weight": 0.5, "loss.hidden.weight": 0.5}


def launch_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(n: int) -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    return [*head, "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]


def assets_in(assets_dir: str) -> dict:
    """The ``tiny_assets`` paths from their folder (a string: the runs are cached by their arguments)."""
    return {k: Path(assets_dir) / v for k, v in {"train": "train.txt", "heldout": "heldout.txt",
                                                 "teacher": "teacher", "student": "student"}.items()}


def assert_logged_close(h1: list[dict], h2: list[dict], keys, rtol: float) -> None:
    """Every step's logged ``keys`` of two runs' histories (the reference ``h1`` first) agree within ``rtol``
    (atol 0): as many steps in both, and no zero in the reference (a relative comparison of zeros says nothing)."""
    assert len(h1) == len(h2) > 0
    for key in keys:
        a = torch.tensor([h[key] for h in h1], dtype=torch.float64)
        b = torch.tensor([h[key] for h in h2], dtype=torch.float64)
        assert a.abs().min() > 0, key
        torch.testing.assert_close(b, a, rtol=rtol, atol=0, msg=key)


def student_weights(out: Path) -> dict:
    return load_file(str(Path(out) / "student" / "model.safetensors"))


def assert_same_students(ref: Path, other: Path, *, rtol: float = 0.0, atol: float = 0.0) -> None:
    """The exported students of two runs (``ref`` first) hold the same tensors: bit for bit (the default),
    or within ``rtol`` / ``atol``."""
    wa, wb = student_weights(ref), student_weights(other)
    assert wa.keys() == wb.keys()
    for k in wa:
        if rtol == atol == 0:
            assert torch.equal(wb[k], wa[k]), f"{k}: max |diff| {(wb[k] - wa[k]).abs().max():.3e}"
        else:
            torch.testing.assert_close(wb[k], wa[k], rtol=rtol, atol=atol, msg=k)
