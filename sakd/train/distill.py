"""The distillation loop (``sakd distill``), top to bottom, on Accelerate.

One optimizer step:
  1. fetch ``grad_accum`` micro-batches (already tokenized and byte-aligned by the data pipeline);
  2. count the targets of every loss term over the whole step and across processes, so that each
     term is normalised ONCE per optimizer step (batch 8 x accumulation 1 == batch 2 x accumulation 4);
  3. [SAR] one router step on the first micro-batch: KL(p_teacher || q_student), student detached;
  4. for each micro-batch: teacher forward(s) without gradient (KA: M routed passes), student forward,
     loss terms as sums, backward (``no_sync`` except on the last micro-batch);
  5. unscale, clip, step (a step with non-finite gradients is skipped and counted), schedule;
  6. log; every ``train.eval_every`` steps held-out bits per byte; every ``train.save_every`` steps a
     checkpoint; stop on ``train.max_time`` or a signal (saved, resumable).
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from transformers import AutoConfig

from sakd.models import moe
from sakd.align.mapping import mapping_tables
from sakd.align.classes import class_tables
from sakd.align.vocab import build_vocab_map
from sakd.train import fsdp, objective
from sakd.train.heads import fused_head_terms
from sakd.train.checkpoint import list_checkpoints, load_latest, rng_state, save_checkpoint
from sakd.config import Config, changed_keys, flatten, parse_duration, to_dict
from sakd.data.text import Collator, SpanDataset, pad_id, span_data
from sakd.errors import UserError
from sakd.evaluate.bpb import bits_per_byte
from sakd.models.load import count_parameters, experts_per_token, fp32_forward, load_student, load_teacher
from sakd.models.lora import export_student, trainable_parameters, wrap_student
from sakd.models.placement import big_model_placement
from sakd.train.objective import Objective
from sakd.train.onpolicy import generate_items
from sakd.train.publish import publish
from sakd.train.runlog import RunLogger
from sakd.train.schedule import EpochOrder, lr_lambda, optimizer_update
from sakd.train.state import TrainState


@dataclass
class Run:
    """Everything the loop builds once (printed at start-up)."""
    accelerator: Accelerator
    teacher: torch.nn.Module
    student: torch.nn.Module
    student_tok: object
    teacher_tok: object
    vocab: object
    train: SpanDataset
    heldout: list
    aux: torch.nn.ModuleDict
    teacher_cache: object = None  # sakd.teacher_cache.reader.TeacherCache when training from a cache (teacher is None)


class StopFlag:
    """SIGTERM / SIGINT: finish the current step, save, exit."""

    def __init__(self):
        self.raised = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------- set-up

def native_bf16() -> bool:
    """bf16 in hardware (Ampere, sm_80, and newer). ``torch.cuda.is_bf16_supported()`` also says yes
    where bf16 is only emulated (a P100), which is slow: there fp16 + GradScaler is the right choice."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def mixed_precision(name: str) -> str:
    """Accelerate's mixed_precision for train.precision: fp32 on CPU (bf16 on CPU is ~5x slower than fp32),
    bf16 where the GPU has it natively, else fp16 with a GradScaler."""
    if name == "fp32" or not torch.cuda.is_available():
        return "no"
    if name == "auto":
        return "bf16" if native_bf16() else "fp16"
    if name == "bf16" and not native_bf16():  # a P100 or T4 would emulate it, far slower than fp16
        major, minor = torch.cuda.get_device_capability()
        raise UserError(f"train.precision=bf16 but this GPU (sm_{major}{minor}) has no native bf16 (needs sm_80+): "
                        "use train.precision=fp16 (or auto)")
    return name


def needs_attention_maps(cfg: Config) -> bool:
    return "attention" in cfg.loss.active_terms()


