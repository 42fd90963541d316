"""sakd.plan: each memory term against a hand computation, the activation formula against autograd's
saved tensors, and the whole estimate against the measured RSS growth of a real training step (CPU).

Run as a script, this file is the measuring child: ``python tests/test_plan.py '<json>'``."""

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sakd.config import load_config  # noqa: E402
from sakd.errors import UserError  # noqa: E402
from sakd.plan import GiB, _layer_bytes, activation_bytes, format_plan, model_shape, plan  # noqa: E402
from sakd.models.tiny import llama_config, qwen3_moe_config  # noqa: E402

REAL = ROOT / "configs" / "huihui-moe-1b-to-smollm-135m.yaml"


def _pair(tmp_path, vs=8192, vt=8192, s_hidden=256, s_layers=4, s_inter=688):
    """Tiny student (Llama) and teacher (Qwen3-MoE, 3 experts, 1 active) configs, config.json only."""
    llama_config(vs, hidden=s_hidden, layers=s_layers, heads=4, intermediate=s_inter).save_pretrained(tmp_path / "s")
    qwen3_moe_config(vt, hidden=256, layers=4, heads=4, experts=3, experts_per_tok=1,
                     intermediate=512).save_pretrained(tmp_path / "t")
    return [f"model.student={tmp_path / 's'}", f"model.teacher={tmp_path / 't'}"]


def _cfg(models, *extra, B=8, L=256):
    return load_config(None, models + [f"data.seq_len={L}", f"data.teacher_seq_len={L}", f"train.batch_size={B}",
                                       *extra])


# ----------------------------------------------------------------------------- arithmetic

def test_parameter_counts_by_hand(tmp_path):
    p = plan(_cfg(_pair(tmp_path, vs=8192, vt=4096)), device="cpu")
    V, h, L, I = 8192, 256, 4, 688  # tied Llama: embeddings once, q/k/v/o (kv = heads), SwiGLU, 2 norms
    assert p["student"]["params"] == V * h + L * (4 * h * h + 3 * h * I + 2 * h) + h
    Vt, d, E, Im = 4096, 64, 3, 512  # Qwen3-MoE: 2 kv heads, q/k norms over head_dim, router E x h, experts
    per_layer = 2 * h * h + 2 * h * (2 * d) + 2 * d + E * h + E * 3 * h * Im + 2 * h
    assert p["teacher"]["params"] == Vt * h + L * per_layer + h


