"""benchmarks/quality_real.py's arguments: --levers is checked before any data or cache is prepared."""

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import quality_real  # noqa: E402


def test_levers_parse_into_overrides():
    a = quality_real.parse(["--work-dir", "/nonexistent", "--levers", "chunk1=loss.chunk_weight=1",
                            "two=loss.kd_weight=3,train.lr=2e-3"])
    assert a.lever_overrides == {"chunk1": ["loss.chunk_weight=1"], "two": ["loss.kd_weight=3", "train.lr=2e-3"]}


@pytest.mark.parametrize("spec", ["chunk1", "chunk1=", "=loss.chunk_weight=1", "x=loss.chunk_weight"])
def test_a_malformed_lever_is_a_one_line_error(spec):
    with pytest.raises(SystemExit, match="--levers .*NAME=KEY=VALUE"):
        quality_real.parse(["--work-dir", "/nonexistent", "--levers", spec])


def test_levers_without_the_every_position_method_in_the_grid_are_refused():
    with pytest.raises(SystemExit, match=f"needs {quality_real.EVERY_POSITION_METHOD} in --grid-methods"):
        quality_real.parse(["--work-dir", "/nonexistent", "--grid-methods", "shared_kl", "--levers",
                            "chunk1=loss.chunk_weight=1"])
    # without --levers the same grid is fine
    assert quality_real.parse(["--work-dir", "/x", "--grid-methods", "shared_kl"]).lever_overrides == {}


def test_each_regime_has_its_own_runs_and_cache_folders():
    """--steps and --temperature keep their runs (and T its teacher cache, keyed on T) apart in one work dir; the
    published regime keeps the names its results cite."""
    steps = quality_real.STEPS
    regimes = [(1.0, steps), (1.0, 2 * steps), (2.0, steps), (2.0, 2 * steps)]
    folders = {r: quality_real.regime_folders(*r) for r in regimes}
    assert folders[(1.0, steps)] == ("runs", f"cache-smollm2-k{quality_real.CACHE_K}")
    assert len({runs for runs, _ in folders.values()}) == 4                      # every regime's runs apart
    assert folders[(1.0, 2 * steps)][1] == folders[(1.0, steps)][1]              # steps: the same cache
    assert folders[(2.0, steps)][1] == folders[(2.0, 2 * steps)][1] != folders[(1.0, steps)][1]  # T: its own
