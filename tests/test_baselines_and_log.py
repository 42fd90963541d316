"""The benchmark's baselines sit behind an explicit key; the loop's log on a terminal and off it."""

import sys
from pathlib import Path

import pytest

from sakd.config import load_config
from sakd.errors import UserError
from sakd.train.runlog import RunLogger
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


def _logger(tmp_path, monkeypatch, tty: bool, lines: list):
    monkeypatch.setattr("sakd.train.runlog._is_terminal", lambda: tty)
    return RunLogger(tmp_path, log_every=5, total=12, initial=0, progress=True, main=True, log=lines.append)


def _steps(logger, n: int):
    for s in range(1, n + 1):
        logger.step({"step": s, "lr": 1e-3, "tokens_per_s": 100.0}, {"kd": 1.0 / s, "ce": 2.0})
    logger.close()


def test_off_a_terminal_one_plain_line_every_log_every_steps(tmp_path, monkeypatch, capsys):
    lines = []
    logger = _logger(tmp_path, monkeypatch, False, lines)
    assert logger.bar is None
    _steps(logger, 12)
    assert [ln.split(":")[0] for ln in lines] == ["step 5/12", "step 10/12", "step 12/12"]
    assert lines[0] == "step 5/12: kd 0.200, ce 2.000, tok/s 100, lr 0.001"
    assert "\r" not in capsys.readouterr().err


def test_on_a_terminal_the_progress_bar(tmp_path, monkeypatch):
    lines = []
    logger = _logger(tmp_path, monkeypatch, True, lines)
    assert logger.bar is not None
    _steps(logger, 3)
    assert lines == []


def test_no_progress_no_lines(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr("sakd.train.runlog._is_terminal", lambda: False)
    _steps(RunLogger(tmp_path, log_every=1, total=3, initial=0, progress=False, main=True, log=lines.append), 3)
    assert lines == []
