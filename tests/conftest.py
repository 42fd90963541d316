"""Shared fixtures: tiny tokenizers and models built from configs, saved with save_pretrained and
loaded back with from_pretrained (the same loading code as the real pair), on Shakespeare text.

The tests mirror the package (docs/architecture.md, "Where the tests are"): tests/<subsystem>/ for
sakd/<subsystem>/, tests/benchmarks/ for benchmarks/, this folder for cli, config, plan and the rules over the
whole package. No folder has an __init__.py, so test file names are unique across tests/. A test finds the
repository through ROOT below, never through its own __file__ (files move)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs the tests in one worker per core (pytest-xdist): the workers share the cores, so each takes its
# share of threads (two torch processes of 2 threads each on 2 cores run far slower than one at a time)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """{train, heldout, teacher_tok, student_tok, teacher, student} paths: a 3-expert Qwen3-MoE teacher
    with a byte-level BPE tokenizer and a Llama student with a SentencePiece-style tokenizer."""
    from transformers import AutoModelForCausalLM

    from sakd.data.corpus import load_plays
    from sakd.demo.tokenizers import train_student_tokenizer, train_teacher_tokenizer
    from sakd.models.tiny import llama_config, qwen3_moe_config

    d = tmp_path_factory.mktemp("tiny")
    plays = load_plays()
    train_text = plays["hamlet"][:60_000] + "Naïve café — 東京 🙂\n"
    held_text = plays["macbeth"][:6_000]
    (d / "train.txt").write_text(train_text, encoding="utf-8")
    (d / "heldout.txt").write_text(held_text, encoding="utf-8")
    paragraphs = [p for p in train_text.split("\n\n") if p.strip()]
    t_tok = train_teacher_tokenizer(paragraphs, vocab_size=600)
    s_tok = train_student_tokenizer(paragraphs, vocab_size=400)
    t_tok.save_pretrained(d / "teacher")
    s_tok.save_pretrained(d / "student")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(qwen3_moe_config(len(t_tok), hidden=32, layers=2, heads=4, experts=3,
                                                      experts_per_tok=1, intermediate=32)).save_pretrained(d / "teacher")
    AutoModelForCausalLM.from_config(llama_config(len(s_tok), hidden=32, layers=2, heads=4,
                                                  intermediate=64)).save_pretrained(d / "student")
    return {k: d / v for k, v in {"train": "train.txt", "heldout": "heldout.txt", "teacher": "teacher",
                                   "student": "student", "dir": "."}.items()}


def tiny_overrides(assets, out, **extra) -> list[str]:
    base = {
        "model.teacher": assets["teacher"], "model.student": assets["student"],
        "data.source": assets["train"], "data.eval_source": assets["heldout"], "data.seq_len": 48,
        "data.max_examples": 64, "train.max_steps": 3, "train.batch_size": 4, "train.lr": 1e-3,
        "train.warmup_steps": 1, "train.eval_every": 0, "train.save_every": 0, "train.output_dir": out,
        "train.log_every": 1, "eval.max_bytes": 2000, "eval.seq_len": 64, "logging.tensorboard": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


class StderrNotOneLine(AssertionError):
    """The run failed as it should, but stderr holds more than the one error line."""


def assert_user_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, no traceback, the last stderr line names the problem; then: it is the ONLY line."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines and lines[-1].startswith("sakd distill: error: "), r.stderr[-3000:]
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])
    if len(lines) != 1:
        raise StderrNotOneLine(f"{len(lines)} lines on stderr:\n" + "\n".join(lines[:12]))
