"""Routing control on real Hugging Face MoE blocks (sakd/models/moe.py).

Tiny Qwen3-MoE (3 experts, 1 active, like the demo teacher) and Qwen2-MoE (4 experts,
2 active, shared expert) built from config, saved and loaded back with from_pretrained."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sakd.errors import UserError
from sakd.models.moe import (SARRouter, find_moe_blocks, is_moe, ka_select, load_balance_loss,
                      load_router_state, router_state, routing, routing_schedule)
from sakd.models.tiny import llama_config, qwen3_moe_config
from sakd_test_helpers import qwen2_moe_config, router_parameters

VOCAB = 64


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    dirs = {}
    for kind, cfg in (("qwen3", qwen3_moe_config(vocab_size=VOCAB, hidden=32, layers=2, heads=4, experts=3,
                                                  experts_per_tok=1, intermediate=32)),
                      ("qwen2", qwen2_moe_config(VOCAB)),
                      ("llama", llama_config(VOCAB, hidden=32, layers=2))):
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(kind)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        dirs[kind] = d
    return dirs


def load(saved, kind, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(saved[kind], dtype=dtype).eval()


def ids(batch=2, length=16, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def kl_teacher_student(teacher_logits, student_logp):
    """KL(p_teacher || q_student) per position, averaged."""
    lp = torch.log_softmax(teacher_logits.float(), -1)
    return (lp.exp() * (lp - student_logp)).sum(-1).mean()


# --------------------------------------------------------------------------- discovery
def test_find_moe_blocks_by_structure(saved):
    for kind in ("qwen3", "qwen2"):
        m = load(saved, kind)
        assert [n for n, _ in find_moe_blocks(m)] == ["model.layers.0.mlp", "model.layers.1.mlp"]
        assert is_moe(m)
    dense = load(saved, "llama")
    # The name test would have matched: the dense MLP has gate_proj modules.
    assert any("gate" in n for n, _ in dense.named_modules())
    assert find_moe_blocks(dense) == [] and not is_moe(dense)
    with pytest.raises(UserError, match="no MoE block"):
        with routing(dense, "all"):
            pass


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_topk_and_ka_without_sampling_are_bitwise_the_model(saved, kind):
    m, x = load(saved, kind), ids()
    with torch.no_grad():
        ref = m(x).logits
        with routing(m, "topk"):
            topk = m(x).logits
        with routing(m, "ka", sample_prob=0.0, generator=torch.Generator().manual_seed(0)):
            ka = m(x).logits
        with routing(m, "all"):
            everything = m(x).logits
    assert torch.equal(topk, ref)
    assert torch.equal(ka, ref)
    assert not torch.allclose(everything, ref)  # the other tests are not vacuous


def manual_moe(block, x):
    """The MoE block's output with all experts, w = softmax(router logits), in float64,
    written from the weights alone: sum_e p_e * down_e(silu(gate_e x) * up_e x) [+ shared]."""
    x = x.double().reshape(-1, x.shape[-1])
    p = torch.softmax(x @ block.gate.weight.double().T, -1)
    gate_up, down = block.experts.gate_up_proj.double(), block.experts.down_proj.double()
    inter = down.shape[-1]
    out = torch.zeros_like(x)
    for e in range(p.shape[1]):
        h = x @ gate_up[e].T
        out += p[:, e:e + 1] * ((F.silu(h[:, :inter]) * h[:, inter:]) @ down[e].T)
    if hasattr(block, "shared_expert"):
        s = block.shared_expert
        shared = (F.silu(x @ s.gate_proj.weight.double().T) * (x @ s.up_proj.weight.double().T)) @ s.down_proj.weight.double().T
        out += torch.sigmoid(x @ block.shared_expert_gate.weight.double().T) * shared
    return out


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_all_experts_matches_hand_computation(saved, kind):
    m, x = load(saved, kind), ids()
    name, block = find_moe_blocks(m)[1]
    seen = {}
    handle = block.register_forward_hook(lambda mod, a, out: seen.update(inp=a[0].detach(), out=out.detach()))
    with torch.no_grad(), routing(m, "all"):
        m(x)
    handle.remove()
    ref = manual_moe(block, seen["inp"])
    got = seen["out"].reshape(ref.shape).double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# --------------------------------------------------------------------------- restore
@pytest.mark.parametrize("mode,kw", [("topk", {}), ("ka", {"sample_prob": 1.0, "experts": 2}),
                                     ("all", {}), ("sar", {})])
def test_exit_restores_model_exactly(saved, mode, kw):
    m, x = load(saved, "qwen3"), ids()
    params = list(m.parameters())
    for i, p in enumerate(params):  # a non-trivial pattern to restore
        p.requires_grad_(i % 2 == 0)
    flags = [p.requires_grad for p in params]
    with torch.no_grad():
        before = m(x).logits
    gates = [b.gate for _, b in find_moe_blocks(m)]
    with pytest.raises(RuntimeError, match="boom"):
        with routing(m, mode, generator=torch.Generator().manual_seed(0), **kw):
            if mode == "sar":
                routers = {id(p) for p in router_parameters(m)}
                assert all(p.requires_grad == (id(p) in routers) for p in params)
            assert all("forward" in g.__dict__ for g in gates)
            with torch.no_grad():
                m(x)
            raise RuntimeError("boom")
    assert all("forward" not in g.__dict__ for g in gates)
    assert [p.requires_grad for p in params] == flags
    with torch.no_grad():
        assert torch.equal(m(x).logits, before)


# --------------------------------------------------------------------------- KA sampling
def test_ka_select_frequency_k1():
    """E=3, k=1: a row differs from its argmax iff its coin fell (prob lambda) and the single
    draw from q = softmax(l/T) missed the argmax: P = lambda * (1 - q_argmax)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 3, generator=g) * 2.0
    for lam, temp in ((0.3, 1.0), (0.05, 1.0), (0.5, 2.0)):
        chosen = ka_select(logits, 1, lam, temperature=temp, generator=torch.Generator().manual_seed(1))
        differs = (chosen[:, 0] != logits.argmax(-1)).double()
        q = torch.softmax(logits.double() / temp, -1)
        pi = lam * (1 - q.gather(1, logits.argmax(-1, keepdim=True))[:, 0])
        z = (differs.sum() - pi.sum()) / (pi * (1 - pi)).sum().sqrt()
        assert abs(z) < 4, (lam, temp, float(z))


