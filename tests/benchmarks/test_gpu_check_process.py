"""benchmarks/gpu_check.py's runs in ONE process, as on a GPU: two precisions one after the other (Accelerate keeps
its state per process), and the first run's models gone before the second is measured."""

import importlib.util
import weakref

import pytest
import torch

from tests.conftest import ROOT


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.real_tokenizers
def test_two_precisions_in_one_process_and_the_first_runs_student_is_freed(tmp_path, monkeypatch):
    """On CPU both precisions map to Accelerate's "no", which hides the GPU failure; patched to what a bf16 card
    gets (fp16 -> "no" stands in for the first precision, bf16 -> "bf16"), the second run must still start.
    Before the fix it raised "AcceleratorState has already been initialized"."""
    import sakd.train.distill as loop

    g = gpu_check_module()
    models = g.build_models(tmp_path, True, torch.device("cpu"))
    monkeypatch.setattr(loop, "mixed_precision", lambda name: {"fp16": "no", "bf16": "bf16"}[name])
    students = []
    load_student = loop.load_student

    def recording(*a, **kw):
        model = load_student(*a, **kw)
        students.append(weakref.ref(model))
        return model

    monkeypatch.setattr(loop, "load_student", recording)
    first = g.run_precision(models, tmp_path, 1, "fp16", True, False)
    assert first["steps"] == 1 and first["mixed_precision"] == "no"
    assert students[0]() is None, "the first run's student is still alive when the next run starts"
    second = g.run_precision(models, tmp_path, 1, "bf16", True, False)
    assert second["steps"] == 1 and second["mixed_precision"] == "bf16"
    assert students[1]() is None


def test_a_micro_batch_that_does_not_fit_the_card_takes_plans_largest_with_the_same_tokens_per_step(monkeypatch):
    g = gpu_check_module()
    seen = []

    def fake_plan(cfg, card_gb, device):
        seen.append((cfg.train.batch_size, cfg.train.grad_accum, card_gb))
        fits = cfg.train.batch_size <= 3
        return {"fits": fits, "max_micro_batch": 3, "peak_bytes": 1, "overhead_bytes": 0}

    monkeypatch.setattr(g, "plan", fake_plan)
    monkeypatch.setattr(g, "card_gib", lambda cuda: 7.5)
    monkeypatch.setattr("sakd.train.distill.distill", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("ran")))
    with pytest.raises(RuntimeError, match="ran"):
        g.run_precision({"teacher": "t", "student": "s"}, ROOT / "no-such-dir", 1, "bf16", False, False)
    # the configuration's 4 x 8 micro-batches, then 3 x ceil(32 / 3) = 3 x 11 on the 7.5 GiB card
    assert seen == [(4, 8, 7.5), (3, 11, 7.5)]
