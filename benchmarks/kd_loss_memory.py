"""Peak extra memory and time of forward KL + backward: plain autograd vs sakd's chunked Function.

Setting: Qwen3's vocabulary (V = 151,936), float32 logits on CPU, rows = 4 x 512 (``--quick``:
1 x 512), T = 2. Each variant runs in a fresh subprocess so that peaks do not mix; in it, the
logits are allocated first, then the resident set size (RSS) is the baseline, and the peak is
taken both from a background thread sampling RSS every 1 ms and from getrusage's ru_maxrss
(a true high-water mark, valid here because nothing before the baseline used more memory).
"Extra" = peak - baseline: what the loss and its backward (including the [rows, V] gradient,
which both variants produce) add on top of the inputs. Time: median of --repeats runs of
forward + backward.

    python benchmarks/kd_loss_memory.py --quick
writes benchmarks/results/kd_loss_memory.json with kd_loss_memory_ratio and kd_loss_time_ratio
(ours / plain, at the first --chunk-rows value, the API default 1024 unless given).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kd_loss_memory.json"
MIB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler(threading.Thread):
    """Highest RSS seen, sampled every ``interval`` seconds (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, _rss_bytes(), threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, _rss_bytes())


def child(args) -> dict:
    """One variant, in this (fresh) process; returns the measurements."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from sakd.losses import forward_kl

    T = args.temperature

    def plain(s, t):
        log_q = F.log_softmax(s / T, dim=-1)
        log_p = F.log_softmax(t / T, dim=-1)
        return F.kl_div(log_q, log_p, log_target=True, reduction="sum") / s.shape[0]

    def ours(s, t):
        return forward_kl(s, t, temperature=T, chunk_rows=args.chunk)

    fn = plain if args.child == "plain" else ours
    g = torch.Generator().manual_seed(0)
    s = torch.randn(args.rows, args.vocab, generator=g).mul_(3).requires_grad_()  # in place: no 2x peak
    t = torch.randn(args.rows, args.vocab, generator=g).mul_(3)
    baseline = _rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    sampler = _PeakSampler()
    sampler.start()
    times, losses = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loss = fn(s, t)
        loss.backward()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        s.grad = None
    peak_sampled = sampler.stop()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": args.child, "chunk_rows": args.chunk if args.child == "ours" else None,
        "rows": args.rows, "vocab": args.vocab, "torch_threads": torch.get_num_threads(),
        "input_mib": 2 * s.numel() * 4 / MIB, "baseline_rss_mib": baseline / MIB,
        "extra_peak_sampled_mib": (peak_sampled - baseline) / MIB,
        "extra_peak_rusage_mib": (maxrss_after - baseline) / MIB,
        "rusage_valid": maxrss_before <= baseline + 16 * MIB,
        "time_s_median": statistics.median(times), "times_s": times, "loss": losses[0],
    }


def run_variant(variant: str, chunk: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--chunk", str(chunk), "--rows", str(args.rows),
           "--vocab", str(args.vocab), "--repeats", str(args.repeats), "--temperature", str(args.temperature)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"variant {variant} (chunk_rows={chunk}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 x 512 rows instead of 4 x 512")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--rows", type=int, default=None, help="override the number of rows")
    ap.add_argument("--chunk-rows", type=int, nargs="+", default=[1024, 128],
                    help="chunk_rows values for sakd's loss; the first gives the headline ratios")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--child", choices=["plain", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rows is None:
        args.rows = 512 if args.quick else 4 * 512
    if args.child:
        print(json.dumps(child(args)))
        return

    results = [run_variant("plain", 0, args)] + [run_variant("ours", c, args) for c in args.chunk_rows]
    plain = results[0]
    print(f"forward KL + backward, rows={args.rows}, V={args.vocab}, fp32 CPU, "
          f"inputs {plain['input_mib']:.0f} MiB, torch threads {plain['torch_threads']}")
    print(f"{'variant':<22}{'extra peak (sampled)':>22}{'extra peak (rusage)':>21}{'time (median)':>15}{'loss':>12}")
    for r in results:
        name = "plain autograd" if r["variant"] == "plain" else f"sakd chunk_rows={r['chunk_rows']}"
        print(f"{name:<22}{r['extra_peak_sampled_mib']:>18.0f} MiB{r['extra_peak_rusage_mib']:>17.0f} MiB"
              f"{r['time_s_median']:>13.3f} s{r['loss']:>12.6f}")
    head = results[1]
    summary = {
        "kd_loss_memory_ratio": head["extra_peak_rusage_mib"] / plain["extra_peak_rusage_mib"],
        "kd_loss_time_ratio": head["time_s_median"] / plain["time_s_median"],
        "headline_chunk_rows": head["chunk_rows"],
        "memory_measure": "extra peak RSS over the inputs, getrusage ru_maxrss in a fresh subprocess",
        "quick": args.quick, "rows": args.rows, "vocab": args.vocab, "variants": results,
    }
    print(f"ours/plain at chunk_rows={head['chunk_rows']}: memory {summary['kd_loss_memory_ratio']:.3f}, "
          f"time {summary['kd_loss_time_ratio']:.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
