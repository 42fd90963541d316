"""Tests for sakd/losses/divergences.py against float64 references written the slow obvious way."""

from __future__ import annotations

import math

import pytest
import torch

from sakd.errors import UserError
from sakd.losses import forward_kl, generalized_jsd, kd_loss, reverse_kl, sparse_forward_kl, tvd

T = 1.7  # a temperature != 1 everywhere, so a missing or doubled 1/T shows up
KINDS = ["forward_kl", "reverse_kl", "jsd", "tvd"]


# ---------------------------------------------------------------------------------------------
# float64 references: one row at a time, probabilities and the textbook formulas.
# ---------------------------------------------------------------------------------------------

def ref_row(kind: str, s_row: torch.Tensor, t_row: torch.Tensor, temperature: float, beta: float = 0.5):
    """Divergence for one position from float64 logit vectors (differentiable)."""
    q = torch.exp(s_row / temperature)
    q = q / q.sum()
    p = torch.exp(t_row / temperature)
    p = p / p.sum()
    if kind == "forward_kl":
        return (p * (p.log() - q.log())).sum()
    if kind == "reverse_kl":
        return (q * (q.log() - p.log())).sum()
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * (p.log() - m.log())).sum() + (1 - beta) * (q * (q.log() - m.log())).sum()
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum()
    raise AssertionError(kind)


def ref_loss(kind, s, t, mask, temperature, reduction, beta=0.5):
    """Loop over positions of [..., V] float64 logits; mean/sum over the unmasked ones."""
    V = s.shape[-1]
    s2, t2 = s.reshape(-1, V), t.reshape(-1, V)
    keep = [True] * s2.shape[0] if mask is None else mask.reshape(-1).tolist()
    terms = [ref_row(kind, s2[i], t2[i], temperature, beta) for i in range(s2.shape[0]) if keep[i]]
    total = torch.stack(terms).sum()
    return total / len(terms) if reduction == "mean" else total


def ours(kind, s, t, mask=None, *, temperature=T, reduction="mean", beta=0.5, chunk_rows=1024):
    return kd_loss(kind, s, t, mask, temperature=temperature, beta=beta, reduction=reduction, chunk_rows=chunk_rows)


