"""Peak memory of one distillation configuration, from the two model CONFIGS alone (``sakd plan``).

    p = plan(load_config("configs/huihui-moe-1b-to-smollm-135m.yaml"), card_gb=16)
    print(format_plan(p))

Nothing is downloaded or allocated: parameter counts come from instantiating each model on the
``meta`` device, every other term from the shapes below. For the real pair the two configs are
built in (``BUILTIN_CONFIGS``), so the plan works offline.

Notation: B micro-batch, Ls / Lt student / teacher tokens (data.seq_len / teacher_seq_len), h hidden,
hq = heads x head_dim, kvd = kv_heads x head_dim, I MLP width, a heads, k experts run per token,
V vocabulary, S = min(Vs, Vt) the shared vocabulary (upper bound), N = B x Ls rows of the logit loss
(upper bound: every student position in a 1:1 chunk), P parameters.

Activations saved for backward, per token and per decoder layer, in ELEMENTS (fp32 run). Derived by
walking the transformers 5.x Llama / Qwen3-MoE layer op by op (the method of Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", eq. 1: s·b·h·(34 + 5·a·s/h) bytes
for a GPT layer in fp16), then checked against autograd's saved tensors (saved_tensors_hooks): exact to the element for
Llama, within 0.1 % for Qwen3-MoE (a few per-expert scalars):

    residual stream (after attention, after MLP)        2h
    two RMSNorms (normalised input, weighted output)    4h  (+2 for the 1/rms scalars)
    q, k, v (after RoPE, k/v repeated to all heads), attention output   4hq
    Qwen3 q_norm / k_norm                               2hq + 2kvd (+ a + kv_heads)
    dense SwiGLU MLP: gate, silu(gate), up, product     4I
    MoE MLP, per expert run: gathered input, gate_up (2I), silu, product, weighted output
                                                        k (2h + 4I + 10)  (+ E router probabilities + 1;
                                                        the 10 and 1: routing indices (int64) and weights)
    attention: sdpa  saves its float mask row            Lmask (+ a log-sum-exps)
               eager saves the softmax row               a·L

Under 16-bit autocast (CUDA) the residual stream and the RMSNorms stay fp32, every linear layer
keeps its own 16-bit copy of its input, and the rest is 16-bit (``_layer_bytes``). Outside the
layers: final norm + lm_head input (3h fp32) and the boolean causal mask (L bytes) per token.
Gradient checkpointing keeps each layer's input (h, fp32) and recomputes one layer at a time.

Peak = persistent (weights, AdamW states) + the largest of these MOMENTS (what is alive at once,
following the order in which ``objective.micro_step_loss`` builds and autograd frees each buffer)
+ on CUDA the context and an allocator margin:
  teacher_pass     a teacher forward ends (KA: the previous pass's logits still referenced)
  loss_forward     activations, both logits, KD rows of every pass, one loss term's temporaries
  loss_backward    backward runs the terms newest first (CE, ALM, KD); earlier logits gradients wait
  layers_backward  the logits gradient meets lm_head; checkpointing recomputes one layer
  optimizer        every gradient (+ one parameter-sized foreach temporary on CUDA)
  router           SAR: the teacher WITH gradient (checkpointed) through all its layers
  fp32_recompute   a 16-bit teacher overflowed: its pass again in fp32, one module's weights at a time
  teacher_eval / student_eval   held-out bits per byte (full-vocabulary log-probs, no grad)
On CPU (fp32) the estimate was checked against the measured RSS growth of a real step
(tests/test_plan.py; 0.98-1.05 x the measured growth on ten configurations, 1.07 x for evaluation).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sakd.config import Config
from sakd.errors import UserError
from sakd.data.text import teacher_seq_len
from sakd.train.heads import fused_head_terms, teacher_head_use

GiB = 2**30

# Offline copies of the real pair's config.json (transformers keys). Huihui-MoE-1B-A0.6B: GGUF metadata
# of the published model (qwen3moe: 28 blocks, embedding 1024, 16 heads, 8 kv heads, key length 128,
# 3 experts, 1 used, expert feed-forward 3072, vocab 151,936); its 1.28B parameters imply an untied head.
BUILTIN_CONFIGS = {
    "huihui-ai/Huihui-MoE-1B-A0.6B": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=1024, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
        moe_intermediate_size=3072, num_experts=3, num_experts_per_tok=1, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6),
    "HuggingFaceTB/SmolLM-135M": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True, max_position_embeddings=2048,
        rope_theta=10000.0, rms_norm_eps=1e-5),
}
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS workspace (typ. 0.3-0.5 GiB), outside torch's count
ALLOCATOR_MARGIN = 0.10             # caching-allocator fragmentation, as a fraction of the transient peak


# ----------------------------------------------------------------------------- model shapes

def load_model_config(name: str, role: str):
    """(transformers config, where it came from): a local folder / cached hub id, else the built-in table."""
    from transformers import AutoConfig, CONFIG_MAPPING

    from sakd.models.load import looks_local

    if looks_local(name) and not (Path(name).expanduser() / "config.json").is_file():
        raise UserError(f"model.{role}={name!r}: no config.json there; give a model folder or a hub id")
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True), "config.json"
    except (OSError, ValueError):
        pass
    if name in BUILTIN_CONFIGS:
        kw = dict(BUILTIN_CONFIGS[name])
        return CONFIG_MAPPING[kw.pop("model_type")](**kw), "built-in table"
    try:
        return AutoConfig.from_pretrained(name), "hub"
    except (OSError, ValueError) as e:
        raise UserError(f"model.{role}={name!r}: cannot read its config ({str(e).splitlines()[0][:120]}); "
                        "give a local folder with config.json") from None


def count_parameters(config) -> int:
    """Unique parameters (tied embeddings once) of the model a config describes, built on ``meta``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def model_shape(config, experts_run: int | None = None) -> dict:
    """The dimensions the activation formulas need (``experts_run``: MoE experts computed per token)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    experts = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None) or 0
    active = getattr(c, "num_experts_per_tok", 0) or 0
    return {
        "vocab": c.vocab_size, "hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": heads,
        "kv_heads": kv, "head_dim": head_dim, "hq": heads * head_dim, "kvd": kv * head_dim,
        "intermediate": c.intermediate_size, "moe_intermediate": getattr(c, "moe_intermediate_size", None)
        or c.intermediate_size, "experts": experts, "active": active,
        "experts_run": (experts_run or active) if experts else 0,
        "qk_norm": c.model_type.startswith("qwen3"), "tied": bool(getattr(c, "tie_word_embeddings", False)),
        "model_type": c.model_type,
    }


# ----------------------------------------------------------------------------- activation formulas

def _layer_bytes(s: dict, seq: int, *, half: bool, eager: bool, experts_run: int | None = None) -> float:
    """Bytes saved for backward per token by one decoder layer (see the module docstring)."""
    h, hq, kvd, a = s["hidden"], s["hq"], s["kvd"], s["heads"]
    k = s["experts_run"] if experts_run is None else experts_run
    if not half:  # fp32: counted in elements, x 4
        e = 6 * h + 2 + 4 * hq
        if s["qk_norm"]:
            e += 2 * hq + 2 * kvd + a + s["kv_heads"]
        e += k * (2 * h + 4 * s["moe_intermediate"] + 10) + s["experts"] + 1 if s["experts"] else 4 * s["intermediate"]
        e += a * seq if eager else seq + a
        return 4.0 * e
    # 16-bit autocast: fp32 residual (2h) and norms (4h); 16-bit copies of each linear's input
    # (q, k, v: 3h; gate, up or router + expert gathers); 16-bit q, k, v, output (4hq).
    b = 4 * (6 * h) + 2 * (3 * h) + 2 * (4 * hq)
    if s["qk_norm"]:
        b += 10 * (hq + kvd)  # fp32 upcast + normalised (4 + 4) and the 16-bit result (2)
    if s["experts"]:
        b += 2 * h + 2 * k * (2 * h + 4 * s["moe_intermediate"]) + 4 * (10 * k + s["experts"] + 1)
    else:
        b += 2 * (2 * h) + 2 * (4 * s["intermediate"])
    b += 6 * a * seq if eager else 2 * seq + 4 * a  # eager: fp32 softmax + its 16-bit copy
    return float(b)


def activation_bytes(s: dict, tokens: int, seq: int, *, half: bool, eager: bool, checkpointing: bool,
                     experts_run: int | None = None) -> float:
    """Activations saved by a forward with gradient: every layer, or (checkpointing) every layer's
    input plus one layer being recomputed; plus the final norm / lm_head input and the causal mask."""
    per_layer = _layer_bytes(s, seq, half=half, eager=eager, experts_run=experts_run)
    outside = 4 * 3 * s["hidden"] + (2 * s["hidden"] if half else 0) + seq
    if checkpointing:
        return tokens * (s["layers"] * 4 * s["hidden"] + per_layer + outside)
    return tokens * (s["layers"] * per_layer + outside)


# ----------------------------------------------------------------------------- the plan

def _experts_run(cfg: Config, shape: dict) -> int:
    """MoE experts the teacher computes per token in the student step (KA default: E - 1, as in the paper)."""
    if not shape["experts"]:
        return 0
    mode = cfg.moe.mode
    if mode in ("all", "sar"):
        return shape["experts"]
    if mode == "ka":
        return cfg.moe.experts_start or max(shape["active"], shape["experts"] - 1)
    return shape["active"]


KERNEL_TEMPORARIES = {"forward_kl": 3.25, "reverse_kl": 3.25, "jsd": 7.0, "tvd": 5.0}  # fp32 [chunk, S] each


def _teacher_head_use(cfg: Config) -> str | None:
    """heads.teacher_head_use for this configuration's terms (None with a teacher cache)."""
    if cfg.model.teacher_cache or cfg.model.teacher_device_map is not None:  # a mapped teacher runs whole
        return None
    return teacher_head_use(cfg.loss, cfg.loss.active_terms())