def setup(cfg: Config, log=print) -> Run:
    accelerator = fsdp.build_accelerator(mixed_precision(cfg.train.precision), cfg.train.distributed,
                                         on_policy=cfg.loss.on_policy_prob > 0)
    set_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = accelerator.device
    m = cfg.model
    data = span_data(cfg, log)  # tokenizers, text spans, held-out text (no model loaded yet)
    vocab = build_vocab_map(data.student_tok, data.teacher_tok)
    # mapped_kl: where every teacher token's mass lands in the student vocabulary (built once, cached on disk)
    vocab.mapping = (mapping_tables(data.student_tok, data.teacher_tok, log=log)
                     if cfg.loss.method in ("mapped_kl", "projected_kl") else None)
    # projected_kl: the class of every student token (sakd/align/classes.py; built once per run, seconds)
    vocab.classes = (class_tables(data.student_tok, vocab.mapping) if cfg.loss.method == "projected_kl" else None)
    attn = "eager" if needs_attention_maps(cfg) else None  # sdpa returns no attention maps
    teacher, cache = None, None
    if m.teacher_cache:
        from sakd.teacher_cache.manifest import check_cached_config, expected_manifest
        from sakd.teacher_cache.reader import TeacherCache

        check_cached_config(cfg)
        cache = TeacherCache(m.teacher_cache, expected_manifest(
            cfg, data.train.fingerprints, student_tok=data.student_tok, teacher_tok=data.teacher_tok, vocab=vocab))
    else:
        teacher = load_teacher(m.teacher, device, m.teacher_dtype, attn=attn,
                               experts_implementation=m.experts_implementation,
                               placement=big_model_placement(m.teacher_device_map, m.teacher_max_memory,
                                                             m.teacher_offload_folder))
        if cfg.moe.mode != "topk" and not moe.is_moe(teacher):
            raise UserError(f"moe.mode={cfg.moe.mode} needs an MoE teacher, but {m.teacher!r} has no MoE blocks: "
                            "use moe.mode=topk")
    student = load_student(m.student, device, attn=attn)
    if m.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    t_config = teacher.config if teacher is not None else AutoConfig.from_pretrained(m.teacher)
    aux = objective.build_aux_modules(cfg, student.config, t_config).to(device)
    if m.student_lora.r is not None:  # only the adapters train (sakd/models/lora.py); wrapped after
        # the projectors are drawn, so that they start as in a full student's run
        lo = m.student_lora
        student = wrap_student(student, r=lo.r, alpha=lo.alpha or 2.0 * lo.r, dropout=lo.dropout,
                               target_modules=lo.target_modules)
    return Run(accelerator, teacher, student, data.student_tok, data.teacher_tok, vocab, data.train, data.heldout,
               aux, cache)


