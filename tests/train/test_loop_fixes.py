"""The loop on the paths a real fp16 run takes: SAR padding, skipped fp16 steps, a resume with another
max_steps, out-of-memory, the fp32 recompute of an overflowing teacher, KA draws without host syncs."""

import copy
import math
import shutil

import pytest
import torch

from sakd.models import moe
from sakd.train import objective
from sakd.config import load_config
from sakd.data.text import Collator, pad_id
from sakd.train.distill import distill, optimizer_update, setup
from sakd.models.load import fp32_forward
from sakd.models.moe import ka_select
from tests.conftest import tiny_overrides


class CpuAcc:
    autocast = staticmethod(lambda: torch.autocast("cpu", enabled=False))
    unwrap_model = staticmethod(lambda m: m)
    num_processes = 1


def _pad_right(batch: dict, extra: int, t_pad: int) -> dict:
    """The same examples with ``extra`` more padded teacher positions (the student side unchanged)."""
    b = dict(batch)
    B = b["t_ids"].shape[0]
    b["t_ids"] = torch.cat([b["t_ids"], torch.full((B, extra), t_pad)], 1)
    b["t_mask"] = torch.cat([b["t_mask"], torch.zeros(B, extra, dtype=torch.bool)], 1)
    b["t_chunk"] = torch.cat([b["t_chunk"], torch.full((B, extra), -1)], 1)
    return b


def test_sar_router_step_ignores_teacher_padding(tiny_assets, tmp_path):
    """Right padding changes no real token's logits (causal attention), so the router step's KL, balance
    loss and telemetry must not change when more padding is appended."""
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path, **{"moe.mode": "sar", "moe.balance_coef": 1.0}))
    run = setup(cfg, log=lambda *_: None)
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(3)])
    out = []
    for extra in (0, 24):
        teacher = copy.deepcopy(run.teacher)
        sar = moe.SARRouter(teacher, lr=1e-3)
        out.append(objective.sar_router_step(sar, teacher, run.student, _pad_right(batch, extra, pad_id(run.teacher_tok)),
                                             run.vocab.shared_s, run.vocab.shared_t, cfg, CpuAcc, len(run.teacher_tok)))
    for k in ("sar_kl", "sar_balance", "sar_entropy", "sar_selected_mass"):
        assert out[1][k] == pytest.approx(out[0][k], rel=1e-5), (k, out[0][k], out[1][k])


class _ScaledAcc:
    """What optimizer_update needs of an Accelerator, with a real (CPU) GradScaler."""

    def __init__(self, optimizer):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        self._opt = optimizer

    def clip_grad_norm_(self, params, max_norm):
        self.scaler.unscale_(self._opt.optimizer)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def test_fp16_overflow_skipped_steps_are_counted_and_the_schedule_advances():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # the process state AcceleratedOptimizer reads (the loop creates it the same way)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    acc = _ScaledAcc(None)
    wrapped = AcceleratedOptimizer(opt, device_placement=False, scaler=acc.scaler)
    acc._opt = wrapped
    counters = {"skipped_steps": 0}
    for grad, expect_skip in ((float("inf"), True), (1.0, False)):
        acc.scaler.scale((w * grad).sum()).backward()
        before = w.detach().clone()
        norm, skipped = optimizer_update(acc, wrapped, sched, 1.0, counters)
        assert skipped is expect_skip
        assert torch.equal(w.detach(), before) is expect_skip  # a skipped step leaves the weights alone
    assert counters["skipped_steps"] == 1
    assert sched.last_epoch == 2  # the schedule advanced on both
    assert acc.scaler.get_scale() < 2.0 ** 10  # the scaler backed off after the overflow


def test_resume_with_another_max_steps_keeps_the_saved_schedule_horizon(tiny_assets, tmp_path):
    """Resuming a 4-step run with train.max_steps=6 must not reshape the LR schedule of the steps already
    planned: steps 3-4 get the LR of the uninterrupted 4-step run; the run then stops at 6."""
    common = {"train.max_steps": 4, "train.save_every": 2, "train.warmup_steps": 1, "train.min_lr_ratio": 0.1,
              "train.keep_checkpoints": 3, "data.max_examples": 16}
    a = distill(load_config(None, tiny_overrides(tiny_assets, tmp_path / "run", **common)),
                progress=False, log=lambda *_: None)
    assert a["steps"] == 4
    import json

    lr_a = [r["lr"] for r in json.loads((tmp_path / "run" / "history.json").read_text())["history"]]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    lines = []
    b = distill(load_config(None, tiny_overrides(tiny_assets, tmp_path / "run", **{**common, "train.max_steps": 6})),
                resume=True, progress=False, log=lines.append)
    assert b["steps"] == 6
    lr_b = [r["lr"] for r in json.loads((tmp_path / "run" / "history.json").read_text())["history"]]
    assert lr_b[:4] == pytest.approx(lr_a)
    assert lr_b[4:] == pytest.approx([1e-3 * 0.1] * 2)  # past the saved horizon: the minimum LR
    assert any("keep the saved horizon of 4 steps" in l for l in lines)