def test_real_pair_offline_from_the_builtin_table():
    """SmolLM-135M has 134,515,008 parameters (its published count); Huihui-MoE-1B-A0.6B 1.28B with an
    untied head: 2 x 151,936 x 1,024 + 28 x (attention 6,291,456 + q/k norms 256 + router 3,072 +
    3 experts x 3 x 1,024 x 3,072 + norms 2,048) + 1,024."""
    p = plan(load_config(REAL), card_gb=16)
    assert p["student"]["source"] == p["teacher"]["source"] == "built-in table"
    assert p["student"]["params"] == 49152 * 576 + 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 1152) + 576
    assert p["student"]["params"] == 134_515_008
    assert p["teacher"]["params"] == 2 * 151936 * 1024 + 28 * (6_291_456 + 256 + 3072 + 9 * 1024 * 3072 + 2048) + 1024
    c = p["components"]
    assert c["teacher_weights"] == 2 * p["teacher"]["params"]          # fp16 on CUDA (teacher_dtype auto)
    assert c["optimizer_states"] == 8 * 134_515_008                    # AdamW: 2 fp32 states
    # shared_kl + full CE, no chunk term: the fused output layer (logits of the last position only)
    assert p["fused_head"]
    assert c["student_logits"] == 4 * 1 * 49152 * 2                    # autocast fp16, one position
    # shared_kl alone reads the teacher's logits: its head computes the shared columns only (S of them), from a
    # gathered fp16 copy of the head's shared rows [S, H]
    assert c["teacher_logits"] == 4 * 640 * 49152 * 2
    assert c["teacher_head_shared"] == 49152 * 1024 * 2
    # KA M=2 passes, each holding d/d hidden [N, H] fp16 + d/d head and the gathered head [S, H] fp32,
    # S = min(Vs, Vt) (the shared vocabulary's upper bound)
    assert c["kd_grad_buffers"] == 2 * (4 * 512 * 576 * 2 + 2 * 49152 * 576 * 4)
    # per chunk of 512 rows: the larger of 3.25 [chunk, S] kernel temporaries and the teacher-mass log's
    # [chunk, 2 Vt + S], fp32, + the fp16 teacher rows (shared columns)
    assert c["kd_chunk_temporaries"] == 512 * 4 * max(3.25 * 49152, 2 * 151936 + 49152) + 512 * 49152 * 2
    mapped = plan(load_config(REAL, ["loss.logit=mapped_kl"]), card_gb=16)["components"]
    # mapped_kl alone reads the teacher: its last hidden state [B, Lt, H] fp16 is held, the rows multiplied out
    # per chunk; with the chunk likelihood as well, the model's full logits
    assert mapped["teacher_logits"] == 4 * 640 * 1024 * 2 and mapped["teacher_head_shared"] == 0
    alm = plan(load_config(REAL, ["loss.logit=mapped_kl", "loss.chunk_weight=0.5"]), card_gb=16)["components"]
    assert alm["teacher_logits"] == 4 * 640 * 151936 * 2
    # mapped_kl per chunk: 2 [chunk, Vt] + 5 [chunk, Vs] fp32 buffers + the fp16 teacher rows
    assert mapped["kd_chunk_temporaries"] == 512 * 4 * (2 * 151936 + 5 * 49152) + 512 * 151936 * 2
    unfused = plan(load_config(REAL, ["loss.fused_head=false"]), card_gb=16)["components"]
    assert unfused["student_logits"] == 4 * 512 * 49152 * 2            # every position's fp16 logits
    assert unfused["kd_grad_buffers"] == 2 * (4 * 512) * 49152 * 2     # one fp16 logits gradient per KA pass
    assert unfused["teacher_logits"] == 4 * 640 * 151936 * 2
    assert p["fits"] and p["max_micro_batch"] >= 4
    text = format_plan(p)
    assert "GiB" in text and "fits in 16 GiB" in text and "AdamW states" in text


def test_each_component_by_hand_on_cpu(tmp_path):
    models = _pair(tmp_path)
    B, L, V, h = 8, 256, 8192, 256
    p = plan(_cfg(models, "loss.ce_weight=0.5", "loss.chunk_rows=512", "loss.fused_head=false", B=B, L=L),
             device="cpu")
    P, c = p["student"]["params"], p["components"]
    assert c["student_weights"] == 4 * P and c["student_gradients"] == 4 * P and c["optimizer_states"] == 8 * P
    assert c["teacher_weights"] == 4 * p["teacher"]["params"]          # fp32 on CPU
    assert c["student_logits"] == B * L * V * 4 == c["teacher_logits"]
    assert c["kd_grad_buffers"] == B * L * V * 4                       # the logits gradient, made in the forward pass
    # max(3.25 S, 2 Vt + S) fp32 kernel rows + the gathered student and teacher rows, S = Vt = Vs = V
    assert c["kd_chunk_temporaries"] == 512 * 4 * 3.25 * V + 512 * (V * 4 + V * 4)
    assert c["ce_buffers_forward"] == 2 * B * L * V * 4 and c["ce_buffers_backward"] == 3 * B * L * V * 4
    fused = plan(_cfg(models, "loss.ce_weight=0.5", "loss.chunk_rows=512", B=B, L=L), device="cpu")
    f = fused["components"]
    assert fused["fused_head"] and f["student_logits"] == B * 1 * V * 4 and f["student_logits_grad"] == 0
    assert f["kd_grad_buffers"] == B * L * h * 4 + 2 * V * h * 4      # d/d hidden, d/d head (+ the gathered head)
    assert f["ce_buffers_backward"] == B * L * h * 4 + V * h * 4
    # activations: (6h + 2 + 4hq + 4I + L + a) fp32 elements per token and layer, + 3h fp32 + L bytes outside
    layer = 4 * (6 * h + 2 + 4 * h + 4 * 688 + L + 4)
    assert c["student_activations"] == B * L * (4 * layer + 4 * 3 * h + L)
    assert c["student_activations_other"] == B * L * (4 * 4 * h + layer + 4 * 3 * h + L)  # checkpointed
    assert p["persistent_bytes"] == c["teacher_weights"] + c["student_weights"] + c["optimizer_states"]
    assert p["peak_bytes"] == p["persistent_bytes"] + max(p["moments"].values())  # no CUDA overhead on CPU
    on_gpu = plan(_cfg(models, B=B, L=L), device="cuda")
    assert on_gpu["components"]["teacher_weights"] == 2 * p["teacher"]["params"]
    assert on_gpu["overhead_bytes"] == int(0.5 * GiB + 0.10 * on_gpu["transient_bytes"])