def test_ka_select_without_replacement_k2():
    """E=3, k=2, lambda=1: expert e is left out with probability
    sum_{i != e} q_i * q_j / (1 - q_i), j the third expert (two draws without replacement)."""
    logits = torch.tensor([[1.5, 0.0, -1.0]]).expand(30000, 3)
    chosen = ka_select(logits, 2, 1.0, generator=torch.Generator().manual_seed(2))
    assert (chosen[:, 0] != chosen[:, 1]).all()
    q = torch.softmax(logits[0].double(), -1).tolist()
    for e in range(3):
        i, j = [t for t in range(3) if t != e]
        expected = q[i] * q[j] / (1 - q[i]) + q[j] * q[i] / (1 - q[j])
        left_out = (chosen != e).all(-1).double().mean().item()
        sd = math.sqrt(expected * (1 - expected) / 30000)
        assert abs(left_out - expected) < 4 * sd, (e, left_out, expected)


def test_ka_on_model_samples_at_the_expected_rate_and_stats_count_it(saved):
    m, x = load(saved, "qwen3"), ids(batch=8, length=64, seed=3)
    with torch.no_grad():
        for p in router_parameters(m):
            p.mul_(40.0)  # peaked routers, so sampling visibly departs from the argmax
    seen = []
    hooks = [b.gate.register_forward_hook(lambda mod, a, out: seen.append((out[0].detach(), out[2])))
             for _, b in find_moe_blocks(m)]
    lam = 0.5
    with torch.no_grad(), routing(m, "ka", sample_prob=lam, generator=torch.Generator().manual_seed(4)) as r:
        m(x)
    for h in hooks:
        h.remove()
    differs = torch.cat([(idx[:, 0] != lg.argmax(-1)) for lg, idx in seen]).double()
    q_max = torch.cat([torch.softmax(lg.double(), -1).max(-1).values for lg, _ in seen])
    pi = lam * (1 - q_max)
    z = (differs.sum() - pi.sum()) / (pi * (1 - pi)).sum().sqrt()
    assert abs(z) < 4, float(z)
    stats = r.stats()
    for (name, d), (lg, idx) in zip(stats.items(), seen):
        hist = torch.bincount(idx[:, 0], minlength=3).double()
        assert d["counts"] == hist.tolist()
        assert d["usage"] == pytest.approx((hist / hist.sum()).tolist())
        p = torch.softmax(lg.double(), -1)
        assert d["entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
        assert d["selected_mass"] == pytest.approx(float(p.gather(1, idx).sum(-1).mean()), rel=1e-5)
        assert d["tokens"] == x.numel()


def test_ka_is_reproducible_from_the_generator(saved):
    m, x = load(saved, "qwen3"), ids()

    def run(seed):
        with torch.no_grad(), routing(m, "ka", experts=2, sample_prob=1.0,
                                      generator=torch.Generator().manual_seed(seed)):
            return m(x).logits

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_token_mask_and_reference_kl_in_stats(saved):
    m, x = load(saved, "qwen3"), ids()
    block = find_moe_blocks(m)[0][1]
    inputs = []
    h = block.gate.register_forward_hook(lambda mod, a, out: inputs.append(a[0].detach()))
    ref_w = {n: b.gate.weight.detach() + 0.5 * torch.randn_like(b.gate.weight) for n, b in find_moe_blocks(m)}
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, -5:] = False
    with torch.no_grad(), routing(m, "all", reference_weights=ref_w) as r:
        r.set_token_mask(mask)
        m(x)
    h.remove()
    d = r.stats()["model.layers.0.mlp"]
    keep = mask.reshape(-1)
    xin = inputs[0].double()[keep]
    lp = torch.log_softmax(xin @ block.gate.weight.detach().double().T, -1)
    lp0 = torch.log_softmax(xin @ ref_w["model.layers.0.mlp"].double().T, -1)
    assert d["tokens"] == int(keep.sum())
    assert d["router_kl"] == pytest.approx(float((lp0.exp() * (lp0 - lp)).sum(-1).mean()), rel=1e-4)
    assert d["usage"] == pytest.approx([1 / 3] * 3) and d["selected_mass"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- balance loss
def test_load_balance_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 1.0, -1.0], [0.0, 0.0, 0.5]],
                          dtype=torch.float64)
    rows = [[math.exp(v) for v in r] for r in logits.tolist()]
    probs = [[v / sum(r) for v in r] for r in rows]
    top = [r.index(max(r)) for r in probs]

    def by_hand(use):
        n = len(use)
        f = [sum(1 for t in use if top[t] == e) / n for e in range(3)]
        P = [sum(probs[t][e] for t in use) / n for e in range(3)]
        return 3 * sum(a * b for a, b in zip(f, P))

    assert load_balance_loss(logits).item() == pytest.approx(by_hand([0, 1, 2, 3]), rel=1e-12)
    mask = torch.tensor([True, False, True, True])
    assert load_balance_loss(logits, mask=mask).item() == pytest.approx(by_hand([0, 2, 3]), rel=1e-12)
    # Layers are averaged.
    two = load_balance_loss({"a": logits, "b": logits[:2]}).item()
    assert two == pytest.approx((by_hand([0, 1, 2, 3]) + by_hand([0, 1])) / 2, rel=1e-12)
    # Extremes: one expert taking everything with certainty -> E; uniform logits -> 1.
    assert load_balance_loss(torch.tensor([[50.0, 0, 0]] * 4)).item() == pytest.approx(3.0)
    assert load_balance_loss(torch.zeros(6, 3)).item() == pytest.approx(1.0)
    # Differentiable through P (f is piecewise constant): gradcheck away from argmax ties.
    assert torch.autograd.gradcheck(lambda l: load_balance_loss(l), (logits.clone().requires_grad_(),))


