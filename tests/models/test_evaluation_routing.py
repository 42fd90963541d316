"""One rule for the routing the teacher is evaluated under: the live run (distill.teacher_heldout_bpb), the
cache build (builder.teacher_heldout_bits, the manifest's teacher_heldout_bpb) and the report
(run.measure_expert_usage) enter moe.routing with the same mode, for every moe.mode."""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from sakd.config import load_config
from sakd.models import moe
from sakd.report import run as report_run
from sakd.teacher_cache import builder
from sakd.train import distill


class _Teacher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, **kw):
        return None


@pytest.fixture
def entered(monkeypatch):
    modes = []

    @contextmanager
    def routing(teacher, mode, **kw):
        modes.append(mode)
        yield SimpleNamespace(set_token_mask=lambda m: None, stats=lambda: {})

    monkeypatch.setattr(moe, "routing", routing)
    monkeypatch.setattr(moe, "is_moe", lambda model: True)
    monkeypatch.setattr(distill, "bits_per_byte", lambda *a, **kw: 1.0)
    monkeypatch.setattr(builder, "nll_bits", lambda *a, **kw: (8.0, 4, 2))
    return modes


@pytest.mark.parametrize("mode", moe.MODES)
def test_live_run_cache_build_and_report_evaluate_the_teacher_under_one_routing(mode, entered, monkeypatch):
    cfg = load_config(None, [f"moe.mode={mode}"])
    teacher = _Teacher()
    run = SimpleNamespace(teacher=teacher, teacher_tok=None, heldout=["some text"],
                          accelerator=SimpleNamespace(device=torch.device("cpu")))
    distill.teacher_heldout_bpb(run, cfg)
    assert builder.teacher_heldout_bits(teacher, None, ["some text"], cfg, "cpu") == (8.0, 4)
    from sakd.evaluate import bpb

    monkeypatch.setattr(bpb, "scoring_windows", lambda tok, texts, L: [[1, 2, 3]])
    report_run.measure_expert_usage(teacher, None, ["some text"], cfg)
    assert entered == [moe.evaluation_mode(mode)] * 3, entered
    assert entered[0] == {"topk": "topk", "ka": "topk", "all": "all", "sar": "all"}[mode]


def test_an_unknown_mode_is_refused():
    with pytest.raises(Exception, match="moe.mode='best' is unknown"):
        moe.evaluation_mode("best")
