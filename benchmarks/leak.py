"""Memory growth of the distillation loop: does resident memory keep rising once training is warm?

Runs `sakd distill --config configs/demo.yaml` (the offline demo: 9.5M-parameter MoE teacher, 1.1M
Llama student) for --steps optimizer steps in a subprocess, exactly as a user would, and samples the
subprocess's resident set size (VmRSS in /proc/<pid>/status) every --interval seconds. The current
step is read from the progress bar the CLI writes to stderr, so every sample is tied to a step.

Reported, over the steps after --warmup (default 50: allocator pools, the first evaluation and the
first checkpoint have happened by then) up to the last training step (the final evaluation and
export are excluded):
  growth_percent   (median RSS of the last 10% of those steps - median RSS of the first 10%) / the latter
  slope_mib_per_1k_steps   least-squares slope of RSS against step, per 1000 steps
A leak shows as a steady positive slope; noise and periodic evaluation/checkpoint peaks do not move
the medians much.

    python benchmarks/leak.py                      # 300 steps (minutes on 2 CPU cores)
    python benchmarks/leak.py --steps 30 --teacher /tmp/demo/teacher
writes benchmarks/results/leak.json. Linux only (/proc).
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


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def analyse(samples: list[tuple[float, int, float]], steps: int, warmup: int) -> dict:
    """samples: (seconds, step, rss MiB). Only samples taken while training, after the warm-up."""
    warm = min(warmup, max(1, steps // 3))  # short runs (--steps 30): a third of the run as warm-up
    train = [(s, r) for _, s, r in samples if warm <= s < steps]
    if len(train) < 4:
        return {"warmup_step_used": warm, "error": "too few samples after the warm-up: run more steps"}
    k = max(2, len(train) // 10)
    first = statistics.median(r for _, r in train[:k])
    last = statistics.median(r for _, r in train[-k:])
    slope = least_squares_slope([s for s, _ in train], [r for _, r in train])
    return {"warmup_step_used": warm, "samples_after_warmup": len(train),
            "rss_mib_after_warmup": round(first, 1), "rss_mib_at_end": round(last, 1),
            "growth_percent": round(100 * (last - first) / first, 2),
            "slope_mib_per_1k_steps": round(1000 * slope, 1),
            "peak_rss_mib": round(max(r for _, _, r in samples), 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    ap.add_argument("--warmup", type=int, default=50, help="steps excluded at the start (default 50)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples (default 0.5)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--teacher", help="teacher folder (default: the config's, assets/demo/teacher)")
    ap.add_argument("--out", default=str(RESULTS), help="result JSON (default benchmarks/results/leak.json)")
    ap.add_argument("overrides", nargs="*", help="extra sakd config overrides, key=value")
    args = ap.parse_args(argv)

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
              # condensed trace: the last sample of each step
              "rss_mib_by_step": {str(s): r for _, s, r in samples if s >= 0}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mib_by_step"}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
