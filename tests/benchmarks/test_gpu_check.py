"""benchmarks/gpu_check.py on CPU with tiny widths (its timings mean nothing here; its checks do)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.real_tokenizers
def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--steps", "2",
                        "--out", str(out), "--work", str(tmp_path / "work")], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["tiny"]
    for precision in ("fp16", "bf16"):
        run = report["runs"][precision]
        assert run["steps"] == 2 and run["skipped_steps"] == 0
        assert run["tokens_per_s"] > 0 and run["plan_peak_gib"] > 0
    for name in ("fp16", "fp16_alm"):  # the fused output layer, then the unfused logits (the ALM term needs them)
        overflow = report["runs"][name]["overflow"]
        assert overflow == {"injected": 1, "nonfinite_teacher": 1, "recomputed_fp32": 1, "losses_finite": True,
                            "handled": True}, name
    alm = report["runs"]["fp16_alm"]
    assert alm["steps"] == 1 and alm["skipped_steps"] == 0
    alm_history = json.loads((tmp_path / "work" / "fp16_alm" / "history.json").read_text())["history"]
    assert all(r["chunk"] > 0 for r in alm_history)
    assert all(run["fits_card"] and run["card_gib"] > 0 for run in report["runs"].values())
    sig = report["sigterm"]
    assert sig["stopped"] == "SIGTERM received" and sig["checkpoint"] == f"step-{sig['steps']:06d}"
    assert 0 <= sig["sigterm_to_checkpoint_s"] < 60
