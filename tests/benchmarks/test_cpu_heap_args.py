"""benchmarks/cpu_heap.py refuses, before starting any run, runs too short to time (the warm-up steps are dropped)
and an allocator set in the environment (the runs would inherit it, and it wins over train.cpu_heap)."""

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import cpu_heap  # noqa: E402


@pytest.mark.parametrize("args", [["--steps", str(cpu_heap.perf.STEP_TIME_WARMUP)], ["--pairs", "0"],
                                  ["--threads", "0"]])
def test_too_few_steps_or_pairs_is_a_one_line_error(args, monkeypatch):
    monkeypatch.setattr(cpu_heap, "measure", lambda *a: pytest.fail("a run started"))
    with pytest.raises(SystemExit, match="--pairs and --threads must be >= 1 and --steps >"):
        cpu_heap.main(args)


def test_an_allocator_set_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_heap, "measure", lambda *a: pytest.fail("a run started"))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1")
    with pytest.raises(SystemExit, match="the environment sets glibc's allocator"):
        cpu_heap.main([])