def make(shape, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_mask(shape, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < 0.6
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = False  # at least one position in and one out
    return mask


def grads64(kind, s, t, mask, reduction, beta=0.5):
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    loss = ref_loss(kind, s64, t64, mask, T, reduction, beta)
    loss.backward()
    return loss.detach(), s64.grad, t64.grad


def assert_grad_close(ours_grad, ref_grad):
    # rtol 1e-5 on fp32; the atol only covers entries that are ~0 in the reference.
    torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=1e-5, atol=1e-6 * ref_grad.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Values and gradients.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("masked", [False, True])
def test_value_matches_float64_reference(kind, reduction, masked):
    s, t = make((2, 5, 11), 1), make((2, 5, 11), 2)
    mask = make_mask((2, 5), 3) if masked else None
    got = ours(kind, s, t, mask, reduction=reduction, beta=0.3)
    want = ref_loss(kind, s.double(), t.double(), mask, T, reduction, beta=0.3)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradients_match_float64_autograd(kind, reduction):
    s = make((3, 4, 13), 4).requires_grad_()
    t = make((3, 4, 13), 5).requires_grad_()
    mask = make_mask((3, 4), 6)
    ours(kind, s, t, mask, reduction=reduction, beta=0.3).backward()
    _, gs, gt = grads64(kind, s, t, mask, reduction, beta=0.3)
    assert s.grad.dtype == torch.float32 and t.grad.dtype == torch.float32
    assert_grad_close(s.grad, gs)
    assert_grad_close(t.grad, gt)
    # masked positions get exactly zero gradient
    assert (s.grad[~mask] == 0).all() and (t.grad[~mask] == 0).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_teacher_only_gradient_with_detached_student(kind):
    """Student-aware routing: train the teacher through KL with the student detached."""
    s = make((6, 9), 7)
    t = make((6, 9), 8).requires_grad_()
    ours(kind, s, t).backward()
    _, _, gt = grads64(kind, s, t, None, "mean")
    assert_grad_close(t.grad, gt)


def test_grad_output_scaling_is_applied():
    """backward multiplies by the incoming gradient (here 3.5), not just 1/N."""
    s = make((4, 7), 9).requires_grad_()
    t = make((4, 7), 10)
    (3.5 * forward_kl(s, t, temperature=T)).backward()
    _, gs, _ = grads64("forward_kl", s, t, None, "mean")
    assert_grad_close(s.grad, 3.5 * gs)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_inputs_give_zero_loss_and_zero_gradient(kind):
    x = make((3, 2, 17), 11)
    s, t = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = ours(kind, s, t)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert s.grad.abs().max().item() < 1e-7 and t.grad.abs().max().item() < 1e-7


def test_forward_kl_hand_computed_two_tokens():
    # q = (1/2, 1/2), p = (3/4, 1/4) at T = 2; KL(p||q) = 3/4 ln(3/2) + 1/4 ln(1/2)
    s = torch.zeros(1, 2)
    t = torch.tensor([[2 * math.log(3.0), 0.0]])
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert forward_kl(s, t, temperature=2.0).item() == pytest.approx(want, rel=1e-6)
    assert tvd(s, t, temperature=2.0).item() == pytest.approx(0.25, rel=1e-6)


def test_jsd_hand_computed_two_tokens_beta_half():
    # q = (1/2, 1/2), p = (3/4, 1/4) at T = 2, m = (5/8, 3/8):
    # 0.5 * [3/4 ln(6/5) + 1/4 ln(2/3)] + 0.5 * [1/2 ln(4/5) + 1/2 ln(4/3)] = 0.0338220756...
    s = torch.zeros(1, 2)
    t = torch.tensor([[2 * math.log(3.0), 0.0]])
    got = generalized_jsd(s, t, beta=0.5, temperature=2.0).item()
    assert got == pytest.approx(0.0338220756, rel=1e-6)


def test_jsd_ends_are_the_two_kl_directions():
    s = make((4, 3, 10), 12).requires_grad_()
    t = make((4, 3, 10), 13)
    mask = make_mask((4, 3), 14)
    for beta, other in [(0.0, forward_kl), (1.0, reverse_kl)]:
        a = generalized_jsd(s, t, mask, beta=beta, temperature=T)
        (ga,) = torch.autograd.grad(a, s)
        b = other(s, t, mask, temperature=T)
        (gb,) = torch.autograd.grad(b, s)
        assert a.item() == b.item()
        assert torch.equal(ga, gb)
    # and the interior is neither of them
    mid = generalized_jsd(s, t, mask, beta=0.5, temperature=T).item()
    assert mid < min(forward_kl(s, t, mask, temperature=T).item(), reverse_kl(s, t, mask, temperature=T).item())


def test_teacher_zero_probabilities_contribute_nothing():
    """-inf teacher logits (e.g. tokens outside a shared vocabulary) are 0 log 0 = 0, not NaN."""
    s = make((3, 6), 15).requires_grad_()
    t = make((3, 6), 16)
    t[:, 4:] = -math.inf
    loss = forward_kl(s, t, temperature=T)
    loss.backward()
    # reference: the KL over the teacher's support (the student's mass elsewhere enters via log q)
    want = []
    for i in range(3):
        q = torch.softmax(s[i].detach().double() / T, 0)
        p = torch.softmax(t[i, :4].double() / T, 0)
        want.append((p * (p.log() - q[:4].log())).sum())
    assert loss.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)
    assert torch.isfinite(s.grad).all()


def test_all_positions_masked_gives_zero():
    s = make((2, 3, 5), 17).requires_grad_()
    t = make((2, 3, 5), 18)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for kind in KINDS:
        loss = ours(kind, s, t, mask)
        loss.backward()
        assert loss.item() == 0.0
        assert (s.grad == 0).all()
        s.grad = None


# ---------------------------------------------------------------------------------------------
# Chunking, dtypes, memory.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_unchunked(kind, masked):
    s = make((3, 7, 12), 19).requires_grad_()
    t = make((3, 7, 12), 20).requires_grad_()
    mask = make_mask((3, 7), 21) if masked else None
    results = []
    for chunk_rows in (3, 10**9):
        loss = ours(kind, s, t, mask, chunk_rows=chunk_rows, beta=0.3)
        gs, gt = torch.autograd.grad(loss, (s, t))
        results.append((loss, gs, gt))
    (l1, gs1, gt1), (l2, gs2, gt2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=0)
    # per-row gradients depend on the chunking only through vectorised-kernel rounding
    torch.testing.assert_close(gs1, gs2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gt1, gt2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_inputs_give_finite_fp32_results(kind, dtype):
    # large logits: exp() in fp16 would overflow, so this fails unless each chunk is upcast
    s = make((2, 4, 32), 22, scale=40.0, dtype=dtype).requires_grad_()
    t = make((2, 4, 32), 23, scale=40.0, dtype=dtype).requires_grad_()
    loss = ours(kind, s, t, temperature=1.0)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert s.grad.dtype == dtype and t.grad.dtype == dtype
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    # same value as the float32 computation on the same (rounded) numbers
    want = ours(kind, s.detach().float(), t.detach().float(), temperature=1.0)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_are_not_modified(kind):
    s = make((4, 9), 24).requires_grad_()
    t = make((4, 9), 25).requires_grad_()
    s0, t0 = s.detach().clone(), t.detach().clone()
    ours(kind, s, t, chunk_rows=2).backward()
    assert torch.equal(s.detach(), s0) and torch.equal(t.detach(), t0)


def _saved_tensors(fn, s, t):
    """Every tensor autograd saves while building the graph of fn(s, t)."""
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn(s, t)
    return loss, saved


def _aliases(x, inputs):
    return any(x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() for y in inputs)


@pytest.mark.parametrize("kind", KINDS)
def test_graph_keeps_only_the_gradient_buffers(kind):
    """The graph holds one gradient-sized buffer per input that needs a gradient (computed in the
    forward pass) and nothing else: no log-softmax outputs, not even the inputs themselves."""
    V = 50
    s = make((3, 4, V), 26).requires_grad_()
    t = make((3, 4, V), 27)
    mask = make_mask((3, 4), 28)
    loss, saved = _saved_tensors(lambda a, b: ours(kind, a, b, mask, chunk_rows=5), s, t)
    assert not any(_aliases(x, (s, t)) for x in saved)
    assert sum(x.numel() for x in saved) == s.numel()  # d loss / d s, nothing more
    loss.backward()  # and the graph still works

    t.requires_grad_()
    _, saved_both = _saved_tensors(lambda a, b: ours(kind, a, b, mask, chunk_rows=5), s, t)
    assert sum(x.numel() for x in saved_both) == s.numel() + t.numel()

    # The check can fail: plain autograd saves its log-softmax output and the teacher's probabilities.
    def plain(a, b):
        ls, lt = torch.log_softmax(a / T, -1), torch.log_softmax(b / T, -1)
        return (lt.exp() * (lt - ls)).sum(-1)[mask].mean()

    _, saved_plain = _saved_tensors(plain, s, t.detach())
    assert sum(x.numel() for x in saved_plain if not _aliases(x, (s, t))) >= 2 * s.numel()


def test_backward_twice_is_not_silently_wrong():
    """Gradients are scaled in place in backward: a second backward through the same graph (retain_graph)
    must not return a doubly scaled gradient silently — torch refuses to reuse freed saved tensors."""
    s = make((4, 9), 30).requires_grad_()
    t = make((4, 9), 31)
    loss = ours("forward_kl", s, t)
    loss.backward()
    with pytest.raises(RuntimeError):
        loss.backward()


# ---------------------------------------------------------------------------------------------
# Sparse teacher.
# ---------------------------------------------------------------------------------------------

def sparse_teacher(t, k, temperature):
    """Top-k ids and log-probs at temperature T, and the log of the rest, from dense logits."""
    logp = torch.log_softmax(t.double() / temperature, -1)
    top_lp, top_ids = logp.topk(k, dim=-1)
    rest = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1.0))
    return top_ids, top_lp.float(), rest.float()


