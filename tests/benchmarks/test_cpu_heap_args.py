"""benchmarks/cpu_heap.py refuses runs too short to time before starting any (the warm-up steps are dropped)."""

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import cpu_heap  # noqa: E402


@pytest.mark.parametrize("args", [["--steps", str(cpu_heap.perf.STEP_TIME_WARMUP)], ["--pairs", "0"]])
def test_too_few_steps_or_pairs_is_a_one_line_error(args, monkeypatch):
    monkeypatch.setattr(cpu_heap, "measure", lambda *a: pytest.fail("a run started"))
    with pytest.raises(SystemExit, match="--pairs must be >= 1 and --steps >"):
        cpu_heap.main(args)
