"""Typed configuration: dataclasses per section, YAML files, dotted command-line overrides.

Each field's ``help`` is its one docstring: ``sakd distill --help`` prints it.
Unknown keys, wrong types and out-of-range values raise ``UserError`` with a
one-line message naming the key (the CLI exits 2 on it).

    cfg = load_config("configs/demo.yaml", ["train.lr=3e-4", "loss.temperature=2"])
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from sakd.errors import UserError


def F(default: Any, help: str, **kw) -> Any:  # noqa: A002 - "help" reads best at the call site
    """A dataclass field with its help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class StudentLoraConfig:
    r: Optional[int] = F(None, "LoRA rank of the student's adapters (None = off: the whole student trains). "
                         "Through peft: only the adapters train, the base weights stay frozen (sakd/models/lora.py).",
                         min=1)
    alpha: Optional[float] = F(None, "LoRA alpha: the update is scaled by alpha / r (None = 2 r).", gt=0.0)
    dropout: float = F(0.0, "Dropout on the adapters' input (0 = off).", min=0.0, max=0.9)
    target_modules: list = F(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                             "Linear layers that get adapters (last name part): default the attention and MLP "
                             "projections of a Llama student.")
    save_adapter: bool = F(False, "Also export the adapter folder (<output_dir>/adapter, PeftModel.from_pretrained) "
                           "beside the merged student.")


@dataclass
class ModelConfig:
    teacher: str = F("huihui-ai/Huihui-MoE-1B-A0.6B", "Teacher: hub id or local folder (from_pretrained).")
    student: str = F("HuggingFaceTB/SmolLM-135M", "Student: hub id or local folder (from_pretrained).")
    teacher_tokenizer: Optional[str] = F(None, "Teacher tokenizer (default: the teacher's own).")
    student_tokenizer: Optional[str] = F(None, "Student tokenizer (default: the student's own).")
    teacher_cache: Optional[str] = F(None, "Train from a teacher cache folder (sakd cache-teacher) instead of "
                                     "running the teacher; the teacher is not loaded.")
    teacher_dtype: str = F("auto", "Teacher weights: auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32.",
                           choices=("auto", "float16", "bfloat16", "float32"))
    experts_implementation: Optional[str] = F(None, "Teacher MoE experts backend (eager, grouped_mm); None = library default.")
    gradient_checkpointing: bool = F(False, "Checkpoint the student's activations (less memory, ~30% slower).")
    student_lora: StudentLoraConfig = field(default_factory=StudentLoraConfig,
                                            metadata={"help": "Train LoRA adapters instead of the whole student."})
    teacher_device_map: Optional[typing.Union[str, dict]] = F(
        None, "A teacher bigger than the card: transformers' big-model loading (from_pretrained(device_map=...), "
        "Accelerate's hooks): auto, balanced, balanced_low_0, sequential, or {module: device} with devices 0, "
        "cuda:1, cpu, disk. Modules left off the card run from host memory or disk (slower, same logits). One "
        "process only; moe.mode=sar needs the teacher whole on one device.")
    teacher_max_memory: Optional[dict] = F(None, "With model.teacher_device_map: the most each device may hold "
                                           "of the teacher, e.g. {0: 10GiB, cpu: 30GiB}.")
    teacher_offload_folder: Optional[str] = F(None, "With model.teacher_device_map: folder for the weights "
                                              "mapped to disk.")