def ref_sparse(s, ids, lp, rest, mask, temperature, reduction):
    """Per row: bucket the student's float64 probabilities into the k ids and the rest."""
    V = s.shape[-1]
    s2, ids2, lp2, rest2 = s.reshape(-1, V), ids.reshape(-1, ids.shape[-1]), lp.reshape(-1, lp.shape[-1]), rest.reshape(-1)
    keep = [True] * s2.shape[0] if mask is None else mask.reshape(-1).tolist()
    terms = []
    for i in range(s2.shape[0]):
        if not keep[i]:
            continue
        q = torch.exp(s2[i] / temperature)
        q = q / q.sum()
        in_top = torch.zeros(V, dtype=torch.bool)
        in_top[ids2[i]] = True
        q_top, q_rest = q[ids2[i]], q[~in_top].sum()
        p_top, p_rest = lp2[i].double().exp(), rest2[i].double().exp()
        term = (p_top * (p_top.log() - q_top.log())).sum()
        if p_rest > 0:
            term = term + p_rest * (p_rest.log() - q_rest.log())
        terms.append(term)
    total = torch.stack(terms).sum()
    return total / len(terms) if reduction == "mean" else total


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("k", [1, 4])
def test_sparse_forward_kl_matches_float64_reference(k, reduction):
    s = make((2, 5, 16), 29).requires_grad_()
    t = make((2, 5, 16), 30)
    mask = make_mask((2, 5), 31)
    ids, lp, rest = sparse_teacher(t, k, T)
    loss = sparse_forward_kl(s, ids, lp, rest, mask, T, reduction=reduction, chunk_rows=3)
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    want = ref_sparse(s64, ids, lp, rest, mask, T, reduction)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-7)
    assert_grad_close(s.grad, s64.grad)
    # coarsening cannot increase a KL (data-processing inequality)
    dense = forward_kl(s, t, mask, temperature=T, reduction=reduction)
    assert loss.item() <= dense.item() + 1e-6


