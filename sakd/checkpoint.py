"""Atomic, resumable checkpoints.

A checkpoint is a folder ``step-000123`` holding the student (safetensors), the
optimizer, scheduler and scaler states, every RNG state, the data position and
any trainable distillation parts (projectors, SAR router). It is written to a
temporary folder, fsynced, then renamed, so a crash while saving never leaves a
half-written checkpoint under the final name; the last K are kept, and resume
falls back to the previous one when the newest cannot be read.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sakd.errors import UserError

COMPLETE = "COMPLETE"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int) -> Path:
    """Write ``tensors`` (name -> flat state dict, saved as safetensors) and ``state`` (torch.save)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        for name, sd in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / COMPLETE).write_text(str(step))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {str(final)!r} ({e.strerror or e}): free disk space or "
                        "choose another train.output_dir; earlier checkpoints are intact") from None
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    if not (path / COMPLETE).is_file():
        raise ValueError("missing COMPLETE marker")
    tensors = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    state = torch.load(path / "state.pt", weights_only=False)
    return tensors, state


def load_latest(ckpt_dir: Path, log=print) -> tuple[Path, dict, dict] | None:
    """The newest readable checkpoint; a corrupt newer one is skipped with a warning."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            tensors, state = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous one
            msg = f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); falling back to the previous one"
            warnings.warn(msg)
            log(f"warning: {msg}")
            continue
        return path, tensors, state
    return None
