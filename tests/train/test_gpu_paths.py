"""GPU paths a CPU run does not take, checked on CPU: what a card cannot do is refused, loss.chunk_rows reaches
the cross-entropy, and a run folder that is no folder is refused before anything runs."""

import subprocess
import sys

import pytest
import torch

from sakd.config import load_config
from sakd.errors import UserError
from tests.conftest import ROOT, tiny_overrides


@pytest.mark.parametrize("capability", [(6, 0), (7, 5)])  # P100, T4
def test_bf16_is_refused_below_sm80(monkeypatch, capability):
    import sakd.train.distill as loop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    with pytest.raises(UserError, match=r"train.precision=bf16 .*sm_%d%d.*train.precision=fp16" % capability):
        loop.mixed_precision("bf16")
    assert loop.mixed_precision("auto") == "fp16" and loop.mixed_precision("fp16") == "fp16"


def test_bf16_is_kept_from_sm80(monkeypatch):
    import sakd.train.distill as loop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert loop.mixed_precision("bf16") == "bf16" == loop.mixed_precision("auto")


def test_chunk_rows_reaches_the_fused_cross_entropy(tiny_assets, tmp_path, monkeypatch):
    import sakd.train.objective as objective
    import sakd.train.terms as terms
    from sakd.data.text import Collator, pad_id
    from sakd.train.distill import setup
    from sakd.train.heads import fused_head_weight

    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / "o", **{"loss.chunk_rows": 7}))
    run = setup(cfg, log=lambda *_: None)
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(2)])
    seen = []
    real = terms.linear_cross_entropy_sum

    def spy(*a, **kw):
        seen.append(kw.get("chunk_rows"))
        return real(*a, **kw)

    monkeypatch.setattr(terms, "linear_cross_entropy_sum", spy)
    weights = {"ce": 1.0}
    counts = objective.count_targets([batch], cfg, None)
    assert fused_head_weight(run.student, cfg, weights, run.accelerator) is not None
    objective.micro_step_loss(run.teacher, run.student, run.aux, batch, run.vocab.shared_s, run.vocab.shared_t, cfg,
                              weights, counts, run.accelerator, {}, torch.Generator(), len(run.teacher_tok))
    assert seen == [7]


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_output_dir_is_refused_by_the_configuration(value):
    with pytest.raises(UserError, match="train.output_dir is empty"):
        load_config(None, [f"train.output_dir={value}"])


@pytest.mark.parametrize("argv", [
    ["distill", "--config", str(ROOT / "configs" / "demo.yaml"), "train.output_dir="],
    ["demo", "--out", ""],
    ["demo", "--out", "  "],
    ["cache-teacher", "--config", str(ROOT / "configs" / "demo.yaml"), "--out", ""],
    ["pretrain", "--model-config", "x", "--tokenizer", "x", "--train", "x", "--heldout", "x", "--out", ""],
])
def test_every_verb_refuses_an_empty_out_in_one_line_and_writes_nothing(tmp_path, argv):
    r = subprocess.run([sys.executable, "-m", "sakd.cli", *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    lines = [line for line in r.stderr.splitlines() if line.startswith("sakd ")]  # (not import-time warnings)
    assert r.returncode == 2 and len(lines) == 1 and "is empty" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written where it was started


def test_chat_eval_source_format_is_detected_on_its_own(tmp_path, monkeypatch):
    """data.format=auto on a ShareGPT training file with the built-in chat held-out set (messages): each source is
    read in its own format. Before the fix the training source's sharegpt was imposed on the held-out set
    ("sakd:shakespeare-chat-heldout row 1: no field 'conversations')."""
    import json

    import sakd.data.chat_dataset as cd

    train = tmp_path / "my_sharegpt.jsonl"
    train.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                                   {"from": "gpt", "value": "Hello"}]}) + "\n")
    cfg = load_config(None, [f"data.source={train}", "data.eval_source=sakd:shakespeare-chat-heldout",
                             "data.format=auto"])
    seen = {}
    monkeypatch.setattr(cd, "read_conversations", lambda source, fmt, **kw: seen.__setitem__(source, fmt) or [])
    monkeypatch.setattr(cd, "configure_template", lambda *a: "test")
    monkeypatch.setattr(cd, "refuse_unsupported", lambda cfg: None)
    monkeypatch.setattr(cd, "start_token_id", lambda tok: 0)
    monkeypatch.setattr(cd, "ChatEncoder", lambda *a: None)
    monkeypatch.setattr(cd, "encode_all", lambda enc, convs: ([], {}))
    with pytest.raises(UserError, match="no conversation can be trained on"):
        cd.chat_data(cfg, "sharegpt", "NFC", None, None, 64, log=lambda *_: None)
    assert seen == {str(train): "sharegpt", "sakd:shakespeare-chat-heldout": "messages"}


def test_the_heldout_teacher_evaluation_recomputes_an_overflowing_16bit_teacher_in_fp32(tiny_assets, tmp_path):
    """The start-up evaluation of the teacher is guarded like a training pass: a 16-bit teacher whose outputs
    overflow is evaluated again in fp32 (one module's weights at a time). Before the fix it reported NaN."""
    from sakd.train.distill import setup, teacher_heldout_bpb

    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / "o", **{"moe.mode": "topk"}))
    run = setup(cfg, log=lambda *_: None)
    reference = teacher_heldout_bpb(run, cfg)
    run.teacher.to(torch.bfloat16)  # CPU stand-in for an fp16 teacher

    def overflow(module, args, output):  # what a bf16-trained model overflowing in fp16 gives
        return output.masked_fill(torch.ones_like(output, dtype=torch.bool), float("inf")) \
            if output.dtype != torch.float32 else output

    run.teacher.get_decoder().norm.register_forward_hook(overflow)
    bpb = teacher_heldout_bpb(run, cfg)
    assert bpb == pytest.approx(reference, rel=0.02)  # bf16-rounded weights, computed in fp32
