"""`sakd push RUN_DIR REPO_ID` and `train.push_to_hub`: the exported student (weights, tokenizer, model card
with the held-out bits-per-byte table, the teacher and the data) goes up through huggingface_hub's
create_repo + upload_folder; offline or without a token, one line before anything else runs.

No network here: huggingface_hub's client (``huggingface_hub.HfApi``) is replaced by a fixture that RECORDS
the calls (and lists the uploaded folder at upload time); it does not emulate the hub's server."""

from pathlib import Path

import pytest
from huggingface_hub import constants

from sakd.cli import main
from sakd.config import load_config
from tests.conftest import tiny_overrides


class RecordingHfApi:
    calls: list = []

    def __init__(self, token=None, **kw):
        self.calls.append(("HfApi", {"token": token}))

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        folder = Path(folder_path)
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder, "files": files, **kw}))
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Online, a token in HF_TOKEN, and the recording client."""
    import huggingface_hub

    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return RecordingHfApi.calls


@pytest.fixture(scope="module")
def finished_run(tiny_assets, tmp_path_factory):
    """A tiny distillation run (exported student with its card), built offline without pushing."""
    from sakd.train.distill import distill

    out = tmp_path_factory.mktemp("run")
    result = distill(load_config(None, tiny_overrides(tiny_assets, out, **{"train.max_steps": 2,
                                                                           "data.max_examples": 16})),
                     log=lambda *_: None, progress=False)
    return out, result


def _uploaded(calls) -> dict:
    (up,) = [kw for name, kw in calls if name == "upload_folder"]
    return up


def test_sakd_push_uploads_the_exported_student_with_its_card(hub, finished_run, tiny_assets):
    out, result = finished_run
    assert main(["push", str(out), "me/tiny-student", "--private", "--revision", "v1", "--message", "first"]) == 0
    assert [name for name, _ in hub] == ["HfApi", "create_repo", "create_branch", "upload_folder"]
    assert hub[0][1]["token"] == "hf_test_token"
    assert hub[1][1] == {"repo_id": "me/tiny-student", "repo_type": "model", "private": True, "exist_ok": True}
    up = _uploaded(hub)
    assert up["repo_id"] == "me/tiny-student" and up["folder_path"] == out / "student"
    assert up["revision"] == "v1" and up["commit_message"] == "first"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(up["files"])
    card = up["files"]["README.md"].decode()
    for metric in ("teacher_bpb", "student_bpb_initial", "student_bpb_final"):
        assert f"| {metric} | {result[metric]:.4f} | bits/byte |" in card
    assert f"teacher `{tiny_assets['teacher']}` on `{tiny_assets['train']}`" in card  # the teacher and the data


def test_train_push_to_hub_pushes_at_the_end_of_the_run(hub, tiny_assets, tmp_path):
    from sakd.train.distill import distill

    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / "run", **{
        "train.max_steps": 1, "data.max_examples": 8, "train.push_to_hub": "me/live", "train.push_private": True}))
    result = distill(cfg, log=lambda *_: None, progress=False)
    up = _uploaded(hub)
    assert up["repo_id"] == "me/live" and up["folder_path"] == tmp_path / "run" / "student"
    assert f"| student_bpb_final | {result['student_bpb_final']:.4f} | bits/byte |" in up["files"]["README.md"].decode()
    assert result["pushed"].endswith("/commit/0")


def _one_line(capsys, verb: str, *fragments) -> None:
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith(f"sakd {verb}: error: "), err
    for f in fragments:
        assert f in err[0], (f, err[0])


def test_offline_stops_the_run_before_anything_runs(hub, tiny_assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    assert main(["distill", *tiny_overrides(tiny_assets, out, **{"train.push_to_hub": "me/x"})]) == 2
    _one_line(capsys, "distill", "HF_HUB_OFFLINE")
    assert not out.exists() and hub == []  # no run folder, no model loaded, no hub call


def test_no_token_stops_push_before_anything_runs(hub, finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(finished_run[0]), "me/x"]) == 2
    _one_line(capsys, "push", "no Hugging Face token", "HF_TOKEN")
    assert hub == []


@pytest.mark.parametrize("args, fragment", [
    (["push", "{run}", "not a repo"], "is not a hub repo id"),
    (["push", "{tmp}", "me/x"], "holds no exported student (weights, tokenizer, model card, config missing)"),
])
def test_bad_push_input_is_one_line(hub, finished_run, tmp_path, capsys, args, fragment):
    args = [a.format(run=finished_run[0], tmp=tmp_path) for a in args]
    assert main(args) == 2
    _one_line(capsys, "push", fragment)
    assert [n for n, _ in hub if n != "HfApi"] == []


def test_push_waits_for_the_ce_only_row(hub, tiny_assets, tmp_path):
    """train.push_to_hub with eval.ce_only_baseline: the push comes last, after the CE-only run, so the card
    that goes up carries the CE-only number (as the run report does); one upload, of the distilled student."""
    import json

    out = tmp_path / "run"
    assert main(["distill", "--no-progress", *tiny_overrides(tiny_assets, out, **{
        "train.max_steps": 1, "data.max_examples": 8, "train.push_to_hub": "me/live",
        "eval.ce_only_baseline": True})]) == 0
    ce = json.loads((out / "ce-only" / "result.json").read_text())["student_bpb_final"]
    assert json.loads((out / "report.json").read_text())["extra"]["student_bpb_ce_only"] == ce
    up = _uploaded(hub)  # exactly one upload
    assert up["repo_id"] == "me/live" and up["folder_path"] == out / "student"
    card = up["files"]["README.md"].decode()
    assert f"| student_bpb_ce_only | {ce:.4f} | bits/byte |" in card
    assert card == (out / "student" / "README.md").read_text()  # what went up is the card on disk
