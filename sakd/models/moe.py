"""Routing control for Mixture-of-Experts teachers: top-k, KA, ALL and SAR.

Source: *Every Expert Matters* (Kim, Chu, Yang 2025, arXiv 2502.12947; code
gmkim-ai/MoEKD). For a token with router input x and router weights W [E, H]:

    l = W x                      router logits, E entries
    p = softmax(l)               router probabilities
    topk  (the model):  S = top-k(p),        w_e = p_e / sum_{j in S} p_j   (norm_topk_prob)
                                             w_e = p_e                      (otherwise)
    ka    (KA, Sec. 4.1): with probability lambda, S = k draws without replacement from
                        softmax(l / T); else S = top-k(p). Weights as for topk, which for a
                        norm_topk_prob model is the paper's softmax over the selected logits.
    all   (ALL baseline): S = all E experts, w = p.
    sar   (SAR, Sec. 4.2): as "all", with W trainable.
    MoE output = sum_{e in S} w_e * expert_e(x)  (+ the shared expert, untouched).

We never copy model code: the router module's ``forward`` is replaced on the
instance (inside a context manager; under Accelerate's big-model hooks its ``_old_forward``,
which the hook calls once the offloaded weights are in) by a function that returns the
``(router_logits, weights [N, k], indices [N, k])`` triple the transformers 5.x
block passes to its experts. Blocks are found by structure, never by name.
transformers 4.x MoE blocks (``gate`` an ``nn.Linear``, experts a ``ModuleList``)
are refused with a ``UserError``.
"""

from __future__ import annotations

import copy
import functools
import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sakd.errors import UserError
def routing_schedule(step: int, total_steps: int, *, experts_start: int, experts_end: int,
                     temp_start: float = 1.0, temp_end: float = 1.0, prob_start: float,
                     prob_end: float) -> dict:
    """Linear ramps from *_start at step 0 to *_end at ``total_steps`` (held after):
    {"experts": round-half-up integer, "temperature", "sample_prob"} for routing(..., "ka")."""
    if total_steps < 0:
        raise UserError(f"total_steps={total_steps} must be >= 0")
    frac = 1.0 if total_steps == 0 else min(max(step / total_steps, 0.0), 1.0)

    def lerp(a: float, b: float) -> float:
        return a + (b - a) * frac

    return {"experts": int(math.floor(lerp(experts_start, experts_end) + 0.5)),
            "temperature": lerp(temp_start, temp_end), "sample_prob": lerp(prob_start, prob_end)}



MODES = ("topk", "ka", "all", "sar")


def student_step_mode(mode: str) -> str:
    """The routing the teacher runs under when it teaches a student step: the run's ``moe.mode``, except SAR,
    whose student step sees the teacher with all experts (its router updated by the router step before)."""
    return "all" if mode == "sar" else mode


def evaluation_mode(mode: str) -> str:
    """The one rule for the routing the teacher is EVALUATED under (its held-out bits/byte in the live run and
    in the cache build, its expert usage at report time): the routing it teaches with, without KA's random
    sampling: ``topk`` for topk and ka, ``all`` for all and sar."""
    if mode not in MODES:
        raise UserError(f"moe.mode={mode!r} is unknown: use one of {', '.join(MODES)}")
    return "all" if mode in ("all", "sar") else "topk"


# --------------------------------------------------------------------------- discovery
def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) for every module with a router ``.gate`` whose ``weight`` is
    [E, H] (E > 1) and an ``.experts`` module. Structural: a dense MLP's ``gate_proj`` and
    Qwen2-MoE's ``shared_expert_gate`` (no ``.experts`` beside it) never match."""
    found = []
    for name, module in model.named_modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if not (isinstance(gate, nn.Module) and isinstance(experts, nn.Module)):
            continue
        weight = getattr(gate, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] > 1:
            found.append((name, module))
    return found


def is_moe(model: nn.Module) -> bool:
    return bool(find_moe_blocks(model))


class _Layer:
    """What the patched router needs to know about one block."""

    def __init__(self, name: str, block: nn.Module):
        gate = block.gate
        if not hasattr(gate, "top_k") or isinstance(block.experts, nn.ModuleList):
            raise UserError(
                f"MoE block {name!r} has the transformers 4.x layout (router without top_k); "
                "sakd needs transformers>=5: pip install 'transformers>=5,<6'")
        self.name, self.gate = name, gate
        self.num_experts, self.hidden = gate.weight.shape
        self.top_k = int(gate.top_k)
        self.norm_topk_prob = bool(getattr(gate, "norm_topk_prob", False))