def describe(run: Run, cfg: Config, log=print) -> dict:
    """Print what was derived (parameters, experts per token, tokens per step, vocabulary overlap)."""
    world = run.accelerator.num_processes
    ept = experts_per_token(run.teacher) if run.teacher is not None else None
    info = {
        "teacher_parameters": count_parameters(run.teacher) if run.teacher is not None else None,
        "student_parameters": count_parameters(run.student),
        "teacher_experts_per_token": f"{ept[0]} of {ept[1]}" if ept else "dense",
        "tokens_per_step": cfg.train.batch_size * cfg.train.grad_accum * world * cfg.data.seq_len,
        "shared_vocab": int(run.vocab.shared_s.numel()),
        "student_vocab": run.vocab.student_vocab,
        "teacher_vocab": run.vocab.teacher_vocab,
        "train_spans": len(run.train),
        "heldout_bytes": sum(len(t.encode()) for t in run.heldout),
        "processes": world,
        "student_sharded": fsdp.is_sharded(run.accelerator),
        "device": str(run.accelerator.device),
        "mixed_precision": run.accelerator.mixed_precision,
    }
    if cfg.loss.baseline:
        log(f"warning: loss.baseline={cfg.loss.baseline} replaces loss.logit={cfg.loss.logit}: a benchmark baseline "
            "(sakd/losses/baselines.py), kept for comparison, not a loss for a real run")
    if run.teacher is None:
        log(f"teacher: read from the cache {cfg.model.teacher_cache} (top-{run.teacher_cache.k}, not loaded)")
    else:
        log(f"teacher: {info['teacher_parameters'] / 1e6:.2f}M parameters, experts per token: "
            f"{info['teacher_experts_per_token']}, routing: {cfg.moe.mode}")
    log(f"student: {info['student_parameters'] / 1e6:.2f}M parameters"
        + (f", sharded over {world} processes (FSDP2: parameters, gradients, AdamW states), the teacher "
           "replicated" if info["student_sharded"] else ""))
    if cfg.model.student_lora.r is not None:
        info["student_trainable_parameters"] = sum(p.numel() for p in trainable_parameters(run.student))
        log(f"student: LoRA r={cfg.model.student_lora.r} on {', '.join(cfg.model.student_lora.target_modules)}: "
            f"{info['student_trainable_parameters'] / 1e6:.3f}M trainable parameters, the rest frozen")
    log(f"vocabulary overlap: {info['shared_vocab']:,} token strings shared "
        f"({100 * info['shared_vocab'] / info['student_vocab']:.1f}% of the student's {info['student_vocab']:,}, "
        f"teacher has {info['teacher_vocab']:,})")
    log(f"tokens per optimizer step: {info['tokens_per_step']:,} (at most; {cfg.train.batch_size} x "
        f"{cfg.train.grad_accum} accumulation x {world} process(es) x {cfg.data.seq_len})")
    log(f"data: {info['train_spans']:,} training spans, {info['heldout_bytes']:,} held-out bytes; "
        f"device {info['device']}, mixed precision {info['mixed_precision']}")
    terms = cfg.loss.active_terms()
    if run.teacher is not None and fused_head_terms(cfg.loss, kd="kd" in terms, chunk="chunk" in terms):
        # The fused head's matmuls run in the dtype of the student's final hidden state, and the final
        # RMSNorm returns its fp32 input dtype under autocast; the loss runs outside autocast.
        log("fused output layer: the student's logits are computed one row block (loss.chunk_rows rows) at a "
            "time in float32 (its final hidden state is float32 under autocast): exact log-softmax inputs at 150k "
            "columns, the head's matmul at fp32 speed")
    return info


# ----------------------------------------------------------------------------- the loop

# Settings a resumed run may change: where and how often it reports and saves, how long it runs, and the
# held-out evaluation (which never feeds back into training). Everything else must match the checkpoint.
RESUME_MAY_CHANGE = ("train.max_steps", "train.max_time", "train.output_dir", "train.eval_every",
                     "train.save_every", "train.keep_checkpoints", "train.log_every", "data.num_workers",
                     "logging.", "eval.", "model.teacher_device_map", "model.teacher_device_map.",
                     "model.teacher_max_memory", "model.teacher_max_memory.", "model.teacher_offload_folder",
                     "train.push_to_hub", "train.push_private")


def _check_resume_config(path: Path, saved: dict | None, current: dict) -> None:
    """Refuse to resume a checkpoint written with a different training configuration."""
    if not saved:
        return  # a checkpoint from before configurations were stored
    a, b = flatten(saved), flatten(current)
    diff = [k for k in changed_keys(saved, current)
            if not any(k == m or (m.endswith(".") and k.startswith(m)) for m in RESUME_MAY_CHANGE)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:3]) + (" ..." if len(diff) > 3 else "")
        raise UserError(f"checkpoint {str(path)!r} was written with another configuration ({shown}): resume with "
                        "the same settings, or choose another train.output_dir")


def _output_dir(cfg: Config, resume: bool) -> Path:
    out = Path(cfg.train.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # a probe of its own per process: under `accelerate launch` all of them check at once
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"train.output_dir {str(out)!r} is not writable ({e.strerror}): choose another folder") from None
    if not resume and list_checkpoints(out / "checkpoints"):
        raise UserError(f"{str(out)!r} already holds checkpoints: pass --resume to continue, or choose another "
                        "train.output_dir")
    return out


def build_optimizer(student: torch.nn.Module, aux: torch.nn.Module, tc) -> tuple:
    """AdamW (no weight decay on vectors; the projectors at ``train.aux_lr``) and its warm-up + cosine LR."""
    trainable = trainable_parameters(student)  # a LoRA student: its adapters only
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay, "lr": tc.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": tc.lr}]
    if len(list(aux.parameters())):
        groups.append({"params": list(aux.parameters()), "weight_decay": 0.0, "lr": tc.aux_lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))
    return optimizer, scheduler


