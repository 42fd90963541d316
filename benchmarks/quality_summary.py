"""benchmarks/quality.py's numbers from stored runs: rows per split, paired gains, the kept fraction of the
same-tokenizer gain, the validation-based choice of settings, the tables. Pure Python (no torch)."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

# The row each method is compared with, seed by seed: KD rows against the CE-only student of their tokenizer.
BASELINE = {"ceiling_kd": "ceiling_ce"}
NOT_KD = ("ce", "ceiling_ce")  # baselines, no gain of their own
# What the validation split chooses, and among which rows (full-data regime).
CHOICES = {"loss.logit": {"shared_kl": "shared_kl", "mapped_kl": "mapped_kl", "projected_kl": "projected_kl"},
           "moe.mode": {"topk": "mapped_kl", "ka": "ka_mapped", "sar": "sar_mapped"}}
SELECTION_RULE = "lowest mean validation bits/byte over the seeds, full-data regime"

# CPU seconds per optimizer step, one torch thread, the demo's batch (8 x 256), on this 2-core machine:
# ce, shared_kl, uld, truncation, ka, sar, gap_weighted from docs/benchmarks.md ("Cost", idle-ish);
# mapped_kl (the lead's first version), ceiling_ce and ceiling_kd measured under load (3 -> 33 steps,
# load average ~3, so on the high side); ka_mapped / sar_mapped = mapped_kl + what ka / sar add to shared_kl.
COST = {"ce": 0.25, "shared_kl": 0.6, "mapped_kl": 0.9, "projected_kl": 0.75, "ceiling_ce": 0.47, "ceiling_kd": 1.33, "ka_mapped": 1.4,
        "sar_mapped": 2.2, "uld": 1.5, "truncation": 0.6, "shared_kl+chunk": 0.65, "ka": 1.1, "sar": 1.9,
        "gap_weighted": 0.55, "mapped_kl_o2o": 0.8, "mapped_kl_noext": 0.85,
        "mapped_kl_pw": 0.9}
RUN_FIXED_SECONDS = 17.0  # CPU s per run: start-up, loading, teacher + student evaluations, report, both splits
TEACHER_SECONDS = 15.0  # the teacher scored once on both splits


def run_cost(method: str, steps: int) -> float:
    return RUN_FIXED_SECONDS + steps * COST.get(method, 1.0)


def costs_from(path: Path) -> dict[str, float]:
    """CPU seconds per step of every method of an earlier result file (e.g. quality_quick.json): the median
    over its runs of (cpu_seconds - RUN_FIXED_SECONDS) / steps."""
    import statistics

    per: dict[str, list[float]] = {}
    for r in read_result(path)["runs"]:
        if r.get("steps") and r.get("cpu_seconds") is not None:  # reused runs (--resume) have no CPU time
            per.setdefault(r["method"], []).append(max(0.0, r["cpu_seconds"] - RUN_FIXED_SECONDS) / r["steps"])
    return {m: statistics.median(v) for m, v in per.items()}


def estimate(tasks: list[tuple[str, str, int]], steps: dict[str, int], jobs: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of the plan: runs longest first on ``jobs`` single-thread workers, as
    the pool runs them (each takes the next task when it is free)."""
    costs = sorted((run_cost(m, steps[r]) for m, r, _ in tasks), reverse=True) + [TEACHER_SECONDS]
    free = [0.0] * max(1, jobs)
    for c in costs:
        k = free.index(min(free))
        free[k] += c
    return sum(costs), max(free)


def _mean_std(xs: list[float]) -> tuple[float | None, float]:
    if not xs:
        return None, 0.0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(runs: list[dict], methods: list[str]) -> tuple[float, float | None, list[dict]]:
    """(teacher_bpb, ce_bpb, rows) from runs {method, seed, bpb, teacher_bpb, seconds_per_step, run_seconds,
    cpu_seconds} of ONE split. Differences are paired by seed (the same data order), so the seed-to-seed
    spread both runs share cancels:

    * delta_vs_ce: bpb - bpb_ce (bits/byte); gain_pct: 100 (bpb_base - bpb) / bpb_base against the row's
      baseline (ce; ceiling_ce for ceiling_kd), mean ± std over seeds;
    * kept_same_tokenizer_gain: gain_pct_mean / gain_pct_mean of ceiling_kd (what a student that shares the
      teacher's tokenizer gains from plain KD), for the cross-tokenizer KD rows."""
    by = {m: [r for r in runs if r["method"] == m] for m in methods}
    by = {m: rs for m, rs in by.items() if rs}
    bpb = {m: {r["seed"]: r["bpb"] for r in rs} for m, rs in by.items()}
    ce = bpb.get("ce", {})
    ce_bpb = statistics.fmean(ce.values()) if ce else None
    teacher_bpb = next(r["teacher_bpb"] for r in runs if r["method"] in by)
    rows = []
    for m, rs in by.items():
        bpbs = [r["bpb"] for r in rs]
        mean, std = _mean_std(bpbs)
        diffs = [r["bpb"] - ce[r["seed"]] for r in rs if r["seed"] in ce]
        vs_kl = [r["bpb"] - bpb["shared_kl"][r["seed"]] for r in rs if r["seed"] in bpb.get("shared_kl", {})]
        base = None if m in NOT_KD else bpb.get(BASELINE.get(m, "ce"), {})
        gains = [100.0 * (base[r["seed"]] - r["bpb"]) / base[r["seed"]] for r in rs if base and r["seed"] in base]
        gap = ce_bpb - teacher_bpb if ce_bpb is not None else 0.0
        row = {"method": m, "bpb_mean": mean, "bpb_std": std, "seeds": [r["seed"] for r in rs], "bpb_per_seed": bpbs,
               "baseline": None if m in NOT_KD else BASELINE.get(m, "ce"),
               "delta_vs_ce_mean": _mean_std(diffs)[0], "delta_vs_ce_std": _mean_std(diffs)[1],
               "delta_vs_ce_per_seed": diffs,
               "delta_vs_shared_kl_mean": _mean_std(vs_kl)[0], "delta_vs_shared_kl_std": _mean_std(vs_kl)[1],
               "gain_pct_mean": _mean_std(gains)[0], "gain_pct_std": _mean_std(gains)[1], "gain_pct_per_seed": gains,
               "gap_closed_pct": 100.0 * (ce_bpb - mean) / gap if gap > 0 else None,
               "seconds_per_step": statistics.median(r["seconds_per_step"] for r in rs),
               # over the runs that were timed (a run reused by --resume has no wall or CPU seconds)
               "run_seconds_mean": _mean_std([r["run_seconds"] for r in rs if r.get("run_seconds") is not None])[0],
               "cpu_seconds_mean": _mean_std([r["cpu_seconds"] for r in rs if r.get("cpu_seconds") is not None])[0]}
        rows.append(row)
    ceiling = next((r for r in rows if r["method"] == "ceiling_kd"), None)
    for row in rows:
        ok = ceiling is not None and row["baseline"] == "ce" and row["gain_pct_mean"] is not None
        ok = ok and ceiling["gain_pct_mean"] is not None and ceiling["gain_pct_mean"] > 0
        row["kept_same_tokenizer_gain"] = row["gain_pct_mean"] / ceiling["gain_pct_mean"] if ok else None
    return teacher_bpb, ce_bpb, rows


