"""train.cpu_heap: with ``keep`` a large buffer freed and allocated again costs no new page faults (glibc
serves it from the heap it kept); with glibc's defaults every such buffer is a fresh mmap that faults again.
Each case runs in its own interpreter: the allocator's settings are the process's."""

import json
import os
import subprocess
import sys

import pytest

from sakd.train.heap import set_cpu_heap, _glibc
from tests.conftest import ROOT

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
    keep, system = _child("keep"), _child("system")
    assert system["did"] == "system"
    if keep["did"] != "kept":  # glibc before 2.35: at most 32 MiB, below the 48 MiB buffer
        pytest.skip(f"train.cpu_heap=keep here: {keep['did']}")
    # glibc's defaults: a fresh mmap per buffer, its pages fault again every time (one fault per page, or per
    # huge page where transparent huge pages are always on: compared with each other, not with a page count)
    assert min(system["faults"]) > 0, system
    # keep: the first buffer is new memory; after it, the freed one comes back without faults
    assert keep["faults"][0] >= 0.9 * min(system["faults"]), keep
    assert max(keep["faults"][1:]) < 0.01 * min(system["faults"]), (keep, system)


@pytest.mark.skipif(_glibc() is None, reason="glibc's allocator only")
def test_environment_wins():
    env, system = _child("keep", MALLOC_MMAP_THRESHOLD_="65536"), _child("system")
    assert env["did"] == "environment"
    assert min(env["faults"]) >= 0.9 * min(system["faults"]) > 0, env  # its 64 KiB threshold stays: all fault
    assert _child("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")["did"] == "environment"
    assert _child("keep", GLIBC_TUNABLES="glibc.rtld.optional_static_tls=2048")["did"] in ("kept", "kept up to 32 MiB")


def test_gpu_and_system_leave_the_allocator_alone():
    assert set_cpu_heap("keep", on_gpu=True, environ={}) == "gpu"
    assert set_cpu_heap("system", on_gpu=False, environ={}) == "system"


@pytest.mark.parametrize("verb", ["distill", "demo", "cache-teacher"])
def test_the_commands_apply_the_setting_of_their_config(verb, monkeypatch, tmp_path, capsys):
    """sakd distill / demo / cache-teacher hand train.cpu_heap to set_cpu_heap (stubbed: the pytest process keeps
    its heap)."""
    import sakd.demo.run
    import sakd.teacher_cache.builder
    import sakd.train.distill
    import sakd.train.heap
    from sakd.cli import main

    calls = []
    monkeypatch.setattr(sakd.train.heap, "set_cpu_heap", lambda s, on_gpu: calls.append((s, on_gpu)) or "kept")
    monkeypatch.setattr(sakd.train.distill, "distill", lambda cfg, **kw: {})
    monkeypatch.setattr(sakd.demo.run, "run_demo", lambda *a, **kw: {})
    monkeypatch.setattr(sakd.teacher_cache.builder, "build_cache", lambda cfg, out, **kw: {"bytes_per_token": 1.0})
    args = {"distill": [f"train.output_dir={tmp_path}"], "demo": ["--out", str(tmp_path)],
            "cache-teacher": ["--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(tmp_path / "cache")]}[verb]
    assert main([verb, *args, "train.cpu_heap=keep"]) == 0
    assert main([verb, *args]) == 0
    gpu = __import__("torch").cuda.is_available()
    assert calls == [("keep", gpu), ("system", gpu)]
    assert "train.cpu_heap=keep: kept" in capsys.readouterr().out