def resume_from(state: TrainState, ckpt_dir: Path, cfg: Config, log=print, rank: int = 0) -> None:
    """Load the newest readable checkpoint into ``state`` (nothing there: start from step 0); ``rank``: this
    process's index (its own KA stream)."""
    found = load_latest(ckpt_dir, log)
    if found is None:
        log(f"resume: no checkpoint under {ckpt_dir}; starting from step 0")
        return
    path, tensors, saved = found
    # strict except for the tied lm_head (stored once, as the embeddings): a checkpoint of another
    # student architecture must not load half-way in silence
    missing, unexpected = state.student_mismatch(tensors)
    if missing or unexpected:
        raise UserError(f"checkpoint {str(path)!r} does not fit model.student={cfg.model.student!r} "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. "
                        f"{(missing + unexpected)[0]!r}): resume with the same student, or choose another "
                        "train.output_dir")
    _check_resume_config(path, saved.get("config"), state.config)
    fsdp.shard_loaded(state.student, state.optimizer, tensors, saved)  # FSDP: keep this process's shards
    state.load_state_dict({"tensors": tensors, "state": saved}, log, rank=rank)
    tc = cfg.train
    if state.horizon != tc.max_steps:
        # Changing the horizon would reshape the remaining LR and KA schedules mid-run; they keep the
        # saved one and train.max_steps only says where this run stops.
        state.scheduler.lr_lambdas = [lr_lambda(tc.warmup_steps, state.horizon, tc.min_lr_ratio)] * len(
            state.scheduler.lr_lambdas)
        log(f"resume: train.max_steps={tc.max_steps} differs from the checkpoint's {state.horizon}: the LR and KA "
            f"schedules keep the saved horizon of {state.horizon} steps (after it, the LR stays at its minimum); "
            f"training stops at step {tc.max_steps}")
    log(f"resume: continuing from {path.name} (step {state.step})")


def heldout_bits_per_byte(model, run: Run, cfg: Config, teacher: bool = False) -> float:
    tok = run.teacher_tok if teacher else run.student_tok
    return bits_per_byte(model, tok, run.heldout, cfg.eval.seq_len, cfg.eval.batch_size, run.accelerator.device)


def teacher_heldout_bpb(run: Run, cfg: Config) -> float:
    """The teacher's held-out bits/byte: from the cache's manifest (NaN if measured on other text), or
    measured under the teacher's evaluation routing (``moe.evaluation_mode``)."""
    if run.teacher is None:
        from sakd.teacher_cache.manifest import heldout_sha256
        m = run.teacher_cache.manifest
        return m.get("teacher_heldout_bpb") if m.get("heldout_sha256") == heldout_sha256(run.heldout) else float("nan")
    def measure():
        with moe.routing(run.teacher, moe.evaluation_mode(cfg.moe.mode)) \
                if moe.is_moe(run.teacher) else nullcontext():
            return heldout_bits_per_byte(run.teacher, run, cfg, teacher=True)

    bpb = measure()
    # a 16-bit teacher that overflows: recomputed in fp32 one module's weights at a time, as in training
    if (not math.isfinite(bpb) and cfg.train.nonfinite_teacher == "recompute"
            and next(run.teacher.parameters()).dtype != torch.float32):
        with fp32_forward(run.teacher):
            bpb = measure()
    return bpb


