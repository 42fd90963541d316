"""A LoRA student (model.student_lora) in the loop, on the tiny pair: every loss term reaches the adapters
through the peft wrapper, the fused output layer equals the logits path, resume is exact, the export is
merged, and a bad target module stops the CLI with one line."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sakd.config import load_config
from sakd.errors import UserError
from sakd.data.text import Collator, pad_id
from sakd.models.lora import is_lora
from sakd.train import objective
from sakd.train.distill import distill, setup
from sakd.train.heads import fused_head_weight
from tests.conftest import ROOT, assert_user_error, tiny_overrides

LORA = {"model.student_lora.r": 4, "model.student_lora.alpha": 8}
ALL_TERMS = {"loss.ce_weight": 0.5, "loss.chunk_weight": 0.5, "loss.hidden.weight": 0.5,
             "loss.attention.weight": 0.5, "loss.contrastive.weight": 0.5}
QUIET = dict(progress=False, log=lambda *_: None)


class CpuAcc:
    """The Accelerator methods the objective uses, on CPU fp32."""
    autocast = staticmethod(lambda: torch.autocast("cpu", enabled=False))
    unwrap_model = staticmethod(lambda m: m)


def _loss(run, cfg, n=4):
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(n)])
    weights = objective.term_weights(cfg, 10)
    loss, terms, _ = objective.micro_step_loss(
        run.teacher, run.student, run.aux, batch, run.vocab.shared_s, run.vocab.shared_t, cfg, weights,
        objective.count_targets([batch], cfg, run.vocab.mapping), CpuAcc, {}, torch.Generator().manual_seed(0),
        len(run.teacher_tok), mapping=run.vocab.mapping)
    return weights, loss, terms


def test_every_loss_term_reads_the_student_through_the_wrapper(tiny_assets, tmp_path):
    """B starts at zero, so the wrapped student computes what the plain one does: each term (KD, CE, chunk,
    hidden states, attention maps, contrastive) has the plain student's value; and each term alone sends a
    gradient to the adapters' B, none to a frozen weight."""
    terms_of = {}
    for lora in (True, False):
        cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / str(lora), **ALL_TERMS, **(LORA if lora else {})))
        run = setup(cfg, log=lambda *_: None)
        assert is_lora(run.student) == lora
        weights, loss, terms_of[lora] = _loss(run, cfg)
        assert set(weights) == {"kd", "ce", "chunk", "hidden", "attention", "contrastive"}
    assert terms_of[True].keys() == terms_of[False].keys()
    for k, v in terms_of[False].items():
        assert abs(terms_of[True][k] - v) <= 1e-5 * abs(v), (k, terms_of[True][k], v)
    for term in ("hidden", "attention", "contrastive", "chunk"):  # each alone (the KD term's weight is 0)
        only = {k: 0 for k in ("loss.kd_weight", *ALL_TERMS)} | {f"loss.{term}.weight" if term not in ("chunk",)
                                                                 else "loss.chunk_weight": 0.5}
        cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / term, **LORA, **only, **{"loss.logit": "none"}))
        run = setup(cfg, log=lambda *_: None)
        _, loss, terms = _loss(run, cfg)
        assert set(terms) == {term}
        loss.backward()
        grads = {n: p.grad for n, p in run.student.named_parameters()}
        assert all(g is None for n, g in grads.items() if "lora_" not in n), term
        moved = [n for n, g in grads.items() if "lora_B" in n and g is not None and g.abs().max() > 0]
        assert moved, term


def test_the_fused_output_layer_gives_the_logits_paths_adapter_gradients(tiny_assets, tmp_path):
    """loss.fused_head with a LoRA student: its frozen head's plain weight is fused into KD and CE; the same
    loss and adapter gradients as through the [B, L, V] logits."""
    out = []
    for fused in (True, False):
        cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / str(fused), **LORA, **{
            "loss.ce_weight": 0.5, "loss.fused_head": fused, "loss.chunk_rows": 7}))
        run = setup(cfg, log=lambda *_: None)
        weights, loss, _ = _loss(run, cfg)
        assert (fused_head_weight(run.student, cfg, weights, CpuAcc) is not None) == fused
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in run.student.named_parameters() if p.requires_grad}))
    (la, ga), (lb, gb) = out
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=0)
    assert ga.keys() == gb.keys() and any("lora_B" in n for n in ga)
    for n in gb:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-5 * gb[n].abs().max().item())


