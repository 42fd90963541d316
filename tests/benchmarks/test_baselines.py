"""The benchmark's baselines sit behind an explicit key (loss.baseline, not loss.logit)."""

import sys
from pathlib import Path

import pytest

from sakd.config import load_config
from sakd.errors import UserError
from tests.conftest import ROOT


@pytest.mark.parametrize("name", ["uld", "gold", "truncation"])
def test_baselines_are_not_choices_of_loss_logit(name):
    with pytest.raises(UserError, match="loss.logit"):
        load_config(None, [f"loss.logit={name}"])
    cfg = load_config(None, [f"loss.baseline={name}"])
    assert cfg.loss.method == name and cfg.loss.logit == "shared_kl"
    assert load_config(None, []).loss.method == "shared_kl"


def test_quality_benchmark_rows_uld_and_truncation_still_load():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import quality
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    paths = {k: ROOT / "configs" / "demo.yaml" for k in ("train_full", "validation", "ceiling_init")}
    for row in ("uld", "truncation"):
        assert any(o.startswith("loss.baseline=") for o in quality.METHODS[row])
        cfg = quality.demo_config(row, base=str(ROOT / "configs" / "demo.yaml"), steps=2, seed=0,
                                  out_dir=Path("unused"), paths=paths)
        assert cfg.loss.method == row
