"""benchmarks/paired.py: paired gains, their t interval and the seed count, against hand-computed values."""

import math
import sys
import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from paired import gain_percent, paired, seeds_needed, t975  # noqa: E402


def test_paired_gain_mean_std_and_interval_by_hand():
    base = {0: 3.0, 1: 3.0, 2: 3.0, 7: 2.5}  # seed 7 has no partner: it must not count
    other = {0: 2.97, 1: 2.94, 2: 2.91, 9: 1.0}
    g = paired(base, other)
    assert g["seeds"] == [0, 1, 2]
    assert g["gain_percent_per_seed"] == pytest.approx([1.0, 2.0, 3.0])
    assert g["mean"] == pytest.approx(2.0) and g["std"] == pytest.approx(1.0)
    assert g["se"] == pytest.approx(1 / math.sqrt(3))
    half = 4.303 / math.sqrt(3)  # t_{0.975, 2} x se
    assert g["ci95"] == pytest.approx([2.0 - half, 2.0 + half])


def test_a_worse_method_has_a_negative_gain_and_one_seed_has_no_interval():
    assert gain_percent(2.0, 2.1) == pytest.approx(-5.0)
    one = paired({0: 2.0}, {0: 2.1})
    assert one["mean"] == pytest.approx(-5.0) and one["ci95"] is None


def test_seeds_for_a_target_standard_error():
    assert seeds_needed(1.5, 0.4) == 15  # (1.5 / 0.4)^2 = 14.06
    assert seeds_needed(0.45, 0.4) == 3  # 1.27, but never below the minimum
    assert t975(40) == 1.96 and t975(1) == 12.706
    with pytest.raises(ValueError):
        t975(0)


def test_mean_interval_of_independent_ratios_by_hand():
    from paired import mean_interval
    r = mean_interval([1.1, 1.2, 1.3])
    assert r["mean"] == pytest.approx(1.2) and r["std"] == pytest.approx(0.1)
    assert r["se"] == pytest.approx(0.1 / math.sqrt(3))
    half = 4.303 * 0.1 / math.sqrt(3)
    assert r["ci95"] == pytest.approx([1.2 - half, 1.2 + half])
    one = mean_interval([1.25])
    assert one["mean"] == 1.25 and one["ci95"] is None and one["n"] == 1