class _Step:
    """The quantities every memory term of one micro-batch reads (``_components``)."""

    def __init__(self, cfg: Config, t: dict, s: dict, B: int, device: str, processes: int = 1):
        lc, cuda = cfg.loss, device == "cuda"
        self.shards = processes if cfg.train.distributed == "fsdp" else 1  # FSDP: the student split N ways
        self.cfg, self.t, self.s, self.B, self.cuda = cfg, t, s, B, cuda
        self.half = cuda and cfg.train.precision != "fp32"     # autocast fp16/bf16 on CUDA, fp32 on CPU
        self.ab = 2 if self.half else 4                        # student activation / logits bytes
        self.tb = {"float16": 2, "bfloat16": 2, "float32": 4}.get(cfg.model.teacher_dtype, 2 if cuda else 4)
        self.Ls, self.Lt = cfg.data.seq_len, teacher_seq_len(cfg)
        self.Vs, self.Vt, self.S = s["vocab"], t["vocab"], min(s["vocab"], t["vocab"])
        self.N, self.rows = B * self.Ls, min(lc.chunk_rows, B * self.Ls)  # rows: one row block of the loss
        self.H = s["hidden"]
        self.terms = lc.active_terms()
        self.eager = "attention" in self.terms
        self.ckpt = cfg.model.gradient_checkpointing
        self.passes = cfg.moe.ka_samples if cfg.moe.mode == "ka" else 1
        self.kd, self.ce, self.alm = "kd" in self.terms, "ce" in self.terms, "chunk" in self.terms
        self.kernel = KERNEL_TEMPORARIES.get(lc.divergence, 7.0)
        self.cached = bool(cfg.model.teacher_cache)  # teacher read from a top-k cache: never loaded, never run
        self.topk = _cache_k(cfg.model.teacher_cache) if self.cached else 0
        # the model-side conditions of heads.fused_head_weight (a bias-free head, no logit scaling) hold
        # for Llama and Qwen
        self.fused = fused_head_terms(lc, kd=self.kd, chunk=self.alm)
        # a LoRA student's output layer is frozen (config.py refuses lm_head as a target with the fused head;
        # without it the adapter trains, not the weight): no [V, H] gradient of it exists on either path
        self.head_grad = cfg.model.student_lora.r is None
        self.use = _teacher_head_use(cfg)
        self.t_shared = self.use == "shared"
        self.t_logits_full = B * self.Lt * self.Vt * self.tb


