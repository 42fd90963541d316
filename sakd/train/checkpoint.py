"""Atomic, resumable checkpoints.

A checkpoint is a folder ``step-000123`` holding the student (safetensors), the
optimizer, scheduler and scaler states, every RNG state, the data position and
any trainable distillation parts (projectors, SAR router). Guarantees:

* atomic: everything is written to ``.tmp-step-000123-<pid>``, fsynced, and only
  then renamed to ``step-000123`` (one ``os.replace``, then the folder itself is
  fsynced), so a crash or a full disk while saving never leaves a half-written
  folder under a ``step-*`` name; old checkpoints are first renamed to
  ``.old-*`` and then deleted, so a crash while pruning cannot either;
* the newest readable checkpoint wins: ``load_latest`` skips (with a warning) a
  folder whose ``COMPLETE`` marker is missing or names another step, or whose
  files do not load, and falls back to the previous one;
* a failed write (disk full, read-only folder) raises ``UserError`` naming the
  folder, after removing the temporary folder; earlier checkpoints are untouched;
* leftovers of a writer that died (``.tmp-*`` / ``.old-*`` of a process that no
  longer runs) are removed by the next save.

Tested in tests/train/test_reliability.py (see docs/reliability.md).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sakd.errors import UserError
from sakd.files import fsync_path

COMPLETE = "COMPLETE"
_STEP = re.compile(r"step-(\d{6,})")
_LEFTOVER = re.compile(r"\.(?:tmp|old)-step-\d+-(\d+)")


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
    fsync_path(path)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_leftovers(ckpt_dir: Path) -> None:
    """Temporary / half-deleted folders of writers that died (SIGKILL, power loss mid-save)."""
    for p in ckpt_dir.iterdir():
        m = _LEFTOVER.fullmatch(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _is_write_failure(e: BaseException) -> bool:
    """Disk full / read-only / quota: each writer reports it with its own exception type."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    if isinstance(e, SafetensorError):  # "Error while serializing: I/O error: No space left on device (os error 28)"
        return "I/O error" in text or "os error" in text
    if isinstance(e, RuntimeError):  # torch.save's PytorchStreamWriter: "[enforce fail at inline_container.cc:..]"
        return any(s in text for s in ("inline_container", "PytorchStreamWriter", "file write failed",
                                       "unexpected pos"))
    return False


def _retire(path: Path) -> None:
    """Delete a checkpoint folder without ever leaving a half-deleted ``step-*`` folder behind."""
    old = path.with_name(f".old-{path.name}-{os.getpid()}")
    os.replace(path, old)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(ckpt_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int) -> Path:
    """Write ``tensors`` (name -> flat state dict, saved as ``name.safetensors``) and ``state``
    (``state.pt``, torch.save) atomically as ``ckpt_dir/step-NNNNNN``; keep the newest ``keep``."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-step-{step:06d}-{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(ckpt_dir)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, sd in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / COMPLETE).write_text(str(step))
        _fsync_tree(tmp)
        if final.exists():  # e.g. re-saving a step after resuming from an older checkpoint
            _retire(final)
        os.replace(tmp, final)
        fsync_path(ckpt_dir)  # the rename itself is durable only once the folder is synced
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_write_failure(e):
            raise
        try:
            free = f"; {shutil.disk_usage(ckpt_dir).free / 2**30:.1f} GiB free there"
        except OSError:
            free = ""
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:120]
        raise UserError(f"cannot write checkpoint {str(final)!r} ({reason}{free}): free disk space or "
                        "choose another train.output_dir; earlier checkpoints are intact") from None
    for old in list_checkpoints(ckpt_dir)[:-max(1, keep)]:
        try:
            _retire(old)
        except OSError:
            pass  # pruning is best effort: a checkpoint too many is harmless
    return final


def checkpoint_step(path: Path) -> int | None:
    m = _STEP.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``step-*`` folders, oldest first, ordered by step number (not by name: step-1000000 > step-999999)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensors by file stem, state); ValueError / OSError / pickle errors when anything is off."""
    path = Path(path)
    step = checkpoint_step(path)
    marker = path / COMPLETE
    if not marker.is_file():
        raise ValueError("missing COMPLETE marker")
    if marker.read_text().strip() != str(step):
        raise ValueError(f"COMPLETE names step {marker.read_text().strip()!r}, the folder step {step}")
    tensors = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    # map_location: a checkpoint written on a GPU resumes anywhere (the loop moves states to its device)
    state = torch.load(path / "state.pt", weights_only=False, map_location="cpu")
    if not isinstance(state, dict) or state.get("step") != step:
        raise ValueError(f"state.pt holds step {state.get('step') if isinstance(state, dict) else None}, "
                         f"the folder step {step}")
    return tensors, state


def load_latest(ckpt_dir: Path, log=print) -> tuple[Path, dict, dict] | None:
    """The newest readable checkpoint; a corrupt newer one is skipped with a warning."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            tensors, state = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous one
            msg = (f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                   "falling back to the previous one")
            warnings.warn(msg, stacklevel=2)
            log(f"warning: {msg}")
            continue
        return path, tensors, state
    return None
