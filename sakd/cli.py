"""Command line: verbs map to functions.

    sakd distill --config configs/demo.yaml train.lr=3e-4 loss.temperature=2
    sakd demo --out runs/demo --compare
    sakd align --teacher-tokenizer T --student-tokenizer S --text FILE [--json]
    sakd evaluate --student DIR [--teacher DIR] --data FILE [--json]
    sakd cache-teacher --config FILE --out DIR [--k 64 | --codec sampled --draws 12] [--resume]
    sakd plan --config FILE [--card-gb 16] [--json]
    sakd pretrain --model-config DIR --tokenizer DIR --train FILE --heldout FILE --out DIR
    sakd push RUN_DIR REPO_ID [--private] [--token T] [--revision BRANCH] [--message TEXT]

Bad input ends with exit code 2 and one line naming the problem; ``--debug`` writes the
traceback to ``sakd-debug.log`` (in the run folder when there is one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from sakd.errors import UserError

EXIT_USER, EXIT_BUG = 2, 1
# Sub-commands repeat --debug; SUPPRESS keeps their unset default from overwriting `sakd --debug VERB`.
DEBUG_HELP = "write tracebacks to sakd-debug.log"


def _config_epilog() -> str:
    from sakd.config import field_help

    lines = ["configuration keys (override with key=value):"]
    for key, help_, default in field_help():
        lines.append(f"  {key} = {default!r}\n      {help_}")
    return "\n".join(lines)


def _add_distill(sub) -> None:
    """``sakd distill``: the main loop."""
    d = sub.add_parser("distill", help="distil a teacher into a student (the main loop)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_epilog())
    d.add_argument("--config", help="YAML configuration file (configs/*.yaml)")
    d.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint in "
                   "train.output_dir (mid-epoch, exact)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    d.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 loss.temperature=2")


def _add_demo(sub) -> None:
    """``sakd demo``: the offline demo."""
    m = sub.add_parser("demo", help="the offline demo: Shakespeare, a pre-trained 3-expert MoE teacher, "
                       "a small Llama student with another tokenizer")
    m.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    m.add_argument("--config", default=None, help="demo config (default configs/demo.yaml; the chat demo: "
                   "configs/demo-chat.yaml)")
    m.add_argument("--steps", type=int, default=None, help="distillation steps (default: configs/demo.yaml)")
    m.add_argument("--compare", action="store_true", help="also train the same student with cross-entropy "
                   "alone on the same data and report student_bpb_ce_only")
    m.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    m.add_argument("overrides", nargs="*", help="dotted config overrides applied to the demo config")


def _add_align(sub) -> None:
    """``sakd align``: the alignment report."""
    a = sub.add_parser("align", help="byte-align two tokenisations of a text and print the chunk statistics")
    a.add_argument("--teacher-tokenizer", required=True, help="hub id, folder, .gguf file, or qwen-real")
    a.add_argument("--student-tokenizer", required=True, help="hub id, folder, .gguf file, or smollm2-real")
    a.add_argument("--text", required=True, help="UTF-8 text file")
    a.add_argument("--teacher-model", help="also report the teacher's probability mass on the shared "
                   "vocabulary at 1:1 chunks")
    a.add_argument("--chunk-mode", default="boundary", choices=("boundary", "word"))
    a.add_argument("--json", action="store_true", help="write one JSON object to stdout")
    a.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def _add_evaluate(sub) -> None:
    """``sakd evaluate``: held-out bits per byte."""
    e = sub.add_parser("evaluate", help="held-out bits per byte (and retention) of a student and a teacher")
    e.add_argument("--student", required=True, help="student folder or hub id")
    e.add_argument("--teacher", help="teacher folder or hub id")
    e.add_argument("--data", required=True, help="held-out text: file, folder, hub dataset or sakd:shakespeare-heldout")
    e.add_argument("--max-bytes", type=int, default=200_000, help="UTF-8 bytes scored (default 200,000)")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    e.add_argument("--json", action="store_true", help="write one JSON object to stdout")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def _add_cache_teacher(sub) -> None:
    """``sakd cache-teacher``: the teacher cache build."""
    c = sub.add_parser("cache-teacher", help="run the teacher once over the training data and store its top-k "
                       "log-probabilities (train later with model.teacher_cache=DIR, without the teacher)",
                       description="Run the teacher once over the training spans of --config and store its top-k "
                       "log-probabilities, shard by shard (--resume continues a stopped build; under accelerate "
                       "launch --num_processes N the processes split the shards). moe.mode=topk, all and ka (M "
                       "sampled routings per position) can be cached; moe.mode=sar trains the router during "
                       "distillation and needs the live teacher.")
    c.add_argument("--config", help="the YAML configuration of the run that will use the cache (default: the "
                   "defaults + overrides)")
    c.add_argument("--out", required=True, help="cache folder to create")
    c.add_argument("--k", type=int, default=64, help="teacher tokens kept per position (default 64)")
    c.add_argument("--codec", default="packed",
                   help="packed: ids as an Elias-Fano set + 5-bit log-prob levels (~160 bytes/token at k=64 for "
                   "Qwen3); float32: exact (8 bytes per id); sampled: --draws ids drawn from the teacher with "
                   "their counts, an unbiased KD target (under 40 bytes/token for Qwen3; --k is not used)")
    c.add_argument("--draws", type=int, default=12, help="--codec sampled: draws per position (default 12)")
    c.add_argument("--resume", action="store_true", help="continue a stopped or killed build in --out (same "
                   "config and options): only the missing shards are computed")
    c.add_argument("--shard-spans", type=int, help="spans per shard (default: ~512k teacher tokens a shard)")
    c.add_argument("--batch-size", type=int, help="spans per teacher forward (default eval.batch_size)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar (a log line per shard)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    c.add_argument("overrides", nargs="*", help="dotted config overrides")


def _add_plan(sub) -> None:
    """``sakd plan``: the memory estimate."""
    pl = sub.add_parser("plan", help="estimate the peak GPU memory of a configuration and the largest micro-batch "
                        "that fits a card")
    pl.add_argument("--config", required=True, help="YAML configuration")
    pl.add_argument("--card-gb", type=float, default=16.0, help="GPU memory in GiB (default 16, a P100)")
    pl.add_argument("--processes", type=int, default=1, help="processes (GPUs) of the run: with "
                    "train.distributed=fsdp the student's weights, gradients and AdamW states are divided by it")
    pl.add_argument("--json", action="store_true", help="write one JSON object to stdout")
    pl.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    pl.add_argument("overrides", nargs="*", help="dotted config overrides")


def _add_pretrain(sub) -> None:
    """``sakd pretrain``: pre-training a demo teacher."""
    t = sub.add_parser("pretrain", help="pre-train a causal LM from a config on a text file (demo teachers)")
    t.add_argument("--model-config", required=True, help="folder or config.json of the architecture")
    t.add_argument("--tokenizer", required=True, help="tokenizer folder")
    t.add_argument("--train", required=True, help="training text file")
    t.add_argument("--heldout", required=True, help="held-out text file")
    t.add_argument("--out", required=True, help="output folder (model + tokenizer + pretrain.json)")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    t.add_argument("--eval-every", type=int, default=250, help="held-out evaluation (and best-model save) interval")
    t.add_argument("--init-from", help="continue from this saved model (a second stage with its own schedule)")
    t.add_argument("--stop-after", type=int, help="run only this many steps of the --steps long schedule")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def _add_push(sub) -> None:
    """``sakd push``: the exported student to the hub."""
    u = sub.add_parser("push", help="upload a run's exported student (weights, tokenizer, model card) to the "
                       "Hugging Face hub")
    u.add_argument("run_dir", help="run folder (its student/ is uploaded) or an exported student folder")
    u.add_argument("repo_id", help="hub repo id, e.g. me/my-student (created if missing)")
    u.add_argument("--private", action="store_true", help="create the repo private")
    u.add_argument("--token", help="write token (default: HF_TOKEN or the saved `hf auth login`)")
    u.add_argument("--revision", help="branch to push to (created if missing; default main)")
    u.add_argument("--message", help="commit message")
    u.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sakd", description="Student-aware knowledge distillation from an MoE "
                                "teacher into a dense student with a different tokenizer.")
    p.add_argument("--debug", action="store_true", help="write tracebacks to sakd-debug.log")
    sub = p.add_subparsers(dest="verb", required=True)
    for add in (_add_distill, _add_demo, _add_align, _add_evaluate, _add_cache_teacher, _add_plan, _add_pretrain,
                _add_push):
        add(sub)
    return p


def cmd_distill(args) -> int:
    from sakd.config import load_config

    cfg = load_config(args.config, args.overrides)  # before importing torch: a typo fails in a fraction of a second
    args._log_dir = cfg.train.output_dir
    _cpu_heap(cfg)
    from sakd.train.distill import distill

    # with the CE-only run, the push (train.push_to_hub) waits until its row is in the model card (publish)
    result = distill(cfg, resume=args.resume, progress=not args.no_progress)
    if cfg.eval.ce_only_baseline:
        from sakd.train.ce_only import ce_only_row, run_ce_only
        from sakd.train.publish import publish

        if result.get("stopped"):
            print(f"cross-entropy-only run not started: the run stopped ({result['stopped']}); it follows the "
                  "run's --resume", flush=True)
            return 0
        ce = run_ce_only(args.config, args.overrides, cfg.train.output_dir, progress=not args.no_progress)
        if ce.get("stopped"):
            print(f"cross-entropy-only run stopped ({ce['stopped']}); --resume finishes it"
                  + (" and then pushes" if cfg.train.push_to_hub else ""), flush=True)
            return 0
        if "student_bpb_final" in ce and "student_bpb_final" in result:  # the main process
            print(f"held-out bits/byte: distilled {result['student_bpb_final']:.4f}, cross-entropy only "
                  f"{ce['student_bpb_final']:.4f} (report: {cfg.train.output_dir}/report.md)", flush=True)
            publish(cfg.train.output_dir, cfg, result, ce_only=ce_only_row(cfg.train.output_dir, ce))  # then push
    return 0


def _cpu_heap(cfg) -> None:
    """``train.cpu_heap`` for this process (the command owns it; sakd/train/heap.py)."""
    import torch

    from sakd.train.heap import set_cpu_heap

    did = set_cpu_heap(cfg.train.cpu_heap, on_gpu=torch.cuda.is_available())
    if cfg.train.cpu_heap != "system":
        print(f"train.cpu_heap={cfg.train.cpu_heap}: {did}", flush=True)


def cmd_demo(args) -> int:
    from sakd.config import load_config
    from sakd.demo.run import run_demo

    args._log_dir = args.out
    from sakd.demo.run import DEMO_CONFIG

    _cpu_heap(load_config(args.config or DEMO_CONFIG, args.overrides))
    run_demo(args.out, steps=args.steps, compare=args.compare, overrides=args.overrides,
             config=args.config or DEMO_CONFIG)
    return 0


def cmd_align(args) -> int:
    from sakd.evaluate.alignment import align_report

    path = Path(args.text)
    if not path.is_file():
        raise UserError(f"text file {args.text!r} does not exist")
    report = align_report(args.teacher_tokenizer, args.student_tokenizer, path, teacher_model=args.teacher_model,
                          chunk_mode=args.chunk_mode)
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:>40}: {v:,.4f}" if isinstance(v, float) else f"{k:>40}: {v:,}" if isinstance(v, int)
                  else f"{k:>40}: {v}")
    return 0


def cmd_evaluate(args) -> int:
    from sakd.report.run import evaluate_command

    result = evaluate_command(args.student, args.teacher, args.data, max_bytes=args.max_bytes, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(result))
    else:
        from sakd.report.run import format_evaluation
        print(format_evaluation(result))
    return 0


def cmd_cache_teacher(args) -> int:
    if args.codec not in ("packed", "float32", "sampled"):  # = teacher_cache.codec.CODECS, before importing torch
        raise UserError(f"--codec={args.codec}: unknown codec: use one of packed, float32, sampled")
    if args.draws < 1:
        raise UserError(f"--draws={args.draws}: must be >= 1")
    from sakd.teacher_cache.builder import build_cache
    from sakd.config import load_config

    cfg = load_config(args.config, args.overrides)
    _cpu_heap(cfg)
    if args.k < 1:
        raise UserError(f"--k={args.k}: must be >= 1")
    for name in ("shard_spans", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    manifest = build_cache(cfg, args.out, k=args.k, codec=args.codec, draws=args.draws, overwrite=args.overwrite,
                           resume=args.resume,
                           shard_spans=args.shard_spans, batch_size=args.batch_size,
                           progress=not args.no_progress and sys.stderr.isatty())
    if manifest is None:
        from sakd.teacher_cache.builder import INCOMPLETE
        return INCOMPLETE  # stopped by train.max_time: the message says how to resume
    if int(os.environ.get("RANK", "0")) == 0:
        kept = f"{args.draws} draws" if args.codec == "sampled" else f"k={args.k}"
        print(f"teacher cache: {manifest['bytes_per_token']:.1f} bytes per teacher token ({kept}, {args.codec}) "
              f"-> {args.out}; train with model.teacher_cache={args.out}")
    return 0


def cmd_plan(args) -> int:
    from sakd.config import load_config
    from sakd.plan import format_plan, plan

    cfg = load_config(args.config, args.overrides)
    p = plan(cfg, card_gb=args.card_gb, processes=args.processes)
    print(json.dumps(p, default=str) if args.json else format_plan(p))
    return 0


def cmd_pretrain(args) -> int:
    from sakd.demo.pretrain import pretrain

    for name in ("model_config", "tokenizer", "train", "heldout"):
        if not Path(getattr(args, name)).exists():
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)!r} does not exist")
    args._log_dir = args.out
    m = pretrain(args.model_config, args.tokenizer, args.train, args.heldout, args.out, steps=args.steps,
                 batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                 warmup=args.warmup, eval_every=args.eval_every, init_from=args.init_from,
                 stop_after=args.stop_after)
    print(f"held-out {m['heldout_bpb']:.4f} bits/byte (best step {m['best_step']}), saved to {args.out}")
    return 0


def cmd_push(args) -> int:
    from sakd.report.push import check_push, push_student

    token = check_push(args.repo_id, args.token)  # offline / no token: one line before anything else
    push_student(args.run_dir, args.repo_id, token=token, private=args.private, revision=args.revision,
                 commit_message=args.message)
    return 0


VERBS = {"distill": cmd_distill, "demo": cmd_demo, "align": cmd_align, "evaluate": cmd_evaluate,
         "pretrain": cmd_pretrain, "cache-teacher": cmd_cache_teacher, "plan": cmd_plan, "push": cmd_push}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # stderr is for errors (one line each): no "Loading weights" / "Writing model shards" bars from
    # transformers / huggingface_hub (read when they are first imported, i.e. after this line)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = _parser().parse_args(argv)
    args._log_dir = None
    try:
        if getattr(args, "out", None) is not None and not str(args.out).strip():
            raise UserError("--out is empty: name the folder to write, e.g. --out runs/my-run")
        return VERBS[args.verb](args)
    except UserError as e:
        _debug_log(args)
        print(f"sakd {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print(f"sakd {args.verb}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        _debug_log(args)
        print(f"sakd {args.verb}: error: out of memory: use a smaller train.batch_size or data.seq_len "
              "(see `sakd plan`)", file=sys.stderr)
        return EXIT_USER
    except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback in the log
        if _is_device_oom(e):
            _debug_log(args)
            print(f"sakd {args.verb}: error: {OOM_HINT.format(config=_config_arg(args))}", file=sys.stderr)
            return EXIT_USER
        path = _debug_log(args, force=True)
        print(f"sakd {args.verb}: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(traceback in {path})", file=sys.stderr)
        return EXIT_BUG


OOM_HINT = ("the GPU ran out of memory: run `sakd plan {config} --card-gb <GiB of your card>` to see what fits, "
            "then lower train.batch_size (and raise train.grad_accum to keep the step size), data.seq_len or "
            "loss.chunk_rows, or set model.gradient_checkpointing=true, loss.fused_head=true, moe.ka_samples=1")


def _is_device_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, and other accelerators) -- without importing torch for other verbs."""
    return type(e).__name__ == "OutOfMemoryError" or (isinstance(e, RuntimeError) and "out of memory" in str(e)
                                                       and ("CUDA" in str(e) or "HIP" in str(e)))


def _config_arg(args) -> str:
    return f"--config {args.config}" if getattr(args, "config", None) else "--config <your.yaml>"


def _debug_log(args, force: bool = False) -> str | None:
    if not (args.debug or force):
        return None
    folder = Path(args._log_dir) if args._log_dir and Path(args._log_dir).is_dir() else Path(".")
    path = folder / "sakd-debug.log"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(traceback.format_exc())
    except OSError:
        return "stderr (log not writable)"
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
