"""Performance of sakd: one table, benchmarks/results/perf.json.

    python benchmarks/perf.py --quick          # under 10 minutes on 2 CPU cores
    python benchmarks/perf.py                  # full sizes
    python benchmarks/perf.py --device cuda    # a GPU machine: tokens/s, peak CUDA memory, MFU

Sections (every ratio is ours / the reference, measured in this run; targets in TARGETS):
 1. KD loss, V = 151,936, fp32 CPU, 4 x 512 rows (quick 1 x 512): peak extra memory and time of
    forward KL + backward, plain autograd vs sakd's chunked Function (benchmarks/kd_loss_memory.py's
    children) -> kd_loss_memory_ratio, kd_loss_time_ratio.
 2. TRL's GKDTrainer (trl.experimental.gkd, lmbda=0, beta=0.5, loss temperature 1, fp32, no
    gradient checkpointing) vs ``sakd.train.distill`` (shared_kl with divergence jsd, beta 0.5) on the same
    same-tokenizer pair (SmolLM2's 49,152-token tokenizer, tiny Llama teacher and student), the same
    token sequences, batch 4 x <=512, same steps. TRL is never a dependency of sakd: it runs from its
    own virtual environment (--trl-python, default /tmp/trlvenv/bin/python) as a subprocess. The two
    programs alternate run by run; per pair: tokens/s ratio and step-memory ratio (peak RSS during the
    steps - RSS when training starts) -> trl_throughput_ratio, trl_memory_ratio (medians over pairs).
 3. Teacher cache (sakd.teacher_cache.reader, packed k = 64) vs the live teacher on the demo pair: the student's held-out
    bits/byte after the same steps trained from the cache / from the live teacher, moe.mode=topk with
    shared_kl and with mapped_kl -> cache_bpb_ratio, cache_bpb_ratio_mapped ("cache"); KA from the cache
    vs live KA over seeds -> cache_ka_bpb_ratio ("cache_ka"); bytes per teacher token for the real
    vocabularies (Qwen3 151,936 columns / SmolLM2) -> cache_bytes_per_token_real ("cache_real").
 3b. TRL's GOLDTrainer (trl.experimental.gold, hybrid ULD, off-policy) vs sakd's default on the same
    cross-tokenizer job (real vocabulary sizes on tiny models, 4 x 512, fp32, alternating runs)
    -> gold_throughput_ratio, gold_memory_ratio ("gold"; TRL from --trl-path or --trl-python).
 3c. The sampled cache (sakd/teacher_cache/sampled.py, 12 draws per position): bytes per teacher token on the
    real vocabularies -> cache_sampled_bytes_per_token_real ("cache_sampled_real"); the demo student from it /
    from the live teacher, 3 seeds, the steps of cache_bpb_ratio -> cache_sampled_bpb_ratio (shared_kl,
    "cache_sampled"), cache_sampled_bpb_ratio_projected ("cache_sampled_projected"); the training step of KD
    from a top-64 and from a sampled cache / a CE-only step, alternating runs -> cached_kd_step_vs_ce
    ("cached_kd_step").
 4. Share of the step spent tokenizing and byte-aligning (SpanDataset items: encode_with_bytes x 2 +
    align) and collating, in the real loop on the demo configuration -> alignment_time_share.
 5. Step time of the every-position loss: configs/demo.yaml (KA, 2 teacher samples) with loss.logit=projected_kl
    against loss.logit=shared_kl, the same data and steps, runs alternating, evaluation excluded, the first
    STEP_TIME_WARMUP steps dropped; median wall and main-thread CPU seconds per step -> step_time_ratio,
    step_time_cpu_ratio ("step_time"; issue 19, item 2). On shared cores, run it with --threads 1 under nice;
    when the cores are oversubscribed the wall seconds mostly measure waiting (both methods near the same
    figure), and the CPU ratio is the one that compares the code:
        nice -n 10 python benchmarks/perf.py --only step_time --threads 1 --out benchmarks/results/step_time.json

Each training run is a fresh subprocess (peaks do not mix) with MALLOC_MMAP_THRESHOLD_ fixed, so
freed buffers leave the resident set at once and RSS follows the live tensors (not in section 5: it times
steps, and a fixed threshold makes every large temporary a fresh mmap with its page faults). The first step of
every run is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kd_loss_memory as kdm  # noqa: E402  (stdlib-only at import: also usable by the TRL interpreter)

RESULTS = ROOT / "benchmarks" / "results" / "perf.json"
MIB = 2**20
# The performance issue's targets (every ratio is ours / the reference).
TARGETS = {
    "kd_loss_memory_ratio": ("<=", 0.15), "kd_loss_time_ratio": ("<=", 1.0),
    "trl_throughput_ratio": (">=", 1.3), "trl_memory_ratio": ("<=", 0.6),
    "cache_bytes_per_token_real": ("<=", 160.0), "cache_bpb_ratio": ("<=", 1.005),
    "cache_bpb_ratio_mapped": ("<=", 1.005), "cache_ka_bpb_ratio": ("<=", 1.005),
    "gold_throughput_ratio": (">=", 3.0), "gold_memory_ratio": ("<=", 0.3),
    "alignment_time_share": ("<=", 0.05), "step_time_ratio": ("<=", 1.15),
    "step_time_cpu_ratio": ("<=", 1.15),
    "cache_sampled_bytes_per_token_real": ("<=", 64.0), "cache_sampled_bpb_ratio": ("<=", 1.005),
    "cache_sampled_bpb_ratio_projected": ("<=", 1.005), "cached_kd_step_vs_ce": ("<=", 1.1),
}
SECTIONS = ["kd", "trl", "gold", "cache", "cache_ka", "cache_real", "align", "step_time", "cache_sampled",
            "cache_sampled_projected", "cache_sampled_real", "cached_kd_step"]
STEP_TIME_WARMUP = 3  # first steps of a run (allocator, caches, lazily built tables) left out of the step time
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40": 181, "A10": 125, "V100": 125, "L4": 121, "T4": 65,
               "P100": 18.7}  # dense 16-bit tensor TFLOP/s (P100: fp16, no tensor cores)


TRL_PATH: str | None = None  # --trl-path: a folder holding the trl package, for TRL children run by this Python


# glibc's allocator settings of a child, by name:
# "fixed": every allocation over 64 KiB is its own mmap, so that RSS follows the live tensors (the memory
#   sections); it also makes each large temporary cost page faults, so timings use "default";
# "default": no setting in the environment, so a distill child sets train.cpu_heap as the sakd command does
#   (sakd/train/heap.py: glibc's own defaults unless the run's overrides say "keep").
HEAP = {"fixed": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "default": {}}


def child_env(threads: int, trl: bool = False, heap: str = "fixed") -> dict:
    """The environment of a child run; ``heap``: its allocator settings (``HEAP``)."""
    path = str(ROOT) + (os.pathsep + TRL_PATH if trl and TRL_PATH else "")
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
                TRL_EXPERIMENTAL_SILENCE="1", PYTHONPATH=path, **HEAP[heap])


def trl_interpreter(trl_python: str) -> str | None:
    """The Python that runs TRL's trainers: --trl-path with this interpreter, else --trl-python if it exists."""
    if TRL_PATH:
        return sys.executable
    return trl_python if Path(trl_python).exists() else None