def _persistent_terms(z: _Step, c: dict) -> None:
    """Weights and optimizer states."""
    t, s = z.t, z.s
    # model.teacher_device_map: only what the map leaves on the card (sakd.models.placement.bytes_on_card)
    c["teacher_weights"] = 0 if z.cached else t.get("weights_on_card", t["params"] * z.tb)
    # a LoRA student: the frozen base once, its adapters beside it; only the adapters have AdamW states
    c["student_weights"] = (s["params"] + s["lora_params"]) * 4 / z.shards
    c["optimizer_states"] = 2 * 4 * (s["trainable"] / z.shards + s["aux_params"]) # AdamW exp_avg + exp_avg_sq, fp32
    if z.shards > 1:
        # FSDP2 units gathered in full at once (fp32): the output layer + final norm (+ tied embeddings), kept
        # from the forward to the backward, and two decoder layers (the one running, the one prefetched)
        head = s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)
        c["fsdp_gathered_units"] = 4 * (head + 2 * (s["params"] - head) / s["layers"])
    if z.cfg.moe.mode == "sar":  # fp32 master + initial copy + AdamW (2) per router weight
        c["sar_router_state"] = 4 * 4 * t["layers"] * t["experts"] * t["hidden"]


def _student_terms(z: _Step, c: dict) -> None:
    """The student's gradients, activations and logits (every forward runs with use_cache=False: no KV cache)."""
    s, B, Ls = z.s, z.B, z.Ls
    c["student_gradients"] = 4 * (s["trainable"] / z.shards + s["aux_params"])
    act = activation_bytes(s, B * Ls, Ls, half=z.half, eager=z.eager, checkpointing=z.ckpt)
    one_layer = B * Ls * _layer_bytes(s, Ls, half=z.half, eager=z.eager)
    c["student_activations"] = act
    c["student_activations_other"] = activation_bytes(s, B * Ls, Ls, half=z.half, eager=z.eager,
                                                      checkpointing=not z.ckpt)
    z.act = act
    z.act_saved = act - one_layer if z.ckpt else act   # checkpointing: the recomputed layer exists only in backward
    # fused output layer (loss.fused_head): the model computes logits for one position only; the losses
    # take the final hidden state and the head weight, and return gradients of those: [N, H] + [Vs, H].
    c["student_logits"] = B * (1 if z.fused else Ls) * z.Vs * z.ab
    c["student_logits_grad"] = 0 if z.fused else B * Ls * z.Vs * z.ab