def test_max_micro_batch_is_the_largest_that_fits(tmp_path):
    models = _pair(tmp_path)
    cfg = _cfg(models, B=8, L=256)
    p = plan(cfg, card_gb=2.0, device="cpu")
    b = p["max_micro_batch"]
    assert b >= 1
    assert plan(cfg, card_gb=2.0, micro_batch=b, device="cpu")["fits"]
    assert not plan(cfg, card_gb=2.0, micro_batch=b + 1, device="cpu")["fits"]
    assert plan(cfg, card_gb=0.01, device="cpu")["max_micro_batch"] == 0


def test_checkpointing_and_grad_accum_move_the_right_terms(tmp_path):
    models = _pair(tmp_path)
    off = plan(_cfg(models), device="cpu")
    on = plan(_cfg(models, "model.gradient_checkpointing=true"), device="cpu")
    assert on["components"]["student_activations"] < off["components"]["student_activations"]
    assert on["components"]["student_activations"] == off["components"]["student_activations_other"]
    acc = plan(_cfg(models, "train.grad_accum=4"), device="cpu")  # earlier micro-batches' gradients stay alive
    assert acc["moments"]["loss_forward"] - off["moments"]["loss_forward"] == off["components"]["student_gradients"]


def test_missing_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        plan(load_config(None, [f"model.teacher={tmp_path / 'nope'}"]))


def _saved_activation_bytes(config, B, L, attn):
    """Bytes autograd saves for backward in a forward (parameters excluded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, -7:] = 0  # padded batches, as the collator makes them: sdpa then gets an explicit mask
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask)
    return sum(seen.values())


@pytest.mark.parametrize("kind, attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen3_moe", "sdpa")])
def test_layer_formula_equals_autograd_saved_tensors(kind, attn):
    """saved(3 layers) - saved(2 layers) == one layer: exact for Llama; Qwen3-MoE within 0.1 % (per-expert
    scalars of the routing that do not scale with the tokens)."""
    B, L = 2, 64

    def make(n):
        if kind == "llama":
            return llama_config(512, hidden=64, layers=n, heads=4, intermediate=160)
        return qwen3_moe_config(512, hidden=64, layers=n, heads=4, experts=3, experts_per_tok=1, intermediate=96)

    per_layer = _saved_activation_bytes(make(3), B, L, attn) - _saved_activation_bytes(make(2), B, L, attn)
    est = B * L * _layer_bytes(model_shape(make(3)), L, half=False, eager=attn == "eager")
    assert per_layer == est if kind == "llama" else per_layer == pytest.approx(est, rel=1e-3)
    whole = _saved_activation_bytes(make(2), B, L, attn)
    est = activation_bytes(model_shape(make(2)), B * L, L, half=False, eager=attn == "eager", checkpointing=False)
    assert abs(whole - est) <= 0.02 * whole  # outside the layers: final norm, lm_head input, causal mask


# ----------------------------------------------------------------------------- measured

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _one_to_one_batch(B: int, L: int, V: int) -> dict:
    """One tokenizer on both sides: every chunk is 1:1 (the planner's upper bound); example 0 is padded."""
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.zeros(B, L, dtype=torch.long) for k in ("s_ids", "t_ids")}
    batch.update({k: torch.zeros(B, L, dtype=torch.bool) for k in ("s_mask", "t_mask")})
    batch.update({k: torch.ones(B, L - 1, dtype=torch.long) for k in
                  ("chunk_s_start", "chunk_s_end", "chunk_t_start", "chunk_t_end")})
    batch["chunk_mask"] = torch.zeros(B, L - 1, dtype=torch.bool)
    batch["s_chunk"], batch["t_chunk"] = torch.full((B, L), -1), torch.full((B, L), -1)
    for b, n in enumerate([L - 7] + [L] * (B - 1)):
        ids, c = torch.randint(0, V, (n,), generator=g), torch.arange(n - 1)
        for side in "st":
            batch[f"{side}_ids"][b, :n], batch[f"{side}_mask"][b, :n] = ids, True
            batch[f"chunk_{side}_start"][b, :n - 1], batch[f"chunk_{side}_end"][b, :n - 1] = c + 1, c + 2
            batch[f"{side}_chunk"][b, 1:n] = c
        batch["chunk_mask"][b, :n - 1] = True
    return batch