def test_cuda_out_of_memory_is_one_line_pointing_to_sakd_plan(monkeypatch, capsys):
    from sakd import cli

    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.32 GiB. GPU 0 has a total capacity "
                                     "of 15.89 GiB of which 1.02 GiB is free.")

    monkeypatch.setitem(cli.VERBS, "distill", oom)
    assert cli.main(["distill", "--config", "configs/huihui-moe-1b-to-smollm-135m.yaml"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "internal error" not in err[0] and "Traceback" not in err[0]
    assert "sakd plan --config configs/huihui-moe-1b-to-smollm-135m.yaml" in err[0]
    assert "train.batch_size" in err[0] and "model.gradient_checkpointing" in err[0]


def test_fp32_recompute_holds_one_module_in_fp32_at_a_time(tiny_assets):
    """The overflow path recomputes in fp32 module by module: the same outputs as the whole model in fp32,
    never more than one module's weights in fp32 at once, and every weight back in fp16 after."""
    from transformers import AutoModelForCausalLM

    t16 = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], dtype=torch.float16).eval()
    t32 = copy.deepcopy(t16).float()
    ids = torch.randint(0, t16.config.vocab_size, (2, 20))
    most = []

    def count(module, args):
        most.append(sum(p.numel() for p in t16.parameters() if p.dtype == torch.float32))

    hooks = [m.register_forward_pre_hook(count) for m in t16.modules()]
    with torch.no_grad(), fp32_forward(t16):
        hooks += [m.register_forward_hook(lambda m, a, o: count(m, a)) for m in t16.modules()]
        out = t16(input_ids=ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        ref = t32(input_ids=ids, output_hidden_states=True)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in t16.modules())
    assert 0 < max(most) <= largest < sum(p.numel() for p in t16.parameters()) // 2
    assert all(p.dtype == torch.float16 for p in t16.parameters())


def test_finite_check_sees_inf_and_nan_anywhere():
    class Out:
        def __init__(self, logits, hidden):
            self.logits, self.hidden_states = logits, hidden

    logits = torch.randn(2, 5, 11, dtype=torch.float16)
    hidden = [torch.randn(2, 5, 4, dtype=torch.float16) for _ in range(3)]
    assert objective._finite(Out(logits, hidden), 10, True)
    for bad in (float("inf"), -float("inf"), float("nan")):
        lg = logits.clone()
        lg[1, 3, 4] = bad
        assert not objective._finite(Out(lg, hidden), 10, False)
        lg = logits.clone()
        lg[1, 3, 10] = bad  # a padded head column beyond the tokenizer: ignored
        assert objective._finite(Out(lg, hidden), 10, False)
        hs = [h.clone() for h in hidden]
        hs[2][0, 0, 0] = bad
        assert objective._finite(Out(logits, hs), 10, False) and not objective._finite(Out(logits, hs), 10, True)


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_ka_draws_for_every_row_have_the_same_distribution(lam):
    """The accelerator path (draw every row, keep by the coin: no nonzero(), no host sync) samples the
    same distribution as the CPU path: P(row differs from its argmax) = lambda * (1 - q_argmax)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 3, generator=g) * 2.0
    chosen = ka_select(logits, 1, lam, generator=torch.Generator().manual_seed(1), every_row=True)
    differs = (chosen[:, 0] != logits.argmax(-1)).double()
    q = torch.softmax(logits.double(), -1)
    pi = lam * (1 - q.gather(1, logits.argmax(-1, keepdim=True))[:, 0])
    z = (differs.sum() - pi.sum()) / (pi * (1 - pi)).sum().sqrt()
    assert abs(z) < 4, float(z)
    two = ka_select(logits, 2, lam, generator=torch.Generator().manual_seed(1), every_row=True)
    assert (two[:, 0] != two[:, 1]).all()
    assert torch.equal(ka_select(logits, 2, 0.0, every_row=True), torch.topk(logits, 2, -1).indices)


def test_fused_output_layer_runs_in_fp32_under_autocast():
    """What the README and the start-up log say: under 16-bit autocast the student's final hidden state
    (which the fused output layer multiplies) is float32 -- the last RMSNorm returns its input's dtype, the
    fp32 residual stream -- while the model's own head gives 16-bit logits."""
    from transformers import AutoModelForCausalLM

    from sakd.models.tiny import llama_config

    model = AutoModelForCausalLM.from_config(llama_config(100, hidden=32, layers=1, heads=2, intermediate=32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=torch.randint(0, 100, (1, 5)), output_hidden_states=True)
    assert out.hidden_states[-1].dtype == torch.float32 and out.logits.dtype == torch.bfloat16


def test_on_policy_text_is_normalised_like_the_spans(tiny_assets, tmp_path, monkeypatch):
    """A student can write decomposed accents; the teacher's tokenizer composes them (NFC). The generated
    text must be normalised as the spans were, not stop the run."""
    import unicodedata

    from sakd.train.onpolicy import generate_items

    run = setup(load_config(None, tiny_overrides(tiny_assets, tmp_path)), log=lambda *_: None)
    written = unicodedata.normalize("NFD", " the café was naïve")
    monkeypatch.setattr(run.student_tok, "decode", lambda ids, **kw: written)
    (item,) = generate_items(run.student, run.train, [0], new_tokens=2, temperature=1.0)
    assert not item.get("skipped") and item["n_bytes"] == len(unicodedata.normalize("NFC", written).encode())