def _teacher_terms(z: _Step, c: dict) -> None:
    """The teacher's head copy, logits, forward temporaries, hidden states and attention maps."""
    t, B, Lt, tb = z.t, z.B, z.Lt, z.tb
    # fused teacher head (heads.teacher_head): where shared_kl alone reads the teacher's logits, only the
    # shared columns are computed ([B, Lt, S]), from a gathered copy of the head's shared rows ([S, H])
    c["teacher_head_shared"] = z.S * t["hidden"] * tb if z.t_shared else 0
    # "rows" (mapped_kl): the last hidden state [B, Lt, H] instead; the loss multiplies out a row block's rows
    c["teacher_logits"] = B * Lt * {"shared": z.S, "rows": t["hidden"]}.get(z.use, z.Vt) * tb
    c["teacher_forward"] = B * Lt * tb * (4 * t["hidden"] + 2 * t["hq"] + 2 * t["kvd"]
                                          + 3 * (t["moe_intermediate"] if t["experts"] else t["intermediate"])) \
        + B * Lt * Lt + t.get("offloaded_block", 0)  # an offloaded block's weights, on the card for its forward
    if z.cached:  # the decoded cache batch instead: top-k ids (int64) and log-probs (fp32) per teacher position
        c["teacher_logits"] = B * Lt * (z.topk * 12 + 16)
        c["teacher_forward"] = 0
    need_hidden = bool({"hidden", "contrastive"} & z.terms)
    c["teacher_hidden_states"] = (t["layers"] + 1) * B * Lt * t["hidden"] * tb if need_hidden else 0
    c["teacher_attention_maps"] = t["layers"] * B * t["heads"] * Lt * Lt * tb if z.eager else 0


def _kd_terms(z: _Step, c: dict) -> None:
    """KD (sakd.losses.row_blocks): the gradient is computed in the forward pass, one row block at a time,
    and held until backward: one buffer of the student logits' shape per KA pass (fused: [N, H] + [S, H]
    fp32, and the [S, H] gathered head; a frozen head, LoRA's: no [S, H] gradient). Each row block holds
    `kernel` fp32 [rows, S] temporaries plus its gathered rows; the teacher-mass-outside log (forward, no
    grad) holds ~[rows, 2 Vt + S]."""
    B, Ls, S, Vs, Vt, H, rows, kd, lc = z.B, z.Ls, z.S, z.Vs, z.Vt, z.H, z.rows, z.kd, z.cfg.loss
    head_grad = B * Ls * H * z.ab + (2 if z.head_grad else 1) * S * H * 4  # dh, the gathered rows [, their gradient]
    c["kd_grad_buffers"] = z.passes * (head_grad if z.fused else B * Ls * Vs * z.ab) if kd else 0
    gathered = (S if z.t_shared else Vt) * z.tb + (0 if z.fused else Vs * z.ab)
    c["kd_chunk_temporaries"] = rows * 4 * max(z.kernel * S, 2 * Vt + S) + rows * gathered if kd else 0
    if kd and lc.logit in ("mapped_kl", "projected_kl"):  # projected_kl: the same buffers, plus its bucket sums
        # mapped_kl (sakd.losses.mapped): per row block, the teacher rows' logits and probabilities ([rows, Vt]
        # fp32, two buffers), the target Q and its log ([rows, Vs + 1] fp32, two) and the forward-KL
        # kernel's student temporaries ([rows, Vs], three); no [rows, S] gathers
        c["kd_chunk_temporaries"] = rows * 4 * (2 * Vt + 5 * Vs) + rows * (Vt * z.tb + (0 if z.fused else Vs * z.ab))
    if kd and z.cached:  # sparse teacher: the [N, Vs] student gradient, [rows, Vs] kernel temporaries
        c["kd_grad_buffers"] = B * Ls * Vs * z.ab
        c["kd_chunk_temporaries"] = rows * 4 * 4 * Vs + z.N * S * z.ab
    if kd and lc.gap_weighting:
        c["kd_chunk_temporaries"] += 4 * z.N * S * 4


def _ce_and_alm_terms(z: _Step, c: dict) -> None:
    """Cross-entropy. Logits path: forward, a contiguous fp32 copy of the shifted logits and the saved
    log-probs; backward, the saved log-probs and the nll_loss and log_softmax gradients ([N, Vs] fp32).
    Fused: its gradient buffers ([N, H] + [Vs, H] fp32; a frozen head, LoRA's: [N, H] only) and two fp32
    [rows, Vs] temporaries. Then the chunk-likelihood (ALM) term's temporaries."""
    B, Ls, Vs, H, ce = z.B, z.Ls, z.Vs, z.H, z.ce
    if z.fused:
        w_grad = Vs * H * 4 if z.head_grad else 0
        c["ce_buffers_forward"] = B * Ls * H * z.ab + w_grad + 2 * z.rows * Vs * 4 if ce else 0
        c["ce_buffers_backward"] = B * Ls * H * z.ab + w_grad if ce else 0
    else:
        c["ce_buffers_forward"] = 2 * z.N * Vs * 4 if ce else 0
        c["ce_buffers_backward"] = 3 * z.N * Vs * 4 if ce else 0
    c["alm_chunk_temporaries"] = 3 * z.rows * max(Vs, z.Vt) * 4 if z.alm else 0