@dataclass
class DataConfig:
    source: str = F("", "Training text: a hub dataset name, a .txt/.jsonl/.parquet file, or a save_to_disk folder.")
    config_name: Optional[str] = F(None, "Hub dataset configuration name.")
    split: str = F("train", "Dataset split to train on.")
    text_column: Optional[str] = F(None, "Column holding the text (auto-detected when unambiguous).")
    streaming: bool = F(False, "Stream a hub dataset instead of downloading it.")
    fallback: list = F([], "Other sources tried in order if `source` cannot be read (announced when used).")
    eval_source: Optional[str] = F(None, "Held-out text (same forms as `source`); default: a split of `source`.")
    eval_fraction: float = F(0.02, "Fraction of the source held out when no eval_source is given.", min=0.0, max=0.5)
    seq_len: int = F(512, "Maximum student tokens per example (the teacher gets the same text span).", min=8)
    teacher_seq_len: Optional[int] = F(None, "Maximum teacher tokens per example (default: 2 x seq_len).", min=8)
    max_examples: Optional[int] = F(None, "Use at most this many training spans (None: all).", min=1)
    chunk_mode: str = F("boundary", "Where chunks close: every common byte boundary, or only at word starts.",
                        choices=("boundary", "word"))
    format: str = F("auto", "Row format: text, messages ({role, content} lists), sharegpt (conversations of "
                    "{from, value}), prompt_completion; auto: from the columns.",
                    choices=("auto", "text", "messages", "sharegpt", "prompt_completion"))
    train_on_prompt: bool = F(False, "Chat data: the losses also cover the user turns (default: assistant only).")
    student_chat_template: Optional[str] = F(None, "Chat data: the student's template (chatml, turns or a .jinja "
                                             "file); default: its tokenizer's own, else chatml.")
    teacher_chat_template: Optional[str] = F(None, "Chat data: the teacher's template (chatml, turns or a .jinja "
                                             "file); default: its tokenizer's own, else chatml.")
    pack: bool = F(True, "Chat data: pack short conversations into seq_len rows (positions restart per example, "
                   "no attention across examples).")
    num_workers: int = F(1, "Background workers encoding and aligning the next step's spans while a step "
                         "computes (0 = in the step itself).", min=0, max=1)


@dataclass
class HiddenLossConfig:
    weight: float = F(0.0, "Weight of the hidden-state loss at chunk ends (0 = off).", min=0.0)
    kind: str = F("mse", "Distance between projected student and teacher states.", choices=("mse", "cosine"))
    pairs: list = F([], "Explicit [student_layer, teacher_layer] pairs; empty = uniform map.")
    n_pairs: int = F(4, "Number of uniformly mapped layer pairs when `pairs` is empty.", min=1)
    ramp_steps: int = F(0, "Ramp the weight linearly from 0 over this many steps (0 = constant).", min=0)


@dataclass
class AttentionLossConfig:
    weight: float = F(0.0, "Weight of the chunk-level attention-transfer loss (0 = off; needs eager attention).", min=0.0)
    pairs: list = F([], "[student_layer, teacher_layer] pairs to compare; empty = last layer of each.")
    ramp_steps: int = F(0, "Ramp the weight linearly from 0 over this many steps.", min=0)


@dataclass
class ContrastiveLossConfig:
    weight: float = F(0.0, "Weight of the InfoNCE term between pooled student and teacher states (0 = off).", min=0.0)
    temperature: float = F(0.1, "InfoNCE temperature.", gt=0.0)
    ramp_steps: int = F(0, "Ramp the weight linearly from 0 over this many steps.", min=0)


