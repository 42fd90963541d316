import math

import pytest
import torch

from batches import MIXED, identity_batch, make_batch
from sakd.losses.baselines import gold_hybrid_loss, truncation_kd, uld_loss
from sakd.losses.crosstok import (
    chunk_likelihood_loss,
    chunk_logprobs,
    log1mexp,
    one_to_one_positions,
    shared_vocab_kd,
)
from sakd.losses.divergences import kd_loss
from sakd_test_helpers import mean_loss

VS, VT = 11, 13
SHARED_S = torch.tensor([3, 1, 7, 2, 9, 10])
SHARED_T = torch.tensor([5, 12, 0, 8, 4, 1])


def _logits(batch, side, vocab, seed, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*batch[f"{side}_ids"].shape, vocab, generator=g)).to(dtype)


def _one_to_one_chunks(batch):
    out = []
    B, C = batch["chunk_mask"].shape
    for b in range(B):
        for c in range(C):
            ns = int(batch["chunk_s_end"][b, c] - batch["chunk_s_start"][b, c])
            nt = int(batch["chunk_t_end"][b, c] - batch["chunk_t_start"][b, c])
            if batch["chunk_mask"][b, c] and ns == 1 and nt == 1:
                out.append((b, int(batch["chunk_s_start"][b, c]) - 1, int(batch["chunk_t_start"][b, c]) - 1))
    return out


# ------------------------------------------------------------------ shared_vocab_kd

@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_identical_tokenizers_equal_plain_full_vocab_kd(name):
    """One tokenizer on both sides: shared = arange(V), chunk k = token k. The loss must be
    plain KD over every predicting position, value and gradient."""
    V = 11
    batch = identity_batch([6, 4, 1], vocab=V)
    s = _logits(batch, "s", V, 1).requires_grad_()
    t = torch.cat([_logits(batch, "t", V, 2), torch.full((3, 7, 3), 50.0)], -1)  # 3 padding columns
    got, n, outside = shared_vocab_kd(s, t, batch, torch.arange(V), torch.arange(V), divergence=name,
                                      temperature=2.0, beta=0.3, t_vocab_size=V)
    s2 = s.detach().clone().requires_grad_()
    want = kd_loss(name, s2[:, :-1], t[:, :-1, :V], batch["s_mask"][:, 1:], temperature=2.0, beta=0.3,
                   reduction="sum")
    assert int(n) == 11 == int(batch["s_mask"][:, 1:].sum())
    # Bitwise: the same rows, in the same order, through the same kernel.
    assert torch.equal(got, want)
    assert outside.item() == 0.0
    got.backward()
    want.backward()
    assert torch.equal(s.grad, s2.grad)