def _layers(model: nn.Module) -> list[_Layer]:
    blocks = find_moe_blocks(model)
    if not blocks:
        raise UserError(f"{type(model).__name__} has no MoE block (a module with a router .gate and "
                        ".experts); KA/SAR/ALL need a Mixture-of-Experts teacher")
    return [_Layer(n, b) for n, b in blocks]


# --------------------------------------------------------------------------- selection
def ka_select(logits: torch.Tensor, k: int, sample_prob: float, *, temperature: float = 1.0,
              generator: torch.Generator | None = None, every_row: bool | None = None) -> torch.Tensor:
    """Expert indices [N, k] for KA (paper Sec. 4.1, "Knowledge Augmentation").

    Per row independently: with probability ``sample_prob`` draw k experts without
    replacement from softmax(logits / temperature), else take the top k of softmax(logits)
    (computed exactly as the HF router does, so sample_prob=0 reproduces its choice).
    logits: [N, E]. All randomness comes from ``generator`` (its device is used for the
    draws; pass one on the teacher's device to avoid copies).

    ``every_row`` (default: when the draws run on an accelerator): draw for every row and keep
    the draws where the coin says so. Same distribution, no ``nonzero()`` -- which waits for the
    device (a host sync per MoE layer per pass) -- at the cost of N x E multinomial draws, which is
    nothing next to the experts. On CPU only the sampled rows are drawn (no sync to avoid there)."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    chosen = torch.topk(probs, k, dim=-1).indices
    if sample_prob <= 0.0:
        return chosen
    dev = generator.device if generator is not None else logits.device
    coin = torch.rand(logits.shape[0], generator=generator, device=dev) < sample_prob
    if every_row if every_row is not None else dev.type != "cpu":
        q = F.softmax(logits.detach().float().to(dev) / temperature, dim=-1)
        drawn = torch.multinomial(q.clamp_min(1e-30), k, replacement=False, generator=generator)
        return torch.where(coin.to(chosen.device)[:, None], drawn.to(chosen.device), chosen)
    rows = coin.nonzero().squeeze(1)
    if rows.numel():
        q = F.softmax(logits.detach().float().to(dev)[rows] / temperature, dim=-1)
        # Exact zeros (large logits / small T) would make k draws without replacement impossible.
        drawn = torch.multinomial(q.clamp_min(1e-30), k, replacement=False, generator=generator)
        chosen = chosen.clone()
        chosen[rows.to(chosen.device)] = drawn.to(chosen.device)
    return chosen


# --------------------------------------------------------------------------- telemetry
class RoutingStats:
    """Per-layer router telemetry accumulated over every forward inside ``routing()``.

    Padding counts unless ``set_token_mask(attention_mask)`` is called before the forward.
    ``last_logits[name]`` holds each router's logits from the latest forward (attached to the
    autograd graph under "sar" with grad), used by ``load_balance_loss(stats)``."""

    def __init__(self, layers: list[_Layer]):
        self._names = [l.name for l in layers]
        self._experts = {l.name: l.num_experts for l in layers}
        self.last_logits: dict[str, torch.Tensor] = {}
        self.last_mask: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self._acc: dict[str, dict[str, torch.Tensor]] = {}

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Count only tokens where ``mask`` is True (e.g. the batch's attention mask [B, L])."""
        self._mask = None if mask is None else mask.reshape(-1).bool()

    def _record(self, name: str, logits: torch.Tensor, chosen: torch.Tensor,
                reference: torch.Tensor | None) -> None:
        mask = self._mask
        if mask is not None and mask.numel() != logits.shape[0]:
            raise UserError(f"token mask has {mask.numel()} entries but router {name!r} saw "
                            f"{logits.shape[0]} tokens; call set_token_mask() with this batch's mask")
        self.last_logits[name], self.last_mask = logits, mask
        with torch.no_grad():
            lg = logits.detach().float()
            logp = F.log_softmax(lg, dim=-1)
            p = logp.exp()
            w = torch.ones(lg.shape[0], device=lg.device) if mask is None else mask.to(lg.device).float()
            sel = torch.zeros_like(p).scatter_(1, chosen.to(p.device), 1.0)
            acc = self._acc.setdefault(name, {k: torch.zeros((), dtype=torch.float64, device=lg.device)
                                              for k in ("tokens", "entropy", "mass", "kl")})
            acc["tokens"] += w.sum()
            acc["entropy"] += (-(p * logp).sum(-1) * w).sum()
            acc["mass"] += ((p * sel).sum(-1) * w).sum()
            acc["counts"] = acc.get("counts", 0) + (sel * w[:, None]).sum(0).double()
            # (not F.one_hot: on the CPU it reads the ids' min and max back, two host syncs per layer)
            top1 = torch.zeros_like(p).scatter_(1, lg.argmax(-1, keepdim=True), 1.0)
            acc["top1"] = acc.get("top1", 0) + (top1 * w[:, None]).sum(0).double()
            if reference is not None:
                ref_logp = F.log_softmax(reference.float(), dim=-1)
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
                acc["kl"] += (kl * w).sum()
                acc["has_kl"] = torch.ones(())

    def stats(self) -> dict[str, dict]:
        """{layer: {"usage": [E] fraction of expert slots per expert (sums to 1), "counts",
        "top1": [E] fraction of tokens whose router argmax is e, "entropy": mean router entropy
        (nats), "selected_mass": mean router probability on the experts used, "tokens",
        "router_kl": mean KL(reference router || current) if reference weights were given}}."""
        names = [n for n in self._names if n in self._acc]
        if not names:
            return {}
        parts = [torch.cat([torch.stack([a["tokens"], a["entropy"], a["mass"], a["kl"]]), a["counts"], a["top1"]])
                 for a in (self._acc[n] for n in names)]
        flat = torch.cat(parts).tolist()  # every layer in ONE read of device values (one host sync)
        out, i = {}, 0
        for name, part in zip(names, parts):
            (tokens, entropy, mass, kl), rest = flat[i:i + 4], flat[i + 4:i + len(part)]
            i += len(part)
            counts, top1 = rest[:len(rest) // 2], rest[len(rest) // 2:]
            n, used = max(tokens, 1e-12), max(sum(counts), 1e-12)
            d = {"usage": [c / used for c in counts], "counts": counts, "top1": [t / n for t in top1],
                 "entropy": entropy / n, "selected_mass": mass / n, "tokens": int(round(tokens))}
            if "has_kl" in self._acc[name]:
                d["router_kl"] = kl / n
            out[name] = d
        return out

    def summary(self) -> dict[str, float]:
        """Means over layers of entropy, selected_mass and router_kl (when recorded)."""
        per = list(self.stats().values())
        if not per:
            return {}
        keys = [k for k in ("entropy", "selected_mass", "router_kl") if k in per[0]]
        return {k: sum(d[k] for d in per) / len(per) for k in keys}


def _in_backward() -> bool:
    # Non-reentrant checkpointing re-runs forwards inside backward: do not count them twice.
    return torch._C._current_graph_task_id() != -1


# --------------------------------------------------------------------------- the context
def _make_forward(layer: _Layer, original: Callable, mode: str, k: int, sample_prob: float,
                  temperature: float, generator, weight: torch.Tensor | None,
                  reference: torch.Tensor | None, stats: RoutingStats) -> Callable:
    gate = layer.gate

    def forward(hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, layer.hidden)
        if mode == "topk":
            out = original(hidden_states)  # the model's own code: bitwise identical
            if not _in_backward():
                with torch.no_grad():
                    ref = None if reference is None else F.linear(x.to(reference.dtype), reference)
                    stats._record(layer.name, F.linear(x, gate.weight), out[2], ref)
            return out
        w = gate.weight if weight is None else weight
        # Recomputed here: some 5.x versions return probabilities under the name "logits".
        logits = F.linear(x.to(w.dtype), w)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        if mode == "ka":
            chosen = ka_select(logits, k, sample_prob, temperature=temperature, generator=generator)
            scores = probs.gather(1, chosen)
            if layer.norm_topk_prob:
                scores = scores / scores.sum(dim=-1, keepdim=True)
        else:  # all / sar
            chosen = torch.arange(layer.num_experts, device=x.device).expand(x.shape[0], -1)
            scores = probs
        if not _in_backward():
            ref = None
            if reference is not None:
                with torch.no_grad():
                    ref = F.linear(x.to(reference.dtype), reference)
            stats._record(layer.name, logits, chosen, ref)
        return logits, scores.to(hidden_states.dtype), chosen

    return forward


@contextmanager
def routing(teacher: nn.Module, mode: str, *, experts: int | None = None, sample_prob: float = 0.0,
            generator: torch.Generator | None = None, temperature: float = 1.0,
            router_weights: dict[str, torch.Tensor] | None = None,
            reference_weights: dict[str, torch.Tensor] | None = None) -> Iterator[RoutingStats]:
    """Route every MoE block of ``teacher`` by ``mode`` (see the module docstring) inside the
    block; yields a ``RoutingStats``. On exit the routers' ``forward`` attributes and every
    parameter's ``requires_grad`` are restored exactly.

    experts: "ka" only, experts per token (default: the model's own top_k; the paper uses
        E - 1). "all"/"sar" always use all E experts and refuse any other value.
    sample_prob, temperature, generator: "ka" only (lambda, sampling temperature, RNG).
    router_weights: {block name: [E, H]} used instead of ``gate.weight`` (e.g. SARRouter's
        fp32 master copy); with "sar" these receive gradients and no teacher parameter does.
    reference_weights: {block name: [E, H]}; stats then report router_kl = mean
        KL(softmax(W_ref x) || softmax(W x)).
    "sar": every teacher parameter gets requires_grad False except the router weights (True)
    unless router_weights is given."""
    if mode not in MODES:
        raise UserError(f"routing mode {mode!r} is not one of {', '.join(MODES)}")
    if not 0.0 <= sample_prob <= 1.0:
        raise UserError(f"sample_prob={sample_prob} must lie in [0, 1]")
    if not temperature > 0.0:
        raise UserError(f"temperature={temperature} must be > 0")
    if mode != "ka" and (sample_prob != 0.0 or temperature != 1.0):
        raise UserError(f"sample_prob/temperature apply only to mode='ka', not {mode!r}")
    layers = _layers(teacher)
    for extra, label in ((router_weights, "router_weights"), (reference_weights, "reference_weights")):
        for l in layers if extra is not None else ():
            t = extra.get(l.name)
            if t is None or tuple(t.shape) != (l.num_experts, l.hidden):
                raise UserError(f"{label} lacks a [{l.num_experts}, {l.hidden}] tensor for block {l.name!r}")
    ks = {}
    for l in layers:
        if mode == "ka":
            ks[l.name] = l.top_k if experts is None else int(experts)
            if not 1 <= ks[l.name] <= l.num_experts:
                raise UserError(f"experts={experts} must lie in [1, {l.num_experts}] for block {l.name!r}")
        elif mode in ("all", "sar"):
            if experts is not None and int(experts) != l.num_experts:
                raise UserError(f"mode={mode!r} uses all {l.num_experts} experts; use mode='ka' "
                                f"with experts={experts} for a partial set")
            ks[l.name] = l.num_experts
        else:
            if experts is not None and int(experts) != l.top_k:
                raise UserError(f"mode='topk' uses the model's top_k={l.top_k}; use mode='ka' for experts={experts}")
            ks[l.name] = l.top_k
    stats = RoutingStats(layers)
    saved_grad = [(p, p.requires_grad) for p in teacher.parameters()]
    patched = []
    try:
        for l in layers:
            # A teacher loaded with a device_map (Accelerate's big-model hooks): the router's own weights are
            # on the meta device outside its forward when offloaded, and the hook's forward loads them, then
            # calls ``_old_forward``. Patching that one keeps our routing INSIDE the hook (weights present).
            attr = "_old_forward" if hasattr(l.gate, "_hf_hook") and "_old_forward" in l.gate.__dict__ else "forward"
            had = attr in l.gate.__dict__
            patched.append((l.gate, attr, had, l.gate.__dict__.get(attr)))
            setattr(l.gate, attr, _make_forward(
                l, getattr(l.gate, attr), mode, ks[l.name], sample_prob, temperature, generator,
                None if router_weights is None else router_weights[l.name],
                None if reference_weights is None else reference_weights[l.name].detach(), stats))
        if mode == "sar":
            for p in teacher.parameters():
                p.requires_grad_(False)
            if router_weights is None:
                for l in layers:
                    l.gate.weight.requires_grad_(True)
        yield stats
    finally:
        for gate, attr, had, previous in reversed(patched):
            if had:
                gate.__dict__[attr] = previous
            else:
                del gate.__dict__[attr]
        for p, flag in saved_grad:
            p.requires_grad_(flag)
        stats.last_logits, stats.last_mask = {}, None  # drop references to the autograd graph


# --------------------------------------------------------------------------- SAR helpers
def router_state(teacher: nn.Module) -> dict[str, torch.Tensor]:
    """{"<block>.gate.weight": contiguous clone}: safetensors-friendly, nothing shared."""
    return {f"{l.name}.gate.weight": l.gate.weight.detach().clone().contiguous() for l in _layers(teacher)}


def load_router_state(teacher: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy router weights saved by ``router_state`` into ``teacher`` (dtype cast on copy)."""
    layers = _layers(teacher)
    for l in layers:
        key = f"{l.name}.gate.weight"
        t = state.get(key)
        if t is None or tuple(t.shape) != (l.num_experts, l.hidden):
            raise UserError(f"router state lacks {key!r} of shape [{l.num_experts}, {l.hidden}]; "
                            "was it saved from the same teacher?")
    with torch.no_grad():
        for l in layers:
            l.gate.weight.copy_(state[f"{l.name}.gate.weight"])


def load_balance_loss(source, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer load balance (Fedus et al. 2021, eq. 4), averaged over layers:

        L = mean_layers  E * sum_e f_e * P_e
        f_e = fraction of tokens whose router argmax is e (not differentiable)
        P_e = mean over tokens of softmax(logits)_e      (differentiable w.r.t. the router)

    1.0 at perfect balance, E when every token goes to one expert with probability 1.
    source: RoutingStats (its last forward's logits and token mask), {name: [N, E]},
    a list of [N, E], or one tensor [N, E] / [layers, N, E]. mask: [N] (or any shape with N
    entries) bool, tokens to count. The paper's MoEKD code uses Llama-MoE's cv^2 balance
    loss instead; with E = 3 experts both push toward uniform use."""
    if isinstance(source, RoutingStats):
        items = list(source.last_logits.values())
        mask = source.last_mask if mask is None else mask
    elif isinstance(source, dict):
        items = list(source.values())
    elif isinstance(source, torch.Tensor):
        items = [source] if source.dim() == 2 else list(source)
    else:
        items = list(source)
    if not items:
        raise UserError("load_balance_loss got no router logits; run the teacher inside routing() first")
    losses = []
    for logits in items:
        logits = logits.reshape(-1, logits.shape[-1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
        E = logits.shape[-1]
        p = F.softmax(logits, dim=-1)
        f = F.one_hot(p.detach().argmax(-1), E).to(p.dtype)
        w = torch.ones_like(p[:, 0]) if mask is None else mask.reshape(-1).to(p.device, p.dtype)
        w = w / w.sum().clamp_min(1.0)
        losses.append(E * ((f * w[:, None]).sum(0) * (p * w[:, None]).sum(0)).sum())
    return torch.stack(losses).mean()


@contextmanager
def _router_step_mode(teacher: nn.Module, checkpointing: bool) -> Iterator[bool]:
    """Train mode (the paper's router step) and, if asked, non-reentrant activation
    checkpointing on every transformers ``GradientCheckpointingLayer``; restored on exit.
    Done by hand rather than with ``gradient_checkpointing_enable`` because that also leaves
    a hook on the input embeddings behind."""
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    modes = [(m, m.training) for m in teacher.modules()]
    keys = ("gradient_checkpointing", "_gradient_checkpointing_func")
    saved = []
    teacher.train()
    if checkpointing:
        for m in teacher.modules():
            if isinstance(m, GradientCheckpointingLayer):
                saved.append((m, {k: m.__dict__[k] for k in keys if k in m.__dict__}))
                m.gradient_checkpointing = True
                m._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    try:
        yield bool(saved)
    finally:
        for m, old in saved:
            for k in keys:
                if k in old:
                    m.__dict__[k] = old[k]
                else:
                    m.__dict__.pop(k, None)
        for m, flag in modes:
            m.training = flag


def _average_across_processes(params: list[nn.Parameter]) -> None:
    """Under data parallelism (torch.distributed initialised, several processes), replace every
    gradient by its mean over the processes, in one all-reduce, so that every process takes the same
    router step and the teachers stay identical. (The student's gradients are averaged by DDP; the
    router's master weights live outside the wrapped model, so they are averaged here.) The KL part
    is exact when ``loss_fn`` divides by the GLOBAL count times the world size (``sar_router_step``
    does); the balance term is averaged per process, an approximation of the global batch's."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


class SARRouter:
    """Student-Aware Router training (paper Sec. 4.2): only router weights learn.

    Keeps an fp32 master copy of every router weight (the teacher may be fp16/bf16), its own
    AdamW (weight decay ``weight_decay``), gradient clipping at ``grad_clip``, and for fp16
    teachers a dynamic loss scale (torch GradScaler). Each ``step(loss_fn)``:

        L = loss_fn(teacher) + balance_coef * load_balance_loss + anchor * sum ||W - W0||^2

    where loss_fn runs the teacher forward (inside routing(teacher, "sar") with the master
    weights, train mode, activation checkpointing if ``checkpointing``) and returns a scalar,
    typically KL(p_teacher || q_student) with the student's logits detached. Then backward,
    clip, AdamW step, and the master weights are copied back into the teacher."""

    def __init__(self, teacher: nn.Module, lr: float = 1e-5, weight_decay: float = 0.01,
                 balance_coef: float = 0.01, anchor: float = 0.0, grad_clip: float = 1.0,
                 checkpointing: bool = True):
        layers = _layers(teacher)
        self.teacher, self.names = teacher, [l.name for l in layers]
        self.balance_coef, self.anchor, self.grad_clip = balance_coef, anchor, grad_clip
        self.checkpointing = checkpointing
        self.master = {l.name: nn.Parameter(l.gate.weight.detach().to(torch.float32).clone()) for l in layers}
        self.initial = {n: p.detach().clone() for n, p in self.master.items()}
        self.optimizer = torch.optim.AdamW(list(self.master.values()), lr=lr, weight_decay=weight_decay)
        w = layers[0].gate.weight
        self.scaler = torch.amp.GradScaler(w.device.type, enabled=w.dtype == torch.float16)

    def _sync_teacher(self) -> None:
        with torch.no_grad():
            for l in _layers(self.teacher):
                l.gate.weight.copy_(self.master[l.name])

    def step(self, loss_fn: Callable[[nn.Module], torch.Tensor],
             token_mask: torch.Tensor | None = None) -> dict[str, float]:
        """One router update; ``token_mask`` (the teacher batch's attention mask) keeps padding
        out of the balance loss and the telemetry. Returns {"kl": loss_fn value, "balance", "anchor", "loss",
        "grad_norm" (before clipping), "router_kl": mean KL(initial router || router before
        this update) on this batch, "entropy", "selected_mass", "skipped", "loss_scale"}."""
        params = list(self.master.values())
        with _router_step_mode(self.teacher, self.checkpointing), \
                routing(self.teacher, "sar", router_weights=self.master, reference_weights=self.initial) as r:
            r.set_token_mask(token_mask)
            kl = loss_fn(self.teacher)
            if not (isinstance(kl, torch.Tensor) and kl.dim() == 0 and kl.requires_grad):
                raise UserError("SARRouter.step: loss_fn must return a scalar tensor computed from a teacher "
                                "forward run inside loss_fn with gradients enabled (not under torch.no_grad)")
            balance = load_balance_loss(r)
            anchor = sum((p - self.initial[n]).pow(2).sum() for n, p in self.master.items())
            total = kl + self.balance_coef * balance + self.anchor * anchor
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()  # inside the context: checkpoint recompute re-routes
            summary = r.summary()
        _average_across_processes(params)
        self.scaler.unscale_(self.optimizer)
        clip = self.grad_clip if self.grad_clip and self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        finite = bool(torch.isfinite(grad_norm))
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips the update itself on inf/nan gradients
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        if finite:
            self._sync_teacher()
        return {"kl": float(kl.detach()), "balance": float(balance.detach()), "anchor": float(anchor.detach()),
                "loss": float(total.detach()), "grad_norm": float(grad_norm),
                "router_kl": summary.get("router_kl", 0.0), "entropy": summary.get("entropy", math.nan),
                "selected_mass": summary.get("selected_mass", math.nan), "skipped": not finite,
                "loss_scale": float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0}

    def state_dict(self) -> dict:
        """A snapshot (deep copies: the optimizer's own state_dict shares its live moment tensors)."""
        return {"names": list(self.names),
                "master": {n: p.detach().clone() for n, p in self.master.items()},
                "initial": {n: t.clone() for n, t in self.initial.items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("names", [])) != self.names:
            raise UserError("SAR router state was saved from a teacher with different MoE blocks "
                            f"({state.get('names')} vs {self.names}); resume with the same teacher")
        with torch.no_grad():
            for n, p in self.master.items():
                p.copy_(state["master"][n])
                self.initial[n].copy_(state["initial"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._sync_teacher()
