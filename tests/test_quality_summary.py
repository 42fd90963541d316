"""benchmarks/quality.py's summary: means, spreads and paired differences against hand-computed values."""

import importlib.util
import math

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(method, seed, bpb):
    return {"method": method, "seed": seed, "bpb": bpb, "teacher_bpb": 2.0, "seconds_per_step": 1.0 + seed,
            "run_seconds": 10.0, "cpu_seconds": 9.0}


def test_paired_differences_cancel_the_seed_spread(quality):
    # seed 1 is a hard data order for everyone (+0.3): the means spread, the paired differences do not
    runs = [_run("ce", 0, 3.0), _run("ce", 1, 3.3), _run("shared_kl", 0, 2.9), _run("shared_kl", 1, 3.2),
            _run("ka", 0, 2.88), _run("ka", 1, 3.22)]
    teacher, ce, rows = quality.summarise(runs, ["ce", "shared_kl", "ka"])
    assert teacher == 2.0 and ce == pytest.approx(3.15)
    kl, ka = rows[1], rows[2]
    assert kl["bpb_mean"] == pytest.approx(3.05) and kl["bpb_std"] == pytest.approx(0.3 / math.sqrt(2))
    assert kl["delta_vs_ce_per_seed"] == pytest.approx([-0.1, -0.1])
    assert kl["delta_vs_ce_mean"] == pytest.approx(-0.1) and kl["delta_vs_ce_std"] == pytest.approx(0.0, abs=1e-12)
    assert kl["gap_closed_pct"] == pytest.approx(100 * 0.1 / 1.15)
    assert ka["delta_vs_shared_kl_mean"] == pytest.approx(0.0, abs=1e-12)        # -0.02 and +0.02
    assert ka["delta_vs_shared_kl_std"] == pytest.approx(0.04 / math.sqrt(2))
    assert kl["seconds_per_step"] == pytest.approx(1.5)                           # median over seeds
