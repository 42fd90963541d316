"""LoRA students through ``peft`` (``model.student_lora``): wrap, count, export merged.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3: each adapted linear layer
computes ``h = W0 x + (alpha / r) B A x`` with W0 [out, in] frozen, A [r, in] (random) and B [out, r]
(zeros: the wrapped student starts equal to the plain one) trained. Only A and B get gradients, so the
optimizer, its AdamW states and the checkpoint hold r (in + out) numbers per adapted layer; the frozen
base is the student's own folder, loaded again on resume.

    student = wrap_student(student, r=16, alpha=32.0, dropout=0.05, target_modules=["q_proj", ...])
    export_student(student, Path("runs/x/student"), adapter_dir=Path("runs/x/adapter"))
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sakd.errors import UserError

# the attention and MLP projections of a Llama / Qwen / Mistral decoder layer (every linear layer but lm_head)
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adaptable_names(model: nn.Module) -> list[str]:
    """The last name parts of the student's linear layers (what ``target_modules`` may name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def lora_parameter_count(model: nn.Module, r: int, target_modules: list[str]) -> int:
    """Parameters LoRA adds: r (in + out) per adapted linear layer (A [r, in], B [out, r], no bias).
    Works on a ``meta`` model (``sakd plan``); the tied lm_head is one module, counted once."""
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in target_modules)


def check_targets(model: nn.Module, target_modules: list[str]) -> None:
    """One-line UserError for a target that names no linear layer of the student (peft's own error is
    a multi-line ValueError raised half-way through wrapping)."""
    have = adaptable_names(model)
    bad = [t for t in target_modules if t not in have]
    if not target_modules or bad:
        what = f"{bad[0]!r} is not a linear layer of the student" if bad else "is empty"
        raise UserError(f"model.student_lora.target_modules: {what}; choose among {', '.join(have)}")


def wrap_student(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: list[str]):
    """The student as a ``peft`` LoRA model: base weights frozen, adapters on ``target_modules``.
    ``alpha / r`` scales the update (eq. 3)."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, target_modules)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                     bias="none", task_type="CAUSAL_LM")
    # with model.gradient_checkpointing, transformers' gradient_checkpointing_enable has already made the
    # embeddings' output require grad: the checkpointed blocks then pass gradients on to the adapters
    wrapped = get_peft_model(model, cfg)
    wrapped.train()
    return wrapped


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def export_student(model: nn.Module, folder: Path, adapter_dir: Path | None = None) -> nn.Module:
    """Write the student as a plain transformers folder (``AutoModelForCausalLM.from_pretrained``): a LoRA
    student is merged first (W0 + alpha/r B A, in place: call after the last use of the adapters) and,
    with ``adapter_dir``, its adapter folder (``PeftModel.from_pretrained(base, adapter_dir)``) is
    written too. Returns the exported model."""
    if is_lora(model):
        if adapter_dir is not None:
            model.save_pretrained(adapter_dir, safe_serialization=True)
        with torch.no_grad():
            model = model.merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    return model