def _step_moments(z: _Step, c: dict) -> dict:
    """The moments of the step, in the order in which the objective builds, and autograd frees, each buffer."""
    fused, passes = z.fused, z.passes
    # with accumulation, the gradients of the earlier micro-batches are alive in every later one
    held_grads = c["student_gradients"] if z.cfg.train.grad_accum > 1 else 0
    base = held_grads + z.act_saved + c["student_logits"] + c["teacher_hidden_states"] + c["teacher_attention_maps"]
    per_pass = c["kd_grad_buffers"] / passes
    m = {}
    # a teacher pass ends: under KA the previous pass's logits and KD gradient are still referenced
    m["teacher_pass"] = base + min(2, passes) * c["teacher_logits"] + (passes - 1) * per_pass + c["teacher_forward"]
    # the loss terms in order (KD of every pass, ALM, CE), each with its temporaries while it runs
    m["loss_forward"] = base + c["teacher_logits"] + max(
        c["kd_grad_buffers"] + c["kd_chunk_temporaries"] if z.kd else 0,
        c["kd_grad_buffers"] + c["alm_chunk_temporaries"],
        c["kd_grad_buffers"] + c["ce_buffers_forward"])
    # backward: CE's own buffers (newest first), the KD gradients are scaled in place, and everything
    # meets in the student logits' gradient (logits path); ALM saves the logits until its own backward
    alm_b = (c["student_logits"] + c["student_logits_grad"] + c["alm_chunk_temporaries"]) if z.alm else 0
    m["loss_backward"] = held_grads + z.act_saved + c["kd_grad_buffers"] + max(
        c["ce_buffers_backward"] + (0 if fused else c["student_logits_grad"]) if z.ce else 0, alm_b,
        c["student_logits_grad"])
    # the layers' backward: the logits gradient (or, fused, the [N, H] one) meets lm_head (its weight's
    # gradient: a trained head only)
    m["layers_backward"] = held_grads + z.act + (c["student_logits_grad"] if not fused else z.B * z.Ls * z.H * z.ab) \
        + (4 * z.Vs * z.H if z.head_grad else 0)
    # optimizer step: every gradient; foreach AdamW (CUDA) holds about one parameter-sized temporary
    m["optimizer"] = c["student_gradients"] * (2 if z.cuda else 1)
    return m


def _router_term(z: _Step, c: dict, m: dict) -> None:
    """moe.mode=sar's router step: student logits (no grad, fp32), teacher WITH grad, checkpointed by SARRouter."""
    t, B, Lt, tb = z.t, z.B, z.Lt, z.tb
    router = 0.0
    if z.cfg.moe.mode == "sar":
        t_layer = B * Lt * _layer_bytes(t, Lt, half=tb == 2, eager=False, experts_run=t["experts"])
        t_saved = activation_bytes(t, B * Lt, Lt, half=tb == 2, eager=False, checkpointing=True) - t_layer
        # the KD gradient w.r.t. the teacher logits is computed in the loss forward (a logits-sized buffer)
        router = B * z.Ls * z.Vs * 4 + t_saved + max(2 * z.t_logits_full + c["kd_chunk_temporaries"],
                                                      2 * z.t_logits_full + t_layer)  # the full teacher head, with grad
    c["sar_router_step"] = m["router"] = router


def _fp32_recompute_term(z: _Step, c: dict, m: dict) -> None:
    """fp16 overflow in the teacher (train.nonfinite_teacher=recompute): the micro-batch's teacher pass runs
    again in fp32, one module's weights at a time (models.fp32_forward), with the 16-bit outputs dropped first;
    the loss terms then read fp32 teacher logits and hidden states. On top of the loss forward: the
    logits and hidden states a second time (4 instead of 2 bytes) and the largest module in fp32 (the
    embeddings or the head, Vt x h; the experts of one layer if larger)."""
    t = z.t
    c["fp32_recompute"] = 0
    if z.tb == 2 and not z.cached and z.cfg.train.nonfinite_teacher == "recompute":
        largest = max(z.Vt * t["hidden"], (t["experts"] or 1) * 3 * t["moe_intermediate"] * t["hidden"])
        c["fp32_recompute"] = c["teacher_logits"] + c["teacher_hidden_states"] + 4 * largest
        m["fp32_recompute"] = m["loss_forward"] + c["fp32_recompute"]


