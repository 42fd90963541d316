"""train.cpu_heap: with ``keep`` a large buffer freed and allocated again costs no new page faults (glibc
serves it from the heap it kept); with glibc's defaults every such buffer is a fresh mmap that faults again.
Each case runs in its own interpreter: the allocator's settings are the process's."""

import json
import os
import subprocess
import sys

import pytest

from sakd.train.heap import set_cpu_heap, _glibc

CHILD = r"""
import ctypes, json, resource, sys
from sakd.train.heap import set_cpu_heap
did = set_cpu_heap(sys.argv[1], on_gpu=False)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 48 << 20                       # above glibc's largest dynamic mmap threshold (32 MiB)
faults = []
for _ in range(5):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)         # touch every page
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    libc.free(p)
print(json.dumps({"did": did, "faults": faults}))
"""


def _child(setting: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", CHILD, setting], capture_output=True, text=True, timeout=60,
                         env={**clean, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.mark.skipif(_glibc() is None, reason="glibc's allocator only")
def test_keep_reuses_freed_pages_and_system_faults_them_again():
    pages = (48 << 20) // os.sysconf("SC_PAGE_SIZE")
    keep, system = _child("keep"), _child("system")
    assert keep["did"] == "kept" and system["did"] == "system"
    # the first buffer is new memory either way; after it, keep reuses it: (almost) no faults
    assert keep["faults"][0] >= 0.9 * pages and max(keep["faults"][1:]) < 0.01 * pages, keep
    # glibc's defaults: a fresh mmap per buffer, every page faults again
    assert min(system["faults"]) >= 0.9 * pages, system


@pytest.mark.skipif(_glibc() is None, reason="glibc's allocator only")
def test_environment_wins():
    env = _child("keep", MALLOC_MMAP_THRESHOLD_="65536")
    assert env["did"] == "environment"
    pages = (48 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert min(env["faults"]) >= 0.9 * pages, env  # the environment's threshold (64 KiB) stays: every buffer faults
    assert _child("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")["did"] == "environment"


def test_gpu_and_system_leave_the_allocator_alone():
    assert set_cpu_heap("keep", on_gpu=True, environ={}) == "gpu"
    assert set_cpu_heap("system", on_gpu=False, environ={}) == "system"