@dataclass
class LossConfig:
    logit: str = F("shared_kl", "Logit transfer: projected_kl (at every student position, the teacher's distribution "
                   "and the student's compared on the classes the teacher can name: each student token in the class "
                   "of the longest prefix of its bytes that a teacher token's mass reaches; forward KL; "
                   "sakd/losses/projected.py); mapped_kl (the teacher's distribution mapped onto the student's "
                   "vocabulary by bytes, at every student position); shared_kl (1:1 chunks over the shared "
                   "vocabulary); none.", choices=("projected_kl", "mapped_kl", "shared_kl", "none"))
    baseline: str = F("", "Benchmark only (benchmarks/quality.py), never for a real run: a baseline logit loss "
                      "that replaces loss.logit, with a warning: uld, gold or truncation (sakd/losses/baselines.py).",
                      choices=("", "uld", "gold", "truncation"))
    mapped_extend: bool = F(True, "mapped_kl: where the realised student token runs past the teacher token, move "
                            "the realised path's probability to its cell (BPM); false keeps the first-token map.")
    mapped_prefix_weight: bool = F(False, "mapped_kl: weight each position's term by the teacher's probability "
                                   "of the bytes already seen inside its token (1 where a student token starts "
                                   "a teacher token): targets conditioned on bytes the teacher did not expect "
                                   "count less.")
    mapped_positions: str = F("all", "mapped_kl: the student positions that get a target: all; one_to_one (only "
                              "those of 1:1 chunks, where shared_kl has its targets: an ablation that separates "
                              "the vocabulary mapping from the extra positions).", choices=("all", "one_to_one"))
    divergence: str = F("forward_kl", "Divergence for the logit loss.", choices=("forward_kl", "reverse_kl", "jsd", "tvd"))
    beta: float = F(0.5, "Generalized JSD mixture weight (0 = forward KL, 1 = reverse KL).", min=0.0, max=1.0)
    temperature: float = F(1.0, "Softmax temperature for the logit loss (the loss is scaled by T^2).", gt=0.0)
    kd_weight: float = F(1.0, "Weight of the logit loss.", min=0.0)
    ce_weight: float = F(0.0, "Weight of cross-entropy on the student's own next tokens.", min=0.0)
    chunk_weight: float = F(0.0, "Weight of the chunk-likelihood (ALM) loss on multi-token chunks.", min=0.0)
    chunk_temperature: float = F(100.0, "ALM binarisation temperature.", gt=0.0)
    chunk_rows: int = F(1024, "Rows per row block in the full-vocabulary losses and cross-entropy: they walk "
                        "the positions one row block at a time, so [chunk_rows, vocab] float32 bounds their "
                        "temporaries (memory bound; the name is kept for old configs, it is no alignment chunk).",
                        min=1)
    fused_head: bool = F(True, "Fuse the student's output layer into the shared-vocabulary KD and cross-entropy "
                         "losses (its [tokens, vocab] logits never exist). Used when those are the only logit "
                         "terms (no chunk likelihood, gap weighting or baseline logit loss); else the logits path. "
                         "Where shared_kl alone reads the teacher's logits, the teacher's output layer computes the "
                         "shared vocabulary's columns only.")
    gap_weighting: bool = F(False, "Weight each position's logit loss by its current teacher-student gap "
                            "(normalised to mean 1, detached, clipped).")
    gap_clip: float = F(5.0, "Upper clip of the knowledge-gap weights.", gt=0.0)
    on_policy_prob: float = F(0.0, "GKD lambda: probability per step that the student generates the batch's "
                              "continuations (both models then score that text); 0 = off-policy.", min=0.0, max=1.0)
    on_policy_temperature: float = F(1.0, "Sampling temperature of on-policy generation.", gt=0.0)
    on_policy_tokens: int = F(64, "Tokens the student generates per on-policy example.", min=1)
    hidden: HiddenLossConfig = field(default_factory=HiddenLossConfig, metadata={"help": "Hidden-state term."})
    attention: AttentionLossConfig = field(default_factory=AttentionLossConfig, metadata={"help": "Attention term."})
    contrastive: ContrastiveLossConfig = field(default_factory=ContrastiveLossConfig,
                                               metadata={"help": "Contrastive term."})

    @property
    def method(self) -> str:
        """The logit loss this run computes: the benchmark's ``baseline`` when one is set, else ``logit``."""
        return self.baseline or self.logit

    def active_terms(self) -> frozenset[str]:
        """The one rule for which loss terms a run trains with, at any step: kd (the logit loss) when
        loss.kd_weight > 0 and loss.logit is not none; ce, chunk, hidden, attention, contrastive when their
        weight > 0 (a ramped term is active from step 0, at weight 0). The loop (``objective.term_weights``),
        ``sakd plan`` and the teacher-cache check read it; those in TEACHER_TERMS need the teacher's outputs."""
        weights = {"kd": self.kd_weight if self.method != "none" else 0.0, "ce": self.ce_weight,
                   "chunk": self.chunk_weight, "hidden": self.hidden.weight, "attention": self.attention.weight,
                   "contrastive": self.contrastive.weight}
        return frozenset(k for k, w in weights.items() if w > 0)


