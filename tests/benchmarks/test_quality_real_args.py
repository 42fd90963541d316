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