class StepData:
    """The spans of each step, in the resumable order; with ``data.num_workers > 0`` the next step's
    spans are tokenised and byte-aligned in a background thread while this step computes. ``position``
    is the order's position after THIS step's spans (what a checkpoint saves), so a resume draws the
    prefetched spans again: exact either way."""

    def __init__(self, run: Run, order: EpochOrder, cfg: Config):
        self.run, self.order, self.cfg = run, order, cfg
        self.collate = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))
        self.pool = ThreadPoolExecutor(max_workers=1) if cfg.data.num_workers > 0 else None
        self.upcoming, self.position = None, order.state()

    def _draw(self) -> list[list[int]]:
        return [self.order.next(self.cfg.train.batch_size) for _ in range(self.cfg.train.grad_accum)]

    def _encode(self, idx: list[list[int]]) -> list[dict]:
        return [self.collate([self.run.train[i] for i in ids]) for ids in idx]

    def next(self, step: int, student, counters: dict, log=print):
        """(span ids per micro-batch, micro-batches on the device, on-policy?, seconds waited for data)."""
        cfg, tc, acc = self.cfg, self.cfg.train, self.run.accelerator
        idx, ready = self.upcoming if self.upcoming is not None else (self._draw(), None)
        self.position = self.order.state()
        if self.pool is not None and step + 1 < tc.max_steps:
            nxt = self._draw()
            self.upcoming = (nxt, self.pool.submit(self._encode, nxt))
        on_policy = cfg.loss.on_policy_prob > 0 and random.random() < cfg.loss.on_policy_prob
        data_wait = 0.0
        if on_policy:  # GKD: the student writes the continuations, both models score that text
            micro = [self.collate(generate_items(acc.unwrap_model(student), self.run.train, ids,
                                                 new_tokens=cfg.loss.on_policy_tokens,
                                                 temperature=cfg.loss.on_policy_temperature, counters=counters))
                     for ids in idx]
        else:
            t_wait = time.time()
            micro = ready.result() if ready is not None else self._encode(idx)
            data_wait = time.time() - t_wait  # what the step waits for its data (0 when prefetched in time)
        n_skipped = sum(int(b["skipped"].sum()) for b in micro)
        if n_skipped:  # spans that could not be byte-aligned: empty rows, counted and named, never fatal
            counters["skipped_spans"] = counters.get("skipped_spans", 0) + n_skipped
            if counters["skipped_spans"] <= 3 or step % tc.log_every == 0:
                why = next(iter(self.run.train.skipped.values()), "")
                log(f"data: {counters['skipped_spans']} span(s) skipped so far (cannot be byte-aligned), e.g. {why}")
        return idx, [{k: v.to(acc.device) for k, v in b.items()} for b in micro], on_policy, data_wait

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def train_step(objective: Objective, micro: list[dict], idx: list, state: TrainState, student, aux_params,
               acc, grad_clip: float) -> tuple[dict, dict, dict | None, float | None, bool]:
    """One optimizer step: [SAR router step], loss and backward per micro-batch (``no_sync`` except on
    the last), projector gradients averaged by hand, clip, step. Returns (terms, logs, routing
    telemetry, gradient norm, skipped)."""
    counters = state.counters
    logs = objective.begin_step(state.step, micro, idx, state.horizon)
    terms_total: dict[str, torch.Tensor] = {}  # float64 tensors on the device until the step's one read
    routing_stats = None
    for i, batch in enumerate(micro):
        with nullcontext() if i == len(micro) - 1 else acc.no_sync(student):
            loss, terms, flags = objective.loss(batch, i)
            if "teacher_mass_outside_shared" in flags:
                logs["teacher_mass_outside_shared"] = flags["teacher_mass_outside_shared"]
            counters["nonfinite_teacher"] += flags.get("nonfinite_teacher", 0)
            counters["recomputed_fp32"] = counters.get("recomputed_fp32", 0) + flags.get("recomputed_fp32", 0)
            routing_stats = flags.get("routing") or routing_stats
            # DDP averages gradients over processes; the counts are global sums, so scale back up.
            acc.backward(loss * acc.num_processes)
        for k, v in terms.items():
            terms_total[k] = terms_total.get(k, 0.0) + v
    if acc.num_processes > 1:
        # The projectors are called piecewise (aux["hidden"], ...), never through a forward(), so DDP cannot
        # wrap them (and refuses a module without parameters): their gradients are averaged here, as DDP does.
        for p in aux_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(acc.reduce(p.grad, reduction="mean"))
    grad_norm, skipped = optimizer_update(acc, state.optimizer, state.scheduler, grad_clip, counters)
    return term_values(terms_total, objective.weights, acc), logs, routing_stats, grad_norm, skipped