def test_sparse_forward_kl_with_all_ids_equals_forward_kl():
    s = make((3, 4, 9), 32).requires_grad_()
    t = make((3, 4, 9), 33)
    mask = make_mask((3, 4), 34)
    ids, lp, _ = sparse_teacher(t, 9, T)
    rest = torch.full(ids.shape[:-1], -math.inf)  # no mass left outside the top-k
    a = sparse_forward_kl(s, ids, lp, rest, mask, T)
    (ga,) = torch.autograd.grad(a, s)
    b = forward_kl(s, t, mask, temperature=T)
    (gb,) = torch.autograd.grad(b, s)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)
    assert torch.isfinite(ga).all()


def test_sparse_forward_kl_keeps_only_the_student_gradient():
    s = make((6, 40), 35).requires_grad_()
    ids, lp, rest = sparse_teacher(make((6, 40), 36), 5, 1.0)
    loss, saved = _saved_tensors(lambda a, _: sparse_forward_kl(a, ids, lp, rest, chunk_rows=4), s, None)
    assert not any(_aliases(x, (s, ids, lp, rest)) for x in saved)
    assert sum(x.numel() for x in saved) == s.numel()


def test_sparse_forward_kl_rejects_mismatched_shapes():
    s = make((2, 3, 8), 37)
    ids, lp, rest = sparse_teacher(make((2, 3, 8), 38), 2, 1.0)
    with pytest.raises(ValueError, match="rest_logprob"):
        sparse_forward_kl(s, ids, lp, rest[:, :2])


# ---------------------------------------------------------------------------------------------
# Dispatch and argument errors.
# ---------------------------------------------------------------------------------------------

def test_kd_loss_dispatches_each_name_to_its_function():
    s, t = make((2, 3, 8), 39), make((2, 3, 8), 40)
    mask = make_mask((2, 3), 41)
    assert kd_loss("forward_kl", s, t, mask, temperature=T, beta=0.9).item() == forward_kl(s, t, mask, temperature=T).item()
    assert kd_loss("reverse_kl", s, t, mask, temperature=T, beta=0.9).item() == reverse_kl(s, t, mask, temperature=T).item()
    assert kd_loss("tvd", s, t, mask, temperature=T, beta=0.9).item() == tvd(s, t, mask, temperature=T).item()
    assert (kd_loss("jsd", s, t, mask, temperature=T, beta=0.9).item()
            == generalized_jsd(s, t, mask, beta=0.9, temperature=T).item())
    assert len({kd_loss(k, s, t, mask, temperature=T, beta=0.9).item() for k in KINDS}) == 4


