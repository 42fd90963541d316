"""The cross-entropy-only comparison (``eval.ce_only_baseline``, ``sakd demo --compare``).

The same student, data order, steps, schedule and seed as the distillation run, with every teacher term
off: what the teacher adds is the difference of the two held-out bits per byte. The run lives in
``<output_dir>/ce-only``; its number goes into the distillation run's report and model card
(``student_bpb_ce_only``, sakd/train/publish.py)."""

from __future__ import annotations

import json
from pathlib import Path

# every teacher term off, full cross-entropy, the teacher's own routing (its pass is not used)
CE_ONLY = ["loss.logit=none", "loss.baseline=", "loss.kd_weight=0", "loss.ce_weight=1", "loss.chunk_weight=0",
           "loss.hidden.weight=0", "loss.attention.weight=0", "loss.contrastive.weight=0", "moe.mode=topk",
           "eval.ce_only_baseline=false", "train.push_to_hub=null"]


def ce_only_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "ce-only"


def run_ce_only(config: str | Path | None, overrides, output_dir: str | Path, log=print, progress=True) -> dict:
    """Train the cross-entropy-only student for the run of ``config`` + ``overrides`` whose folder is
    ``output_dir``. A finished one of the same configuration is read back; a stopped one is resumed."""
    from sakd.config import load_config
    from sakd.train.distill import distill

    out = ce_only_dir(output_dir)
    cfg = load_config(config, [*overrides, *CE_ONLY, f"train.output_dir={out}"])
    done = out / "result.json"
    if done.is_file() and (out / "student").is_dir():
        res = json.loads(done.read_text())
        if not res.get("stopped"):
            log(f"cross-entropy-only run: finished earlier in {out}")
            return res
    log(f"== the same student, cross-entropy only, same data and steps ({out}) ==")
    return distill(cfg, resume=(out / "checkpoints").is_dir(), log=log, progress=progress)


def ce_only_row(output_dir: str | Path, ce: dict) -> dict:
    """The distillation run's report row for the finished CE-only run ``ce`` (its result): its held-out bits per
    byte (``student_bpb_ce_only``, also a model-card row: sakd/train/publish.py) and its folder."""
    return {"student_bpb_ce_only": ce["student_bpb_final"], "ce_only_dir": str(ce_only_dir(output_dir))}
