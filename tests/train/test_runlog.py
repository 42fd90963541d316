"""The loop's log (sakd/train/runlog.py) on a terminal and off it."""

from sakd.train.runlog import RunLogger


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
