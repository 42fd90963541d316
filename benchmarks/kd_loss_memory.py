"""Peak extra memory and time of forward KL + backward: plain autograd vs sakd's chunked Function.

Setting: Qwen3's vocabulary (V = 151,936), float32 on CPU, rows = 4 x 512 (``--quick``: 1 x 512),
T = 2. Two comparisons:

  logits  the student's logits [rows, V] are the input: plain ``F.kl_div`` over log-softmaxes vs
          ``sakd.losses.forward_kl`` (chunks of --chunk-rows rows, gradient computed in the same pass).
  head    the student's final hidden state [rows, H] (H = --hidden, 576 as SmolLM) and a head weight
          [V, H] are the input, as in training: plain = ``h @ W.T`` then the plain loss; ours = the
          fused ``divergence_sum(..., head_weight=W)`` (``loss.fused_head``): the [rows, V] student
          logits and their gradient never exist; gradients flow to h and W.

The teacher's logits [rows, V] are an input in both. Each variant runs in a fresh subprocess so that peaks do not mix; in it, the
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

    from sakd.losses.divergences import divergence_sum

    def plain_head(h, t):
        return plain(h @ w.T, t)

    def ours_head(h, t):
        return divergence_sum("forward_kl", h, t, head_weight=w, temperature=T, chunk_rows=args.chunk) / h.shape[0]

    fn = {"plain": plain, "ours": ours, "plain_head": plain_head, "ours_head": ours_head}[args.child]
    g = torch.Generator().manual_seed(0)
    head = args.child.endswith("_head")
    if head:
        s = torch.randn(args.rows, args.hidden, generator=g).requires_grad_()
        w = torch.randn(args.vocab, args.hidden, generator=g).mul_(3 / args.hidden ** 0.5).requires_grad_()
    else:
        s = torch.randn(args.rows, args.vocab, generator=g).mul_(3).requires_grad_()  # in place: no 2x peak
    t = torch.randn(args.rows, args.vocab, generator=g).mul_(3)
    inputs = [s, t] + ([w] if head else [])
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
        for x in inputs:
            x.grad = None
    peak_sampled = sampler.stop()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": args.child, "chunk_rows": args.chunk if args.child.startswith("ours") else None,
        "rows": args.rows, "vocab": args.vocab, "hidden": args.hidden if head else None,
        "torch_threads": torch.get_num_threads(),
        "input_mib": sum(x.numel() for x in inputs) * 4 / MIB, "baseline_rss_mib": baseline / MIB,
        "extra_peak_sampled_mib": (peak_sampled - baseline) / MIB,
        "extra_peak_rusage_mib": (maxrss_after - baseline) / MIB,
        "rusage_valid": maxrss_before <= baseline + 16 * MIB,
        "time_s_median": statistics.median(times), "times_s": times, "loss": losses[0],
    }


def run_variant(variant: str, chunk: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--chunk", str(chunk), "--rows", str(args.rows),
           "--vocab", str(args.vocab), "--repeats", str(args.repeats), "--temperature", str(args.temperature),
           "--hidden", str(args.hidden)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"variant {variant} (chunk_rows={chunk}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


HEAD_CHUNK_ROWS = 256  # the fused comparison's headline chunk (what configs for 150k vocabularies set)


def measure(rows: int, vocab: int, hidden: int, repeats: int, temperature: float, chunk_rows: list[int],
            head_chunk_rows: list[int]) -> dict:
    """Both comparisons, each variant in a fresh subprocess; headline ratios from the fused (head) one at
    its first chunk size, the logits ratios next to them."""
    args = argparse.Namespace(rows=rows, vocab=vocab, hidden=hidden, repeats=repeats, temperature=temperature)
    logits = [run_variant("plain", 0, args)] + [run_variant("ours", c, args) for c in chunk_rows]
    head = [run_variant("plain_head", 0, args)] + [run_variant("ours_head", c, args) for c in head_chunk_rows]

    def ratios(plain, ours):
        return (ours["extra_peak_rusage_mib"] / plain["extra_peak_rusage_mib"],
                ours["time_s_median"] / plain["time_s_median"])

    mem, tim = ratios(head[0], head[1])
    mem_l, tim_l = ratios(logits[0], logits[1])
    return {
        "kd_loss_memory_ratio": mem, "kd_loss_time_ratio": tim,
        "kd_loss_memory_ratio_logits": mem_l, "kd_loss_time_ratio_logits": tim_l,
        "headline": f"fused output layer (loss.fused_head), chunk_rows={head_chunk_rows[0]}, hidden {hidden}; "
                    f"the _logits ratios: logits as input, chunk_rows={chunk_rows[0]}",
        "memory_measure": "extra peak RSS over the inputs, getrusage ru_maxrss in a fresh subprocess",
        "time_measure": f"median of {repeats} forward + backward",
        "rows": rows, "vocab": vocab, "hidden": hidden, "variants": logits + head,
    }


def print_table(res: dict) -> None:
    print(f"forward KL + backward, rows={res['rows']}, V={res['vocab']}, fp32 CPU")
    print(f"{'variant':<34}{'inputs':>10}{'extra peak (sampled)':>22}{'extra peak (rusage)':>21}{'time (median)':>15}"
          f"{'loss':>11}")
    names = {"plain": "plain autograd, logits in", "ours": "sakd, logits in",
             "plain_head": "plain autograd, h @ W.T in", "ours_head": "sakd fused head"}
    for r in res["variants"]:
        name = names[r["variant"]] + (f" (chunk {r['chunk_rows']})" if r["chunk_rows"] else "")
        print(f"{name:<34}{r['input_mib']:>6.0f} MiB{r['extra_peak_sampled_mib']:>18.0f} MiB"
              f"{r['extra_peak_rusage_mib']:>17.0f} MiB{r['time_s_median']:>13.3f} s{r['loss']:>11.6f}")
    print(f"ours/plain, fused head: memory {res['kd_loss_memory_ratio']:.3f}, time {res['kd_loss_time_ratio']:.3f}; "
          f"logits in: memory {res['kd_loss_memory_ratio_logits']:.3f}, time {res['kd_loss_time_ratio_logits']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 x 512 rows instead of 4 x 512")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=576, help="hidden size of the fused comparison (SmolLM: 576)")
    ap.add_argument("--rows", type=int, default=None, help="override the number of rows")
    ap.add_argument("--chunk-rows", type=int, nargs="+", default=[1024, 128],
                    help="chunk_rows values with logits as input; the first gives the _logits ratios")
    ap.add_argument("--head-chunk-rows", type=int, nargs="+", default=[HEAD_CHUNK_ROWS, 1024],
                    help="chunk_rows values of the fused head; the first gives the headline ratios")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--child", choices=["plain", "ours", "plain_head", "ours_head"], help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rows is None:
        args.rows = 512 if args.quick else 4 * 512
    if args.child:
        print(json.dumps(child(args)))
        return
    res = measure(args.rows, args.vocab, args.hidden, args.repeats, args.temperature, args.chunk_rows,
                  args.head_chunk_rows)
    res["quick"] = args.quick
    print_table(res)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
