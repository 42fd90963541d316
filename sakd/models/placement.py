"""A teacher bigger than the card: ``model.teacher_device_map`` through transformers' big-model loading.

``from_pretrained(device_map=..., max_memory=..., offload_folder=...)`` places each module (Accelerate's
``dispatch_model`` underneath: modules mapped to ``cpu`` or ``disk`` keep their weights there and are
streamed onto the execution device by a hook around their forward; the model's outputs come back on its
input's device). Nothing here shards by hand: this file checks the map against the model's module names
(transformers ignores a name it does not know and leaves unmapped modules where they load) and reads the
map for ``sakd plan`` (the teacher's weights on the card are what the map leaves there)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sakd.errors import UserError

CARD = {0, "0", "cuda", "cuda:0"}  # the one card `sakd plan` and a one-process run see


def big_model_placement(device_map, max_memory: dict | None = None, offload_folder: str | None = None) -> dict:
    """The ``from_pretrained`` arguments for ``model.teacher_device_map`` / ``teacher_max_memory`` /
    ``teacher_offload_folder`` (their values checked by ``sakd.config.check_teacher_placement``); {} without
    a map."""
    if device_map is None:
        return {}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("model.teacher_device_map spreads ONE teacher over this machine's devices: run one process "
                        "(not accelerate launch --num_processes N), or drop the map")
    kw = {"device_map": device_map}
    if max_memory:
        kw["max_memory"] = max_memory
    if offload_folder:
        kw["offload_folder"] = str(Path(offload_folder).expanduser())
    return kw


def meta_model(config):
    """The model of ``config`` with every tensor on the meta device: names and sizes, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_device_map(config, device_map: dict, role: str = "teacher") -> None:
    """Every key names a module of the model, and every parameter falls under a key (transformers 5 ignores
    unknown names and keeps unmapped modules where they load: a typo would silently not offload)."""
    model = meta_model(config)
    modules = {name for name, _ in model.named_modules()}
    for key in device_map:
        if key not in modules:
            some = ", ".join(n for n in sorted(modules, key=len) if n.count(".") <= 2 and n)[:160]
            raise UserError(f"model.{role}_device_map: {key!r} is not a module of the {role} (e.g. {some})")
    for name, _ in model.named_parameters():
        if not any(k == "" or name == k or name.startswith(k + ".") for k in device_map):
            raise UserError(f"model.{role}_device_map: parameter {name!r} falls under no key: map every module "
                            "(or use auto)")


def bytes_on_card(config, device_map, max_memory: dict | None, dtype_bytes: int, card_bytes: float) -> dict:
    """{"on_card": bytes of the teacher's weights the map leaves on card 0, "offloaded_block": the largest
    offloaded block (streamed onto the card during its forward, 0 when nothing is offloaded), "total"}.
    A dict map is read as is; auto/balanced/sequential are planned by Accelerate's own
    ``infer_auto_device_map`` with card 0 limited to ``max_memory[0]`` (else the whole card)."""
    from accelerate import infer_auto_device_map

    model = meta_model(config)
    sizes = {n: p.numel() * dtype_bytes for n, p in model.named_parameters()}
    if isinstance(device_map, str):
        budget = {k: v for k, v in (max_memory or {}).items()}
        card = next((budget.pop(k) for k in list(budget) if k in CARD), card_bytes)
        quiet = logging.getLogger("accelerate.utils.modeling")  # "Device 0 is not available": planned, not run
        level, _ = quiet.level, quiet.setLevel(logging.ERROR)
        try:
            device_map = infer_auto_device_map(model, max_memory={0: card, "cpu": budget.get("cpu", 2 ** 50),
                                                                  **budget},
                                               no_split_module_classes=model._no_split_modules,
                                               dtype={2: torch.float16, 4: torch.float32}[dtype_bytes])
        finally:
            quiet.setLevel(level)

    def device(name: str):
        keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        return device_map[max(keys, key=len)] if keys else 0

    on_card = sum(b for n, b in sizes.items() if device(n) in CARD)
    blocks: dict = {}
    for n, b in sizes.items():
        if device(n) in ("cpu", "disk"):
            key = max((k for k in device_map if k == "" or n == k or n.startswith(k + ".")), key=len)
            blocks[key] = blocks.get(key, 0) + b
    return {"on_card": on_card, "offloaded_block": max(blocks.values(), default=0), "total": sum(sizes.values())}