# The loss terms that read the teacher's outputs (every term but ce): see LossConfig.active_terms.
TEACHER_TERMS = frozenset({"kd", "chunk", "hidden", "attention", "contrastive"})


@dataclass
class TrainConfig:
    max_steps: int = F(1000, "Optimizer steps.", min=1)
    batch_size: int = F(4, "Examples per micro-batch (per process).", min=1)
    grad_accum: int = F(1, "Micro-batches per optimizer step.", min=1)
    lr: float = F(3e-4, "Peak learning rate of the student.", gt=0.0)
    aux_lr: float = F(1e-3, "Learning rate of projectors (hidden/contrastive).", gt=0.0)
    weight_decay: float = F(0.01, "AdamW weight decay.", min=0.0)
    warmup_steps: int = F(50, "Linear warm-up steps before the cosine decay.", min=0)
    min_lr_ratio: float = F(0.1, "Final learning rate as a fraction of the peak.", min=0.0, max=1.0)
    grad_clip: float = F(1.0, "Clip the gradient norm to this value (0 = off).", min=0.0)
    precision: str = F("auto", "auto (fp16+GradScaler on GPUs without bf16, bf16 where supported, fp32 on CPU), "
                       "fp32, fp16, bf16.", choices=("auto", "fp32", "fp16", "bf16"))
    eval_every: int = F(100, "Evaluate held-out bits per byte every N steps (0 = only at the end).", min=0)
    save_every: int = F(100, "Save a checkpoint every N steps (0 = only at the end).", min=0)
    keep_checkpoints: int = F(2, "Checkpoints kept on disk (older ones are deleted).", min=1)
    log_every: int = F(10, "Log loss terms every N steps.", min=1)
    seed: int = F(0, "Seed for initialisation-free randomness: data order, sampling, dropout.")
    output_dir: str = F("runs/sakd", "Run folder: checkpoints, logs, report, the exported student.")
    push_to_hub: Optional[str] = F(None, "At the end of the run, upload the exported student (weights, tokenizer, "
                                   "model card) to this hub repo id, e.g. me/my-student (needs HF_TOKEN; checked "
                                   "before training starts; with eval.ce_only_baseline: after the CE-only run, its "
                                   "number in the card). Same as `sakd push RUN_DIR REPO_ID` afterwards.")
    push_private: bool = F(False, "With train.push_to_hub: create the repo private.")
    max_time: Optional[str] = F(None, "Stop cleanly (checkpoint, exit) after this long, e.g. 8h45m, 90m, 3600s.")
    nonfinite_teacher: str = F("recompute", "When the teacher's logits or hidden states are not finite (fp16 "
                               "overflow): recompute that micro-batch with the teacher in fp32, or skip its "
                               "teacher terms; counted either way.", choices=("recompute", "skip"))
    deterministic: bool = F(False, "Deterministic algorithms (bit-exact resume on CPU).")
    cpu_heap: str = F("system", "CPU runs of the sakd command: system (glibc's defaults) or keep (glibc keeps "
                      "freed memory for the next allocation, so large temporaries cost no new page faults; the "
                      "resident set stays near the step's peak; on the demo step 0.965x [0.891, 1.039] the step "
                      "time of system over 10 pairs of runs: not a resolved gain). GPU runs and an environment "
                      "that sets glibc's thresholds itself (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, "
                      "MALLOC_TOP_PAD_, MALLOC_MMAP_MAX_, glibc.malloc tunables) are left alone "
                      "(sakd/train/heap.py, docs/performance.md).", choices=("system", "keep"))
    distributed: str = F("ddp", "Several processes: ddp (each holds the whole student) or fsdp (FSDP2 through "
                         "Accelerate: the student's parameters, gradients and AdamW states split over the processes; "
                         "the teacher replicated). See docs/distributed.md.", choices=("ddp", "fsdp"))