def term_values(terms: dict, weights: dict, acc) -> dict[str, float]:
    """The step's loss terms as floats for the log, read in ONE host sync (each stayed a tensor on the
    device through the micro-batches); under DDP summed over the processes, so they are global values, not
    this process's share."""
    keys = sorted(weights) if acc.num_processes > 1 else sorted(terms)
    if not keys:
        return {}
    vec = torch.stack([torch.as_tensor(terms.get(k, 0.0), dtype=torch.float64, device=acc.device).reshape(())
                       for k in keys])
    if acc.num_processes > 1:
        vec = acc.reduce(vec, reduction="sum")
    return {k: v for k, v in zip(keys, vec.tolist()) if k in terms or v != 0.0}


def step_record(step: int, lr: float, seconds: float, tokens_per_s: float, on_policy: bool, data_wait: float,
                terms: dict, logs: dict, weights: dict, sched: dict, grad_norm, skipped: bool, routing_stats,
                log_every: int) -> dict:
    """The history record of one step (what TensorBoard / W&B / history.json receive)."""
    rec = {"step": step, "lr": lr, "seconds": seconds, "on_policy": on_policy, "skipped": skipped,
           "data_wait_s": 0.0 if on_policy else data_wait, "tokens_per_s": tokens_per_s, **terms, **logs,
           **{f"w_{k}": v for k, v in weights.items()}}
    if grad_norm is not None:
        rec["grad_norm"] = grad_norm
    if sched:
        rec.update({f"moe_{k}": v for k, v in sched.items()})
    if routing_stats and (step % log_every == 0 or step == 1):
        # telemetry per MoE layer: expert usage, router entropy (nats), router mass on the
        # experts used, and under SAR the KL between the original and the current router
        layers = list(routing_stats.values())
        rec["moe_usage"] = {k: v["usage"] for k, v in routing_stats.items()}
        rec["moe_top1"] = {k: v["top1"] for k, v in routing_stats.items()}
        rec["moe_entropy"] = sum(v["entropy"] for v in layers) / len(layers)
        rec["moe_selected_mass"] = sum(v["selected_mass"] for v in layers) / len(layers)
        if "router_kl" in layers[0]:
            rec["moe_router_kl"] = {k: v["router_kl"] for k, v in routing_stats.items()}
    return rec


def stop_reason(stop: StopFlag, acc, t_setup: float, max_time: float | None, tc) -> str | None:
    """Why to stop after this step (time budget, a signal, another process stopping), or None."""
    reason = None
    if max_time is not None and time.time() - t_setup > max_time:
        reason = f"train.max_time={tc.max_time} reached"
    if stop.raised:
        reason = f"{stop.raised} received"
    if acc.num_processes > 1:  # every process stops at the same step, or the others hang in a collective
        flag = acc.reduce(torch.tensor(float(bool(reason)), device=acc.device), reduction="sum")
        if float(flag) > 0 and not reason:
            reason = "another process is stopping"
    return reason


def save(state: TrainState, ckpt_dir: Path, acc, keep: int) -> None:
    # every process's own KA stream and global RNG states (its dropout masks, its on-policy draws), in process
    # order (the main process writes the checkpoint alone)
    ka_states = rng_states = None
    if acc.num_processes > 1:
        ka_states, rng_states = map(list, zip(*gather_object([(state.ka_gen.get_state(), rng_state())])))
    acc.wait_for_everyone()
    if fsdp.is_sharded(acc):  # every process takes part in gathering the full tensors; the main one writes
        sd = fsdp.gathered(state.state_dict(ka_states, rng_states), keep=acc.is_main_process)
    else:
        sd = state.state_dict(ka_states, rng_states) if acc.is_main_process else None
    if acc.is_main_process:
        save_checkpoint(ckpt_dir, state.step, sd["tensors"], sd["state"], keep)


