"""Where a CPU training process keeps the memory it frees (``train.cpu_heap``).

glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB by default) from a fresh mmap that is
unmapped on free, and trims the top of its heap once enough of it is free; every large temporary of a training
step (one row block of teacher logits: 1,024 x 8,192 float32 = 32 MiB) then pays its page faults again, at every
row block of every step. ``keep`` raises both thresholds with mallopt(3), so freed memory stays in the heap for the
next block, as CUDA's caching allocator keeps GPU memory and as the jemalloc / tcmalloc that CPU-training guides
preload do. The resident set then stays near the step's peak, which a training loop reaches again at every step.
It is not the default: on the demo step, 10 alternating pairs of runs gave keep 0.965x [0.891, 1.039] the step
time of glibc's defaults (benchmarks/cpu_heap.py, docs/performance.md), a gain the machine's noise does not
resolve. GPU runs are left alone: their host memory holds checkpoints and weights on their way to the card,
which should go back to the system.

Set by the ``sakd distill`` / ``sakd demo`` / ``sakd cache-teacher`` commands for their own process, not by the
library's ``distill()`` (the allocator belongs to whoever owns the process). glibc's own settings of these
thresholds in the environment (``ENV_KEYS``, or ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``) win: with any of
them set, nothing is changed.
"""

from __future__ import annotations

import ctypes
import os

# mallopt(3) parameters (malloc.h) and the values of ``keep``: allocations below 1 GiB come from the heap (glibc
# before 2.35 refuses more than 32 MiB: then 32 MiB), and up to 2 GiB - 1 of free memory at its top is kept (the
# largest value an int takes)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
TRIM_THRESHOLD = 2**31 - 1
# the environment settings of glibc's allocator that win over ``keep`` (mallopt(3), tunables(7))
ENV_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def allocator_in_environment(environ=os.environ) -> bool:
    """Whether the environment sets glibc's thresholds itself (``ENV_KEYS``, or ``glibc.malloc`` tunables)."""
    return any(k in environ for k in ENV_KEYS) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")


def _glibc():
    """The process's own C library when it is glibc (it has ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def set_cpu_heap(setting: str, *, on_gpu: bool, environ=os.environ) -> str:
    """Apply ``train.cpu_heap`` to this process; returns what was done, for the log: "kept" (both thresholds
    raised), "kept up to 32 MiB" (an older glibc: its largest mmap threshold), "system" (asked for glibc's
    defaults), "gpu" (a GPU run: left alone), "environment" (glibc's own settings in the environment win),
    "not glibc" (another C library: nothing to set), "refused" (mallopt said no: not applied, or in part)."""
    if setting == "system":
        return "system"
    if on_gpu:
        return "gpu"
    if allocator_in_environment(environ):
        return "environment"
    libc = _glibc()
    if libc is None:
        return "not glibc"
    mmap = next((v for v in MMAP_THRESHOLDS if libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(v)) == 1),
                None)
    if mmap is None or libc.mallopt(ctypes.c_int(M_TRIM_THRESHOLD), ctypes.c_int(TRIM_THRESHOLD)) != 1:
        return "refused"
    return "kept" if mmap == MMAP_THRESHOLDS[0] else "kept up to 32 MiB"