@pytest.mark.parametrize("call, match", [
    (lambda s, t: kd_loss("kl", s, t), "forward_kl, reverse_kl, jsd, tvd"),
    (lambda s, t: forward_kl(s, t, temperature=0.0), "temperature"),
    (lambda s, t: forward_kl(s, t, reduction="batchmean"), "reduction"),
    (lambda s, t: generalized_jsd(s, t, beta=1.5), "beta"),
])
def test_bad_settings_raise_user_error(call, match):
    s, t = make((2, 5), 42), make((2, 5), 43)
    with pytest.raises(UserError, match=match):
        call(s, t)


def test_shape_errors_raise_value_error():
    s, t = make((2, 5), 44), make((2, 6), 45)
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(s, t)
    with pytest.raises(ValueError, match="mask"):
        forward_kl(s, make((2, 5), 46), torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Row/column selection and the fused output layer (divergence_sum, linear_cross_entropy_sum).
# ---------------------------------------------------------------------------------------------

def _selection_case(seed=40):
    """Student hidden states [7, 5] and head [12, 5]; teacher logits [9, 15]; 4 row pairs and 6 column
    pairs in scrambled order (rows and columns do not correspond by index)."""
    h = make((7, 5), seed)
    w = make((12, 5), seed + 1, scale=0.7)
    t = make((9, 15), seed + 2)
    s_rows, t_rows = torch.tensor([5, 0, 3, 6]), torch.tensor([1, 8, 2, 4])
    s_cols, t_cols = torch.tensor([11, 2, 7, 0, 4, 9]), torch.tensor([3, 14, 0, 9, 6, 1])
    return h, w, t, s_rows, t_rows, s_cols, t_cols


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fused", [False, True])
def test_divergence_sum_selection_matches_float64_reference(kind, fused):
    from sakd.losses.divergences import divergence_sum

    h, w, t, s_rows, t_rows, s_cols, t_cols = _selection_case()
    h64, w64, t64 = (x.double().requires_grad_() for x in (h, w, t))
    s64 = h64 @ w64.T
    want = torch.stack([ref_row(kind, s64[i, s_cols], t64[j, t_cols], T, 0.3)
                        for i, j in zip(s_rows.tolist(), t_rows.tolist())]).sum()
    want.backward()
    h, w, t = (x.clone().requires_grad_() for x in (h, w, t))
    if fused:
        got = divergence_sum(kind, h, t, s_rows=s_rows, t_rows=t_rows, s_cols=s_cols, t_cols=t_cols, head_weight=w,
                             temperature=T, beta=0.3, chunk_rows=3)
    else:
        got = divergence_sum(kind, h @ w.T, t, s_rows=s_rows, t_rows=t_rows, s_cols=s_cols, t_cols=t_cols,
                             temperature=T, beta=0.3, chunk_rows=3)
    (2.5 * got).backward()  # an outer factor: backward must scale the stored gradients
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=0)
    for ours_, ref in ((h.grad, h64.grad), (w.grad, w64.grad), (t.grad, t64.grad)):
        assert_grad_close(ours_ / 2.5, ref)
    # Unselected teacher rows and columns get exact zeros.
    assert t.grad[[0, 3, 5, 6, 7]].abs().sum() == 0 and t.grad[:, [2, 4, 5, 7, 8, 10, 11, 12, 13]].abs().sum() == 0


def test_fused_head_equals_logits_path_bitwise_in_value_when_columns_are_all():
    """With every column and row, the fused path and the logits path compute the same chunks."""
    from sakd.losses.divergences import divergence_sum

    h, w, t = make((6, 5), 50), make((15, 5), 51), make((6, 15), 52)
    a = divergence_sum("forward_kl", h, t, head_weight=w, temperature=T, chunk_rows=4)
    b = forward_kl(h @ w.T, t, temperature=T, reduction="sum", chunk_rows=4)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_linear_cross_entropy_matches_float64_reference():
    from sakd.losses.divergences import linear_cross_entropy_sum

    h, w = make((8, 5), 60), make((13, 5), 61)
    rows, targets = torch.tensor([7, 1, 4, 2, 0]), torch.tensor([12, 0, 5, 5, 3])
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    want = torch.nn.functional.cross_entropy((h64 @ w64.T)[rows], targets, reduction="sum")
    want.backward()
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = linear_cross_entropy_sum(h, w, targets, rows, chunk_rows=2)
    got.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=0)
    assert_grad_close(h.grad, h64.grad)
    assert_grad_close(w.grad, w64.grad)
    assert h.grad[[3, 5, 6]].abs().sum() == 0  # rows not scored


