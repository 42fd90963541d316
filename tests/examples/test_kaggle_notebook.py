"""examples/kaggle.ipynb runs top to bottom with the demo's tiny models (no GPU, SAKD_NOTEBOOK_TINY=1), in a
temporary working folder, kernel = this interpreter (nbclient): session 1 stops at train.max_time after one
step, the "next session" resumes to train.max_steps from the cache, `sakd evaluate` on the exported student
gives the run's own final held-out bits per byte, and the push is skipped with its reason (offline). Not on
Kaggle, the install cell only prints that it skipped."""

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "kaggle.ipynb"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    work = tmp_path_factory.mktemp("kaggle")
    env = {"SAKD_NOTEBOOK_TINY": "1", "HF_HUB_OFFLINE": "1", "SAKD_PUSH_REPO": "me/tiny-student",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel (and the sakd commands it runs) inherit this environment
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(work)}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return nb, work


def _cell(nb, starts: str):
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and c.source.lstrip().startswith(starts)]
    return cell


def test_the_notebook_runs_the_kaggle_steps_on_tiny_models(executed):
    nb, work = executed
    assert "tiny demo models on CPU" in _text(nb.cells[1])
    assert "install skipped" in _text(_cell(nb, 'REPO = WORK'))
    assert "largest micro-batch that fits" in _text(_cell(nb, 'sakd("plan"'))
    manifest = json.loads((work / "teacher-cache" / "manifest.json").read_text())
    assert manifest["n_spans"] > 0
    session1 = _text(_cell(nb, "if PREVIOUS_OUTPUT"))
    assert "stopping at step 1: train.max_time=1s reached" in session1
    assert "read from the cache" in session1  # trained from the cache, the teacher not loaded
    result = json.loads((work / "run" / "result.json").read_text())
    assert result["steps"] == 4 and result["stopped"] is None
    history = json.loads((work / "run" / "history.json").read_text())["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4]  # session 2 went on from the checkpoint, not from 0


def test_the_exported_student_scores_what_the_run_measured(executed):
    nb, work = executed
    out = _text(_cell(nb, 'if not result["stopped"]'))
    evaluation = json.JSONDecoder().raw_decode(out[out.index("{"):])[0]  # `sakd evaluate --json`'s line
    result = json.loads((work / "run" / "result.json").read_text())
    assert evaluation["student"]["bits_per_byte"] == pytest.approx(result["student_bpb_final"], rel=1e-4)
    card = (work / "run" / "student" / "README.md").read_text()
    assert f"| student_bpb_final | {result['student_bpb_final']:.4f} | bits/byte |" in card


def test_push_is_skipped_with_its_reason_offline(executed):
    nb, _ = executed
    assert "push skipped: HF_HUB_OFFLINE is set" in _text(_cell(nb, "REPO_ID ="))
