"""Where projected_kl's step spends the time shared_kl's does not: torch.profiler per operator, demo config.

Trains ``configs/demo.yaml`` as shipped (KA with 2 teacher passes, fused heads) for ``--steps`` steps with
``loss.logit=shared_kl`` and then ``=projected_kl``, each under ``torch.profiler`` at ``--threads`` threads, and
prints the operators whose self CPU time grew the most, in milliseconds per training step (the difference of the
two runs' totals over the whole run, setup and the final evaluation included, divided by the steps: both runs
share every other cost). Median step seconds (``history.json``) of the steps after the first two are printed
beside. The runs go to a temporary folder; the JSON to ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --threads 1 --steps 6 --out /tmp/profile_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


MATMULS = ("aten::mm", "aten::addmm")


def profile_run(method: str, steps: int, out: Path) -> tuple[dict[str, float], float, dict[str, float]]:
    """{operator: self CPU ms over the run}, the median step seconds of one demo run with ``method``, and
    {matrix product by its right operand's shape, e.g. ``aten::mm [256, 8192]``: self CPU ms over the run}
    (the right operand is the weight: the row count varies from block to block, the weight does not)."""
    from torch.profiler import ProfilerActivity, profile

    from sakd.config import load_config
    from sakd.train.distill import distill

    cfg = load_config(str(ROOT / "configs" / "demo.yaml"), [
        f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0", "train.log_every=1000",
        "train.warmup_steps=1", f"train.output_dir={out}", "logging.tensorboard=false", "eval.max_bytes=1000",
        f"loss.logit={method}"])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        distill(cfg, log=lambda *a: None, progress=False)
    ops = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
    mats: dict[str, float] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in MATMULS and len(e.input_shapes) >= 2:
            key = f"{e.key} {list(e.input_shapes[-1])}"
            mats[key] = mats.get(key, 0.0) + e.self_cpu_time_total / 1000
    hist = json.loads((out / "history.json").read_text())["history"]
    return ops, statistics.median(h["seconds"] for h in hist[2:]), mats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", required=True, help="result JSON")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {m: profile_run(m, a.steps, Path(tmp) / m) for m in ("shared_kl", "projected_kl")}
    (s_ops, s_step, s_mats), (p_ops, p_step, p_mats) = runs["shared_kl"], runs["projected_kl"]
    diff = {k: (p_ops.get(k, 0.0) - s_ops.get(k, 0.0)) / a.steps for k in set(s_ops) | set(p_ops)}
    top = sorted(diff.items(), key=lambda kv: -kv[1])[:a.top]
    mats = {k: {"shared_kl": s_mats.get(k, 0.0) / a.steps, "projected_kl": p_mats.get(k, 0.0) / a.steps}
            for k in set(s_mats) | set(p_mats)}
    mats = dict(sorted(mats.items(), key=lambda kv: -abs(kv[1]["projected_kl"] - kv[1]["shared_kl"]))[:a.top])
    print(f"median step: shared_kl {1000 * s_step:.0f} ms, projected_kl {1000 * p_step:.0f} ms "
          f"({p_step / s_step:.2f}x), {a.threads} thread(s), profiler on")
    print(f"self CPU ms per step, projected_kl - shared_kl: all operators {sum(diff.values()):+.0f}")
    for k, v in top:
        print(f"  {v:+8.1f}  {k}")
    print("matrix products by right operand (the weight), self CPU ms per step: shared_kl, projected_kl, difference")
    for k, v in mats.items():
        print(f"  {v['shared_kl']:8.1f} {v['projected_kl']:8.1f} {v['projected_kl'] - v['shared_kl']:+8.1f}  {k}")
    result = {"steps": a.steps, "threads": a.threads, "median_step_s": {"shared_kl": s_step, "projected_kl": p_step},
              "extra_self_cpu_ms_per_step": {"all": sum(diff.values()), **dict(top)},
              "matmul_self_cpu_ms_per_step_by_weight_shape": mats,
              "measures": "per operator: (projected_kl run's self CPU ms - shared_kl run's) / steps; matrix "
                          "products grouped by their right operand's shape, each run's self CPU ms / steps"}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
