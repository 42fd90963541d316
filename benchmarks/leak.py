"""Memory growth of the distillation loop: does resident memory keep rising once training is warm?

Runs `sakd distill --config configs/demo.yaml` (the offline demo: 9.5M-parameter MoE teacher, 1.1M
Llama student) for --steps optimizer steps in a subprocess, exactly as a user would, and samples the
subprocess's resident set size (VmRSS in /proc/<pid>/status) every --interval seconds. The current
step is read from the progress bar the CLI writes to stderr, so every sample is tied to a step.

RSS swings by ~15% inside every step (activations are allocated and freed), so each step is reduced
to its PEAK (highest sample) and its FLOOR (lowest sample). Reported, over the steps after --warmup
(default 50: allocator pools, the first evaluation and the first checkpoint have happened by then)
up to the last training step (the final evaluation and export are excluded):
  growth_percent           median peak of the last 10% of those steps vs the first 10%, in %
  floor_growth_percent     the same for the floors (a leak lifts both; a one-off spike neither)
  slope_mib_per_1k_steps   Theil-Sen slope of the per-step peaks (median of pairwise slopes: robust
                           to the periodic evaluation / checkpoint spikes), per 1000 steps
A leak shows as steady positive growth of both; noise moves the medians little. Short runs (fewer
than 3 x --warmup steps) use a third of the run as warm-up and are only a smoke test.

    python benchmarks/leak.py                      # 300 steps (about an hour on 2 busy CPU cores)
    python benchmarks/leak.py --steps 30 --teacher /tmp/demo/teacher
    python benchmarks/leak.py --reanalyse benchmarks/results/leak.json   # recompute from the saved trace
writes benchmarks/results/leak.json (summary + every sample). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "leak.json"
PROGRESS = re.compile(r"distill:.*?\|\s*(\d+)/(\d+) \[")


def vm_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class StepReader(threading.Thread):
    """Follows the tqdm bar on the child's stderr (updates end in \\r, not \\n) and keeps the last step."""

    def __init__(self, stream, sink: list[str]):
        super().__init__(daemon=True)
        self.stream, self.sink, self.step = stream, sink, -1

    def run(self):
        buf = ""
        while True:
            chunk = self.stream.read(256)
            if not chunk:
                break
            buf += chunk
            *parts, buf = re.split(r"[\r\n]", buf)
            for part in parts:
                m = PROGRESS.search(part)
                if m:
                    self.step = int(m.group(1))
                elif part.strip():
                    self.sink.append(part)


def theil_sen_slope(xs: list[float], ys: list[float], max_pairs: int = 200_000) -> float:
    """Median of the pairwise slopes (ys[j] - ys[i]) / (xs[j] - xs[i]); O(n^2), n = steps (hundreds)."""
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
              if xs[j] != xs[i]][:max_pairs]
    return statistics.median(slopes) if slopes else 0.0


def per_step(samples: list[tuple[float, int, float]]) -> dict[int, tuple[float, float]]:
    """step -> (floor, peak) RSS over the samples taken while that step was the last one finished."""
    out: dict[int, list[float]] = {}
    for _, step, rss in samples:
        if step >= 0:
            out.setdefault(step, []).append(rss)
    return {s: (min(v), max(v)) for s, v in sorted(out.items())}


def analyse(samples: list[tuple[float, int, float]], steps: int, warmup: int) -> dict:
    """samples: (seconds, last finished step, RSS MiB). Only steps after the warm-up, before the end."""
    warm = warmup if steps >= 3 * warmup else max(1, steps // 3)
    rows = [(s, fl, pk) for s, (fl, pk) in per_step(samples).items() if warm <= s < steps]
    if len(rows) < 6:
        return {"warmup_step_used": warm, "error": "too few steps sampled after the warm-up: run more steps"}
    k = max(2, len(rows) // 10)

    def growth(col: int) -> tuple[float, float, float]:
        first = statistics.median(r[col] for r in rows[:k])
        last = statistics.median(r[col] for r in rows[-k:])
        return first, last, 100 * (last - first) / first

    p0, p1, pg = growth(2)
    f0, f1, fg = growth(1)
    slope = theil_sen_slope([r[0] for r in rows], [r[2] for r in rows])
    return {"warmup_step_used": warm, "steps_analysed": len(rows),
            "peak_rss_mib_after_warmup": round(p0, 1), "peak_rss_mib_at_end": round(p1, 1),
            "growth_percent": round(pg, 2),
            "floor_rss_mib_after_warmup": round(f0, 1), "floor_rss_mib_at_end": round(f1, 1),
            "floor_growth_percent": round(fg, 2),
            "slope_mib_per_1k_steps": round(1000 * slope, 1),
            "max_rss_mib": round(max(r for _, _, r in samples), 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    ap.add_argument("--warmup", type=int, default=50, help="steps excluded at the start (default 50)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples (default 0.5)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--teacher", help="teacher folder (default: the config's, sakd/demo/assets/teacher)")
    ap.add_argument("--out", default=str(RESULTS), help="result JSON (default benchmarks/results/leak.json)")
    ap.add_argument("--reanalyse", metavar="JSON", help="recompute the summary of a saved result (its trace)")
    ap.add_argument("overrides", nargs="*", help="extra sakd config overrides, key=value")
    args = ap.parse_args(argv)
    if args.reanalyse:
        saved = json.loads(Path(args.reanalyse).read_text())
        summary = analyse([tuple(x) for x in saved["trace"]], saved["steps"], saved["warmup"])
        saved.update(summary)
        Path(args.reanalyse).write_text(json.dumps(saved, indent=1))
        print(json.dumps(summary, indent=1))
        return 0

    with tempfile.TemporaryDirectory(prefix="sakd-leak-") as tmp:
        overrides = [f"train.max_steps={args.steps}", f"train.output_dir={tmp}/run", "logging.tensorboard=false"]
        if args.teacher:
            overrides.append(f"model.teacher={args.teacher}")
        cmd = [sys.executable, "-m", "sakd.cli", "distill", "--config", args.config, *overrides, *args.overrides]
        env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), PYTHONUNBUFFERED="1")
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        other: list[str] = []
        reader = StepReader(proc.stderr, other)
        reader.start()
        stdout: list[str] = []
        out_thread = threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)
        out_thread.start()
        samples = []
        while proc.poll() is None:
            rss = vm_rss_mib(proc.pid)
            if rss is not None:
                samples.append((round(time.time() - t0, 2), reader.step, round(rss, 1)))
            time.sleep(args.interval)
        reader.join(5)
        out_thread.join(5)
        wall = time.time() - t0
    if proc.returncode != 0:
        print("".join(stdout)[-2000:] + "\n".join(other[-20:]), file=sys.stderr)
        print(f"leak.py: sakd distill exited {proc.returncode}", file=sys.stderr)
        return 1

    result = {"benchmark": "leak", "command": " ".join(cmd[1:]), "steps": args.steps, "warmup": args.warmup,
              "interval_s": args.interval, "wall_s": round(wall, 1), "samples": len(samples),
              **analyse(samples, args.steps, args.warmup),
              "rss_mib_by_step": {str(s): {"floor": fl, "peak": pk} for s, (fl, pk) in per_step(samples).items()},
              "trace": samples}  # [seconds, last finished step (-1: setting up), RSS MiB]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_mib_by_step", "trace")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
