"""`sakd plan` counts the fp32 recompute of an overflowing fp16 teacher pass (models.fp32_forward)."""

from sakd.config import load_config
from sakd.plan import format_plan, plan
from tests.conftest import ROOT

REAL = ROOT / "configs" / "huihui-moe-1b-to-smollm-135m.yaml"


def test_fp32_recompute_moment_by_hand():
    p = plan(load_config(str(REAL)), card_gb=16)
    c, m = p["components"], p["moments"]
    # the teacher logits (the shared columns: shared_kl alone reads them) again in fp32 (4 - 2 bytes more = once
    # more the fp16 size) and the largest module, the 151,936 x 1,024 embeddings (or the untied head), in fp32
    assert c["fp32_recompute"] == 4 * 640 * 49152 * 2 + 4 * 151936 * 1024
    assert m["fp32_recompute"] == m["loss_forward"] + c["fp32_recompute"]
    assert p["peak_bytes"] == p["persistent_bytes"] + max(m.values()) + p["overhead_bytes"]
    assert "fp32 recompute" in format_plan(p)
    skip = plan(load_config(str(REAL), ["train.nonfinite_teacher=skip"]), card_gb=16)
    assert "fp32_recompute" not in skip["moments"] and skip["peak_bytes"] <= p["peak_bytes"]
    fp32 = plan(load_config(str(REAL), ["model.teacher_dtype=float32"]), card_gb=16)
    assert "fp32_recompute" not in fp32["moments"]  # nothing to recompute
