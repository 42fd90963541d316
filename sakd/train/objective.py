"""The distillation objective of one micro-batch: every loss term as a sum, normalised by
the step's global target count (computed before any forward, from the batch metadata).

Terms (each optional, weights from ``cfg.loss``):
  kd          logit transfer (shared_kl at 1:1 chunks, mapped_kl / projected_kl at every position, or a named
              baseline), x T^2; whatever the method, divided by the step's count of student target tokens
              (cross-entropy's count), so that loss.kd_weight means the same for every method
  ce          cross-entropy on the student's own next tokens
  chunk       chunk-likelihood (ALM) on multi-token chunks
  hidden      projected hidden states at chunk ends
  attention   chunk x chunk attention rows
  contrastive InfoNCE between pooled student and projected teacher states (per example)

The same step with the teacher read from a cache is ``cached_step.cached_step_loss``; the pieces both share
(the cross-entropy term, the KD term's split by position kind) are in ``terms.py``.
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from sakd.models import moe
from sakd.config import TEACHER_TERMS, Config
from sakd.errors import UserError
from sakd.losses.attention import attention_transfer_loss
from sakd.losses.contrastive import info_nce, mean_pool
from sakd.losses.batch import one_to_one, one_to_one_positions
from sakd.losses.baselines import gold_chunk_rows, gold_hybrid_loss, truncation_kd, uld_loss
from sakd.losses.crosstok import chunk_likelihood_loss, shared_vocab_kd, teacher_mass_outside
from sakd.losses.hidden import HiddenProjector, hidden_state_loss, layer_map
from sakd.losses.mapped import mapped_kd
from sakd.losses.projected import projected_kd
from sakd.data.chat import model_inputs  # chat data: packed rows give position ids instead of a 2-D mask
from sakd.models.load import experts_per_token, fp32_forward
from sakd.train.cached_step import cached_step_loss
from sakd.train.heads import fused_head_weight, teacher_head, teacher_head_use
from sakd.train.schedule import ramp
from sakd.train.terms import add_kind_terms, ce_sum, ce_targets


def hidden_pairs(cfg: Config, s_layers: int, t_layers: int) -> list[tuple[int, int]]:
    h = cfg.loss.hidden
    return layer_map(s_layers, t_layers, pairs=h.pairs or None, n_pairs=min(h.n_pairs, s_layers))


def attention_pairs(cfg: Config, s_layers: int, t_layers: int) -> list[tuple[int, int]]:
    # hidden_states numbering (layer i reads attentions[i - 1]); default: the last layer of each model
    return [tuple(p) for p in cfg.loss.attention.pairs] or [(s_layers, t_layers)]


def build_aux_modules(cfg: Config, s_config, t_config) -> nn.ModuleDict:
    """Trainable distillation parts: hidden-state projectors and the contrastive projector.

    They are saved in checkpoints, never in the exported student."""
    aux = nn.ModuleDict()
    s_dim, t_dim = s_config.hidden_size, t_config.hidden_size
    terms = cfg.loss.active_terms()
    if "hidden" in terms:
        pairs = hidden_pairs(cfg, s_config.num_hidden_layers, t_config.num_hidden_layers)
        aux["hidden"] = HiddenProjector(s_dim, t_dim, pairs)
    if "contrastive" in terms:
        aux["contrastive"] = nn.Linear(t_dim, s_dim)
    return aux


def term_weights(cfg: Config, step: int) -> dict[str, float]:
    """{term: weight at ``step``} for the run's active terms: kd (the logit loss; off under loss.logit=none),
    ce, chunk (chunk likelihood) with their configured weights, hidden/attention/contrastive ramped (kept,
    at weight 0 early in a ramp, so that their modules and counts exist from step 0). Which terms are active
    is the one rule ``LossConfig.active_terms``."""
    lc = cfg.loss
    w = {"kd": lc.kd_weight, "ce": lc.ce_weight, "chunk": lc.chunk_weight,
         "hidden": ramp(lc.hidden.weight, lc.hidden.ramp_steps, step),
         "attention": ramp(lc.attention.weight, lc.attention.ramp_steps, step),
         "contrastive": ramp(lc.contrastive.weight, lc.contrastive.ramp_steps, step)}
    active = lc.active_terms()
    return {k: v for k, v in w.items() if k in active}  # in this order: the loss sums its terms in it


def count_targets(micro: list[dict], cfg: Config, mapping=None) -> dict[str, float]:
    """Targets of each term over the micro-batches of one step (this process). ``mapping`` is unused (kept for
    the callers). The KD term of EVERY method is divided by the student's target tokens, the count
    cross-entropy uses (issue 19, item 4): shared_kl's terms at 1:1 chunks and projected_kl's at every
    position then weigh the same per position for one loss.kd_weight, and a method with fewer target
    positions contributes less, as it teaches less of the text."""
    per_micro = []
    for b in micro:
        multi = b["chunk_mask"] & ~one_to_one(b)
        n_ce, n_chunks = ce_targets(b).sum(), b["chunk_mask"].sum()
        per_micro.append(torch.stack([n_ce, n_ce, ((b["chunk_s_end"] - b["chunk_s_start"]) * multi).sum(),
                                      n_chunks, n_chunks]).double())
    # one host sync for the whole step (exact: integer counts far below 2**53)
    kd, ce, chunk, hidden, attention = torch.stack(per_micro).sum(0).tolist()
    return {"kd": kd, "ce": ce, "chunk": chunk, "hidden": hidden, "attention": attention,
            "contrastive": float(sum(b["s_mask"].shape[0] for b in micro))}


def logit_term_sum(name: str, s_logits, t_logits, batch, shared_s, shared_t, lc, *,
                   divergence: str | None = None, teacher_grad: bool = False, mass_log: dict | None = None,
                   head_weight: torch.Tensor | None = None, mapping=None, t_head: tuple | None = None,
                   classes=None, kind_log: dict | None = None) -> torch.Tensor:
    """Summed logit loss of one micro-batch: the default shared-vocabulary KD at 1:1 chunks, or a
    benchmark baseline (``loss.baseline``: ULD, GOLD hybrid, truncation; sakd/losses/baselines.py). With ``head_weight`` (shared_kl only),
    ``s_logits`` is the student's final hidden state and its output layer is fused into the loss. projected_kl
    needs ``classes`` (sakd/align/classes.py); ``kind_log`` receives its sums per position kind."""
    div = divergence or lc.divergence
    if head_weight is not None and (name not in ("shared_kl", "mapped_kl", "projected_kl") or lc.gap_weighting):
        raise ValueError(f"the fused output layer serves shared_kl/mapped_kl/projected_kl without gap weighting, "
                         f"not {name}")
    if name == "projected_kl":  # t_logits: one teacher pass, or a list of passes (their sum, one student side)
        t_logits = [t.detach() for t in t_logits] if isinstance(t_logits, list) else t_logits.detach()
        return projected_kd(s_logits, t_logits, batch, mapping, classes, temperature=lc.temperature,
                            chunk_rows=lc.chunk_rows, head_weight=head_weight, log=kind_log,
                            t_head_weight=t_head[0] if t_head else None,
                            t_vocab_size=t_head[1] if t_head else None)[0]
    if name == "mapped_kl":
        return mapped_kd(s_logits, t_logits.detach(), batch, mapping, divergence=div, temperature=lc.temperature,
                         beta=lc.beta, chunk_rows=lc.chunk_rows, extend=lc.mapped_extend, head_weight=head_weight,
                         one_to_one_only=lc.mapped_positions == "one_to_one",
                         prefix_weight=lc.mapped_prefix_weight,
                         t_head_weight=t_head[0] if t_head else None, t_vocab_size=t_head[1] if t_head else None)[0]
    if name == "shared_kl" and lc.gap_weighting and not teacher_grad:
        return gap_weighted_kd(s_logits, t_logits.detach(), batch, shared_s, shared_t, div, lc.temperature,
                               lc.gap_clip)
    if name == "shared_kl":
        out = shared_vocab_kd(s_logits, t_logits if teacher_grad else t_logits.detach(), batch, shared_s, shared_t,
                              divergence=div, temperature=lc.temperature, beta=lc.beta, chunk_rows=lc.chunk_rows,
                              outside_mass=mass_log is not None, head_weight=head_weight)
        if mass_log is not None and out[2] is not None:
            # the teacher's probability on tokens outside the shared vocabulary at 1:1 positions
            mass_log["teacher_mass_outside_shared"] = float(out[2])
    elif name == "gold":
        out = gold_hybrid_loss(s_logits, t_logits.detach(), batch, shared_s, shared_t,
                               temperature=lc.temperature, beta=lc.beta,
                               chunk_rows=gold_chunk_rows(lc.chunk_rows))
    elif name == "uld":
        out = uld_loss(s_logits, t_logits.detach(), batch["s_mask"], batch["t_mask"], temperature=lc.temperature)
    elif name == "truncation":
        out = truncation_kd(s_logits, t_logits.detach(), batch["s_mask"], temperature=lc.temperature)
    else:
        raise ValueError(name)
    return out[0]


def gap_weighted_kd(s_logits, t_logits, batch, shared_s, shared_t, divergence: str, temperature: float,
                    clip: float) -> torch.Tensor:
    """Knowledge-gap weighting: each 1:1 position's divergence weighted by its own current value
    (detached, normalised to mean 1 over the micro-batch, clipped at ``clip``), so positions where the
    student is furthest from the teacher count more. Sum over positions of w_i * D_i.

    Materialises the [N, S] shared-vocabulary rows (off by default; not for 150k vocabularies)."""
    b, sp, tp = one_to_one_positions(batch)
    dtype = torch.promote_types(s_logits.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
    logq = F.log_softmax(s_logits[b, sp][:, shared_s].to(dtype) / temperature, dim=-1)  # [N, S]
    logp = F.log_softmax(t_logits[b, tp][:, shared_t].to(dtype) / temperature, dim=-1)
    if divergence == "forward_kl":
        per = (logp.exp() * (logp - logq)).sum(-1)
    elif divergence == "reverse_kl":
        per = (logq.exp() * (logq - logp)).sum(-1)
    else:
        raise UserError(f"loss.gap_weighting supports loss.divergence forward_kl or reverse_kl, not {divergence}")
    w = per.detach()
    w = (w / w.mean().clamp_min(1e-12)).clamp(max=clip)
    return (w * per).sum()


def _teacher_pass(teacher, batch, mode, sched, ka_gen, reference_router, need_hidden, need_attn, head=None):
    """One teacher forward without gradient under the step's routing; (outputs, RoutingStats or None).
    ``head`` (see ``teacher_head``): the body runs alone and the outputs hold ``last_hidden`` [B, Lt, H];
    a weight [S, H] gives ``logits = h @ head.T`` on those columns only, True no logits at all."""
    routed = moe.is_moe(teacher)
    with torch.no_grad(), (moe.routing(teacher, mode, experts=sched.get("experts"),
                                       sample_prob=sched.get("sample_prob", 0.0), generator=ka_gen,
                                       temperature=sched.get("temperature", 1.0), reference_weights=reference_router)
                           if routed else nullcontext()) as r:
        if r is not None:
            r.set_token_mask(batch["t_mask"])
        if head is not None:
            h = teacher.get_decoder()(input_ids=batch["t_ids"], **model_inputs(batch, "t"),
                                      use_cache=False).last_hidden_state
            return SimpleNamespace(logits=None if head is True else F.linear(h, head.to(h.dtype)), last_hidden=h), r
        out = teacher(input_ids=batch["t_ids"], **model_inputs(batch, "t"),
                      output_hidden_states=need_hidden, output_attentions=need_attn, use_cache=False)
    return out, r


def _finite(t_out, t_vocab: int, need_hidden: bool) -> bool:
    """Whether the teacher's logits (and hidden states) hold no inf/NaN. By their min and max (NaN
    propagates through both): no [B, L, V] boolean copy per pass, one host sync per pass."""
    logits = t_out.logits[..., :t_vocab] if t_out.logits is not None else t_out.last_hidden  # fused head: h
    tensors = [logits] + (list(t_out.hidden_states) if need_hidden else [])
    ends = torch.stack([torch.stack(torch.aminmax(t)).float() for t in tensors])
    return bool(torch.isfinite(ends).all())


class TermSum:
    """The micro-batch's loss as its terms are added: ``total`` (weighted, each term divided by the step's global
    count of its targets) and ``terms`` (each term's unweighted value for the log, a float64 tensor on the
    device: no host sync per term, the loop reads them all at once per step, ``term_values``).

    ``total`` starts as a zero attached to the student's graph: when every term of a micro-batch is skipped
    (non-finite teacher), backward() still runs (a plain zero tensor has no grad_fn) and, under DDP, every
    process still joins the gradient all-reduce (a process that skipped backward would hang the others)."""

    def __init__(self, anchor: torch.Tensor, weights: dict, counts: dict):
        self.total = 0.0 * anchor[..., 0].float().sum()
        self.terms: dict[str, torch.Tensor] = {}
        self.weights, self.counts = weights, counts

    def add(self, name: str, value_sum: torch.Tensor, scale: float = 1.0) -> None:
        contrib = value_sum.float() / self.counts[name]
        self.total = self.total + self.weights[name] * scale * contrib
        self.terms[name] = self.terms.get(name, 0.0) + contrib.detach().double()


def student_forward(student, batch, acc, *, need_hidden: bool, need_attn: bool, head):
    """The student's forward under autocast: (outputs, what the losses read). With the fused head the model
    computes logits for one position only (logits_to_keep=1) and the losses take the final hidden state
    [B, L, H] and the head weight instead of the [B, L, V] logits."""
    with acc.autocast():
        s_out = student(input_ids=batch["s_ids"], **model_inputs(batch, "s"),
                        output_hidden_states=need_hidden or head is not None, output_attentions=need_attn,
                        use_cache=False, **({"logits_to_keep": 1} if head is not None else {}))
    return s_out, (s_out.logits if head is None else s_out.hidden_states[-1])


def checked_teacher_pass(teacher, batch, cfg: Config, sched, ka_gen, reference_router, flags: dict, *,
                         t_vocab: int, need_hidden: bool, need_attn: bool, head):
    """One teacher pass whose outputs are finite, or (None, stats): an fp16 overflow in the teacher
    (Qwen-family models trained in bf16 can overflow) recomputes the micro-batch with the teacher in fp32, or
    skips its teacher terms (``train.nonfinite_teacher``); ``flags`` records which."""
    mode = moe.student_step_mode(cfg.moe.mode)
    g_state = ka_gen.get_state()  # to replay the same expert sampling if the pass is recomputed
    t_out, r = _teacher_pass(teacher, batch, mode, sched, ka_gen, reference_router, need_hidden, need_attn, head)
    if _finite(t_out, t_vocab, need_hidden):
        return t_out, r
    flags["nonfinite_teacher"] = 1
    if cfg.train.nonfinite_teacher == "recompute" and next(teacher.parameters()).dtype != torch.float32:
        t_out = r = None  # the 16-bit outputs go before the fp32 ones are made
        ka_gen.set_state(g_state)
        with fp32_forward(teacher):
            t_out, r = _teacher_pass(teacher, batch, mode, sched, ka_gen, reference_router, need_hidden, need_attn,
                                     head)
        flags["recomputed_fp32"] = 1
    return (t_out, r) if _finite(t_out, t_vocab, need_hidden) else (None, r)


def add_logit_terms(acc_terms: TermSum, s_logits, t_logits, t_out, batch, shared_s, kd_t_cols, shared_t,
                    lc, *, passes: int, flags: dict | None, use: str | None, head, mapping, t_head, t_vocab: int,
                    classes=None):
    """The terms read from the teacher's logits, for one teacher pass (KA: the M divergences are averaged,
    Kim et al. 2025, eq. for L_KA; projected_kl may take a list of passes, ``t_logits``, their sum at once):
    ``kd`` (the logit loss, scaled by T^2) and ``chunk`` (chunk likelihood).
    ``flags`` (first pass, when the step logs the teacher's mass outside the shared vocabulary) takes it."""
    weights = acc_terms.weights
    if "kd" in weights:
        kinds = {} if lc.method == "projected_kl" else None
        kd_sum = logit_term_sum(lc.method, s_logits, t_logits, batch, shared_s, kd_t_cols, lc,
                                mass_log=flags if (flags is not None and use is None) else None,
                                head_weight=head, mapping=mapping,
                                t_head=(t_head[0], t_vocab) if use == "rows" else None, classes=classes,
                                kind_log=kinds)
        acc_terms.add("kd", kd_sum / passes, lc.temperature ** 2)
        if kinds:
            add_kind_terms(acc_terms.terms, kinds, acc_terms.counts["kd"] * passes)
        if flags is not None and use == "shared":  # from the hidden state, one row block at a time
            b, _, t_pos = one_to_one_positions(batch)
            flags["teacher_mass_outside_shared"] = float(teacher_mass_outside(
                t_out.last_hidden, b, t_pos, shared_t, t_vocab, lc.chunk_rows, head_weight=t_head[0]))
    if "chunk" in weights:
        ch_sum, _ = chunk_likelihood_loss(s_logits, t_logits, batch, temperature=lc.chunk_temperature,
                                          chunk_rows=lc.chunk_rows)
        acc_terms.add("chunk", ch_sum / passes)


def add_representation_terms(acc_terms: TermSum, s_out, t_out, batch, aux, cfg: Config) -> None:
    """The terms read from the two models' layers: ``hidden`` (projected hidden states), ``attention``
    (attention maps), ``contrastive`` (InfoNCE between the span embeddings)."""
    weights, lc = acc_terms.weights, cfg.loss
    if "hidden" in weights:
        proj = aux["hidden"]
        pairs = [tuple(map(int, k[1:].split("_t"))) for k in proj.proj.keys()]
        h_sum, _ = hidden_state_loss(s_out.hidden_states, t_out.hidden_states, batch, proj, pairs, lc.hidden.kind)
        acc_terms.add("hidden", h_sum)
    if "attention" in weights:
        pairs = attention_pairs(cfg, len(s_out.attentions), len(t_out.attentions))
        a_sum, _ = attention_transfer_loss(s_out.attentions, t_out.attentions, batch, pairs)
        acc_terms.add("attention", a_sum)
    if "contrastive" in weights:
        s_pool = mean_pool(s_out.hidden_states[-1], batch["s_chunk"] >= 0)
        t_pool = mean_pool(t_out.hidden_states[-1], batch["t_chunk"] >= 0)
        c_sum, _ = info_nce(s_pool, t_pool, aux["contrastive"], lc.contrastive.temperature)
        acc_terms.add("contrastive", c_sum)


def micro_step_loss(teacher, student, aux, batch, shared_s, shared_t, cfg: Config, weights: dict,
                    counts: dict, acc, sched: dict, ka_gen, t_vocab: int, reference_router=None,
                    log_mass: bool = False, mapping=None, t_head: tuple | None = None, classes=None):
    """Loss of one micro-batch (already divided by the step's global counts), per-term values for the
    log (float64 tensors), and flags (non-finite teacher outputs). ``t_head``: ``teacher_head(...)``, used as
    ``teacher_head_use`` says. ``log_mass``: the micro-batch feeds the step's log (the first of a logging step):
    the flags then hold the router statistics and the teacher's mass outside the shared vocabulary, which
    cost host syncs and serve nothing but the log."""
    lc = cfg.loss
    need_hidden = "hidden" in weights or "contrastive" in weights
    need_attn = "attention" in weights
    head = fused_head_weight(student, cfg, weights, acc)
    use = teacher_head_use(lc, weights, mapping is not None and mapping.identity) if t_head is not None else None
    if use == "shared" and t_head[1] is None:
        use = None
    pass_head = {"shared": t_head[1], "rows": True}.get(use) if use else None
    # "shared": the teacher's logits on the shared columns only, shared_kl reads column c of them as shared_t[c]
    kd_t_cols = shared_t
    if use == "shared":
        kd_t_cols = torch.arange(shared_t.numel(), device=shared_t.device)
        kd_t_cols._largest_id = shared_t.numel() - 1  # known: no host read in the loss (crosstok.largest_id)
    s_out, s_logits = student_forward(student, batch, acc, need_hidden=need_hidden, need_attn=need_attn, head=head)
    if head is not None:  # FSDP2: the output layer's full weight exists from the forward to the backward (a shard before)
        head = fused_head_weight(student, cfg, weights, acc)
    passes = (cfg.moe.ka_samples if cfg.moe.mode == "ka" else 1) if TEACHER_TERMS & set(weights) else 0
    out = TermSum(s_logits, weights, counts)
    flags: dict = {"nonfinite_teacher": 0}
    t_out = None
    # projected_kl from the teacher's last hidden state (small): the passes' states are kept and the loss takes
    # them in one call, one student side for all M passes (sakd/losses/projected.py); else one call per pass
    grouped: list | None = [] if (use == "rows" and lc.method == "projected_kl") else None
    for m in range(passes):
        t_out, r = checked_teacher_pass(teacher, batch, cfg, sched, ka_gen, reference_router, flags, t_vocab=t_vocab,
                                        need_hidden=need_hidden, need_attn=need_attn, head=pass_head)
        if t_out is None:
            break
        if r is not None and m == 0 and log_mass:  # only where the step is logged (a host sync, work per layer)
            flags["routing"] = r.stats()  # per layer: expert usage, router entropy, selected mass
        # padded head columns name no token; "rows": the last hidden state, the loss applies the head
        t_logits = t_out.last_hidden if use == "rows" else t_out.logits[..., :t_vocab]
        if grouped is not None:
            grouped.append(t_logits)
            continue
        add_logit_terms(out, s_logits, t_logits, t_out, batch, shared_s, kd_t_cols, shared_t, lc, passes=passes,
                        flags=flags if (m == 0 and log_mass) else None, use=use, head=head, mapping=mapping,
                        t_head=t_head, t_vocab=t_vocab, classes=classes)
    if grouped:  # the passes that ran (a non-finite pass ends the loop, as above): their sum, divided by M
        add_logit_terms(out, s_logits, grouped, t_out, batch, shared_s, kd_t_cols, shared_t, lc, passes=passes,
                        flags=None, use=use, head=head, mapping=mapping, t_head=t_head, t_vocab=t_vocab,
                        classes=classes)
    if "ce" in weights:
        out.add("ce", ce_sum(s_logits, batch, head, lc.chunk_rows))
    if t_out is not None:
        add_representation_terms(out, s_out, t_out, batch, aux, cfg)
    return out.total, out.terms, flags


def sar_router_step(sar, teacher, student, batch, shared_s, shared_t, cfg: Config, acc, t_vocab: int) -> dict:
    """Student-Aware Router step (Kim et al. 2025): minimise KL(p_teacher || q_student) w.r.t. the
    teacher's router weights only, on the same batch, student logits without gradient."""
    lc = cfg.loss
    with torch.no_grad(), acc.autocast():
        s_logits = student(input_ids=batch["s_ids"], **model_inputs(batch, "s"), use_cache=False).logits.float()
    # Normalised by the 1:1 count of the GLOBAL batch, times the number of processes: SARRouter averages
    # the router gradients across processes, so that the step equals one process's on the whole batch.
    n_local = one_to_one(batch).sum()
    world = getattr(acc, "num_processes", 1)
    n_global = acc.reduce(n_local.to(acc.device), "sum") if world > 1 else n_local
    n = max(1, int(n_global)) / world

    def loss_fn(t):
        t_logits = t(input_ids=batch["t_ids"], **model_inputs(batch, "t"), use_cache=False).logits[..., :t_vocab]
        kl_sum = logit_term_sum("shared_kl", s_logits, t_logits, batch, shared_s, shared_t, lc,
                                divergence="forward_kl", teacher_grad=True)
        return kl_sum / n

    stats = sar.step(loss_fn, token_mask=batch["t_mask"])  # padding out of the balance loss and telemetry
    return {f"sar_{k}": float(v) for k, v in stats.items()}


class Objective:
    """The distillation objective of one run, built once from the configuration and the models.

    It owns the parts a loss needs: the teacher (live, or a top-k cache), the student, the projectors,
    the vocabulary map (shared ids and, for mapped_kl, ``vocab.mapping``), the KA routing schedule and
    its expert-draw generator, the SAR router. Per optimizer step::

        logs = objective.begin_step(step, micro, span_ids, horizon)  # counts, weights, schedule, [SAR]
        for i, batch in enumerate(micro):
            loss, terms, flags = objective.loss(batch, i)           # live or cached teacher, same call

    ``loss`` is already divided by the step's GLOBAL target counts (summed over processes before any
    forward), so batch 8 x accumulation 1 == batch 2 x accumulation 4."""

    def __init__(self, cfg: Config, acc, student, *, teacher=None, teacher_cache=None, aux=None, vocab,
                 t_vocab: int, ka_gen=None, sar=None):
        self.cfg, self.acc, self.student, self.teacher, self.cache = cfg, acc, student, teacher, teacher_cache
        self.aux, self.vocab, self.t_vocab, self.ka_gen, self.sar = aux, vocab, t_vocab, ka_gen, sar
        self.shared_s = vocab.shared_s.to(acc.device)
        self.shared_t = vocab.shared_t.to(acc.device)
        # the shared rows' copy only where shared_kl is the logit loss (mapped_kl reads the head itself)
        self.t_head = teacher_head(teacher, self.shared_t if cfg.loss.method == "shared_kl" else None,
                                   cfg.loss.fused_head)
        ept = experts_per_token(teacher) if teacher is not None else None
        # KA default as in Kim et al. (2025) and their scripts (--num-selects 15 of 16): E - 1 experts per token.
        self.k_start = cfg.moe.experts_start or (max(ept[0], ept[1] - 1) if ept else 1)
        self.step, self.counts, self.weights, self.sched, self.span_ids = 0, {}, {}, {}, []

    def routing_schedule(self, step: int, horizon: int) -> dict:
        """KA's experts per token, router temperature and sampling probability at ``step`` ({} otherwise)."""
        m = self.cfg.moe
        if m.mode != "ka":
            return {}
        return moe.routing_schedule(step, horizon, experts_start=self.k_start, experts_end=m.experts_end or self.k_start,
                                temp_start=m.router_temperature_start, temp_end=m.router_temperature_end,
                                prob_start=m.sample_prob,
                                prob_end=m.sample_prob if m.sample_prob_end is None else m.sample_prob_end)

    def begin_step(self, step: int, micro: list[dict], span_ids: list[list[int]], horizon: int) -> dict:
        """Count every term's targets over the step (all processes), fix the weights and the routing
        schedule, and [SAR] take the router step on the first micro-batch. Returns the SAR log values."""
        acc = self.acc
        self.step, self.span_ids = step, span_ids
        self.sched = self.routing_schedule(step, horizon)
        counts = count_targets(micro, self.cfg, self.vocab.mapping)
        if acc.num_processes > 1:  # one all-reduce and one host sync for every term's count
            keys = sorted(counts)
            vec = acc.reduce(torch.tensor([counts[k] for k in keys], device=acc.device, dtype=torch.float64),
                             reduction="sum")
            counts = dict(zip(keys, vec.tolist()))
        self.counts = {k: max(1.0, v) for k, v in counts.items()}
        self.weights = term_weights(self.cfg, step)
        if self.sar is None:
            return {}
        return sar_router_step(self.sar, self.teacher, self.student, micro[0], self.shared_s, self.shared_t,
                               self.cfg, acc, self.t_vocab)

    def loss(self, batch: dict, index: int = 0):
        """(loss, per-term values, flags) of micro-batch ``index`` of the current step."""
        if self.cache is not None:
            cb = self.cache.batch(self.span_ids[index], batch["t_ids"].shape[1], device=self.acc.device, check=batch)
            return cached_step_loss(self.student, cb, batch, self.shared_s, self.shared_t, self.cfg, self.weights,
                                    self.counts, self.acc, mapping=self.vocab.mapping,
                                    classes=getattr(self.vocab, "classes", None), t_vocab=self.t_vocab)
        log_every = self.cfg.train.log_every
        return micro_step_loss(self.teacher, self.student, self.aux, batch, self.shared_s, self.shared_t, self.cfg,
                               self.weights, self.counts, self.acc, self.sched, self.ka_gen, self.t_vocab,
                               self.sar.initial if self.sar is not None else None,
                               log_mass=(index == 0 and ((self.step + 1) % log_every == 0 or self.step == 0)),
                               mapping=self.vocab.mapping, t_head=self.t_head,
                               classes=getattr(self.vocab, "classes", None))