def finish(run: Run, cfg: Config, state: TrainState, out: Path, result: dict, stopped: str | None,
           log=print) -> None:
    """After the loop (on the main process; under FSDP every process enters for the collective part): final
    evaluation, export (student, tokenizer, model card, SAR router), history.json, result.json, then ``publish``:
    the run report and the push to the hub (``train.push_to_hub``; with eval.ce_only_baseline, later)."""
    acc, student = run.accelerator, state.student
    if not stopped:  # under FSDP on every process: the student's forwards and the gathering are collective
        bpb = heldout_bits_per_byte(student, run, cfg)
        full = fsdp.full_state_dict(student, keep=acc.is_main_process) if fsdp.is_sharded(acc) else None
    if not acc.is_main_process:
        return
    if not stopped:
        state.evals.append({"step": state.step, "student_bpb": bpb})
        log(f"held-out bits/byte at the end: student {bpb:.4f} (teacher {state.teacher_bpb:.4f})")
        export_dir = out / "student"
        if full is not None:  # FSDP: the gathered full tensors (LoRA is refused under FSDP: config.py)
            student.save_pretrained(export_dir, safe_serialization=True, state_dict=full)
        else:  # a LoRA student is merged into a plain folder (the adapter beside it on request)
            export_student(student, export_dir, out / "adapter" if cfg.model.student_lora.save_adapter else None)
        run.student_tok.save_pretrained(export_dir)
        from sakd.report.model_card import write_model_card
        write_model_card(export_dir, teacher=cfg.model.teacher, data=cfg.data.source,
                         method=f"routing {cfg.moe.mode}, logit loss {cfg.loss.method} ({cfg.loss.divergence}), "
                                f"weights kd={cfg.loss.kd_weight} ce={cfg.loss.ce_weight} "
                                f"chunk={cfg.loss.chunk_weight}",
                         metrics={"teacher_bpb": state.teacher_bpb, "student_bpb_initial": state.evals[0]["student_bpb"],
                                  "student_bpb_final": bpb, "steps": state.step},
                         command="sakd " + " ".join(sys.argv[1:]))
        if state.sar is not None:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in moe.router_state(run.teacher).items()},
                      str(out / "router.safetensors"))
        result["student_dir"] = str(export_dir)
    result.update({"student_bpb_initial": state.evals[0]["student_bpb"],
                   "student_bpb_final": state.evals[-1]["student_bpb"], "evals": state.evals})
    (out / "history.json").write_text(json.dumps({"history": state.history, "evals": state.evals}, default=float))
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    if not stopped:
        publish(out, cfg, result, log=log, teacher=run.teacher, teacher_tokenizer=run.teacher_tok, texts=run.heldout)