STEPS, STOP = 4, 2
# fused head + hidden + attention + contrastive (no chunk term: the fused path applies) and adapter dropout
# (the torch RNG must come back too); bitwise, as tests/test_reliability.py's resume tests
RESUME = {**LORA, "model.student_lora.dropout": 0.1, "model.student_lora.save_adapter": True,
          "loss.ce_weight": 0.5, "loss.hidden.weight": 0.5, "loss.attention.weight": 0.5,
          "loss.contrastive.weight": 0.5, "train.max_steps": STEPS, "train.save_every": 1,
          "train.keep_checkpoints": STEPS, "train.deterministic": True}


def _history(out):
    clock = {"seconds", "tokens_per_s", "data_wait_s"}
    return [{k: v for k, v in r.items() if k not in clock} for r in json.loads((out / "history.json").read_text())["history"]]


def test_resume_is_exact_and_the_export_is_merged(tiny_assets, tmp_path, monkeypatch):
    from accelerate import Accelerator

    a, b = tmp_path / "a", tmp_path / "b"
    prepared, prepare = [], Accelerator.prepare
    monkeypatch.setattr(Accelerator, "prepare", lambda self, *args: prepared.append(args[0]) or prepare(self, *args))
    distill(load_config(None, tiny_overrides(tiny_assets, a, **RESUME)), **QUIET)
    assert is_lora(prepared[0])  # DDP wraps the peft model (its frozen base is no DDP parameter)
    # the checkpoint holds the adapters (and their AdamW states), not the frozen base
    ckpt = a / "checkpoints" / f"step-{STOP:06d}"
    saved = load_file(str(ckpt / "student.safetensors"))
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    groups = state["optimizer"]["param_groups"]  # the student's (decay, no decay), then the projectors'
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(saved)
    assert sum(len(g["params"]) for g in groups[2:]) == len(load_file(str(ckpt / "aux.safetensors")))
    # a run stopped after step STOP (its checkpoint), resumed to the end == the uninterrupted one
    shutil.copytree(ckpt, b / "checkpoints" / ckpt.name)
    distill(load_config(None, tiny_overrides(tiny_assets, b, **RESUME)), resume=True, **QUIET)
    wa, wb = (load_file(str(o / "student" / "model.safetensors")) for o in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _history(a) == _history(b) and len(_history(b)) == STEPS
    # resuming it as a full student is refused (its checkpoint lacks the base weights), the student named
    with pytest.raises(UserError, match=r"does not fit model.student="):
        distill(load_config(None, tiny_overrides(tiny_assets, b, **{**RESUME, "model.student_lora.r": None})),
                resume=True, **QUIET)
    # the merged export: no adapter tensors; the frozen weights as loaded, the adapted ones moved
    init = load_file(str(tiny_assets["student"] / "model.safetensors"))
    assert wa.keys() == init.keys()
    moved = {k for k in wa if not torch.equal(wa[k], init[k])}
    assert moved and all(k.split(".")[-2] in RESUME_TARGETS for k in moved)
    assert not any(k.endswith(("embed_tokens.weight", "norm.weight")) for k in moved)
    # the merged folder computes what the adapter on its base computes
    from peft import PeftModel

    ids = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(1))
    merged = AutoModelForCausalLM.from_pretrained(a / "student").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_assets["student"])
    peft_model = PeftModel.from_pretrained(base, a / "adapter").eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max() <= 1e-5


RESUME_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_an_unknown_target_module_stops_the_cli_with_one_line(tiny_assets, tmp_path):
    args = tiny_overrides(tiny_assets, tmp_path / "x", **LORA, **{"model.student_lora.target_modules": "[q_proj, c_attn]"})
    r = subprocess.run([sys.executable, "-m", "sakd.cli", "distill", "--no-progress", *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert_user_error(r, "model.student_lora.target_modules", "'c_attn' is not a linear layer", "q_proj")