def run_child(python: str, mode: str, spec: dict, threads: int, timeout: int = 1800, heap: str = "fixed") -> dict:
    proc = subprocess.run([python, __file__, "--child", mode, json.dumps(spec)], capture_output=True, text=True,
                          env=child_env(threads, trl=mode in ("trl", "gold"), heap=heap), cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- children

def distill_child(spec: dict) -> dict:
    """Run sakd.train.distill with ``spec["overrides"]`` and instrument the real loop from outside:
    per step, its seconds (history), the time spent in SpanDataset items and collation, the student
    tokens, and the peak memory between the first evaluation and the last one."""
    import torch

    torch.set_num_threads(spec["threads"])
    from sakd.data import text as data
    from sakd.train import distill
    from sakd.train import objective
    from sakd.config import load_config

    cfg = load_config(spec.get("config"), spec["overrides"])
    acc_data, per_step = [0.0], []
    sampler, mem = None, {}
    cuda = torch.cuda.is_available()
    from sakd.train.heap import set_cpu_heap

    heap = set_cpu_heap(cfg.train.cpu_heap, on_gpu=cuda)  # as the sakd command does for its process

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc_data[0] += time.perf_counter() - t0
        return wrapper

    data.SpanDataset.__getitem__ = timed(data.SpanDataset.__getitem__)
    data.Collator.__call__ = timed(data.Collator.__call__)
    count_targets = objective.count_targets

    def counting(micro, c, *a, **kw):  # called once per step, right after the step's batches are collated
        per_step.append({"data_s": acc_data[0], "tokens": int(sum(int(b["s_mask"].sum()) for b in micro))})
        acc_data[0] = 0.0
        return count_targets(micro, c, *a, **kw)

    objective.count_targets = counting
    train_step = distill.train_step

    def cpu_timed_step(*a, **kw):  # the step's CPU seconds on this thread (the batches are made on another one)
        t0 = time.thread_time()
        try:
            return train_step(*a, **kw)
        finally:
            step_cpu.append(time.thread_time() - t0)

    step_cpu: list[float] = []
    distill.train_step = cpu_timed_step
    evaluate, calls = distill.bits_per_byte, [0]
    # distill evaluates the teacher (unless it reads a cache) and the student before the first step,
    # then (eval_every=0) the student once more after the last one: sample memory in between.
    first = 1 if cfg.model.teacher_cache else 2

    def gate(*a, **kw):
        nonlocal sampler
        calls[0] += 1
        if calls[0] == first + 1 and sampler is not None:
            mem["peak_extra_mib"] = (sampler.stop() - mem.pop("base")) / MIB
            if cuda:
                mem["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / MIB
        out = evaluate(*a, **kw)
        if calls[0] == first:
            mem["base"] = kdm._rss_bytes()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sampler = kdm._PeakSampler(0.0005)
            sampler.start()
        return out

    distill.bits_per_byte = gate
    result = distill.distill(cfg, progress=False, log=lambda *a: None)
    hist = json.loads((Path(cfg.train.output_dir) / "history.json").read_text())["history"]
    steps = [{"seconds": h["seconds"], "data_wait_s": h.get("data_wait_s", 0.0), "cpu_s": c, **p}
             for h, p, c in zip(hist, per_step, step_cpu)]
    return {"steps": steps, "memory": mem, "cpu_heap": heap, "student_bpb_final": result.get("student_bpb_final"),
            "teacher_bpb": result.get("teacher_bpb"), "student_parameters": result.get("student_parameters"),
            "teacher_parameters": result.get("teacher_parameters"), "device": result.get("device")}


def trl_child(spec: dict) -> dict:
    """TRL's GKDTrainer on the same model folders and token sequences (run by the TRL interpreter)."""
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(spec["student"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = json.loads(Path(spec["ids"]).read_text())
    tokens: list[int] = []

    def collate(rows):
        L = max(len(r["input_ids"]) for r in rows)
        x = torch.full((len(rows), L), pad, dtype=torch.long)
        m = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            m[i, :len(r["input_ids"])] = 1
        tokens.append(int(m.sum()))
        return {"input_ids": x, "attention_mask": m, "labels": x.masked_fill(m == 0, -100)}

    ends, mem = [], {}

    class Probe(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            mem["base"] = kdm._rss_bytes()
            self.sampler = kdm._PeakSampler(0.0005)
            self.sampler.start()
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            ends.append(time.perf_counter())

        def on_train_end(self, *a, **kw):
            mem["peak_extra_mib"] = (self.sampler.stop() - mem.pop("base")) / MIB

    kw = dict(output_dir=spec["out"], per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
              learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, adam_beta2=0.95,
              max_grad_norm=1.0, lmbda=0.0, beta=0.5, bf16=False, fp16=False, gradient_checkpointing=False,
              use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**6, max_length=spec["seq_len"],
              dataloader_num_workers=0, seed=0, disable_tqdm=True)
    args = GKDConfig(**kw)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, data_collator=collate,
                         train_dataset=datasets.Dataset.from_dict({"input_ids": ids}), processing_class=tok,
                         callbacks=[Probe()])
    trainer.train()
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    return {"steps": [{"seconds": s, "tokens": t} for s, t in zip(seconds, tokens)], "memory": mem,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}}


# ----------------------------------------------------------------------------- sections

def timed_rate(steps: list[dict], warmup: int = 1) -> tuple[float, float]:
    """(tokens per second, mean seconds per step) over the steps after the warm-up."""
    s = steps[warmup:]
    return sum(x["tokens"] for x in s) / sum(x["seconds"] for x in s), statistics.mean(x["seconds"] for x in s)


def kd_loss_section(quick: bool, repeats: int) -> dict:
    res = kdm.measure(512 if quick else 4 * 512, 151_936, 576, repeats, 2.0, [1024], [kdm.HEAD_CHUNK_ROWS])
    kdm.print_table(res)
    return {k: res.pop(k) for k in ("kd_loss_memory_ratio", "kd_loss_time_ratio", "kd_loss_memory_ratio_logits",
                                    "kd_loss_time_ratio_logits")} | {"kd_loss": res}


def make_same_tokenizer_pair(d: Path) -> dict:
    """SmolLM2's tokenizer (49,152) on a tiny Llama teacher (hidden 256) and student (hidden 128)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sakd.models.tokenizers import smollm2_tokenizer
    from sakd.data.corpus import HELD_OUT_PLAYS, load_plays
    from sakd.models.tiny import llama_config

    tok = smollm2_tokenizer()
    for name, shape in (("teacher", dict(hidden=256, layers=4, intermediate=688)),
                        ("student", dict(hidden=128, layers=4, intermediate=384))):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(llama_config(len(tok), heads=4, **shape)).save_pretrained(d / name)
        tok.save_pretrained(d / name)
    plays = load_plays()
    (d / "train.txt").write_text("\n\n".join(t for n, t in plays.items() if n not in HELD_OUT_PLAYS)[:300_000])
    (d / "heldout.txt").write_text(next(t for n, t in plays.items() if n in HELD_OUT_PLAYS)[:20_000])
    return {k: str(d / k) for k in ("teacher", "student")} | {"train": str(d / "train.txt"),
                                                                 "heldout": str(d / "heldout.txt")}


def trl_section(pairs: int, steps: int, threads: int, trl_python: str, work: Path) -> dict:
    python = trl_interpreter(trl_python)
    if python is None:
        return {"trl_throughput_ratio": None, "trl_memory_ratio": None,
                "trl": {"skipped": f"{trl_python} not found: python -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip "
                        "install torch==2.13.0 'trl==1.16.*' transformers==5.23.0 accelerate datasets"}}
    from sakd.config import load_config
    from sakd.data.text import span_data

    pair = make_same_tokenizer_pair(work / "pair")
    batch, seq = 4, 512
    common = [f"model.teacher={pair['teacher']}", f"model.student={pair['student']}", f"data.source={pair['train']}",
              f"data.eval_source={pair['heldout']}", f"data.seq_len={seq}", f"data.teacher_seq_len={seq}",
              f"data.max_examples={steps * batch}", "loss.logit=shared_kl", "loss.divergence=jsd", "loss.beta=0.5",
              "loss.temperature=1.0", "loss.kd_weight=1", "loss.ce_weight=0", "loss.chunk_weight=0",
              f"train.max_steps={steps}", f"train.batch_size={batch}", "train.lr=1e-4", "train.warmup_steps=0",
              "train.precision=fp32", "train.eval_every=0", "train.save_every=0", "train.log_every=1000",
              "logging.tensorboard=false", "eval.max_bytes=1000", "eval.batch_size=1", "eval.seq_len=64"]
    # The same token sequences for TRL: the loop's own training spans, tokenized by the loop's dataset.
    ds = span_data(load_config(None, common), log=lambda *a: None).train
    (work / "ids.json").write_text(json.dumps([ds[i]["s_ids"] for i in range(len(ds))]))
    runs = []
    for r in range(pairs):
        ours = run_child(sys.executable, "distill", {"threads": threads, "overrides": common + [
            f"train.output_dir={work / f'ours-{r}'}"]}, threads)
        theirs = run_child(python, "trl", {"threads": threads, "teacher": pair["teacher"],
                                               "student": pair["student"], "ids": str(work / "ids.json"),
                                               "out": str(work / f"trl-{r}"), "batch": batch, "steps": steps,
                                               "seq_len": seq}, threads)
        (o_rate, o_step), (t_rate, t_step) = timed_rate(ours["steps"]), timed_rate(theirs["steps"])
        runs.append({"ours_tokens_per_s": o_rate, "trl_tokens_per_s": t_rate, "ours_step_s": o_step,
                     "trl_step_s": t_step, "ours_step_memory_mib": ours["memory"]["peak_extra_mib"],
                     "trl_step_memory_mib": theirs["memory"]["peak_extra_mib"],
                     "throughput_ratio": o_rate / t_rate,
                     "memory_ratio": ours["memory"]["peak_extra_mib"] / theirs["memory"]["peak_extra_mib"],
                     "trl_versions": theirs["versions"]})
        print(f"  pair {r + 1}/{pairs}: tokens/s ours {o_rate:.0f} TRL {t_rate:.0f}; step memory ours "
              f"{runs[-1]['ours_step_memory_mib']:.0f} MiB TRL {runs[-1]['trl_step_memory_mib']:.0f} MiB", flush=True)
    return {"trl_throughput_ratio": statistics.median(x["throughput_ratio"] for x in runs),
            "trl_memory_ratio": statistics.median(x["memory_ratio"] for x in runs),
            "trl": {"pairs": runs, "batch": batch, "max_seq_len": seq, "steps_per_run": steps, "timed_steps": steps - 1,
                    "vocab": 49152, "loss": "generalized JSD, beta 0.5, T 1 (TRL: full vocabulary; ours: shared_kl, "
                    "which equals it with one tokenizer)", "memory": "peak RSS during the steps - RSS at their start"}}


def _prompt_completion(texts: list[str]) -> dict:
    """GOLD trains on prompt/completion pairs (it refuses an empty prompt): each span's first line (or first
    40 characters) is the prompt, the rest the completion; together they are the span, as sakd sees it."""
    cut = [min(t.find("\n") + 1 if 0 < t.find("\n") < 80 else 40, len(t) - 1) for t in texts]
    return {"prompt": [t[:c] for t, c in zip(texts, cut)], "completion": [t[c:] for t, c in zip(texts, cut)]}


def gold_child(spec: dict) -> dict:
    """TRL's GOLDTrainer (trl.experimental.gold: byte-offset alignment, hybrid loss = generalized JSD on
    the matched vocabulary + sorted-L1 ULD on the rest) on the same texts and model folders (run by an
    interpreter that can import TRL; TRL is never a dependency of sakd)."""
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    tok = AutoTokenizer.from_pretrained(spec["student"])
    texts = json.loads(Path(spec["texts"]).read_text())
    ends, mem, tokens = [], {}, []

    class Probe(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            mem["base"] = kdm._rss_bytes()
            self.sampler = kdm._PeakSampler(0.0005)
            self.sampler.start()
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            ends.append(time.perf_counter())

        def on_train_end(self, *a, **kw):
            mem["peak_extra_mib"] = (self.sampler.stop() - mem.pop("base")) / MIB

    args = GOLDConfig(output_dir=spec["out"], per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
                      learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
                      max_grad_norm=1.0, lmbda=0.0, beta=0.5, temperature=1.0, bf16=False, fp16=False,
                      gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
                      logging_steps=10**6, max_length=spec["seq_len"] + 16, dataloader_num_workers=0, seed=0,
                      disable_tqdm=True, use_uld_loss=True, use_extended_uld=True,
                      uld_use_hybrid_loss=True, teacher_tokenizer_name_or_path=spec["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    trainer = GOLDTrainer(model=student, teacher_model=teacher, args=args,
                          train_dataset=datasets.Dataset.from_dict(_prompt_completion(texts)), processing_class=tok,
                          callbacks=[Probe()])
    compute_loss = trainer.compute_loss

    def counting(model, inputs, *a, **kw):  # student tokens of each step
        tokens.append(int(inputs["attention_mask"].sum()))
        return compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = counting
    trainer.train()
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    return {"steps": [{"seconds": s, "tokens": t} for s, t in zip(seconds, tokens)], "memory": mem,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}}


def make_cross_tokenizer_pair(d: Path) -> dict:
    """The real vocabularies on tiny models: a Qwen3-MoE teacher with 151,936 logit columns and the qwen-real
    tokenizer, a Llama student with 49,152 (smollm2-real); Shakespeare text."""
    import torch
    from transformers import AutoModelForCausalLM

    from sakd.models.tokenizers import load_tokenizer as real_tokenizer
    from sakd.data.corpus import HELD_OUT_PLAYS, load_plays
    from sakd.models.tiny import llama_config, qwen3_moe_config

    t_tok, s_tok = real_tokenizer("qwen-real"), real_tokenizer("smollm2-real")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(qwen3_moe_config(151_936, hidden=256, layers=4, heads=4, experts=3,
                                                      intermediate=256)).save_pretrained(d / "teacher")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(llama_config(len(s_tok), hidden=128, layers=4, heads=4,
                                                  intermediate=384)).save_pretrained(d / "student")
    t_tok.save_pretrained(d / "teacher")
    s_tok.save_pretrained(d / "student")
    plays = load_plays()
    (d / "train.txt").write_text("\n\n".join(t for n, t in plays.items() if n not in HELD_OUT_PLAYS)[:300_000])
    (d / "heldout.txt").write_text(next(t for n, t in plays.items() if n in HELD_OUT_PLAYS)[:20_000])
    return {k: str(d / k) for k in ("teacher", "student")} | {"train": str(d / "train.txt"),
                                                                 "heldout": str(d / "heldout.txt")}


def gold_section(pairs: int, steps: int, threads: int, trl_python: str, work: Path, batch: int = 4,
                 seq: int = 512) -> dict:
    """sakd's default (shared_kl, forward KL) vs TRL's GOLD (hybrid ULD) on the real vocabularies, 4 x 512,
    fp32, the same texts (the loop's training spans), alternating runs."""
    python = trl_interpreter(trl_python)
    if python is None:
        return {"gold_throughput_ratio": None, "gold_memory_ratio": None,
                "gold": {"skipped": f"{trl_python} not found: python -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip "
                         "install torch==2.13.0 'trl==1.16.*' transformers==5.23.0 accelerate datasets"}}
    from sakd.config import load_config
    from sakd.data.text import span_data

    pair = make_cross_tokenizer_pair(work / "xpair")
    common = [f"model.teacher={pair['teacher']}", f"model.student={pair['student']}", f"data.source={pair['train']}",
              f"data.eval_source={pair['heldout']}", f"data.seq_len={seq}", f"data.max_examples={steps * batch}",
              f"train.max_steps={steps}", f"train.batch_size={batch}", "train.lr=1e-4", "train.warmup_steps=0",
              "train.precision=fp32", "train.eval_every=0", "train.save_every=0", "train.log_every=1000",
              "logging.tensorboard=false", "eval.max_bytes=1000", "eval.batch_size=1", "eval.seq_len=64"]
    ds = span_data(load_config(None, common), log=lambda *a: None).train
    (work / "texts.json").write_text(json.dumps(list(ds.spans)))
    runs = []
    for r in range(pairs):
        ours = run_child(sys.executable, "distill", {"threads": threads, "overrides": common + [
            f"train.output_dir={work / f'gold-ours-{r}'}"]}, threads)
        theirs = run_child(python, "gold", {"threads": threads, "teacher": pair["teacher"], "student": pair["student"],
                                            "texts": str(work / "texts.json"), "out": str(work / f"gold-{r}"),
                                            "batch": batch, "steps": steps, "seq_len": seq}, threads)
        (o_rate, o_step), (t_rate, t_step) = timed_rate(ours["steps"]), timed_rate(theirs["steps"])
        runs.append({"ours_tokens_per_s": o_rate, "gold_tokens_per_s": t_rate, "ours_step_s": o_step,
                     "gold_step_s": t_step, "ours_step_memory_mib": ours["memory"]["peak_extra_mib"],
                     "gold_step_memory_mib": theirs["memory"]["peak_extra_mib"], "throughput_ratio": o_rate / t_rate,
                     "memory_ratio": ours["memory"]["peak_extra_mib"] / theirs["memory"]["peak_extra_mib"],
                     "trl_versions": theirs["versions"]})
        print(f"  pair {r + 1}/{pairs}: tokens/s ours {o_rate:.0f} GOLD {t_rate:.0f}; step memory ours "
              f"{runs[-1]['ours_step_memory_mib']:.0f} MiB GOLD {runs[-1]['gold_step_memory_mib']:.0f} MiB", flush=True)
    return {"gold_throughput_ratio": statistics.median(x["throughput_ratio"] for x in runs),
            "gold_memory_ratio": statistics.median(x["memory_ratio"] for x in runs),
            "gold": {"pairs": runs, "batch": batch, "max_seq_len": seq, "steps_per_run": steps, "timed_steps": steps - 1,
                     "teacher_columns": 151_936, "student_vocab": 49_152,
                     "loss": "GOLD: hybrid ULD (generalized JSD beta 0.5 on matched tokens + sorted L1 on the rest), "
                             "lmbda 0 (off-policy); sakd: the default (shared_kl, forward KL, at 1:1 chunks)",
                     "tokens": "student tokens per step (GOLD: its attention mask, with its appended EOS)",
                     "memory": "peak RSS during the steps - RSS at their start"}}


def demo_overrides(out: Path, steps: int, extra: list[str]) -> list[str]:
    return [f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0", "train.log_every=1000",
            "train.warmup_steps=1", f"train.output_dir={out}", "logging.tensorboard=false", "eval.max_bytes=4000",
            *extra]


def alignment_section(steps: int, threads: int, work: Path) -> dict:
    r = run_child(sys.executable, "distill", {"threads": threads, "config": str(ROOT / "configs" / "demo.yaml"),
                                              "overrides": demo_overrides(work / "align", steps, [])}, threads)
    s = r["steps"][1:]
    share = sum(x["data_s"] for x in s) / sum(x["seconds"] for x in s)
    wait = sum(x["data_wait_s"] for x in s) / sum(x["seconds"] for x in s)
    return {"alignment_time_share": share, "alignment_wait_share": wait,
            "alignment": {"config": "configs/demo.yaml (batch 16 x 256, KA M=2, every loss term)",
                          "timed_steps": len(s),
                          "measures": "alignment_time_share: seconds spent in SpanDataset items (tokenize both sides "
                                      "+ byte-align) and collation, in the background thread, / step seconds; "
                                      "alignment_wait_share: seconds the step waited for its batch / step seconds",
                          "data_s_per_step": statistics.mean(x["data_s"] for x in s),
                          "data_wait_s_per_step": statistics.mean(x["data_wait_s"] for x in s),
                          "step_s": statistics.mean(x["seconds"] for x in s)}}


def alternating_pairs(variants: dict[str, list[str]], pairs: int, steps: int, threads: int, work: Path,
                      on_run=None) -> tuple[dict[str, list[dict]], list[dict[str, dict]], list[str]]:
    """``pairs`` rounds of one distill run per variant of configs/demo.yaml (its overrides), in the order given,
    each run's first STEP_TIME_WARMUP steps dropped: (every variant's timed steps, per round each variant's median
    {"wall", "cpu"} seconds a step, the allocator settings the runs applied). ``on_run(round, name, median)``:
    called after each run (progress)."""
    demo = str(ROOT / "configs" / "demo.yaml")
    timed: dict[str, list[dict]] = {name: [] for name in variants}
    rounds, heaps = [], set()
    for n in range(pairs):
        medians = {}
        for name, over in variants.items():
            r = run_child(sys.executable, "distill", {"threads": threads, "config": demo, "overrides": demo_overrides(
                work / f"step-{name}-{n}", steps, over)}, threads, heap="default")
            heaps.add(r["cpu_heap"])
            run_steps = r["steps"][STEP_TIME_WARMUP:]
            timed[name] += run_steps
            medians[name] = {k: statistics.median(x[f] for x in run_steps) for k, f in (("wall", "seconds"),
                                                                                         ("cpu", "cpu_s"))}
            if on_run:
                on_run(n, name, medians[name])
        rounds.append(medians)
    return timed, rounds, sorted(heaps)


def step_time_section(steps: int, pairs: int, threads: int, work: Path, cpu_heap: str = "system") -> dict:
    """configs/demo.yaml as shipped (KA with 2 teacher samples: the logit loss runs twice per micro-batch) with
    loss.logit=projected_kl and =shared_kl, ``pairs`` runs of each, alternating (shared first), each run's first
    STEP_TIME_WARMUP steps dropped; ratio of the medians over every timed step, wall and main-thread CPU.
    ``cpu_heap``: train.cpu_heap of both (system, as shipped: glibc's defaults; keep: freed memory kept)."""
    from paired import mean_interval

    load = list(os.getloadavg())
    timed, rounds, heaps = alternating_pairs(
        {m: [f"loss.logit={m}", f"train.cpu_heap={cpu_heap}"] for m in ("shared_kl", "projected_kl")},
        pairs, steps, threads, work)
    # one ratio per alternating pair: the pairs are the independent units
    pair_ratios = {k: [r["projected_kl"][k] / r["shared_kl"][k] for r in rounds] for k in ("wall", "cpu")}
    per = {m: {"ms_per_step": 1000 * statistics.median(x["seconds"] for x in s),
               "cpu_ms_per_step": 1000 * statistics.median(x["cpu_s"] for x in s),
               "ms_per_step_each": [round(1000 * x["seconds"], 1) for x in s],
               "cpu_ms_per_step_each": [round(1000 * x["cpu_s"], 1) for x in s]} for m, s in timed.items()}
    wall = per["projected_kl"]["ms_per_step"] / per["shared_kl"]["ms_per_step"]
    cpu = per["projected_kl"]["cpu_ms_per_step"] / per["shared_kl"]["cpu_ms_per_step"]
    pk, sk = per["projected_kl"], per["shared_kl"]
    print(f"  projected_kl {pk['ms_per_step']:.0f} ms/step ({pk['cpu_ms_per_step']:.0f} CPU ms), shared_kl "
          f"{sk['ms_per_step']:.0f} ({sk['cpu_ms_per_step']:.0f}): {wall:.3f}x wall, {cpu:.3f}x CPU", flush=True)
    by_pair = {k: mean_interval(v) for k, v in pair_ratios.items()}
    for k, v in by_pair.items():
        ci = f" [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" if v["ci95"] else ""
        print(f"  {k} ratio per pair of runs: {', '.join(f'{x:.3f}' for x in v['values'])}; mean {v['mean']:.3f}{ci}",
              flush=True)
    return {"step_time_ratio": wall, "step_time_cpu_ratio": cpu,
            "step_time": {"config": "configs/demo.yaml (batch 8 x 256, moe.mode=ka, 2 teacher samples)",
                          "steps_per_run": steps, "warmup_steps_dropped": STEP_TIME_WARMUP, "runs_per_method": pairs,
                          "threads": threads, "load_average_at_start": load,
                          "cpu_heap": cpu_heap, "allocator": heaps,
                          "measures": "median over the timed steps of every run: wall seconds of the optimizer "
                                      "step (history.json) and CPU seconds of the training thread in train_step; "
                                      "ratio_by_pair: each alternating pair's ratio of its two runs' medians, their "
                                      "mean and 95 % t interval (the pairs are the independent units)",
                          "ratio_by_pair": by_pair, **per}}


def _cache_pair(steps: int, threads: int, work: Path, name: str, extra: list[str], cache: Path) -> dict:
    """The demo student trained for ``steps`` from the live teacher and from ``cache``, same seed and data."""
    demo = str(ROOT / "configs" / "demo.yaml")
    online = run_child(sys.executable, "distill", {"threads": threads, "config": demo, "overrides": demo_overrides(
        work / f"{name}-online", steps, extra)}, threads)
    cached = run_child(sys.executable, "distill", {"threads": threads, "config": demo, "overrides": demo_overrides(
        work / f"{name}-cached", steps, extra + [f"model.teacher_cache={cache}"])}, threads)
    (_, on_step), (_, ca_step) = timed_rate(online["steps"]), timed_rate(cached["steps"])
    print(f"  {name}: held-out bits/byte live {online['student_bpb_final']:.4f}, cache "
          f"{cached['student_bpb_final']:.4f}; step {on_step:.2f} s / {ca_step:.2f} s", flush=True)
    return {"student_bpb_online": online["student_bpb_final"], "student_bpb_cached": cached["student_bpb_final"],
            "bpb_ratio": cached["student_bpb_final"] / online["student_bpb_final"],
            "teacher_bpb": online["teacher_bpb"], "step_s_online": on_step, "step_s_cached": ca_step,
            "step_memory_mib_online": online["memory"].get("peak_extra_mib"),
            "step_memory_mib_cached": cached["memory"].get("peak_extra_mib"), "overrides": extra}


CACHE_COMMON = ["loss.hidden.weight=0", "loss.attention.weight=0", "loss.contrastive.weight=0"]


def cache_section(steps: int, threads: int, work: Path) -> dict:
    """Demo pair, moe.mode=topk, one packed k = 64 cache: the student from the cache vs from the live teacher
    with shared_kl (the demo's logit loss) and with mapped_kl, same steps and seed. The logit loss is pinned
    here, whatever configs/demo.yaml says."""
    from sakd.teacher_cache.builder import build_cache
    from sakd.config import load_config

    extra = ["moe.mode=topk", *CACHE_COMMON, f"data.max_examples={steps * 8}"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", demo_overrides(work / "build", steps, extra))
    t0 = time.time()
    manifest = build_cache(cfg, work / "cache", k=64, log=lambda *a: None)
    build_s = time.time() - t0
    shared = _cache_pair(steps, threads, work, "shared_kl", extra + ["loss.logit=shared_kl"], work / "cache")
    mapped = _cache_pair(steps, threads, work, "mapped_kl", extra + ["loss.logit=mapped_kl"], work / "cache")
    return {"cache_bytes_per_token": manifest["bytes_per_token"], "cache_bpb_ratio": shared["bpb_ratio"],
            "cache_bpb_ratio_mapped": mapped["bpb_ratio"],
            "cache": {"k": 64, "codec": "packed", "build_s": build_s, "steps": steps, "teacher_vocab":
                      manifest["teacher_vocab"], "n_tokens": manifest["n_tokens"], "shared_kl": shared,
                      "mapped_kl": mapped}}


def cache_ka_section(steps: int, seeds: int, threads: int, work: Path) -> dict:
    """KA from a cache (M = 2 sampled routings stored per position) vs live KA, demo pair, one cache per seed
    (the draws are seeded by train.seed), mapped_kl (pinned); mean ratio over the seeds."""
    from sakd.teacher_cache.builder import build_cache
    from sakd.config import load_config

    runs = []
    for seed in range(seeds):
        extra = ["moe.mode=ka", "loss.logit=mapped_kl", *CACHE_COMMON, f"data.max_examples={steps * 8}",
                 f"train.seed={seed}"]
        cfg = load_config(ROOT / "configs" / "demo.yaml", demo_overrides(work / f"ka-build-{seed}", steps, extra))
        t0 = time.time()
        build_cache(cfg, work / f"ka-cache-{seed}", k=64, log=lambda *a: None)
        r = _cache_pair(steps, threads, work, f"ka-seed{seed}", extra, work / f"ka-cache-{seed}")
        runs.append(dict(r, seconds=time.time() - t0))
    return {"cache_ka_bpb_ratio": statistics.mean(r["bpb_ratio"] for r in runs),
            "cache_ka": {"steps": steps, "seeds": seeds, "runs": runs,
                         "note": "live KA draws new routings every step; the cache holds M = moe.ka_samples draws "
                                 "per position, reused every epoch"}}


def _real_pair_config(examples: int, work: Path):
    """The run config of a tiny Qwen3-MoE teacher with 151,936 logit columns and the qwen-real tokenizer
    (151,669 tokens), the smollm2-real student tokenizer (49,152), Shakespeare spans of 256 student tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from sakd.config import load_config
    from sakd.models.tiny import llama_config, qwen3_moe_config
    from sakd.models.tokenizers import load_tokenizer as real_tokenizer

    t_tok, s_tok = real_tokenizer("qwen-real"), real_tokenizer("smollm2-real")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(qwen3_moe_config(151_936, hidden=64, layers=2, heads=4, experts=3,
                                                      intermediate=64)).save_pretrained(work / "real-teacher")
    AutoModelForCausalLM.from_config(llama_config(len(s_tok), hidden=64, layers=2, heads=4,
                                                  intermediate=128)).save_pretrained(work / "real-student")
    t_tok.save_pretrained(work / "real-teacher")
    s_tok.save_pretrained(work / "real-student")
    return load_config(None, [f"model.teacher={work / 'real-teacher'}", f"model.student={work / 'real-student'}",
                              "data.source=sakd:shakespeare-train", "data.eval_source=sakd:shakespeare-heldout",
                              "data.seq_len=256", f"data.max_examples={examples}", "eval.max_bytes=2000",
                              "eval.batch_size=4", f"train.output_dir={work / 'real-run'}"])


def cache_real_section(examples: int, work: Path) -> dict:
    """Bytes per teacher token of a packed k = 64 cache for the REAL vocabularies (``_real_pair_config``; the
    size depends on the vocabularies and the student/teacher token ratio, not on the model)."""
    from sakd.teacher_cache.builder import build_cache

    cfg = _real_pair_config(examples, work)
    t0 = time.time()
    m = build_cache(cfg, work / "real-cache", k=64, batch_size=4, log=lambda *a: None)
    print(f"  real vocabularies: {m['bytes_per_token']:.1f} bytes per teacher token ({m['n_tokens']:,} tokens, "
          f"{time.time() - t0:.0f} s)", flush=True)
    return {"cache_bytes_per_token_real": m["bytes_per_token"],
            "cache_real": {"teacher_vocab": m["teacher_vocab"], "teacher_columns": 151_936, "k": 64, "codec": "packed",
                           "n_tokens": m["n_tokens"], "shard_bytes": m["shard_bytes"], "build_s": time.time() - t0}}


def cache_sampled_real_section(examples: int, work: Path) -> dict:
    """Bytes per teacher token of a sampled cache (--codec sampled, 12 draws) for the REAL vocabularies
    (``_real_pair_config``, as cache_real). The random tiny teacher is nearly flat over 151,936 ids, so its 12
    draws are 12 distinct ids at almost every position: the worst case of the format (a trained teacher's
    draws repeat; the demo's distinct ids per position are in ``cache_sampled``)."""
    from sakd.teacher_cache.builder import build_cache

    cfg = _real_pair_config(examples, work)
    t0 = time.time()
    m = build_cache(cfg, work / "real-sampled", codec="sampled", batch_size=4, log=lambda *a: None)
    print(f"  real vocabularies, sampled: {m['bytes_per_token']:.1f} bytes per teacher token ({m['n_tokens']:,} "
          f"tokens, {time.time() - t0:.0f} s)", flush=True)
    return {"cache_sampled_bytes_per_token_real": m["bytes_per_token"],
            "cache_sampled_real": {"teacher_vocab": m["teacher_vocab"], "draws": m["draws"], "codec": "sampled",
                                   "loss.temperature": m["loss.temperature"], "n_tokens": m["n_tokens"],
                                   "shard_bytes": m["shard_bytes"], "distinct_ids_per_position":
                                       _distinct_per_position(work / "real-sampled"),
                                   "build_s": time.time() - t0}}


def _distinct_per_position(cache: Path) -> float:
    """Mean number of distinct drawn ids per teacher position of a sampled cache."""
    from safetensors import safe_open

    m = json.loads((cache / "manifest.json").read_text())
    entries = 0
    for s in range(m["shards"]):
        with safe_open(str(cache / f"shard-{s:05d}.safetensors"), framework="pt") as f:
            entries += int(f.get_tensor("e_offsets")[-1])
    return entries / (m["n_tokens"] * m["samples"])


def cache_sampled_section(steps: int, seeds: int, threads: int, work: Path, logit: str = "shared_kl") -> dict:
    """A sampled cache (12 draws per position) vs the live teacher on the demo pair, moe.mode=topk, the same
    steps and overrides as cache_bpb_ratio, ``logit`` pinned; one cache per seed (its draws are seeded by
    train.seed); the mean ratio over the seeds."""
    from sakd.teacher_cache.builder import build_cache
    from sakd.config import load_config

    runs = []
    for seed in range(seeds):
        extra = ["moe.mode=topk", *CACHE_COMMON, f"data.max_examples={steps * 8}", f"loss.logit={logit}",
                 f"train.seed={seed}"]
        cfg = load_config(ROOT / "configs" / "demo.yaml", demo_overrides(work / f"s-build-{seed}", steps, extra))
        cache = work / f"sampled-cache-{seed}"
        if not (cache / "manifest.json").is_file():
            build_cache(cfg, cache, codec="sampled", log=lambda *a: None)
        m = json.loads((cache / "manifest.json").read_text())
        r = _cache_pair(steps, threads, work, f"sampled-{logit}-seed{seed}", extra, cache)
        runs.append(dict(r, bytes_per_token=m["bytes_per_token"], distinct_ids_per_position=_distinct_per_position(
            cache)))
    key = "cache_sampled_bpb_ratio" + ("" if logit == "shared_kl" else "_projected")
    return {key: statistics.mean(r["bpb_ratio"] for r in runs),
            key.replace("_bpb_ratio", ""): {"steps": steps, "seeds": seeds, "draws": 12, "logit": logit,
                                            "runs": runs}}


def cached_kd_step_section(steps: int, rounds: int, threads: int, work: Path) -> dict:
    """Training step time (the loop's per-step seconds, evaluation excluded, first step not timed) of KD from a
    top-64 and from a sampled cache against a CE-only step (sakd.train.ce_only.CE_ONLY) on the same data and
    student: the demo config (its logit loss, kd_weight and ce_weight) with moe.mode=topk and the
    terms a cache cannot feed off. The three runs alternate, ``rounds`` times; medians of the step times."""
    from sakd.teacher_cache.builder import build_cache
    from sakd.config import load_config

    extra = ["moe.mode=topk", *CACHE_COMMON, f"data.max_examples={steps * 8}"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", demo_overrides(work / "step-build", steps, extra))
    build_cache(cfg, work / "step-top64", k=64, log=lambda *a: None)
    build_cache(cfg, work / "step-sampled", codec="sampled", log=lambda *a: None)
    from sakd.train.ce_only import CE_ONLY  # every teacher term off: no teacher pass in the step

    variants = {"ce": CE_ONLY,
                "top64": [f"model.teacher_cache={work / 'step-top64'}"],
                "sampled": [f"model.teacher_cache={work / 'step-sampled'}"]}
    times: dict[str, list] = {k: [] for k in variants}
    demo = str(ROOT / "configs" / "demo.yaml")
    for r in range(rounds):
        for name, over in variants.items():
            out = run_child(sys.executable, "distill", {"threads": threads, "config": demo, "overrides":
                            demo_overrides(work / f"step-{name}-{r}", steps, extra + over)}, threads,
                            heap="default")  # a timing: the allocator as the sakd command sets it (HEAP)
            times[name].append(timed_rate(out["steps"])[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: med[k] / med["ce"] for k in ("top64", "sampled")}
    print(f"  step: CE {med['ce']:.3f} s, top-64 {med['top64']:.3f} s ({ratios['top64']:.3f}x), sampled "
          f"{med['sampled']:.3f} s ({ratios['sampled']:.3f}x)", flush=True)
    return {"cached_kd_step_vs_ce": max(ratios.values()), "cached_kd_step_vs_ce_top64": ratios["top64"],
            "cached_kd_step_vs_ce_sampled": ratios["sampled"],
            "cached_kd_step": {"steps": steps, "rounds": rounds, "step_s": times, "median_step_s": med,
                               "logit": cfg.loss.logit, "kd_weight": cfg.loss.kd_weight, "ce_weight":
                                   cfg.loss.ce_weight, "note": "cached_kd_step_vs_ce: the larger of the two ratios"}}


def cuda_section(args, work: Path) -> dict:
    """Our loop on the GPU: tokens/s, peak CUDA memory (after the first evaluation), MFU."""
    import torch

    from sakd.config import load_config
    from sakd.plan import count_parameters, load_model_config, plan

    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if args.config:
        cfg_path, overrides = args.config, demo_overrides(work / "cuda", args.steps, ["data.max_examples=4000"])
    else:
        pair = make_same_tokenizer_pair(work / "pair")
        cfg_path = None
        overrides = [f"model.teacher={pair['teacher']}", f"model.student={pair['student']}",
                     f"data.source={pair['train']}", f"data.eval_source={pair['heldout']}", "data.seq_len=512",
                     "data.teacher_seq_len=512", "train.batch_size=4"] + demo_overrides(work / "cuda", args.steps, [])
    r = run_child(sys.executable, "distill", {"threads": args.threads, "config": cfg_path, "overrides": overrides},
                  args.threads)
    cfg = load_config(cfg_path, overrides)
    s_cfg = load_model_config(cfg.model.student, "student")[0]
    t_cfg = load_model_config(cfg.model.teacher, "teacher")[0]
    p_s, p_t = count_parameters(s_cfg), count_parameters(t_cfg)
    rate, step_s = timed_rate(r["steps"])
    # FLOPs per student token: 6 P_s (forward + backward) + 2 P_t per teacher pass (forward), the
    # teacher's tokens taken as 1:1 with the student's (PaLM appendix B convention, attention omitted).
    passes = cfg.moe.ka_samples if cfg.moe.mode == "ka" else 1
    flops_per_token = 6 * p_s + 2 * p_t * passes
    mfu = rate * flops_per_token / (peak * 1e12) if peak else None
    est = plan(cfg, card_gb=torch.cuda.get_device_properties(0).total_memory / 2**30)
    return {"cuda": {"device": name, "tokens_per_s": rate, "step_s": step_s, "peak_cuda_mib": r["memory"].get(
        "cuda_peak_mib"), "plan_peak_mib": est["peak_bytes"] / MIB, "mfu": mfu, "peak_tflops": peak,
        "flops_per_token": flops_per_token, "note": "MFU counts total teacher parameters (MoE: an upper bound)"}}


# ----------------------------------------------------------------------------- main

def verdict(key: str, value) -> str:
    if key not in TARGETS:
        return ""
    op, bound = TARGETS[key]
    if value is None:
        return f"{op} {bound:g}  not measured"
    ok = value <= bound if op == "<=" else value >= bound
    return f"{op} {bound:g}  {'met' if ok else 'NOT met'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: under 10 minutes on 2 CPU cores")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--trl-python", default="/tmp/trlvenv/bin/python", help="interpreter of TRL's own venv")
    ap.add_argument("--trl-path", help="instead: a folder holding the trl package (pip install --no-deps --target "
                    "DIR trl==1.16.0), imported by this interpreter in the TRL children only")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--config", help="--device cuda: a config to run instead of the tiny same-tokenizer pair")
    ap.add_argument("--steps", type=int, default=20, help="--device cuda: optimizer steps")
    ap.add_argument("--out", default=str(RESULTS), help="the JSON written (an --only rerun updates its sections there)")
    ap.add_argument("--peak-tflops", type=float, help="--device cuda: the card's dense 16-bit peak (default: by name)")
    ap.add_argument("--step-time-pairs", type=int, help="step_time: alternating shared_kl/projected_kl pairs of runs "
                    "(default 2; --quick 1); with 3 or more, the ratio's 95 %% interval over the pairs")
    ap.add_argument("--cpu-heap", choices=("system", "keep"), default="system", help="step_time: train.cpu_heap of "
                    "both losses (system, as shipped: glibc's defaults; keep: freed memory stays in the heap)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global TRL_PATH
    TRL_PATH = args.trl_path
    if args.child:
        fn = {"distill": distill_child, "trl": trl_child, "gold": gold_child}[args.child]
        print(json.dumps(fn(json.loads(args.spec))))
        return

    import torch

    t_start = time.time()
    out = {"quick": args.quick, "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                            "threads": args.threads, "torch": torch.__version__,
                                            "python": platform.python_version()}}
    with tempfile.TemporaryDirectory(prefix="sakd-perf-") as tmp:
        work = Path(tmp)
        if args.device == "cuda":
            out.update(cuda_section(args, work))
        else:
            sel = set(args.only or SECTIONS)
            q = args.quick
            for name, fn in (("kd", lambda: kd_loss_section(q, 3)),
                             ("trl", lambda: trl_section(2 if q else 3, 2 if q else 6, args.threads,
                                                         args.trl_python, work)),
                             ("gold", lambda: gold_section(2, 3 if q else 4, args.threads,
                                                           args.trl_python, work, *((2, 256) if q else (4, 512)))),
                             ("cache", lambda: cache_section(10 if q else 60, args.threads, work)),
                             ("cache_ka", lambda: cache_ka_section(10 if q else 60, 1 if q else 3, args.threads, work)),
                             ("cache_real", lambda: cache_real_section(8 if q else 64, work)),
                             ("align", lambda: alignment_section(3 if args.quick else 11, args.threads, work)),
                             ("step_time", lambda: step_time_section(
                                 9 if q else 12, args.step_time_pairs or (1 if q else 2), args.threads, work,
                                 args.cpu_heap)),
                             ("cache_sampled", lambda: cache_sampled_section(10 if q else 60, 1 if q else 3,
                                                                             args.threads, work)),
                             ("cache_sampled_projected", lambda: cache_sampled_section(
                                 10 if q else 60, 1 if q else 3, args.threads, work, "projected_kl")),
                             ("cache_sampled_real", lambda: cache_sampled_real_section(8 if q else 64, work)),
                             ("cached_kd_step", lambda: cached_kd_step_section(6 if q else 20, 1 if q else 3,
                                                                               args.threads, work))):
                if name in sel:
                    t0 = time.time()
                    print(f"[{name}] ...", flush=True)
                    out.update(fn())
                    out.setdefault("section_seconds", {})[name] = round(time.time() - t0, 1)
    out["seconds"] = round(time.time() - t_start, 1)
    out["targets"] = {k: f"{op} {b:g}" for k, (op, b) in TARGETS.items()}
    print(f"\n{'key':<26}{'value':>12}  target")
    for key in TARGETS:
        if key in out:
            v = out[key]
            print(f"{key:<26}{'-' if v is None else f'{v:.4g}':>12}  {verdict(key, v)}")
    for key, note in (("kd_loss_memory_ratio_logits", "(logits as input, chunk_rows=1024)"),
                      ("kd_loss_time_ratio_logits", "(logits as input, chunk_rows=1024)"),
                      ("alignment_wait_share", "(time the step waits for its batch)")):
        if out.get(key) is not None:
            print(f"{key:<26}{out[key]:>12.4g}  {note}")
    if "cuda" in out:
        for k, v in out["cuda"].items():
            print(f"{k:<26}{v if isinstance(v, str) else f'{v:.4g}' if v is not None else '-':>12}")
    print(f"({out['seconds']:.0f} s)")
    results = Path(args.out).resolve()
    results.parent.mkdir(parents=True, exist_ok=True)
    if args.only and results.exists():  # a partial rerun updates its sections' keys, keeps the others
        prev = json.loads(results.read_text())
        out = {**prev, **out, "section_seconds": {**prev.get("section_seconds", {}), **out.get("section_seconds", {})},
               "sections_rerun": {**prev.get("sections_rerun", {}), **{
            name: {"quick": args.quick, "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} for name in args.only}}}
    results.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