def test_shared_vocab_kd_matches_float64_reference():
    batch = make_batch(MIXED)
    s = _logits(batch, "s", VS, 3)
    t = _logits(batch, "t", VT, 4)
    t = torch.cat([t, torch.full((*t.shape[:2], 2), 9.0)], -1)  # 2 padding columns
    got, n, outside = shared_vocab_kd(s, t, batch, SHARED_S, SHARED_T, temperature=1.5, t_vocab_size=VT)
    rows = _one_to_one_chunks(batch)
    total, mass = 0.0, 0.0
    for b, ps, pt in rows:
        log_q = torch.log_softmax(s[b, ps, SHARED_S].double() / 1.5, -1)
        log_p = torch.log_softmax(t[b, pt, SHARED_T].double() / 1.5, -1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        p_full = torch.softmax(t[b, pt, :VT].double(), -1)
        mass += 1.0 - float(p_full[SHARED_T].sum())
    assert int(n) == len(rows) == 4
    assert got.item() == pytest.approx(total, rel=1e-5)
    assert outside.item() == pytest.approx(mass / len(rows), rel=1e-5)
    assert mean_loss(got, n).item() == pytest.approx(total / len(rows), rel=1e-5)


def test_shared_vocab_kd_reads_only_one_to_one_positions_and_shared_columns():
    batch = make_batch(MIXED)
    s, t = _logits(batch, "s", VS, 5), _logits(batch, "t", VT, 6)
    base = shared_vocab_kd(s, t, batch, SHARED_S, SHARED_T)[0].item()
    # Example 0: 1:1 chunks are predicted by student rows 0, 3, 7. Row 1 predicts the first token
    # of the 2:1 chunk, row 2 its second token: neither is read.
    s2 = s.clone()
    s2[0, 1] += torch.randn(VS)
    s2[0, 2] += torch.randn(VS)
    s2[:, :, 0] += 100.0                  # column 0 is not shared
    assert shared_vocab_kd(s2, t, batch, SHARED_S, SHARED_T)[0].item() == pytest.approx(base, rel=1e-6)
    s3 = s.clone()
    s3[0, 0, SHARED_S[0]] += 1.0          # row 0 predicts the first (1:1) chunk
    assert shared_vocab_kd(s3, t, batch, SHARED_S, SHARED_T)[0].item() != pytest.approx(base, rel=1e-4)


def test_teacher_mass_outside_hand_value():
    batch = make_batch([[(1, 1)]])
    s = torch.zeros(1, 2, 5)
    t = torch.zeros(1, 2, 6)
    t[0, 0, 5] = 100.0                    # padding column: must be ignored
    _, n, outside = shared_vocab_kd(s, t, batch, torch.tensor([0, 1]), torch.tensor([2, 3]), t_vocab_size=5)
    assert int(n) == 1
    assert outside.item() == pytest.approx(3 / 5, rel=1e-6)  # uniform over 5, 2 shared


def test_one_to_one_positions():
    batch = make_batch(MIXED)
    b, s_pos, t_pos = one_to_one_positions(batch)
    assert list(zip(b.tolist(), s_pos.tolist(), t_pos.tolist())) == [
        (b_, ps, pt) for b_, ps, pt in _one_to_one_chunks(batch)]
    # Example 0: chunks (1,1) (2,1) (1,1) (1,3) (2,2) (1,1): 1:1 chunks start at s 1, 4, 8 and t 1, 3, 9;
    # example 1: (1,1) (1,2) (3,1): only its first chunk.
    assert b.tolist() == [0, 0, 0, 1]
    assert s_pos.tolist() == [0, 3, 7, 0] and t_pos.tolist() == [0, 2, 8, 0]


# ------------------------------------------------------------------ ALM

def test_chunk_logprobs_off_by_one_hand_example():
    """Token k is scored by the logits at k - 1."""
    rows = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]]).log()
    logits = rows[None]                                   # [1, 4, 3]
    ids = torch.tensor([[0, 1, 2, 0]])                    # start, then tokens 1, 2, 0
    token_chunk = torch.tensor([[-1, 0, 1, 1]])           # chunk 0 = token 1, chunk 1 = tokens 2, 3
    lp = chunk_logprobs(logits, ids, token_chunk, 2)
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.25), math.log(0.3 * 0.2)]]))
    # Restricting to chunk 1 leaves chunk 0 at 0.
    lp1 = chunk_logprobs(logits, ids, token_chunk, 2, select=torch.tensor([[False, True]]))
    torch.testing.assert_close(lp1, torch.tensor([[0.0, math.log(0.06)]]))


def test_chunk_logprobs_gradient_and_padding_columns():
    batch = make_batch(MIXED)
    logits = _logits(batch, "t", VT + 2, 7, dtype=torch.float64).requires_grad_()
    C = batch["chunk_mask"].shape[1]

    def f(x):
        return chunk_logprobs(x, batch["t_ids"], batch["t_chunk"], C, vocab_size=VT, chunk_rows=3)

    assert torch.autograd.gradcheck(f, (logits,))
    f(logits).sum().backward()
    assert logits.grad[..., VT:].abs().max() == 0     # padding columns get no gradient
    # Reference value: log_softmax over the first VT columns, row k-1 scores token k.
    ref = torch.zeros(2, C, dtype=torch.float64)
    lsm = torch.log_softmax(logits.detach()[..., :VT], -1)
    for b in range(2):
        for k in range(1, logits.shape[1]):
            c = int(batch["t_chunk"][b, k])
            if c >= 0:
                ref[b, c] += lsm[b, k - 1, batch["t_ids"][b, k]]
    torch.testing.assert_close(f(logits.detach()), ref)


def test_log1mexp_is_stable():
    x64 = torch.tensor([-1e-7, -1e-3, -0.5, -math.log(2), -1.0, -20.0, -80.0], dtype=torch.float64)
    ref = torch.log(-torch.expm1(x64))
    x32 = x64.float().requires_grad_()
    y = log1mexp(x32)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-30)
    y.sum().backward()
    assert torch.isfinite(x32.grad).all()


