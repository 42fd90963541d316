"""The distillation loop (``sakd distill``), top to bottom, on Accelerate.

One optimizer step:
  1. fetch ``grad_accum`` micro-batches (already tokenized and byte-aligned by the data pipeline);
  2. count the targets of every loss term over the whole step and across processes, so that each
     term is normalised ONCE per optimizer step (batch 8 x accumulation 1 == batch 2 x accumulation 4);
  3. [SAR] one router step on the first micro-batch: KL(p_teacher || q_student), student detached;
  4. for each micro-batch: teacher forward(s) without gradient (KA: M routed passes), student forward,
     loss terms as sums, backward (``no_sync`` except on the last micro-batch);
  5. unscale, clip, step (GradScaler skips steps with non-finite gradients), schedule.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoConfig

from sakd import moe
from sakd.align.mapping import mapping_tables
from sakd.align.vocab import build_vocab_map
from sakd.checkpoint import list_checkpoints, load_latest, rng_state, save_checkpoint, set_rng_state
from sakd.config import Config, parse_duration, to_dict
from sakd.data import Collator, SpanDataset, pad_id, span_data
from sakd.errors import UserError
from sakd.evaluate import nll_bits
from sakd import objective
from sakd.onpolicy import generate_items
from sakd.models import count_parameters, experts_per_token, load_student, load_teacher
from sakd.schedule import EpochOrder, lr_lambda, optimizer_update, ramp  # noqa: F401 (ramp: objective imports it)


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
    teacher_cache: object = None  # sakd.cache.TeacherCache when training from a cache (teacher is None)


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
    return name


def needs_attention_maps(cfg: Config) -> bool:
    return cfg.loss.attention.weight > 0


def setup(cfg: Config, log=print) -> Run:
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.train.precision),
                              cpu=not torch.cuda.is_available())
    set_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = accelerator.device
    m = cfg.model
    data = span_data(cfg, log)  # tokenizers, text spans, held-out text (no model loaded yet)
    vocab = build_vocab_map(data.student_tok, data.teacher_tok)
    # mapped_kl: where every teacher token's mass lands in the student vocabulary (built once, cached on disk)
    vocab.mapping = (mapping_tables(data.student_tok, data.teacher_tok, log=log)
                     if cfg.loss.logit == "mapped_kl" else None)
    attn = "eager" if needs_attention_maps(cfg) else None  # sdpa returns no attention maps
    teacher, cache = None, None
    if m.teacher_cache:
        from sakd import cache as tcache

        tcache.check_cached_config(cfg)
        cache = tcache.TeacherCache(m.teacher_cache, tcache.expected_manifest(
            cfg, data.train.spans, student_tok=data.student_tok, teacher_tok=data.teacher_tok, vocab=vocab))
    else:
        teacher = load_teacher(m.teacher, device, m.teacher_dtype, attn=attn,
                               experts_implementation=m.experts_implementation)
        if cfg.moe.mode != "topk" and not moe.is_moe(teacher):
            raise UserError(f"moe.mode={cfg.moe.mode} needs an MoE teacher, but {m.teacher!r} has no MoE blocks: "
                            "use moe.mode=topk")
    student = load_student(m.student, device, attn=attn)
    if m.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    t_config = teacher.config if teacher is not None else AutoConfig.from_pretrained(m.teacher)
    aux = objective.build_aux_modules(cfg, student.config, t_config).to(device)
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
        "device": str(run.accelerator.device),
        "mixed_precision": run.accelerator.mixed_precision,
    }
    if run.teacher is None:
        log(f"teacher: read from the cache {cfg.model.teacher_cache} (top-{run.teacher_cache.k}, not loaded)")
    else:
        log(f"teacher: {info['teacher_parameters'] / 1e6:.2f}M parameters, experts per token: "
            f"{info['teacher_experts_per_token']}, routing: {cfg.moe.mode}")
    log(f"student: {info['student_parameters'] / 1e6:.2f}M parameters")
    log(f"vocabulary overlap: {info['shared_vocab']:,} token strings shared "
        f"({100 * info['shared_vocab'] / info['student_vocab']:.1f}% of the student's {info['student_vocab']:,}, "
        f"teacher has {info['teacher_vocab']:,})")
    log(f"tokens per optimizer step: {info['tokens_per_step']:,} (at most; {cfg.train.batch_size} x "
        f"{cfg.train.grad_accum} accumulation x {world} process(es) x {cfg.data.seq_len})")
    log(f"data: {info['train_spans']:,} training spans, {info['heldout_bytes']:,} held-out bytes; "
        f"device {info['device']}, mixed precision {info['mixed_precision']}")
    if run.teacher is not None and objective.fused_head_terms(cfg.loss, kd=cfg.loss.kd_weight > 0 and
                                                              cfg.loss.logit != "none",
                                                              chunk=cfg.loss.chunk_weight > 0):
        # The fused head's matmuls run in the dtype of the student's final hidden state, and the final
        # RMSNorm returns its fp32 input dtype under autocast; the loss runs outside autocast.
        log("fused output layer: the student's logits are computed chunk by chunk in float32 (its final hidden "
            "state is float32 under autocast): exact log-softmax inputs at 150k columns, the head's matmul at "
            "fp32 speed")
    return info


@torch.no_grad()
def heldout_bpb(model, tokenizer, texts, cfg: Config, device) -> float:
    bits, n_bytes, _ = nll_bits(model, tokenizer, texts, cfg.eval.seq_len, cfg.eval.batch_size, device)
    return bits / max(n_bytes, 1)


# ----------------------------------------------------------------------------- the loop

# Settings a resumed run may change: where and how often it reports and saves, how long it runs, and the
# held-out evaluation (which never feeds back into training). Everything else must match the checkpoint.
RESUME_MAY_CHANGE = ("train.max_steps", "train.max_time", "train.output_dir", "train.eval_every",
                     "train.save_every", "train.keep_checkpoints", "train.log_every", "data.num_workers",
                     "logging.", "eval.")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resume_config(path: Path, saved: dict | None, current: dict) -> None:
    """Refuse to resume a checkpoint written with a different training configuration."""
    if not saved:
        return  # a checkpoint from before configurations were stored
    a, b = _flatten(saved), _flatten(current)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == m or (m.endswith(".") and k.startswith(m)) for m in RESUME_MAY_CHANGE)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:3]) + (" ..." if len(diff) > 3 else "")
        raise UserError(f"checkpoint {str(path)!r} was written with another configuration ({shown}): resume with "
                        "the same settings, or choose another train.output_dir")


def distill(cfg: Config, *, resume: bool = False, log=print, progress: bool = True) -> dict:
    out = Path(cfg.train.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("ok")
        (out / ".write-test").unlink()
    except OSError as e:
        raise UserError(f"train.output_dir {str(out)!r} is not writable ({e.strerror}): choose another folder") from None
    ckpt_dir = out / "checkpoints"
    if not resume and list_checkpoints(ckpt_dir):
        raise UserError(f"{str(out)!r} already holds checkpoints: pass --resume to continue, or choose another "
                        "train.output_dir")
    t_setup = time.time()
    run = setup(cfg, log)
    acc = run.accelerator
    info = describe(run, cfg, log) if acc.is_main_process else {}
    tc = cfg.train

    decay = [p for p in run.student.parameters() if p.ndim >= 2]
    no_decay = [p for p in run.student.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay, "lr": tc.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": tc.lr}]
    if len(list(run.aux.parameters())):
        groups.append({"params": list(run.aux.parameters()), "weight_decay": 0.0, "lr": tc.aux_lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))
    # The projectors are called piecewise (aux["hidden"], ...), never through a forward(), so DDP cannot
    # wrap them (and refuses a module without parameters): their gradients are averaged by hand below.
    student, optimizer = acc.prepare(run.student, optimizer)
    aux = run.aux.to(acc.device)
    aux_params = list(aux.parameters())
    sar = None
    if cfg.moe.mode == "sar":
        sar = moe.SARRouter(run.teacher, lr=cfg.moe.router_lr, weight_decay=cfg.moe.router_weight_decay,
                            balance_coef=cfg.moe.balance_coef, anchor=cfg.moe.anchor, grad_clip=tc.grad_clip or 1.0)
    order = EpochOrder(len(run.train), tc.seed, acc.process_index, acc.num_processes)
    collate = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))
    # KA's expert draws on the teacher's device (no copies, no host sync per MoE layer); its state is
    # saved in every checkpoint.
    ka_gen = torch.Generator(device=acc.device).manual_seed(tc.seed + 17)
    horizon = tc.max_steps  # the step count the LR and KA schedules are drawn over
    shared_s = run.vocab.shared_s.to(acc.device)
    shared_t = run.vocab.shared_t.to(acc.device)

    step, history, evals, counters = 0, [], [], {"nonfinite_teacher": 0, "skipped_steps": 0}
    teacher_bpb = None
    if resume:
        found = load_latest(ckpt_dir, log)
        if found is None:
            log(f"resume: no checkpoint under {ckpt_dir}; starting from step 0")
        else:
            path, tensors, state = found
            # strict except for the tied lm_head (stored once, as the embeddings): a checkpoint of another
            # student architecture must not load half-way in silence
            missing, unexpected = acc.unwrap_model(student).load_state_dict(tensors.get("student", {}), strict=False)
            missing = [k for k in missing if k != "lm_head.weight"]
            if missing or unexpected:
                raise UserError(f"checkpoint {str(path)!r} does not fit model.student={cfg.model.student!r} "
                                f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. "
                                f"{(missing + unexpected)[0]!r}): resume with the same student, or choose another "
                                "train.output_dir")
            _check_resume_config(path, state.get("config"), to_dict(cfg))
            if "aux" in tensors:
                acc.unwrap_model(aux).load_state_dict(tensors["aux"])
            if sar is not None and "router" in tensors:
                sar.load_state_dict({"master": tensors["router"], **state["sar"]})
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if acc.scaler is not None and state.get("scaler"):
                acc.scaler.load_state_dict(state["scaler"])
            order.load(state["data"])
            set_rng_state(state["rng"])
            try:
                ka_gen.set_state(state["ka_rng"])
            except (RuntimeError, ValueError):  # a CPU generator's state, saved before draws moved to the device
                log("resume: the KA sampling stream restarts (checkpoint saved with a CPU generator)")
            saved_horizon = state.get("horizon") or ((state.get("config") or {}).get("train") or {}).get("max_steps")
            if saved_horizon and saved_horizon != tc.max_steps:
                # Changing the horizon would reshape the remaining LR and KA schedules mid-run; they keep the
                # saved one and train.max_steps only says where this run stops.
                horizon = int(saved_horizon)
                scheduler.lr_lambdas = [lr_lambda(tc.warmup_steps, horizon, tc.min_lr_ratio)] * len(
                    scheduler.lr_lambdas)
                log(f"resume: train.max_steps={tc.max_steps} differs from the checkpoint's {horizon}: the LR and KA "
                    f"schedules keep the saved horizon of {horizon} steps (after it, the LR stays at its minimum); "
                    f"training stops at step {tc.max_steps}")
            step, history, evals = state["step"], state["history"], state["evals"]
            counters, teacher_bpb = state["counters"], state["teacher_bpb"]
            log(f"resume: continuing from {path.name} (step {step})")

    def checkpoint() -> None:
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        tensors = {"student": acc.unwrap_model(student).state_dict()}
        if len(list(aux.parameters())):
            tensors["aux"] = acc.unwrap_model(aux).state_dict()
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                 "data": data_state["position"], "rng": rng_state(), "ka_rng": ka_gen.get_state(),
                 "history": history, "evals": evals, "counters": counters, "teacher_bpb": teacher_bpb,
                 "config": to_dict(cfg), "horizon": horizon}
        if sar is not None:
            sd = sar.state_dict()
            tensors["router"] = sd.pop("master")
            state["sar"] = sd
        # The tied lm_head shares storage with the embeddings: safetensors refuses shared tensors.
        tensors["student"] = {k: v for k, v in tensors["student"].items()
                              if not (k == "lm_head.weight" and acc.unwrap_model(student).config.tie_word_embeddings)}
        save_checkpoint(ckpt_dir, step, tensors, state, tc.keep_checkpoints)

    if teacher_bpb is None and acc.is_main_process:
        if run.teacher is None:
            from sakd.cache import spans_sha256
            m = run.teacher_cache.manifest
            same = m.get("heldout_sha256") == spans_sha256(run.heldout)
            teacher_bpb = m.get("teacher_heldout_bpb") if same else float("nan")
        else:
            with moe.routing(run.teacher, "all" if cfg.moe.mode == "sar" else "topk") \
                    if moe.is_moe(run.teacher) else nullcontext():
                teacher_bpb = heldout_bpb(run.teacher, run.teacher_tok, run.heldout, cfg, acc.device)
        student_bpb0 = heldout_bpb(acc.unwrap_model(student), run.student_tok, run.heldout, cfg, acc.device)
        evals.append({"step": 0, "student_bpb": student_bpb0})
        log(f"held-out bits/byte at start: teacher {teacher_bpb:.4f}, student {student_bpb0:.4f}")

    writer = None
    if cfg.logging.tensorboard and acc.is_main_process:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))
    wandb = None
    if cfg.logging.wandb and acc.is_main_process:
        import wandb as _wandb  # optional: imported only when asked for
        wandb = _wandb
        wandb.init(project=cfg.logging.wandb_project, config=to_dict(cfg))

    max_time = parse_duration(tc.max_time, "train.max_time") if tc.max_time else None
    t0, tokens_seen, stop_reason = time.time(), 0, None
    bar = None
    if progress and acc.is_main_process:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.max_steps, initial=step, desc="distill", unit="step", dynamic_ncols=True)

    ept = experts_per_token(run.teacher) if run.teacher is not None else None
    # KA default as in Kim et al. (2025) and their scripts (--num-selects 15 of 16): E - 1 experts per token.
    k_start = cfg.moe.experts_start or (max(ept[0], ept[1] - 1) if ept else 1)
    # Tokenisation + byte alignment of the next step's spans run in a background thread while this step
    # computes (data.num_workers > 0). The saved data position is the one after THIS step's spans, so a
    # resume draws the prefetched spans again: exact either way.
    prefetcher = ThreadPoolExecutor(max_workers=1) if cfg.data.num_workers > 0 else None
    upcoming = None
    data_state = {"position": order.state()}

    def draw() -> list[list[int]]:
        return [order.next(tc.batch_size) for _ in range(tc.grad_accum)]

    def encode(idx: list[list[int]]) -> list[dict]:
        return [collate([run.train[i] for i in ids]) for ids in idx]

    with StopFlag() as stop:
        while step < tc.max_steps:
            t_step = time.time()
            sched = moe.routing_schedule(step, horizon, experts_start=k_start,
                                         experts_end=cfg.moe.experts_end or k_start,
                                         temp_start=cfg.moe.router_temperature_start,
                                         temp_end=cfg.moe.router_temperature_end,
                                         prob_start=cfg.moe.sample_prob,
                                         prob_end=cfg.moe.sample_prob
                                         if cfg.moe.sample_prob_end is None else cfg.moe.sample_prob_end
                                         ) if cfg.moe.mode == "ka" else {}
            idx, ready = upcoming if upcoming is not None else (draw(), None)
            data_state["position"] = order.state()
            if prefetcher is not None and step + 1 < tc.max_steps:
                nxt = draw()
                upcoming = (nxt, prefetcher.submit(encode, nxt))
            on_policy = cfg.loss.on_policy_prob > 0 and random.random() < cfg.loss.on_policy_prob
            if on_policy:  # GKD: the student writes the continuations, both models score that text
                micro = [collate(generate_items(acc.unwrap_model(student), run.train, ids,
                                                new_tokens=cfg.loss.on_policy_tokens,
                                                temperature=cfg.loss.on_policy_temperature)) for ids in idx]
            else:
                t_wait = time.time()
                micro = ready.result() if ready is not None else encode(idx)
                data_wait = time.time() - t_wait  # what the step waits for its data (0 when prefetched in time)
            n_skipped = sum(int(b["skipped"].sum()) for b in micro)
            if n_skipped:  # spans that could not be byte-aligned: empty rows, counted and named, never fatal
                counters["skipped_spans"] = counters.get("skipped_spans", 0) + n_skipped
                if counters["skipped_spans"] <= 3 or step % tc.log_every == 0:
                    why = next(iter(run.train.skipped.values()), "")
                    log(f"data: {counters['skipped_spans']} span(s) skipped so far (cannot be byte-aligned), "
                        f"e.g. {why}")
            micro = [{k: v.to(acc.device) for k, v in b.items()} for b in micro]
            counts = objective.count_targets(micro, cfg, run.vocab.mapping)
            counts = {k: max(1.0, float(acc.reduce(torch.tensor(v, device=acc.device, dtype=torch.float64),
                                                   reduction="sum"))) for k, v in counts.items()}
            weights = objective.term_weights(cfg, step)

            logs = {}
            if sar is not None:
                logs.update(objective.sar_router_step(sar, run.teacher, student, micro[0], shared_s, shared_t,
                                                      cfg, acc, len(run.teacher_tok)))
            terms_total: dict[str, float] = {}
            routing_stats = None
            for i, batch in enumerate(micro):
                sync = nullcontext() if i == len(micro) - 1 else acc.no_sync(student)
                with sync:
                    if run.teacher_cache is not None:
                        cb = run.teacher_cache.batch(idx[i], batch["t_ids"].shape[1], device=acc.device, check=batch)
                        loss, terms, flags = objective.cached_step_loss(student, cb, batch, shared_s, shared_t, cfg,
                                                                        weights, counts, acc)
                    else:
                        loss, terms, flags = objective.micro_step_loss(
                            run.teacher, student, aux, batch, shared_s, shared_t, cfg, weights, counts,
                            acc, sched, ka_gen, len(run.teacher_tok), sar.initial if sar is not None else None,
                            log_mass=(i == 0 and ((step + 1) % tc.log_every == 0 or step == 0)),
                            mapping=run.vocab.mapping)
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
                for p in aux_params:  # as DDP does for the student: mean over processes
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(acc.reduce(p.grad, reduction="mean"))
                # the logged terms: global values, not this process's share
                keys = sorted(weights)
                vec = acc.reduce(torch.tensor([terms_total.get(k, 0.0) for k in keys], dtype=torch.float64,
                                              device=acc.device), reduction="sum")
                terms_total = {k: float(v) for k, v in zip(keys, vec.tolist()) if k in terms_total or v != 0.0}
            grad_norm, skipped = optimizer_update(acc, optimizer, scheduler, tc.grad_clip, counters)
            step += 1
            if skipped and acc.is_main_process:
                scale = f"; loss scale now {acc.scaler.get_scale():g}" if acc.scaler is not None else ""
                log(f"step {step}: optimizer step skipped, gradients not finite{scale} "
                    f"({counters['skipped_steps']} skipped so far); the LR and KA schedules still advance")
            tokens_seen += int(sum(b["s_mask"].sum() for b in micro)) * acc.num_processes
            dt = time.time() - t_step
            rec = {"step": step, "lr": scheduler.get_last_lr()[0], "seconds": dt, "on_policy": on_policy,
                   "skipped": skipped,
                   "data_wait_s": 0.0 if on_policy else data_wait,
                   "tokens_per_s": tokens_seen / max(time.time() - t0, 1e-9), **terms_total, **logs,
                   **{f"w_{k}": v for k, v in weights.items()}}
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            if sched:
                rec.update({f"moe_{k}": v for k, v in sched.items()})
            if routing_stats and (step % tc.log_every == 0 or step == 1):
                # telemetry per MoE layer: expert usage, router entropy (nats), router mass on the
                # experts used, and under SAR the KL between the original and the current router
                layers = list(routing_stats.values())
                rec["moe_usage"] = {k: v["usage"] for k, v in routing_stats.items()}
                rec["moe_top1"] = {k: v["top1"] for k, v in routing_stats.items()}
                rec["moe_entropy"] = sum(v["entropy"] for v in layers) / len(layers)
                rec["moe_selected_mass"] = sum(v["selected_mass"] for v in layers) / len(layers)
                if "router_kl" in layers[0]:
                    rec["moe_router_kl"] = {k: v["router_kl"] for k, v in routing_stats.items()}
            history.append(rec)
            if writer is not None and (step % tc.log_every == 0 or step == 1):
                for k, v in rec.items():
                    if isinstance(v, (int, float)) and k != "step":
                        writer.add_scalar(k, v, step)
            if wandb is not None and step % tc.log_every == 0:
                wandb.log(rec, step=step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in terms_total.items()} | {"tok/s": f"{rec['tokens_per_s']:.0f}"})
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps and acc.is_main_process:
                bpb = heldout_bpb(acc.unwrap_model(student), run.student_tok, run.heldout, cfg, acc.device)
                evals.append({"step": step, "student_bpb": bpb})
                log(f"step {step}: held-out student {bpb:.4f} bits/byte (teacher {teacher_bpb:.4f})")
                if writer is not None:
                    writer.add_scalar("heldout_bpb", bpb, step)
            if max_time is not None and time.time() - t_setup > max_time:
                stop_reason = f"train.max_time={tc.max_time} reached"
            if stop.raised:
                stop_reason = f"{stop.raised} received"
            if acc.num_processes > 1:  # every process stops at the same step, or the others hang in a collective
                flag = acc.reduce(torch.tensor(float(bool(stop_reason)), device=acc.device), reduction="sum")
                if float(flag) > 0 and not stop_reason:
                    stop_reason = "another process is stopping"
            if stop_reason or (tc.save_every and step % tc.save_every == 0) or step == tc.max_steps:
                checkpoint()
            if stop_reason:
                log(f"stopping at step {step}: {stop_reason}; checkpoint saved, continue with --resume")
                break
    if prefetcher is not None:
        prefetcher.shutdown(wait=True, cancel_futures=True)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()

    result = {"steps": step, "seconds": time.time() - t_setup, "teacher_bpb": teacher_bpb, "stopped": stop_reason,
              "counters": counters, **info}
    if acc.is_main_process:
        final_student = acc.unwrap_model(student)
        if not stop_reason:
            bpb = heldout_bpb(final_student, run.student_tok, run.heldout, cfg, acc.device)
            evals.append({"step": step, "student_bpb": bpb})
            log(f"held-out bits/byte at the end: student {bpb:.4f} (teacher {teacher_bpb:.4f})")
            export_dir = out / "student"
            final_student.save_pretrained(export_dir, safe_serialization=True)
            run.student_tok.save_pretrained(export_dir)
            from sakd.report import write_model_card
            write_model_card(export_dir, teacher=cfg.model.teacher, data=cfg.data.source,
                             method=f"routing {cfg.moe.mode}, logit loss {cfg.loss.logit} ({cfg.loss.divergence}), "
                                    f"weights kd={cfg.loss.kd_weight} ce={cfg.loss.ce_weight} "
                                    f"chunk={cfg.loss.chunk_weight}",
                             metrics={"teacher_bpb": teacher_bpb, "student_bpb_initial": evals[0]["student_bpb"],
                                      "student_bpb_final": bpb, "steps": step},
                             command="sakd " + " ".join(sys.argv[1:]))
            if sar is not None:
                from safetensors.torch import save_file
                save_file({k: v.contiguous() for k, v in moe.router_state(run.teacher).items()},
                          str(out / "router.safetensors"))
            result["student_dir"] = str(export_dir)
        result.update({"student_bpb_initial": evals[0]["student_bpb"], "student_bpb_final": evals[-1]["student_bpb"],
                       "evals": evals})
        (out / "history.json").write_text(json.dumps({"history": history, "evals": evals}, default=float))
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
        if not stop_reason:
            from sakd.report import write_run_report
            write_run_report(out, cfg, result, teacher=run.teacher, teacher_tokenizer=run.teacher_tok,
                             texts=run.heldout)
    acc.wait_for_everyone()
    acc.end_training()
    return result