@dataclass
class EvalConfig:
    max_bytes: int = F(200_000, "Held-out UTF-8 bytes scored for bits per byte.", min=1)
    batch_size: int = F(8, "Windows per evaluation batch.", min=1)
    seq_len: int = F(512, "Tokens per evaluation window.", min=8)
    context_bytes: int = F(384, "Sliding windows: every scored token sees at least this many UTF-8 bytes of the "
                           "text before it (the same budget for teacher and student; 0 = independent windows).",
                           min=0)
    ce_only_baseline: bool = F(False, "sakd distill: afterwards also train the same student with cross-entropy "
                               "alone (same data, steps and seed) in <output_dir>/ce-only, and add its held-out "
                               "bits per byte to the report (student_bpb_ce_only): what the teacher adds.")


@dataclass
class MoEConfig:
    mode: str = F("topk", "Teacher routing: topk (its own), ka (knowledge augmentation), all (all experts), "
                  "sar (student-aware router).", choices=("topk", "ka", "all", "sar"))
    ka_samples: int = F(2, "KA: teacher passes per step whose divergences are averaged (M).", min=1)
    sample_prob: float = F(0.05, "KA: probability per token and layer of sampling experts instead of top-k.",
                           min=0.0, max=1.0)
    sample_prob_end: Optional[float] = F(None, "KA: sample_prob at the last step (linear schedule; None = constant).",
                                         min=0.0, max=1.0)
    experts_start: Optional[int] = F(None, "KA: experts per token at step 0 (None = E - 1, as in the paper).", min=1)
    experts_end: Optional[int] = F(None, "Experts per token at the last step (None = experts_start).", min=1)
    router_temperature_start: float = F(1.0, "Router softmax temperature at step 0 (ka sampling).", gt=0.0)
    router_temperature_end: float = F(1.0, "Router softmax temperature at the last step.", gt=0.0)
    router_lr: float = F(1e-5, "SAR: router learning rate (own AdamW).", gt=0.0)
    router_weight_decay: float = F(0.01, "SAR: router weight decay.", min=0.0)
    balance_coef: float = F(0.01, "SAR: weight of the Switch-style load-balance loss.", min=0.0)
    anchor: float = F(0.0, "SAR: weight of ||W - W0||^2 keeping the router near its initial weights.", min=0.0)