def distill(cfg: Config, *, resume: bool = False, log=print, progress: bool = True) -> dict:
    """Distil ``cfg.model.teacher`` into ``cfg.model.student``: set up, [resume], train, export, report, push
    (with ``eval.ce_only_baseline`` the push waits for the CE-only row: ``sakd.train.publish``)."""
    # ---- set up: data, models, vocabulary map, optimizer, the state a checkpoint holds
    if cfg.train.push_to_hub:  # offline or without a token: one line now, not after the run
        from sakd.report.push import check_push
        check_push(cfg.train.push_to_hub, key="train.push_to_hub")
    out = _output_dir(cfg, resume)
    t_setup = time.time()
    run = setup(cfg, log)
    acc, tc = run.accelerator, cfg.train
    info = describe(run, cfg, log) if acc.is_main_process else {}
    optimizer, scheduler = build_optimizer(run.student, run.aux, tc)
    student, optimizer = fsdp.prepare(acc, run.student, optimizer, log)  # the projectors stay unwrapped (train_step)
    aux = run.aux.to(acc.device)
    sar = None
    if cfg.moe.mode == "sar":
        sar = moe.SARRouter(run.teacher, lr=cfg.moe.router_lr, weight_decay=cfg.moe.router_weight_decay,
                            balance_coef=cfg.moe.balance_coef, anchor=cfg.moe.anchor, grad_clip=tc.grad_clip or 1.0)
    order = EpochOrder(len(run.train), tc.seed, acc.process_index, acc.num_processes)
    # KA's expert draws on the teacher's device (no copies, no host sync per MoE layer). One stream per process:
    # with one seed everywhere, every process would draw the same routings (half the augmentation on two GPUs).
    # Each process's state is checkpointed (save), so a resume goes on with each stream exactly.
    ka_gen = torch.Generator(device=acc.device).manual_seed(tc.seed + 17 + acc.process_index)
    state = TrainState(horizon=tc.max_steps, config=to_dict(cfg), student=acc.unwrap_model(student),
                       aux=acc.unwrap_model(aux), optimizer=optimizer, scheduler=scheduler, scaler=acc.scaler,
                       sar=sar, ka_gen=ka_gen, order=order, data=order.state())
    ckpt_dir = out / "checkpoints"
    # ---- resume: one call
    if resume:
        resume_from(state, ckpt_dir, cfg, log, rank=acc.process_index)
    objective = Objective(cfg, acc, student, teacher=run.teacher, teacher_cache=run.teacher_cache, aux=aux,
                          vocab=run.vocab, t_vocab=len(run.teacher_tok), ka_gen=ka_gen, sar=sar)
    evaluates = acc.is_main_process or fsdp.is_sharded(acc)  # FSDP: the student's forwards are collective
    if state.teacher_bpb is None and evaluates:
        state.teacher_bpb = teacher_heldout_bpb(run, cfg) if acc.is_main_process else None
        student_bpb0 = heldout_bits_per_byte(acc.unwrap_model(student), run, cfg)
        state.evals.append({"step": 0, "student_bpb": student_bpb0})
        if acc.is_main_process:
            log(f"held-out bits/byte at start: teacher {state.teacher_bpb:.4f}, student {student_bpb0:.4f}")
    logger = RunLogger(out, log_every=tc.log_every, total=tc.max_steps, initial=state.step, progress=progress,
                       main=acc.is_main_process, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                       wandb_project=cfg.logging.wandb_project, config=to_dict(cfg), log=log)
    max_time = parse_duration(tc.max_time, "train.max_time") if tc.max_time else None
    data = StepData(run, order, cfg)
    t0, tokens_seen, stopped = time.time(), 0, None
    # ---- the loop: draw -> loss -> backward -> step -> log -> evaluate -> checkpoint -> stop?
    with StopFlag() as stop:
        while state.step < tc.max_steps:
            t_step = time.time()
            idx, micro, on_policy, data_wait = data.next(state.step, student, state.counters, log)
            state.data = data.position
            terms, logs, routing, grad_norm, skipped = train_step(objective, micro, idx, state, student,
                                                                  list(aux.parameters()), acc, tc.grad_clip)
            state.step += 1
            step = state.step
            if skipped and acc.is_main_process:
                scale = f"; loss scale now {acc.scaler.get_scale():g}" if acc.scaler is not None else ""
                log(f"step {step}: optimizer step skipped, gradients not finite{scale} "
                    f"({state.counters['skipped_steps']} skipped so far); the LR and KA schedules still advance")
            tokens_seen += int(sum(b["s_mask"].sum() for b in micro)) * acc.num_processes
            rec = step_record(step, scheduler.get_last_lr()[0], time.time() - t_step,
                              tokens_seen / max(time.time() - t0, 1e-9), on_policy, data_wait, terms, logs,
                              objective.weights, objective.sched, grad_norm, skipped, routing, tc.log_every)
            state.history.append(rec)
            logger.step(rec, terms)
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps and evaluates:
                bpb = heldout_bits_per_byte(acc.unwrap_model(student), run, cfg)
                state.evals.append({"step": step, "student_bpb": bpb})
                if acc.is_main_process:
                    log(f"step {step}: held-out student {bpb:.4f} bits/byte (teacher {state.teacher_bpb:.4f})")
                logger.scalar("heldout_bpb", bpb, step)
            stopped = stop_reason(stop, acc, t_setup, max_time, tc)
            if stopped or (tc.save_every and step % tc.save_every == 0) or step == tc.max_steps:
                save(state, ckpt_dir, acc, tc.keep_checkpoints)
            if stopped:
                log(f"stopping at step {step}: {stopped}; checkpoint saved, continue with --resume")
                break
    # ---- finish: final evaluation, export, history, report
    data.close()
    logger.close()
    result = {"steps": state.step, "seconds": time.time() - t_setup, "teacher_bpb": state.teacher_bpb,
              "stopped": stopped, "counters": state.counters, **info}
    if acc.is_main_process or fsdp.is_sharded(acc):
        finish(run, cfg, state, out, result, stopped, log)
    acc.wait_for_everyone()
    acc.end_training()
    return result
