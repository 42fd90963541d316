"""The end of a run (sakd/train/publish.py): the run report, the CE-only row on the report and the model card,
and last the push, of the card that carries every number. With eval.ce_only_baseline the push waits for that
row. The report writer and the hub client are replaced by recorders (the whole path runs in
tests/report/test_push.py)."""

import pytest

import sakd.report.push
import sakd.report.run
from sakd.config import load_config
from sakd.train.ce_only import ce_only_row
from sakd.train.publish import publish


@pytest.fixture
def events(monkeypatch, tmp_path):
    """[("report", extra) | ("push", repo_id, card text at push time)], in call order."""
    seen = []

    def report(out, cfg, result, extra=None, **kw):
        seen.append(("report", extra))
        return {}

    def push(out, repo_id, *, private, log):
        seen.append(("push", repo_id, (tmp_path / "student" / "README.md").read_text()))
        return "https://huggingface.co/me/x/commit/0"

    monkeypatch.setattr(sakd.report.run, "write_run_report", report)
    monkeypatch.setattr(sakd.report.push, "push_student", push)
    (tmp_path / "student").mkdir()  # the metrics table of write_model_card's card
    (tmp_path / "student" / "README.md").write_text("| metric | value | unit |\n|---|---|---|\n"
                                                    "| student_bpb_final | 2.5000 | bits/byte |\n")
    return seen


@pytest.mark.parametrize("repo", ["me/x", None])
def test_without_the_ce_only_run_the_report_then_the_push(events, tmp_path, repo):
    cfg = load_config(None, [f"train.push_to_hub={repo or 'null'}"])
    result = {"student_dir": str(tmp_path / "student")}
    publish(tmp_path, cfg, result)
    assert [e[:2] for e in events] == [("report", None)] + ([("push", repo)] if repo else [])
    assert ("pushed" in result) == bool(repo)


def test_the_push_waits_for_the_ce_only_row_and_carries_it(events, tmp_path):
    cfg = load_config(None, ["train.push_to_hub=me/x", "eval.ce_only_baseline=true"])
    result = {"student_dir": str(tmp_path / "student")}
    publish(tmp_path, cfg, result)  # the distillation run's end: no push yet
    assert events == [("report", None)] and "pushed" not in result
    row = ce_only_row(tmp_path, {"student_bpb_final": 2.625})
    assert row == {"student_bpb_ce_only": 2.625, "ce_only_dir": str(tmp_path / "ce-only")}
    publish(tmp_path, cfg, result, ce_only=row)
    assert [e[:2] for e in events] == [("report", None), ("report", row), ("push", "me/x")]
    assert "| student_bpb_ce_only | 2.6250 | bits/byte |" in events[-1][2]
    assert result["pushed"].endswith("/commit/0")
