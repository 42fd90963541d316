"""sakd plan with a LoRA student (model.student_lora): the frozen base counted once, AdamW states and
gradients for the adapters only, against a hand count."""

import pytest

from sakd.config import load_config
from sakd.errors import UserError
from sakd.models.tiny import llama_config, qwen3_moe_config
from sakd.plan import format_plan, plan


def _models(tmp_path):
    llama_config(8192, hidden=256, layers=4, heads=4, intermediate=688).save_pretrained(tmp_path / "s")
    qwen3_moe_config(4096, hidden=256, layers=4, heads=4, experts=3, experts_per_tok=1,
                     intermediate=512).save_pretrained(tmp_path / "t")
    return [f"model.student={tmp_path / 's'}", f"model.teacher={tmp_path / 't'}", "data.seq_len=128",
            "data.teacher_seq_len=128", "train.batch_size=2"]


def test_lora_counts_the_base_once_and_adam_and_gradients_for_the_adapters_only(tmp_path):
    models = _models(tmp_path)
    full = plan(load_config(None, models), device="cpu")
    lora = plan(load_config(None, [*models, "model.student_lora.r=16"]), device="cpu")
    P = full["student"]["params"]
    h, I, L, r = 256, 688, 4, 16  # q, k, v, o [h, h] (kv heads = heads); gate, up [I, h]; down [h, I]
    adapters = L * r * (4 * (h + h) + 3 * (h + I))
    s, c, f = lora["student"], lora["components"], full["components"]
    assert s["params"] == P and s["lora_params"] == adapters and s["trainable"] == adapters
    assert c["student_weights"] == 4 * (P + adapters)          # fp32 base once + the adapters
    assert c["optimizer_states"] == 8 * adapters                 # AdamW exp_avg + exp_avg_sq, fp32
    assert c["student_gradients"] == 4 * adapters
    assert f["optimizer_states"] == 8 * P and f["student_gradients"] == 4 * P
    assert c["student_activations"] == f["student_activations"]  # counted as for full training
    assert lora["persistent_bytes"] == full["persistent_bytes"] - 8 * P + 4 * adapters + 8 * adapters
    assert lora["moments"]["optimizer"] == 4 * adapters          # CPU: every gradient, no foreach temporary
    assert lora["peak_bytes"] < full["peak_bytes"]
    assert "LoRA: 0.31M trainable" in format_plan(lora)        # 4 x 16 x (2048 + 2832) = 312,320
    attn_only = plan(load_config(None, [*models, "model.student_lora.r=16",
                                        "model.student_lora.target_modules=[q_proj, v_proj]"]), device="cpu")
    assert attn_only["student"]["lora_params"] == L * r * 2 * (h + h)


def test_plan_names_an_unknown_target_module(tmp_path):
    with pytest.raises(UserError, match="'query' is not a linear layer of the student"):
        plan(load_config(None, [*_models(tmp_path), "model.student_lora.r=8",
                                "model.student_lora.target_modules=[query]"]), device="cpu")


def test_a_frozen_output_layer_has_no_gradient_in_the_plan(tmp_path):
    """A LoRA student's output layer is frozen (lm_head not among target_modules; loss.fused_head refuses it
    there): the fused KD and CE terms and the layers' backward hold no [V, H] gradient of it, only the
    [N, H] gradient of the final hidden state (fp32 on CPU). The full student keeps them."""
    models = [*_models(tmp_path), "loss.ce_weight=0.5"]
    full = plan(load_config(None, models), device="cpu")
    lora = plan(load_config(None, [*models, "model.student_lora.r=16"]), device="cpu")
    assert full["fused_head"] and lora["fused_head"]
    N, H, Vs, S, rows = 2 * 128, 256, 8192, 4096, 256  # rows: one row block (chunk_rows 1024 > N)
    c, f = lora["components"], full["components"]
    assert c["kd_grad_buffers"] == N * H * 4 + S * H * 4              # dh and the gathered shared rows
    assert f["kd_grad_buffers"] == N * H * 4 + S * H * 4 + S * H * 4  # + their gradient
    assert c["ce_buffers_forward"] == N * H * 4 + 2 * rows * Vs * 4 and c["ce_buffers_backward"] == N * H * 4
    assert f["ce_buffers_forward"] == c["ce_buffers_forward"] + Vs * H * 4
    assert f["ce_buffers_backward"] == c["ce_buffers_backward"] + Vs * H * 4
    assert lora["moments"]["layers_backward"] == c["student_activations"] + N * H * 4
    assert full["moments"]["layers_backward"] == f["student_activations"] + N * H * 4 + Vs * H * 4
    # logits path (fused_head off): the logits' gradient meets the frozen head; no [V, H] gradient either
    unfused = plan(load_config(None, [*models, "model.student_lora.r=16", "loss.fused_head=false"]), device="cpu")
    u = unfused["components"]
    assert u["student_logits_grad"] == N * Vs * 4
    assert unfused["moments"]["layers_backward"] == u["student_activations"] + u["student_logits_grad"]