def _alm_reference(s, t, batch, tau, only_multi, weight, subtract, eps=1e-6):
    """float64, loops: chunk log-probs from log_softmax, then the binary CE / KL formula."""
    B, C = batch["chunk_mask"].shape
    ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    total, wsum = 0.0, 0
    for b in range(B):
        for c in range(C):
            if not batch["chunk_mask"][b, c]:
                continue
            s0, s1 = int(batch["chunk_s_start"][b, c]), int(batch["chunk_s_end"][b, c])
            t0, t1 = int(batch["chunk_t_start"][b, c]), int(batch["chunk_t_end"][b, c])
            if only_multi and s1 - s0 == 1 and t1 - t0 == 1:
                continue
            lps = sum(float(ls[b, k - 1, batch["s_ids"][b, k]]) for k in range(s0, s1))
            lpt = sum(float(lt[b, k - 1, batch["t_ids"][b, k]]) for k in range(t0, t1))
            p, q = math.exp(min(lpt, 0) / tau - eps), math.exp(min(lps, 0) / tau - eps)
            val = -(p * math.log(q) + (1 - p) * math.log(1 - q))
            if subtract:
                val += p * math.log(p) + (1 - p) * math.log(1 - p)
            w = {"student_tokens": s1 - s0, "teacher_tokens": t1 - t0, "chunks": 1}[weight]
            total += w * val
            wsum += w
    return total, wsum


@pytest.mark.parametrize("weight", ["student_tokens", "teacher_tokens", "chunks"])
@pytest.mark.parametrize("only_multi,subtract", [(True, True), (False, False), (True, False)])
def test_alm_matches_float64_reference(weight, only_multi, subtract):
    batch = make_batch(MIXED)
    s, t = _logits(batch, "s", VS, 8, torch.float64), _logits(batch, "t", VT, 9, torch.float64)
    for tau in (100.0, 2.0):
        got, n = chunk_likelihood_loss(s, t, batch, temperature=tau, only_multi=only_multi, weight=weight,
                                       subtract_entropy=subtract)
        want, wsum = _alm_reference(s, t, batch, tau, only_multi, weight, subtract)
        assert int(n) == wsum
        assert got.item() == pytest.approx(want, rel=1e-9)


def test_alm_zero_value_and_gradient_when_student_equals_teacher():
    batch = make_batch([[(2, 2), (1, 1), (3, 3)], [(1, 1), (2, 2)]], s_vocab=VS, t_vocab=VS, same_ids=True)
    t = _logits(batch, "t", VS, 10, torch.float64)
    s = t.clone().requires_grad_()
    kl, n = chunk_likelihood_loss(s, t, batch)
    assert int(n) == 2 + 3 + 2                       # multi chunks only, weighted by student tokens
    assert kl.item() == pytest.approx(0.0, abs=1e-12)
    kl.backward()
    assert s.grad.abs().max().item() < 1e-12
    s.grad = None
    bce, _ = chunk_likelihood_loss(s, t, batch, subtract_entropy=False)
    assert bce.item() > 0.01                         # the teacher's binary entropy, weighted
    bce.backward()
    assert s.grad.abs().max().item() < 1e-12         # ... which is still the minimum
    # Away from equality the binary KL is positive and pulls the student toward the teacher.
    s2 = (t + 0.5 * torch.randn_like(t)).requires_grad_()
    assert chunk_likelihood_loss(s2, t, batch)[0].item() > 0


def test_alm_float32_is_stable_at_tau_100():
    batch = make_batch(MIXED)
    s = _logits(batch, "s", VS, 11, scale=8.0).requires_grad_()
    t = _logits(batch, "t", VT, 12, scale=8.0)
    got, _ = chunk_likelihood_loss(s, t, batch)
    want, _ = _alm_reference(s.detach(), t, batch, 100.0, True, "student_tokens", True)
    assert got.item() == pytest.approx(want, rel=2e-3, abs=1e-6)
    got.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_alm_only_multi_skips_one_to_one_chunks():
    batch = identity_batch([4, 2])
    s, t = _logits(batch, "s", 11, 13), _logits(batch, "t", 11, 14)
    got, n = chunk_likelihood_loss(s, t, batch)
    assert int(n) == 0 and got.item() == 0.0
    assert mean_loss(got, n).item() == 0.0
    _, n_all = chunk_likelihood_loss(s, t, batch, only_multi=False)
    assert int(n_all) == 6


# ------------------------------------------------------------------ baselines

def test_uld_hand_value():
    batch = make_batch([[(1, 1)]])
    s = torch.zeros(1, 2, 2)
    t = torch.zeros(1, 2, 3)
    s[0, 0] = torch.tensor([0.3, 0.7]).log()
    t[0, 0] = torch.tensor([0.5, 0.2, 0.3]).log()
    loss, n = uld_loss(s, t, batch["s_mask"], batch["t_mask"])
    # sorted: (0.7, 0.3, 0) vs (0.5, 0.3, 0.2) -> 0.2 + 0 + 0.2
    assert int(n) == 1 and loss.item() == pytest.approx(0.4, abs=1e-6)