def measure_step(overrides: list[str]) -> int:
    """RSS growth (bytes) of one training step after a small warm-up step has created the AdamW
    states; the same code as the loop: objective.micro_step_loss, backward, clip, AdamW, zero_grad."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sakd.train import objective

    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    t_conf, s_conf = AutoConfig.from_pretrained(cfg.model.teacher), AutoConfig.from_pretrained(cfg.model.student)
    teacher = AutoModelForCausalLM.from_config(t_conf).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_config(s_conf).train()
    if cfg.model.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    V = min(s_conf.vocab_size, t_conf.vocab_size)
    shared = torch.arange(V)
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, betas=(0.9, 0.95))
    sched = {"experts": 2, "sample_prob": 0.05, "temperature": 1.0} if cfg.moe.mode == "ka" else {}
    gen = torch.Generator().manual_seed(0)

    class Acc:
        autocast = staticmethod(lambda: torch.autocast("cpu", enabled=False))

    def step(batch):
        counts, weights = objective.count_targets([batch], cfg), objective.term_weights(cfg, 10**6)
        loss, _, _ = objective.micro_step_loss(teacher, student, torch.nn.ModuleDict(), batch, shared, shared, cfg,
                                               weights, counts, Acc, sched, gen, t_conf.vocab_size)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(_one_to_one_batch(2, 16, V))
    batch = _one_to_one_batch(cfg.train.batch_size, cfg.data.seq_len, V)
    gc.collect()
    base, peak, halt = _rss(), [0], threading.Event()

    def sample():  # torch ops release the GIL: a 0.5 ms sampler sees every large buffer
        while not halt.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    step(batch)
    halt.set()
    th.join()
    return max(peak[0], _rss()) - base


CASES = {
    "kd+ce": ["loss.ce_weight=0.5"],                                                    # full activations, fused head
    "kd+ce logits": ["loss.ce_weight=0.5", "loss.fused_head=false"],                    # the [B, L, V] logits path
    "checkpointing+ka": ["model.gradient_checkpointing=true", "moe.mode=ka", "moe.ka_samples=2"],  # 2 teacher passes
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Both cases measured in ONE child process (one interpreter start), each after its own warm-up.
    Student vocab 8k, hidden 256, 4 layers; batch 8 x 256 tokens: ~0.4-0.6 GiB of step memory."""
    models = _pair(tmp_path_factory.mktemp("plan"))
    runs = {k: models + ["data.seq_len=256", "data.teacher_seq_len=256", "train.batch_size=8", *v]
            for k, v in CASES.items()}
    # Fixed mmap threshold: every large buffer is mmapped and unmapped on free, so RSS follows the
    # live tensors (glibc's dynamic threshold would keep freed buffers in the heap, hiding the peak).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, __file__, json.dumps(runs)], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    extra = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: (plan(load_config(None, runs[k]), device="cpu")["transient_bytes"], extra[k]) for k in runs}


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_within_25_percent_of_measured_step(measured, case):
    est, got = measured[case]
    assert got > 256 * 2**20, "too small to be above the noise"
    assert abs(est / got - 1) < 0.25, (est / 2**20, got / 2**20)


if __name__ == "__main__":
    torch.set_num_threads(2)
    results = {}
    for name, overrides in json.loads(sys.argv[1]).items():
        results[name] = measure_step(overrides)
        gc.collect()
    print(json.dumps(results))
