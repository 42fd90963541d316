"""sakd/models/lora.py: which parameters train, what a step may change, the merged export, the counts."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from sakd.config import load_config
from sakd.errors import UserError
from sakd.models.lora import (LLAMA_PROJECTIONS, check_targets, export_student, lora_parameter_count,
                              trainable_parameters, wrap_student)
from sakd.models.tiny import llama_config
from sakd.train.distill import build_optimizer

V, H, LAYERS, I, R = 97, 32, 2, 64, 4


def _student(seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(llama_config(V, hidden=H, layers=LAYERS, heads=4, intermediate=I))


def _wrapped(dropout=0.0, targets=LLAMA_PROJECTIONS):
    return wrap_student(_student(), r=R, alpha=2.0 * R, dropout=dropout, target_modules=list(targets))


def test_the_default_targets_are_every_linear_layer_of_a_llama_decoder_but_the_head():
    assert load_config(None, []).model.student_lora.target_modules == LLAMA_PROJECTIONS
    names = {n.rsplit(".", 1)[-1] for n, m in _student().named_modules() if isinstance(m, nn.Linear)}
    assert names - {"lm_head"} == set(LLAMA_PROJECTIONS)


def test_trainable_parameters_are_exactly_the_adapters_and_their_count_is_r_in_plus_out():
    model = _wrapped()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    lora_named = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert trainable == lora_named
    # by hand: per layer q, o [H, H]; k, v [kv = H, H] (4 heads, 4 kv heads); gate, up [I, H]; down [H, I]
    per_layer = R * (4 * (H + H) + 2 * (H + I) + (I + H))
    assert sum(p.numel() for p in trainable_parameters(model)) == LAYERS * per_layer
    assert lora_parameter_count(_student(), R, LLAMA_PROJECTIONS) == LAYERS * per_layer
    with torch.device("meta"):  # what sakd plan counts on
        meta = AutoModelForCausalLM.from_config(llama_config(V, hidden=H, layers=LAYERS, heads=4, intermediate=I))
    assert lora_parameter_count(meta, R, LLAMA_PROJECTIONS) == LAYERS * per_layer


def test_the_optimizer_holds_only_the_adapters_and_a_step_changes_only_them():
    model = _wrapped(dropout=0.1)
    tc = load_config(None, ["train.lr=1e-2", "train.warmup_steps=0"]).train
    optimizer, scheduler = build_optimizer(model, nn.ModuleDict(), tc)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, V, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    optimizer.step()
    scheduler.step()
    for n, p in model.named_parameters():
        if "lora_" in n:
            # B starts at zero, so A's first gradient is zero: but AdamW's weight decay moves it
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients():
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    grads = []
    for ckpt in (False, True):
        base = _student()
        if ckpt:  # as sakd.train.distill.setup: checkpointing first, then the adapters
            base.gradient_checkpointing_enable()
        model = wrap_student(base, r=R, alpha=2.0 * R, dropout=0.0, target_modules=LLAMA_PROJECTIONS)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert all(g is not None and g.abs().max() > 0 for g in grads[1].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7)


def test_the_merged_export_is_a_plain_folder_with_the_peft_models_outputs(tmp_path):
    model = _wrapped()
    with torch.no_grad():  # an update that is not zero (B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.eval()
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    export_student(model, tmp_path / "student", tmp_path / "adapter")
    assert not (tmp_path / "student" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5
    from peft import PeftModel

    again = PeftModel.from_pretrained(_student(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (again(input_ids=ids).logits - want).abs().max() <= 1e-5


@pytest.mark.parametrize("targets, fragment", [(["q_proj", "qkv_proj"], "'qkv_proj' is not a linear layer"),
                                               ([], "is empty")])
def test_a_target_that_names_no_linear_layer_is_a_one_line_error(targets, fragment):
    with pytest.raises(UserError) as e:
        check_targets(_student(), targets)
    msg = str(e.value)
    assert fragment in msg and "model.student_lora.target_modules" in msg and "down_proj" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("override, fragment", [
    ("model.student_lora.r=0", "model.student_lora.r=0: must be >= 1"),
    ("model.student_lora.r=-4", "model.student_lora.r=-4: must be >= 1"),
    ("model.student_lora.alpha=0", "model.student_lora.alpha=0.0: must be > 0"),
    ("model.student_lora.dropout=1", "model.student_lora.dropout=1.0: must be <= 0.9"),
    ("model.student_lora.rank=8", "unknown config key 'model.student_lora.rank'")])
def test_bad_lora_settings_are_one_line_errors(override, fragment):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_lora_on_the_head_with_the_fused_output_layer_is_refused_in_one_line():
    bad = ["model.student_lora.r=8", "model.student_lora.target_modules=[q_proj, lm_head]"]
    with pytest.raises(UserError) as e:
        load_config(None, bad)
    assert "loss.fused_head=true" in str(e.value) and "\n" not in str(e.value)
    assert load_config(None, [*bad, "loss.fused_head=false"]).model.student_lora.r == 8
