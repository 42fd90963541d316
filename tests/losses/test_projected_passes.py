"""projected_kl over M teacher passes in one call (KA's sampled routings, sakd/losses/projected.py): the same
loss, gradient and per-kind log as the M one-pass calls summed, and as the float64 reference of each pass,
including positions where the passes' targets differ and a row whose realised token is its own bucket in one
pass and not in the other."""

from __future__ import annotations

import math

import pytest
import torch

from test_projected import TEXTS, _batch, _logits, pair, reference  # noqa: F401  (pair: the fixture)
from sakd.losses.mapped import MappedTargets, mapped_positions
from sakd.losses.projected import KINDS, label_tables, projected_kd


def _split_in_one_pass_only(batch, tables, classes, t1, vt):
    """t2 = t1 where, at a few positions whose realised student token t_j is not its class's label, runs past
    the teacher token t_i and gets the realised path's mass under t1, the path's last factor is sunk (every
    teacher token that starts with the path's last bytes gets logit -1e4 in the row predicting it): under t2
    t_j gets no mass while its class keeps p_i(t_i), so t_j is its own bucket in pass 1 and not in pass 2.
    Returns (t2, the positions, P_2(t_j) there, P_2(cls(t_j)) there)."""
    pos = mapped_positions(batch, tables)
    lab = label_tables(tables, classes)
    idx = torch.arange(len(pos))
    P1, _ = MappedTargets(t1, batch, pos, lab, len(classes.cls), vt, 1.0, True)(idx)
    tj = batch["s_ids"][pos.b, pos.j]
    own = (classes.cls[tj] != tj) & (P1[idx, tj] > 0) & pos.ext
    picked = own.nonzero().squeeze(1)[:3]
    t2 = t1.clone()
    for x in picked.tolist():
        b, m = int(pos.b[x]), int(pos.m[x])
        f = int(tables.offset[batch["t_ids"][b, m]] + pos.q[x])
        t2[b, m - 1, tables.sorted_ids[int(tables.lo[f]):int(tables.hi[f])]] = -1e4
    P2, _ = MappedTargets(t2, batch, pos, lab, len(classes.cls), vt, 1.0, True)(idx)
    return t2, picked, P2[picked, tj[picked]], P2[picked, classes.cls[tj[picked]]]


@pytest.mark.parametrize("fused", [False, True])
def test_passes_in_one_call_equal_the_sum_of_one_pass_calls(pair, fused):
    s_tok, t_tok, tables, classes = pair
    batch = _batch(s_tok, t_tok)
    vs, vt = len(s_tok), len(t_tok)
    t1 = _logits(batch, "t", vt, 1)
    t2, picked, p2_tj, p2_class = _split_in_one_pass_only(batch, tables, classes, t1, vt)
    assert picked.numel() >= 2 and (p2_tj == 0).all() and (p2_class > 0).all()  # split in pass 1 only
    t3 = _logits(batch, "t", vt, 3)  # a third pass whose targets differ everywhere
    passes = [t1, t2, t3]
    g = torch.Generator().manual_seed(2)
    if fused:
        x = torch.randn(*batch["s_ids"].shape, 8, generator=g, requires_grad=True)
        weight = (0.7 * torch.randn(vs + 3, 8, generator=g)).requires_grad_()
        kw = {"head_weight": weight, "chunk_rows": 3}
        inputs = (x, weight)
    else:
        x = _logits(batch, "s", vs, 0).requires_grad_()
        kw = {"chunk_rows": 5}
        inputs = (x,)
    log_one, log_each = {}, {}
    one, n = projected_kd(x, passes, batch, tables, classes, t_vocab_size=vt, log=log_one, **kw)
    g_one = torch.autograd.grad(one, inputs)
    each = sum(projected_kd(x, t, batch, tables, classes, t_vocab_size=vt, log=log_each, **kw)[0] for t in passes)
    g_each = torch.autograd.grad(each, inputs)
    assert math.isclose(float(one.detach()), float(each.detach()), rel_tol=1e-6)
    tol = {"rtol": 1e-5, "atol": 1e-6} if fused else {"rtol": 1e-6, "atol": 1e-7}  # fused: float32 head matmuls
    for a, b in zip(g_one, g_each):
        torch.testing.assert_close(a, b, **tol)
    for name in KINDS:  # the per-kind log: the sums of the one-pass calls, term by term
        assert int(log_one[name + "_n"]) == int(log_each[name + "_n"]) // 3 > 0
        assert math.isclose(float(log_one[name]), float(log_each[name]), rel_tol=1e-6)
    # ... and the float64 reference, pass by pass
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    s64 = x64[0] @ x64[1].T if fused else x64[0]
    ref = sum(reference(s64, t.double(), TEXTS, s_tok, t_tok)[0] for t in passes)
    g_ref = torch.autograd.grad(ref, x64)
    assert math.isclose(float(one.detach()), float(ref.detach()), rel_tol=1e-5 if fused else 1e-6)
    for a, b in zip(g_one, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_one_pass_in_a_list_is_the_one_pass_call(pair):
    s_tok, t_tok, tables, classes = pair
    batch = _batch(s_tok, t_tok)
    vs, vt = len(s_tok), len(t_tok)
    t1 = _logits(batch, "t", vt, 1)
    s = _logits(batch, "s", vs, 0)
    a, n_a = projected_kd(s, [t1], batch, tables, classes, t_vocab_size=vt)
    b, n_b = projected_kd(s, t1, batch, tables, classes, t_vocab_size=vt)
    assert int(n_a) == int(n_b) and float(a) == float(b)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_passes_from_the_teacher_hidden_state_equal_those_from_its_logits(pair, temperature):
    """``t_head_weight``: the teacher's last hidden states and output layer (the target multiplies out its rows
    as columns, sakd/losses/mapped.py ``column_exp``) give the loss and gradient of the logits h @ W.T."""
    s_tok, t_tok, tables, classes = pair
    batch = _batch(s_tok, t_tok)
    vs, vt = len(s_tok), len(t_tok)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(vt + 2, 16, generator=g)                       # 2 padding columns past the tokenizer
    hs = [torch.randn(*batch["t_ids"].shape, 16, generator=g) for _ in range(2)]
    s = _logits(batch, "s", vs, 0).requires_grad_()
    a, _ = projected_kd(s, hs, batch, tables, classes, t_vocab_size=vt, t_head_weight=w, temperature=temperature,
                        chunk_rows=6)
    g_a, = torch.autograd.grad(a, s)
    b, _ = projected_kd(s, [h @ w.T for h in hs], batch, tables, classes, t_vocab_size=vt, temperature=temperature,
                        chunk_rows=6)
    g_b, = torch.autograd.grad(b, s)
    assert math.isclose(float(a.detach()), float(b.detach()), rel_tol=1e-6)
    torch.testing.assert_close(g_a, g_b, rtol=1e-5, atol=1e-7)
