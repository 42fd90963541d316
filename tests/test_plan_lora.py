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