def test_uld_is_position_by_index_and_permutation_invariant():
    batch = make_batch([[(1, 1), (2, 1), (1, 3)], [(1, 2)]])   # student 4 / 1 tokens, teacher 5 / 2
    s, t = _logits(batch, "s", VS, 15), _logits(batch, "t", VT, 16)
    loss, n = uld_loss(s, t, batch["s_mask"], batch["t_mask"])
    total, count = 0.0, 0
    for b, m in ((0, 4), (1, 1)):                              # min(student, teacher) text tokens
        for k in range(m):
            q = torch.softmax(s[b, k].double(), -1).sort(descending=True).values
            p = torch.softmax(t[b, k].double(), -1).sort(descending=True).values
            total += float((torch.nn.functional.pad(q, (0, VT - VS)) - p).abs().sum())
            count += 1
    assert int(n) == count == 5
    assert loss.item() == pytest.approx(total, rel=1e-5)
    perm = torch.randperm(VT, generator=torch.Generator().manual_seed(0))
    assert uld_loss(s, t[..., perm], batch["s_mask"], batch["t_mask"])[0].item() == pytest.approx(
        loss.item(), rel=1e-6)
    # aligned=True reads the 1:1 chunks only: example 0 chunk 0.
    la, na = uld_loss(s, t, batch["s_mask"], batch["t_mask"], aligned=True, batch=batch)
    q = torch.softmax(s[0, 0].double(), -1).sort(descending=True).values
    p = torch.softmax(t[0, 0].double(), -1).sort(descending=True).values
    assert int(na) == 1
    assert la.item() == pytest.approx(float((torch.nn.functional.pad(q, (0, VT - VS)) - p).abs().sum()), rel=1e-5)


def test_gold_matches_float64_reference():
    batch = make_batch(MIXED)
    s, t = _logits(batch, "s", VS, 17), _logits(batch, "t", VT, 18)
    rest_s = [i for i in range(VS) if i not in SHARED_S.tolist()]
    rest_t = [i for i in range(VT) if i not in SHARED_T.tolist()]
    for beta in (0.5, 0.0, 1.0):
        got, n = gold_hybrid_loss(s, t, batch, SHARED_S, SHARED_T, beta=beta, temperature=2.0)
        w_m = len(SHARED_T) / VT
        total = 0.0
        for b, ps, pt in _one_to_one_chunks(batch):
            q = torch.softmax(s[b, ps].double() / 2.0, -1)
            p = torch.softmax(t[b, pt].double() / 2.0, -1)
            qm, pm = q[SHARED_S], p[SHARED_T]
            mix = beta * pm + (1 - beta) * qm
            if beta == 0:
                jsd = float((pm * (pm / qm).log()).sum())
            elif beta == 1:
                jsd = float((qm * (qm / pm).log()).sum())
            else:
                jsd = beta * float((pm * (pm / mix).log()).sum()) + (1 - beta) * float((qm * (qm / mix).log()).sum())
            qs = q[rest_s].sort(descending=True).values
            pt_ = p[rest_t].sort(descending=True).values
            l1 = float((torch.nn.functional.pad(qs, (0, len(rest_t) - len(rest_s))) - pt_).abs().sum())
            total += w_m * jsd + (1 - w_m) * l1
        assert int(n) == 4
        assert got.item() == pytest.approx(total, rel=1e-5)


def test_gold_with_identical_vocabularies_is_jsd():
    V = 11
    batch = identity_batch([5, 3], vocab=V)
    s, t = _logits(batch, "s", V, 19), _logits(batch, "t", V, 20)
    got, n = gold_hybrid_loss(s, t, batch, torch.arange(V), torch.arange(V), beta=0.5)
    want = kd_loss("jsd", s[:, :-1], t[:, :-1], batch["s_mask"][:, 1:], beta=0.5, reduction="sum")
    assert int(n) == 8
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_truncation_kd_is_id_by_id_and_wrong_under_a_vocabulary_permutation():
    """The teacher has the student's vocabulary in another id order (plus extra tokens). The
    shared-vocabulary loss sees identical distributions; truncation compares unrelated ids."""
    V = 11
    batch = identity_batch([5, 3], vocab=V)
    s = _logits(batch, "s", V, 21)
    perm = torch.randperm(VT, generator=torch.Generator().manual_seed(1))[:V]  # student id i = teacher id perm[i]
    t = torch.full((2, 6, VT), -1e4)
    t[..., perm] = s
    right, _, outside = shared_vocab_kd(s, t, batch, torch.arange(V), perm)
    assert right.item() == pytest.approx(0.0, abs=1e-5) and outside.item() < 1e-6
    wrong, n = truncation_kd(s, t, batch["s_mask"])
    assert int(n) == 8 and wrong.item() > 1.0
    want = kd_loss("forward_kl", s[:, :-1], t[:, :-1, :V], batch["s_mask"][:, 1:], reduction="sum")
    assert wrong.item() == pytest.approx(want.item(), rel=1e-6)