@dataclass
class LoggingConfig:
    tensorboard: bool = F(True, "Write TensorBoard logs under output_dir/tb.")
    wandb: bool = F(False, "Also log to Weights & Biases (imported only when true).")
    wandb_project: str = F("sakd", "W&B project name.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Teacher and student."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Training and held-out text."})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "Distillation losses."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Held-out evaluation."})
    moe: MoEConfig = field(default_factory=MoEConfig, metadata={"help": "MoE teacher routing."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "Logging."})

    def validate(self) -> "Config":
        if not str(self.train.output_dir or "").strip():  # an unset shell variable: not the current folder
            raise UserError("train.output_dir is empty: name the run folder, e.g. train.output_dir=runs/my-run")
        w = [self.loss.kd_weight, self.loss.ce_weight, self.loss.chunk_weight, self.loss.hidden.weight,
             self.loss.attention.weight, self.loss.contrastive.weight]
        if sum(w) <= 0:
            raise UserError("loss: all loss weights are zero (loss.kd_weight, loss.ce_weight, ...): set at least one > 0")
        if self.loss.method == "none" and self.loss.kd_weight > 0:
            raise UserError("loss.kd_weight > 0 but loss.logit=none: set loss.kd_weight=0 or choose a logit loss")
        if (self.moe.experts_end is not None and self.moe.experts_start is not None
                and self.moe.experts_end < self.moe.experts_start):
            raise UserError(f"moe.experts_end={self.moe.experts_end} is below moe.experts_start={self.moe.experts_start}")
        if self.train.max_time is not None:
            parse_duration(self.train.max_time, "train.max_time")
        if (self.loss.method == "projected_kl" and "kd" in self.loss.active_terms()
                and self.loss.divergence != "forward_kl"):
            raise UserError(f"loss.logit=projected_kl is a forward KL on the teacher's classes, not "
                            f"loss.divergence={self.loss.divergence}: set loss.divergence=forward_kl")
        if self.loss.mapped_positions != "all" and self.model.teacher_cache:
            raise UserError(f"loss.mapped_positions={self.loss.mapped_positions} with model.teacher_cache: a cache "
                            "holds every position's target; use loss.mapped_positions=all, or the live teacher")
        lora = self.model.student_lora
        if lora.r is not None and "lm_head" in lora.target_modules and self.loss.fused_head:
            raise UserError("model.student_lora.target_modules has lm_head, but loss.fused_head=true reads the "
                            "output layer's plain weight: drop lm_head, or set loss.fused_head=false")
        if lora.r is not None and self.train.distributed == "fsdp":
            raise UserError("model.student_lora with train.distributed=fsdp is not supported (untested): a LoRA "
                            "student's optimizer state is small; use train.distributed=ddp")
        check_teacher_placement(self.model, self.moe.mode)
        return self


_DEVICE = re.compile(r"(cpu|disk|mps|(cuda|xpu|npu)(:\d+)?)")
_SIZE = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?", re.IGNORECASE)
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def _is_device(d: Any, disk: bool = True) -> bool:
    if isinstance(d, int) and not isinstance(d, bool):
        return d >= 0
    return isinstance(d, str) and bool(_DEVICE.fullmatch(d.strip())) and (disk or d.strip() != "disk")


def check_teacher_placement(m: ModelConfig, moe_mode: str) -> None:
    """model.teacher_device_map / teacher_max_memory / teacher_offload_folder: the values transformers'
    ``from_pretrained(device_map=, max_memory=, offload_folder=)`` takes, checked before anything loads."""
    dm, mm = m.teacher_device_map, m.teacher_max_memory
    if dm is None:
        for key, v in (("teacher_max_memory", mm), ("teacher_offload_folder", m.teacher_offload_folder)):
            if v is not None:
                raise UserError(f"model.{key} is set without model.teacher_device_map: set "
                                f"model.teacher_device_map=auto (or a map), or drop model.{key}")
        return
    if isinstance(dm, str) and dm not in DEVICE_MAP_NAMES:
        raise UserError(f"model.teacher_device_map={dm!r}: use one of {', '.join(DEVICE_MAP_NAMES)} or a mapping "
                        "{module: device}, e.g. {model.layers.20: cpu}")
    if isinstance(dm, dict):
        if not dm:
            raise UserError("model.teacher_device_map={}: empty; name modules and devices, or use auto")
        for mod, dev in dm.items():
            if not _is_device(dev):
                raise UserError(f"model.teacher_device_map: module {mod!r} -> {dev!r} is not a device: use a GPU "
                                "index (0, 1), cuda:N, cpu or disk")
        if "disk" in dm.values() and not m.teacher_offload_folder:
            raise UserError("model.teacher_device_map puts modules on disk: set model.teacher_offload_folder=DIR "
                            "(where their weights are read from)")
    for dev, size in (mm or {}).items():
        if not _is_device(dev, disk=False):
            raise UserError(f"model.teacher_max_memory: {dev!r} is not a device: use a GPU index (0, 1), cuda:N or cpu")
        if not ((isinstance(size, int) and not isinstance(size, bool) and size > 0)
                or (isinstance(size, str) and _SIZE.fullmatch(size.strip()))):
            raise UserError(f"model.teacher_max_memory: {dev!r} -> {size!r} is not a size: write e.g. 10GiB, 500MB "
                            "or bytes")
    if moe_mode == "sar":
        raise UserError("moe.mode=sar trains the teacher's routers, which needs the teacher whole on one device: "
                        "drop model.teacher_device_map or use moe.mode=topk, ka or all")