def _eval_terms(z: _Step, c: dict, m: dict) -> None:
    """Held-out bits per byte (evaluate.nll_bits, no grad, no KV cache): the logits of eval.batch_size x
    eval.seq_len tokens in the model's dtype, then one window at a time its fp32 copy (16-bit models)
    and logsumexp's fp32 temporary. The teacher is scored once, before the optimizer states exist
    (hence their subtraction: this moment is added to them)."""
    Be, Le, Vt, Vs, tb = z.cfg.eval.batch_size, z.cfg.eval.seq_len, z.Vt, z.Vs, z.tb
    t_eval = Be * Le * Vt * tb + Le * Vt * (4 + (4 if tb != 4 else 0))
    c["teacher_eval"] = 0 if z.cached else t_eval
    c["student_eval"] = Be * Le * Vs * 4 + Le * Vs * 4
    m["teacher_eval"] = max(0.0, c["teacher_eval"] - c["optimizer_states"])
    m["student_eval"] = c["student_eval"]


def _components(cfg: Config, t: dict, s: dict, B: int, *, device: str, processes: int = 1) -> tuple[dict, dict]:
    """(components in bytes, moment totals) at micro-batch B. The moments follow the order in which
    ``objective.micro_step_loss`` builds, and autograd frees, each buffer."""
    z, c = _Step(cfg, t, s, B, device, processes), {}
    _persistent_terms(z, c)
    _student_terms(z, c)
    _teacher_terms(z, c)
    _kd_terms(z, c)
    _ce_and_alm_terms(z, c)
    m = _step_moments(z, c)
    _router_term(z, c, m)
    _fp32_recompute_term(z, c, m)
    _eval_terms(z, c, m)
    return c, m


def _cache_k(folder: str) -> int:
    """k of a teacher cache (its manifest), 64 (the cache-teacher default) before it is built."""
    import json

    try:
        return int(json.loads((Path(folder) / "manifest.json").read_text())["k"])
    except (OSError, ValueError, KeyError, TypeError):
        return 64


PERSISTENT = ("teacher_weights", "student_weights", "optimizer_states", "sar_router_state", "teacher_head_shared",
              "fsdp_gathered_units")


def _totals(cfg, t, s, B, device, processes: int = 1) -> dict:
    c, moments = _components(cfg, t, s, B, device=device, processes=processes)
    persistent = sum(c.get(k, 0) for k in PERSISTENT)
    transient = max(moments.values())
    overhead = (CUDA_CONTEXT_BYTES + ALLOCATOR_MARGIN * transient) if device == "cuda" else 0.0
    return {"components": c, "moments": moments, "persistent": persistent, "transient": transient,
            "overhead": overhead, "peak": persistent + transient + overhead}