def test_divergence_sum_gives_zero_gradient_to_rows_it_does_not_select():
    """Row indices None with more student rows than pairs: the extra rows get an exact 0 gradient, not
    whatever memory the buffer held (torch.empty_like)."""
    from sakd.losses.divergences import divergence_sum

    for _ in range(3):  # fresh allocations: uninitialised memory is not always non-zero on the first try
        junk = torch.full((64, 7), float("nan"))
        del junk
        s = torch.randn(5, 7, dtype=torch.float32, requires_grad=True)
        t = torch.randn(3, 7, dtype=torch.float32)
        divergence_sum("forward_kl", s, t).backward()
        assert torch.equal(s.grad[3:], torch.zeros(2, 7))
        assert s.grad[:3].abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_softmax32_equals_torch_softmax_and_keeps_the_callers_input(temperature):
    """softmax32 (max, exp, sum, divide; the every-position loss's student side) against torch.softmax in float64:
    a fresh float32 tensor for the caller's logits, in place only for a chunk marked ``_owned``."""
    from sakd.losses.divergences import softmax32

    g = torch.Generator().manual_seed(0)
    x = 8.0 * torch.randn(5, 2048, generator=g)
    x[0, :7] = 60.0  # rows far from 0: the max is taken out before exp
    ref = torch.softmax(x.double() / temperature, -1)
    keep = x.clone()
    got = softmax32(x, temperature)
    assert got.dtype == torch.float32 and torch.equal(x, keep)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-9)
    owned = x.clone()
    owned._owned = True
    out = softmax32(owned, temperature)
    assert out.data_ptr() == owned.data_ptr()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-9)
    half = softmax32(x.half(), temperature)  # other dtypes: computed in float32
    assert half.dtype == torch.float32 and torch.allclose(half.double(), ref, atol=2e-3)


@pytest.mark.parametrize("opt_in, index, fused, owned", [
    (False, "rows", False, False),  # a gathered block, a kernel that does not overwrite: rounding kept
    (True, "rows", False, True),
    (True, "cols", False, True),
    (True, None, False, False),     # no index: the block is a view of the caller's tensor
    (False, None, True, True),      # the fused head's logits: computed here
])
def test_row_block_loss_hands_a_kernel_only_blocks_it_may_overwrite(opt_in, index, fused, owned):
    """RowBlockLoss marks block 0 ``_owned`` (log_softmax32 / softmax32 then work in place) where it is fresh and
    the kernel may take it: the fused head's logits for every kernel, a block gathered through a row or column
    index for an ``overwrites_block`` kernel only (log_softmax32 in place rounds otherwise than torch's). The
    caller's tensors are never modified."""
    from sakd.losses.divergences import log_softmax32
    from sakd.losses.row_blocks import RowBlockLoss, overwrites_block

    seen = []

    def kernel(parts, T, need):
        seen.append(bool(getattr(parts[0], "_owned", False)))
        return -log_softmax32(parts[0], T)[:, 0], (None,)

    if opt_in:
        kernel = overwrites_block(kernel)
    x = make((6, 4), 28) if fused else make((6, 9), 26)  # the fused head: the last hidden state [rows, H]
    weight = make((9, 4), 27) if fused else None          # [V, H]
    rows, cols = torch.tensor([5, 0, 3, 2]), torch.tensor([0, 4, 8])
    ix = {"rows": (rows, None), "cols": (None, cols), None: (None, None)}[index]
    n = 4
    keep = x.clone()
    total = RowBlockLoss.apply(kernel, 1, (ix,), n, 3, 2.0, weight, x)
    assert seen == [owned, owned] and torch.equal(x, keep)
    logits = x if weight is None else x @ weight.T
    logits = logits if ix[0] is None else logits[ix[0]]
    logits = logits[:n] if ix[1] is None else logits[:n, ix[1]]
    ref = -torch.log_softmax(logits.double() / 2.0, -1)[:, 0].sum()
    assert math.isclose(float(total), float(ref), rel_tol=1e-6)
