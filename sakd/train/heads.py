"""The output layers a step fuses into its losses (``loss.fused_head``): which terms allow it, the student's and
the teacher's head weights, and how much of the teacher's head a step needs. Read by the objective and by
``sakd plan``."""

from __future__ import annotations

import torch
from torch import nn

from sakd.config import Config


def fused_head_terms(lc, *, kd: bool, chunk: bool) -> bool:
    """Whether ``loss.fused_head`` serves these logit terms (also read by ``sakd plan``): shared-vocabulary
    KD without gap weighting and/or cross-entropy; the chunk likelihood and the baselines need logits."""
    return bool(lc.fused_head and not chunk
                and not (kd and (lc.method not in ("shared_kl", "mapped_kl", "projected_kl") or lc.gap_weighting)))


def plain_head_weight(model) -> torch.Tensor | None:
    """The output layer's weight [V, H] when the model's logits are a plain bias-free ``hidden @ weight.T``
    (no logit scale or soft-capping), else None."""
    head, mc = model.get_output_embeddings(), model.config
    if not isinstance(head, nn.Linear) or head.bias is not None or any(
            getattr(mc, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    return head.weight


def teacher_head_use(lc, weights: dict, identity: bool = False) -> str | None:
    """How much of the teacher's output layer a step needs when ``loss.fused_head`` fuses it (also read by
    ``sakd plan``): "shared" where shared_kl alone reads the teacher's logits (its shared columns), "rows"
    where mapped_kl alone does (its target multiplies out the rows it uses, every column); None where
    anything else reads them (chunk likelihood, gap weighting, a baseline, hidden-state or attention
    terms) or one tokenizer serves both sides (``identity``): the model's own logits then."""
    if not (lc.fused_head and "kd" in weights) or lc.gap_weighting or any(
            k in weights for k in ("chunk", "hidden", "attention", "contrastive")):
        return None
    if lc.method == "shared_kl":
        return "shared"
    return "rows" if lc.method in ("mapped_kl", "projected_kl") and not identity else None


def teacher_head(teacher, shared_t: torch.Tensor | None, fused: bool) -> tuple | None:
    """(the teacher's output-layer weight [Vt_cols, H], its shared-vocabulary rows [S, H] or None without
    ``shared_t``) when ``loss.fused_head`` may fuse it, else None. shared_kl renormalises over the shared columns, so where it alone reads the
    teacher's logits (``teacher_head_use`` "shared") only those S columns are computed: [B, Lt, S] instead of
    [B, Lt, Vt] (39,234 of 151,936 columns for Qwen3 -> SmolLM: 1.1 GiB less at 4 x 640 in fp32). The
    [S, H] rows are gathered once (the teacher is frozen; SAR trains its routers only). Where mapped_kl
    alone reads them ("rows"), the loss takes the last hidden state and the weight, and multiplies out
    only the rows a row block needs."""
    # A teacher with a device map (model.teacher_device_map) runs whole: its head may be offloaded (a meta
    # tensor outside its forward) or on another device than the body's output.
    if not fused or teacher is None or not hasattr(teacher, "get_decoder") or getattr(teacher, "hf_device_map", None):
        return None
    w = plain_head_weight(teacher)
    if w is None:
        return None
    return w, (w.detach()[shared_t.to(w.device)].contiguous() if shared_t is not None else None)


def fused_head_weight(student, cfg: Config, weights: dict, acc) -> torch.Tensor | None:
    """The student's output-layer weight [V, H] when ``loss.fused_head`` applies to this step's terms: the
    logit terms are shared-vocabulary KD (no gap weighting) and/or cross-entropy, and the model's logits
    are a plain bias-free ``hidden @ weight.T`` (no logit scale or soft-capping). Else None."""
    if not fused_head_terms(cfg.loss, kd="kd" in weights, chunk="chunk" in weights):
        return None
    return plain_head_weight(getattr(acc, "unwrap_model", lambda m: m)(student))  # under DDP: the wrapped model's
