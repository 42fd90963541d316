"""The exported student's model card (README.md) and the optional lm-eval pass on it."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from sakd.errors import UserError


def format_number(v, spec: str = ",.4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _unit_for(key: str) -> str:
    k = key.lower()
    for pat, unit in (("bits_per_byte", "bits/byte"), ("bpb", "bits/byte"), ("ppl", "per own token"),
                      ("tokens_per_s", "tokens/s"), ("bytes_per_s", "bytes/s"), ("parameters", "count"),
                      ("agreement", "fraction"), ("frac", "fraction"), ("nats", "nats"), ("seconds", "s"),
                      ("bytes", "bytes"), ("steps", "count")):
        if pat in k:
            return unit
    return "(see name)"


def _metric_row(name: str, v) -> str:
    if isinstance(v, dict):
        value, unit = v.get("value"), v.get("unit", "")
    elif isinstance(v, (tuple, list)) and len(v) == 2:
        value, unit = v
    else:
        value, unit = v, _unit_for(name)
    return f"| {name} | {format_number(value, '.4f')} | {unit} |"


def add_card_metrics(student_dir, metrics: dict) -> Path:
    """Add rows (same forms as ``write_model_card``'s metrics) to the Metrics table of the card in
    ``student_dir``; a row of the same name is replaced. For numbers measured after the export (the
    CE-only run's held-out bits per byte)."""
    path = Path(student_dir) / "README.md"
    if not path.is_file():
        raise UserError(f"{str(path)!r} does not exist: export the student (and its model card) first")
    lines = path.read_text(encoding="utf-8").split("\n")
    head = lines.index("| metric | value | unit |")  # the table write_model_card writes
    end = head + 2
    while end < len(lines) and lines[end].startswith("| "):
        end += 1
    rows = [r for r in lines[head + 2:end] if r.split(" | ")[0][2:] not in metrics]
    rows += [_metric_row(name, v) for name, v in metrics.items()]
    path.write_text("\n".join(lines[:head + 2] + rows + lines[end:]), encoding="utf-8")
    return path


def write_model_card(student_dir, *, teacher: str, data: str, method: str, metrics: dict, command: str) -> Path:
    """README.md (model card) in the exported student folder; adds generation_config.json if missing.

    metrics: {name: value} (unit inferred from the name, e.g. ``heldout_bpb`` -> bits/byte),
    {name: (value, unit)} or {name: {"value": v, "unit": u}}."""
    from transformers import AutoConfig, GenerationConfig

    d = Path(student_dir)
    if not (d / "config.json").is_file():
        raise UserError(f"{str(d)!r} holds no config.json: export the student with save_pretrained first")
    if not (d / "generation_config.json").is_file():
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(d)).save_pretrained(d)
    rows = [_metric_row(name, v) for name, v in metrics.items()]
    card = "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags:", "- knowledge-distillation", "- sakd", "---", "",
        f"# {d.name}", "",
        f"A dense causal language model distilled with `sakd` from the teacher `{teacher}` on `{data}`. "
        "It keeps its own tokenizer (saved in this folder); teacher and student met through byte-aligned "
        "chunks and the shared token strings of their vocabularies.", "",
        "## Method", "", method.strip(), "",
        "## Metrics", "", "Bits per byte are comparable across tokenizers; per-token perplexity is not.", "",
        "| metric | value | unit |", "|---|---|---|", *rows, "",
        "## Reproduce", "", "```bash", command.strip(), "```", "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)", "```", ""])
    path = d / "README.md"
    path.write_text(card, encoding="utf-8")
    return path


def lm_eval_tasks(student_dir, tasks, *, batch_size: int = 8, device: str | None = None,
                  limit: int | None = None) -> dict:
    """Optional downstream evaluation with EleutherAI's lm-evaluation-harness: {task: metrics}."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("lm-eval is not installed: pip install lm-eval")
    import lm_eval

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if not names or not all(names):
        raise UserError(f"lm-eval tasks {tasks!r}: name at least one task, e.g. hellaswag,arc_easy")
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={student_dir}", tasks=names,
                                  batch_size=batch_size, device=device or ("cuda" if torch.cuda.is_available()
                                                                           else "cpu"), limit=limit)
    return res["results"]