# --------------------------------------------------------------------------- SAR
def student_target(seed=7):
    return torch.log_softmax(3.0 * torch.randn(2, 16, VOCAB, generator=torch.Generator().manual_seed(seed)), -1)


def make_loss_fn(x, q):
    return lambda t: kl_teacher_student(t(x, use_cache=False).logits, q)


def test_sar_step_changes_only_router_weights_and_lowers_kl(saved):
    m, x, q = load(saved, "qwen3"), ids(), student_target()
    for p in m.parameters():
        p.requires_grad_(False)  # a frozen teacher, as in the loop
    names = {f"{n}.gate.weight" for n, _ in find_moe_blocks(m)}
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}

    def kl_all():
        with torch.no_grad(), routing(m, "all"):
            return kl_teacher_student(m(x).logits, q).item()

    kl0 = kl_all()
    sar = SARRouter(m, lr=1e-2, balance_coef=0.0)
    out = sar.step(make_loss_fn(x, q))
    after = m.state_dict()
    assert not m.training and all(not p.requires_grad for p in m.parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == names
    assert out["kl"] == pytest.approx(kl0, rel=1e-6) and out["grad_norm"] > 0 and not out["skipped"]
    assert kl_all() < kl0
    for n, p in sar.master.items():  # the teacher holds the master weights
        assert torch.equal(m.get_submodule(n).gate.weight, p.detach())


def test_sar_balance_and_anchor_terms_and_router_kl(saved):
    m, x, q = load(saved, "qwen2"), ids(), student_target()
    sar = SARRouter(m, lr=1e-2, balance_coef=0.5, anchor=2.0)
    with pytest.raises(UserError, match="token mask"):
        sar.step(make_loss_fn(x, q), token_mask=torch.ones(3, dtype=torch.bool))
    first = sar.step(make_loss_fn(x, q), token_mask=torch.ones_like(x, dtype=torch.bool))
    assert first["anchor"] == 0.0 and first["router_kl"] == 0.0
    assert first["loss"] == pytest.approx(first["kl"] + 0.5 * first["balance"], rel=1e-6)
    moved = sum(float((p.detach() - sar.initial[n]).pow(2).sum()) for n, p in sar.master.items())
    second = sar.step(make_loss_fn(x, q))
    assert second["anchor"] == pytest.approx(moved, rel=1e-5)
    assert second["loss"] == pytest.approx(second["kl"] + 0.5 * second["balance"] + 2.0 * moved, rel=1e-5)
    assert second["router_kl"] > 0.0


def test_sar_checkpointing_gives_the_same_update(saved):
    x, q = ids(), student_target()
    results = []
    for ck in (True, False):
        m = load(saved, "qwen3")
        sar = SARRouter(m, lr=1e-2, checkpointing=ck)
        calls = []
        hooks = [b.gate.register_forward_hook(lambda *a: calls.append(1)) for _, b in find_moe_blocks(m)]
        out = sar.step(make_loss_fn(x, q))
        for h in hooks:
            h.remove()
        assert len(calls) == (4 if ck else 2)  # checkpointing re-ran each router in backward
        results.append((out, [p.detach().clone() for p in sar.master.values()]))
        assert all(not getattr(l, "gradient_checkpointing", False) for l in m.model.layers)
    (a, wa), (b, wb) = results
    assert a["kl"] == pytest.approx(b["kl"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for u, v in zip(wa, wb):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7)


def test_sar_state_round_trip(saved, tmp_path):
    x, q = ids(), student_target()
    m1 = load(saved, "qwen3")
    sar1 = SARRouter(m1, lr=1e-2)
    sar1.step(make_loss_fn(x, q))
    state = sar1.state_dict()
    save_file(router_state(m1), tmp_path / "router.safetensors")

    m2 = load(saved, "qwen3")
    sar2 = SARRouter(m2, lr=1e-2)
    sar2.load_state_dict(state)
    for a, b in zip(router_parameters(m1), router_parameters(m2)):
        assert torch.equal(a, b)
    r1, r2 = sar1.step(make_loss_fn(x, q)), sar2.step(make_loss_fn(x, q))
    assert r1 == r2  # optimizer moments and initial weights came back too
    for a, b in zip(router_parameters(m1), router_parameters(m2)):
        assert torch.equal(a, b)

    m3 = load(saved, "qwen3")
    load_router_state(m3, load_file(tmp_path / "router.safetensors"))
    saved_state = load_file(tmp_path / "router.safetensors")
    for n, b in find_moe_blocks(m3):
        assert torch.equal(b.gate.weight, saved_state[f"{n}.gate.weight"])
    with pytest.raises(UserError, match="router state lacks"):
        load_router_state(m3, {})


def test_sar_fp16_teacher_keeps_fp32_master(saved):
    # CPU float16 matmuls work in torch 2.13, so this is the real fp16 path (with loss scaling).
    m, x, q = load(saved, "qwen3", dtype=torch.float16), ids(), student_target()
    before = [p.detach().clone() for p in router_parameters(m)]
    sar = SARRouter(m, lr=1e-2)
    out = sar.step(make_loss_fn(x, q))
    assert not out["skipped"] and out["loss_scale"] > 1.0
    for (n, w), b in zip(sar.master.items(), before):
        assert w.dtype == torch.float32
        tw = m.get_submodule(n).gate.weight
        assert tw.dtype == torch.float16 and torch.equal(tw, w.detach().half()) and not torch.equal(tw, b)


def test_sar_refuses_a_loss_without_gradient(saved):
    m, x, q = load(saved, "qwen3"), ids(), student_target()
    sar = SARRouter(m)

    def no_grad_loss(t):
        with torch.no_grad():
            return kl_teacher_student(t(x).logits, q)

    with pytest.raises(UserError, match="gradients enabled"):
        sar.step(no_grad_loss)
    assert all("forward" not in b.gate.__dict__ for _, b in find_moe_blocks(m))


# --------------------------------------------------------------------------- schedule, errors
def test_routing_schedule_linear_ramps():
    kw = dict(experts_start=1, experts_end=3, temp_start=2.0, temp_end=1.0, prob_start=0.0, prob_end=0.2)
    assert routing_schedule(0, 4, **kw) == {"experts": 1, "temperature": 2.0, "sample_prob": 0.0}
    assert [routing_schedule(s, 4, **kw)["experts"] for s in range(6)] == [1, 2, 2, 3, 3, 3]
    mid = routing_schedule(1, 4, **kw)
    assert mid["temperature"] == pytest.approx(1.75) and mid["sample_prob"] == pytest.approx(0.05)
    assert routing_schedule(9, 4, **kw) == routing_schedule(4, 4, **kw)
    assert routing_schedule(0, 0, **kw)["experts"] == 3


def test_routing_rejects_bad_arguments(saved):
    m = load(saved, "qwen3")
    bad = [dict(mode="random"), dict(mode="ka", experts=4), dict(mode="ka", experts=0),
           dict(mode="all", experts=2), dict(mode="all", sample_prob=0.1),
           dict(mode="ka", sample_prob=1.5), dict(mode="ka", temperature=0.0), dict(mode="topk", experts=2)]
    for kw in bad:
        with pytest.raises(UserError):
            with routing(m, **kw):
                pass
    assert all("forward" not in b.gate.__dict__ for _, b in find_moe_blocks(m))