def plan(cfg: Config, *, card_gb: float = 16.0, micro_batch: int | None = None, device: str = "cuda",
         processes: int = 1) -> dict:
    """Estimate the peak memory of ``sakd distill`` with ``cfg`` on one ``device`` ("cuda" or "cpu"), for one
    of ``processes`` processes (with ``train.distributed=fsdp`` the student's weights, gradients and AdamW
    states are divided by it; under DDP every process holds them whole).

    Returns a dict: ``components`` (bytes of every term at the micro-batch), ``phases`` (forward,
    backward, router totals), ``persistent_bytes``, ``transient_bytes`` (the largest phase),
    ``overhead_bytes`` (CUDA context + allocator margin), ``peak_bytes``, ``card_bytes``, ``fits``,
    ``max_micro_batch`` (largest micro-batch whose peak fits ``card_gb`` GiB; 0 if none), the two
    models' shapes and parameter counts, and the assumptions."""
    if device not in ("cuda", "cpu"):
        raise UserError(f"plan device {device!r}: use cuda or cpu")
    if not card_gb > 0:
        raise UserError(f"--card-gb {card_gb}: must be > 0 (GiB of the accelerator)")
    if processes < 1:
        raise UserError(f"--processes {processes}: must be >= 1 (processes, one per GPU)")
    B = int(micro_batch or cfg.train.batch_size)
    if B < 1:
        raise UserError(f"micro_batch {B}: must be >= 1")
    t_cfg, t_src = load_model_config(cfg.model.teacher, "teacher")
    s_cfg, s_src = load_model_config(cfg.model.student, "student")
    t = model_shape(t_cfg)
    t["experts_run"] = _experts_run(cfg, t)
    s = model_shape(s_cfg)
    t["params"], s["params"] = count_parameters(t_cfg), count_parameters(s_cfg)
    t["source"], s["source"] = t_src, s_src
    s["aux_params"] = _aux_parameters(cfg, s_cfg, t_cfg)
    s["lora_params"] = _lora_parameters(cfg, s_cfg)
    s["trainable"] = s["lora_params"] if cfg.model.student_lora.r is not None else s["params"]
    m = cfg.model
    if m.teacher_device_map is not None and not m.teacher_cache:
        from sakd.models.placement import bytes_on_card
        tb = {"float16": 2, "bfloat16": 2, "float32": 4}.get(m.teacher_dtype, 2 if device == "cuda" else 4)
        placed = bytes_on_card(t_cfg, m.teacher_device_map, m.teacher_max_memory, tb, card_gb * GiB)
        t["weights_on_card"], t["offloaded_block"] = placed["on_card"], placed["offloaded_block"]
        t["weights_total"] = placed["total"]
    tot = _totals(cfg, t, s, B, device, processes)
    card = card_gb * GiB
    max_b, lo = 0, 1
    if _totals(cfg, t, s, 1, device, processes)["peak"] <= card:  # peak grows with B: double, then bisect
        hi = 2
        while hi <= 65536 and _totals(cfg, t, s, hi, device, processes)["peak"] <= card:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _totals(cfg, t, s, mid, device, processes)["peak"] <= card else (lo, mid)
        max_b = lo
    half = device == "cuda" and cfg.train.precision != "fp32"
    return {
        "device": device, "micro_batch": B, "grad_accum": cfg.train.grad_accum,
        "processes": processes, "student_shards": processes if cfg.train.distributed == "fsdp" else 1,
        "seq_len": cfg.data.seq_len, "teacher_seq_len": teacher_seq_len(cfg),
        "activation_dtype": "16-bit autocast" if half else "float32",
        "teacher_dtype": cfg.model.teacher_dtype, "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "moe_mode": cfg.moe.mode, "teacher_cache": cfg.model.teacher_cache, "teacher": t, "student": s,
        "teacher_head": _teacher_head_use(cfg), "teacher_device_map": m.teacher_device_map,
        "fused_head": fused_head_terms(cfg.loss, kd="kd" in cfg.loss.active_terms(),
                                       chunk="chunk" in cfg.loss.active_terms()),
        "components": {k: int(v) for k, v in tot["components"].items()},
        "moments": {k: int(v) for k, v in tot["moments"].items()},
        "persistent_bytes": int(tot["persistent"]), "transient_bytes": int(tot["transient"]),
        "overhead_bytes": int(tot["overhead"]), "peak_bytes": int(tot["peak"]),
        "card_bytes": int(card), "fits": tot["peak"] <= card, "max_micro_batch": max_b,
        "assumptions": [
            "every student position is a 1:1 chunk and the shared vocabulary is min(Vs, Vt) (upper bounds)",
            "gradients counted in full at the backward peak (upper bound)",
            f"CUDA context {CUDA_CONTEXT_BYTES / GiB:.1f} GiB and allocator margin {ALLOCATOR_MARGIN:.0%} "
            "of the transient peak (cuda only)",
            "activation formulas checked against autograd on CPU fp32; the 16-bit variant is derived, not measured",
            "a 16-bit teacher may overflow at any step: its fp32 recompute counts (train.nonfinite_teacher=skip "
            "drops that moment)",
        ] + (["a LoRA student: activations counted as for full training; the adapters' own (r-wide "
              "intermediates, dropout copies of their inputs) are not"] if s["lora_params"] else []),
    }


def _lora_parameters(cfg: Config, s_cfg) -> int:
    """Parameters of the student's LoRA adapters (``model.student_lora``; 0 when off), on ``meta``."""
    from transformers import AutoModelForCausalLM

    from sakd.models.lora import check_targets, lora_parameter_count

    lo = cfg.model.student_lora
    if lo.r is None:
        return 0
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(s_cfg)
    check_targets(model, lo.target_modules)
    return lora_parameter_count(model, lo.r, lo.target_modules)


def _aux_parameters(cfg: Config, s_cfg, t_cfg) -> int:
    from sakd.train.objective import build_aux_modules

    with torch.device("meta"):
        aux = build_aux_modules(cfg, s_cfg.get_text_config(), t_cfg.get_text_config())
    return sum(p.numel() for p in aux.parameters())


# ----------------------------------------------------------------------------- the table

MOMENTS = [("teacher_pass", "moment: a teacher pass ends"), ("loss_forward", "moment: loss forward"),
           ("loss_backward", "moment: loss backward"), ("layers_backward", "moment: layers backward"),
           ("optimizer", "moment: optimizer step"), ("router", "moment: SAR router step"),
           ("fp32_recompute", "moment: fp16 overflow, fp32 recompute"),
           ("teacher_eval", "moment: teacher held-out evaluation"), ("student_eval", "moment: student evaluation")]