# ----------------------------------------------------------------------------- loading

def parse_duration(text: str, key: str) -> float:
    """'8h45m' / '90m' / '3600s' / '3600' -> seconds."""
    s = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", s)
    if not s or not m or not any(m.groups()):
        raise UserError(f"{key}={text!r} is not a duration: write e.g. 8h45m, 90m or 3600s")
    h, mi, se = (int(g or 0) for g in m.groups())
    return h * 3600 + mi * 60 + se


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and for CLI strings, convert) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        for tp_ in args[:-1]:  # Union[str, dict]: the first type that takes the value
            try:
                return _coerce(value, tp_, key)
            except UserError:
                pass
        return _coerce(value, args[-1], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{key}={value!r}: expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{key}={value!r}: expected a number") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key}={value!r}: expected a string")
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                value = None
        if not isinstance(value, dict):
            raise UserError(f"{key}={value!r}: expected a mapping, e.g. {{0: 10GiB, cpu: 30GiB}}")
        return value
    if tp is list or origin is list:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise UserError(f"{key}={value!r}: expected a list, e.g. [[0, 1], [2, 5]]") from None
        if not isinstance(value, list):
            raise UserError(f"{key}={value!r}: expected a list")
        return value
    raise UserError(f"{key}: unsupported type {_type_name(tp)}")


def _check_range(value: Any, f: dataclasses.Field, key: str) -> None:
    md = f.metadata
    if value is None:
        return
    if "choices" in md and value not in md["choices"]:
        raise UserError(f"{key}={value!r}: choose one of {', '.join(md['choices'])}")
    if "min" in md and value < md["min"]:
        raise UserError(f"{key}={value!r}: must be >= {md['min']}")
    if "max" in md and value > md["max"]:
        raise UserError(f"{key}={value!r}: must be <= {md['max']}")
    if "gt" in md and value <= md["gt"]:
        raise UserError(f"{key}={value!r}: must be > {md['gt']}")


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else k
            raise UserError(f"unknown config key {where!r}: valid keys here are {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            value = _coerce(data[name], tp, key)
            _check_range(value, f, key)
            kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str) -> None:
    if "=" not in dotted:
        raise UserError(f"override {dotted!r}: write key=value, e.g. train.lr=3e-4")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key!r}: {p!r} is not a section")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML file (optional), apply ``key=value`` overrides, check every key and value."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {str(p)!r} does not exist")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise UserError(f"config file {str(p)!r} is not valid YAML{where}: fix the syntax") from None
        except UnicodeDecodeError:
            raise UserError(f"config file {str(p)!r} is not UTF-8 text") from None
    for o in overrides:
        _set_dotted(tree, o)
    return _build(Config, tree, "").validate()


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"loss.logit": value, ...} from a nested config dict (``to_dict``)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts; a key added to the configuration since
    ``saved`` was written, at its default, is no change (e.g. loss.baseline in an older checkpoint)."""
    a, b, default = flatten(saved), flatten(current), flatten(to_dict(Config()))
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not (k not in a and b[k] == default.get(k))]


def field_help(cls=Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every leaf field — the text of `sakd distill --help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += field_help(hints[f.name], key)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_ = f.metadata.get("help", "")
            if "choices" in f.metadata:
                help_ += f" [{'|'.join(f.metadata['choices'])}]"
            rows.append((key, help_, default))
    return rows