def split_rows(runs: list[dict], methods: list[str], regime: str, split: str, teacher_bpb: float) -> list[dict]:
    """The rows of one regime scored on one split (runs hold bpb_validation and bpb_test)."""
    mine = [{**r, "bpb": r[f"bpb_{split}"], "teacher_bpb": teacher_bpb} for r in runs if r["regime"] == regime]
    return summarise(mine, methods)[2] if mine else []


def choose_settings(validation_rows: list[dict]) -> dict:
    """The settings the validation split picks (reproducible from the stored runs: ``--summarise``)."""
    mean = {r["method"]: r["bpb_mean"] for r in validation_rows}
    chosen, candidates = {}, {}
    for key, options in CHOICES.items():
        have = {v: mean[m] for v, m in options.items() if m in mean}
        candidates[key] = {options[v]: b for v, b in have.items()}
        if have:
            chosen[key] = min(have, key=have.get)
    logit_row = {"shared_kl": "shared_kl", "mapped_kl": "mapped_kl"}.get(chosen.get("loss.logit"))
    kd_helps = None
    if logit_row and "ce" in mean:
        kd_helps = mean[logit_row] < mean["ce"]
    return {"rule": SELECTION_RULE, "chosen": chosen, "candidates": candidates, "kd_beats_ce_on_validation": kd_helps}


def _pm(mean, std, n, fmt):
    if mean is None:
        return "—"
    return f"{mean:{fmt}} ± {std:{fmt[1:] if fmt.startswith('+') else fmt}}" if n > 1 else f"{mean:{fmt}}"


def format_table(rows: list[dict], teacher_bpb: float) -> str:
    lines = ["| method | bits/byte | gain vs baseline, same seed (%) | kept of same-tokenizer gain | vs ce (bits/byte) "
             "| gap closed (%) | s/step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        n = len(r["seeds"])
        gain = "—" if r.get("baseline") is None else (
            f"{_pm(r.get('gain_pct_mean'), r.get('gain_pct_std', 0.0), n, '+.2f')} vs {r['baseline']}")
        kept = r.get("kept_same_tokenizer_gain")
        kept = "—" if kept is None else f"{100 * kept:.0f} %"
        delta = "—" if r["method"] == "ce" else _pm(r.get("delta_vs_ce_mean"), r.get("delta_vs_ce_std", 0.0), n,
                                                   "+.4f")
        gap = "—" if r.get("gap_closed_pct") is None else f"{r['gap_closed_pct']:+.1f}"
        lines.append(f"| {r['method']} | {_pm(r['bpb_mean'], r['bpb_std'], n, '.4f')} | {gain} | {kept} | {delta} "
                     f"| {gap} | {r['seconds_per_step']:.2f} |")
    lines.append(f"| teacher (3-expert MoE, top-1) | {teacher_bpb:.4f} | | | | 100 | — |")
    seeds = rows[0]["seeds"] if rows else []
    lines.append(f"\nseed(s) {', '.join(map(str, seeds))}; gain = 100 (bpb_baseline - bpb) / bpb_baseline of the same "
                 "seed, mean ± std (positive is better); kept = gain / gain of ceiling_kd over ceiling_ce; "
                 "vs ce = bpb - bpb_ce, same seed (negative is better)")
    return "\n".join(lines)


def legacy_summary(res: dict) -> str:
    """A result file written before the validation split (runs without a regime): its single table."""
    methods = list(dict.fromkeys(r["method"] for r in res["runs"]))
    res["teacher_bpb"], res["ce_bpb"], res["rows"] = summarise(res["runs"], methods)
    return format_table(res["rows"], res["teacher_bpb"])


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


def read_result(path: Path) -> dict:
    try:
        res = json.loads(path.read_text())
        assert isinstance(res.get("runs"), list) and res["runs"]
        return res
    except (OSError, ValueError, AssertionError, AttributeError) as e:
        raise SystemExit(f"quality.py: error: --summarise {path}: not a quality result file with runs "
                         f"({e.__class__.__name__}); give a benchmarks/results/quality*.json") from None
