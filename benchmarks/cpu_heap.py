"""What ``train.cpu_heap=keep`` buys a CPU training step (sakd/train/heap.py, docs/performance.md).

``configs/demo.yaml`` as shipped (projected_kl, KA with 2 teacher passes), ``--steps`` steps per run, runs
alternating ``train.cpu_heap=system`` (glibc's defaults, the default) and ``keep``, ``--pairs`` pairs; each run a
fresh process with nothing about the allocator in its environment (perf.py's distill child, which sets the heap
as the sakd command does); the first perf.STEP_TIME_WARMUP steps of a run dropped. Per pair: keep's median step
/ system's (the pairs are the independent units), their mean and 95 % t interval, of wall seconds and of the
training thread's CPU seconds.

    python benchmarks/cpu_heap.py --pairs 10 --out benchmarks/results/cpu_heap.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import perf  # noqa: E402
from paired import mean_interval  # noqa: E402
from quality_summary import machine  # noqa: E402

from sakd.train.heap import allocator_in_environment  # noqa: E402

SETTINGS = ("system", "keep")


def measure(pairs: int, steps: int, threads: int, work: Path) -> dict:
    def progress(n, setting, med):
        print(f"  pair {n + 1}/{pairs} {setting:>6}: {1000 * med['wall']:.0f} ms/step ({1000 * med['cpu']:.0f} "
              "CPU ms)", flush=True)

    _, rounds, applied = perf.alternating_pairs({s: [f"train.cpu_heap={s}"] for s in SETTINGS}, pairs, steps,
                                                threads, work, progress)
    runs = {s: [{"ms_per_step": round(1000 * r[s]["wall"], 1), "cpu_ms_per_step": round(1000 * r[s]["cpu"], 1)}
                for r in rounds] for s in SETTINGS}
    ratios = {k: [r["keep"][k] / r["system"][k] for r in rounds] for k in ("wall", "cpu")}
    return {"runs": runs, "allocator": applied,
            "keep_over_system": {k: mean_interval(v) for k, v in ratios.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=4, help="alternating system/keep pairs of runs")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_heap.json"))
    a = ap.parse_args(argv)
    if a.pairs < 1 or a.threads < 1 or a.steps <= perf.STEP_TIME_WARMUP:
        raise SystemExit(f"cpu_heap.py: --pairs and --threads must be >= 1 and --steps > {perf.STEP_TIME_WARMUP} "
                         "(the warm-up)")
    if allocator_in_environment():  # the runs inherit it, and the environment wins over train.cpu_heap
        raise SystemExit("cpu_heap.py: the environment sets glibc's allocator (MALLOC_*_ or glibc.malloc tunables): "
                         "unset it, or both settings would run with it")
    t0, host = time.time(), machine(1, a.threads)  # one run at a time; the load average at the start
    with tempfile.TemporaryDirectory(prefix="sakd-heap-") as tmp:
        res = measure(a.pairs, a.steps, a.threads, Path(tmp))
    print("\nratio keep / system   mean    95 % interval   per pair")
    for k, v in res["keep_over_system"].items():
        ci = f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" if v["ci95"] else "-"
        print(f"{k + ' seconds a step':<21} {v['mean']:.3f}   {ci:<15} {', '.join(f'{x:.3f}' for x in v['values'])}")
    out = {"benchmark": "cpu_heap", "config": "configs/demo.yaml as shipped (projected_kl, KA, 2 teacher passes)",
           "machine": host,
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t0)),
           "steps_per_run": a.steps, "warmup_steps_dropped": perf.STEP_TIME_WARMUP, "pairs": a.pairs,
           "threads": a.threads, "seconds": round(time.time() - t0, 1),
           "measures": "median over a run's timed steps of the optimizer step's wall seconds (history.json) and "
                       "the training thread's CPU seconds; keep_over_system: per alternating pair, keep's median "
                       "/ system's, their mean and 95 % t interval (< 1: keep is faster)", **res}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out} ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