ROWS = [  # (component, phase it counts in, label)
    ("teacher_weights", "persistent", "teacher weights"),
    ("student_weights", "persistent", "student weights (fp32)"),
    ("fsdp_gathered_units", "persistent", "FSDP units gathered in full (fp32)"),
    ("optimizer_states", "persistent", "AdamW states (2 x fp32)"),
    ("sar_router_state", "persistent", "SAR router master + AdamW"),
    ("teacher_head_shared", "persistent", "teacher output layer, shared rows"),
    ("student_gradients", "backward", "student gradients (fp32)"),
    ("student_activations", "fwd+bwd", "student activations"),
    ("student_activations_other", "-", "  (same with checkpointing {other})"),
    ("student_logits", "forward", "student logits [B, Ls, Vs]"),
    ("student_logits_grad", "backward", "gradient of the student logits"),
    ("teacher_logits", "forward", "teacher logits [B, Lt, Vt]"),
    ("teacher_forward", "forward", "teacher forward, one layer"),
    ("teacher_hidden_states", "forward", "teacher hidden states"),
    ("teacher_attention_maps", "forward", "teacher attention maps (eager)"),
    ("kd_grad_buffers", "fwd+bwd", "KD gradients (from the forward pass)"),
    ("kd_chunk_temporaries", "fwd+bwd", "KD chunk temporaries"),
    ("ce_buffers_forward", "forward", "cross-entropy buffers, forward"),
    ("ce_buffers_backward", "backward", "cross-entropy buffers, backward"),
    ("alm_chunk_temporaries", "fwd+bwd", "ALM chunk temporaries"),
    ("sar_router_step", "router", "SAR router step (whole)"),
    ("fp32_recompute", "recompute", "fp32 recompute of an overflowing pass"),
    ("teacher_eval", "teacher eval", "teacher held-out scoring buffers"),
    ("student_eval", "student eval", "student held-out scoring buffers"),
]


def gib(x: float) -> str:
    return f"{x / GiB:8.3f}"


def format_plan(p: dict) -> str:
    """A readable table (GiB) of ``plan()``'s result."""
    t, s, c = p["teacher"], p["student"], p["components"]
    lines = [
        f"teacher: {t['model_type']}, {t['params'] / 1e6:,.1f}M parameters ({t['source']}), {t['layers']} layers, "
        f"hidden {t['hidden']}, vocab {t['vocab']:,}"
        + (f", {t['experts']} experts ({t['experts_run']} run per token)" if t["experts"] else ""),
        f"student: {s['model_type']}, {s['params'] / 1e6:,.1f}M parameters ({s['source']}), {s['layers']} layers, "
        f"hidden {s['hidden']}, vocab {s['vocab']:,}"
        + (f", LoRA: {s['lora_params'] / 1e6:,.2f}M trainable (frozen base)" if s["lora_params"] else ""),
        *([f"model.teacher_device_map={p['teacher_device_map']!r}: {t['weights_on_card'] / GiB:.2f} of "
           f"{t['weights_total'] / GiB:.2f} GiB of teacher weights on the card; the largest offloaded block "
           f"({t['offloaded_block'] / GiB:.2f} GiB) comes onto it for its forward"] if "weights_on_card" in t else []),
        f"device {p['device']}, activations {p['activation_dtype']}, teacher dtype {p['teacher_dtype']}, "
        f"micro-batch {p['micro_batch']} x {p['seq_len']} student / {p['teacher_seq_len']} teacher tokens, "
        f"gradient checkpointing {'on' if p['gradient_checkpointing'] else 'off'}, moe.mode {p['moe_mode']}, "
        f"fused output layer {'on' if p['fused_head'] else 'off'}",
        *([f"per process of {p['processes']}: the student's weights, gradients and AdamW states sharded "
           f"{p['student_shards']} ways (FSDP2), the teacher whole on each"] if p.get("student_shards", 1) > 1
          else [f"per process of {p['processes']} (DDP: each holds the whole student and teacher)"]
          if p.get("processes", 1) > 1 else []),
        "",
        f"{'component':<40}{'GiB':>9}  alive in",
    ]
    other = "off" if p["gradient_checkpointing"] else "on"
    for key, phase, label in ROWS:
        if key == "teacher_logits" and p.get("teacher_cache"):
            label = "teacher cache batch (top-k)"
        elif key == "teacher_logits" and p.get("teacher_head") == "shared":
            label = "teacher logits [B, Lt, S] (fused head)"
        elif key == "teacher_logits" and p.get("teacher_head") == "rows":
            label = "teacher last hidden state (fused head)"
        if key == "teacher_weights" and "weights_on_card" in t:
            label = "teacher weights left on the card (map)"
        if key == "student_logits" and p.get("fused_head"):
            label = "student logits, last position (fused head)"
        if key in c and (c[key] or key in PERSISTENT[:3]):
            lines.append(f"{label.format(other=other):<40}{gib(c[key])}  {phase}")
    ph = p["moments"]
    lines += [
        "",
        f"{'persistent (weights + optimizer)':<40}{gib(p['persistent_bytes'])}",
    ]
    for key, label in MOMENTS:
        if ph.get(key):
            lines.append(f"{label:<40}{gib(ph[key])}" + ("  <- peak" if ph[key] == max(ph.values()) else ""))
    if p["overhead_bytes"]:
        lines.append(f"{'CUDA context + allocator margin':<40}{gib(p['overhead_bytes'])}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines += [
        f"{'estimated peak':<40}{gib(p['peak_bytes'])}  {verdict} in {p['card_bytes'] / GiB:g} GiB",
        f"largest micro-batch that fits: {p['max_micro_batch']}"
        + (f" (then raise train.grad_accum to keep {p['micro_batch'] * p['grad_accum']} examples per step)"
           if p["max_micro_batch"] and p["max_micro_batch"] < p["micro_batch"] else ""),
    ]
    return "\n".join(lines)
