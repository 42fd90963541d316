"""GOLD's hybrid ULD baseline from a top-k teacher cache (``cached.cached_gold_kd``), float64: with k = V_t it
is the live ``baselines.gold_hybrid_loss`` (value and student gradient); with k < V_t it is GOLD against the
top-k-truncated teacher (log p kept on the top-k, probability 0 elsewhere, not renormalised), written out
here the slow way, and it stays within the docstring's bound of the full-logit loss."""

import math

import pytest
import torch

from batches import make_batch
from sakd.errors import UserError
from sakd.losses.baselines import gold_hybrid_loss
from sakd.losses.cached import cached_gold_kd
from sakd.losses.crosstok import one_to_one_positions

VS, VT, T = 11, 13, 2.0
SHARED_S = torch.tensor([3, 1, 7, 2, 9, 10])
SHARED_T = torch.tensor([5, 12, 0, 8, 4, 1])
# 1:1 chunks (13 of them, more than one row block at chunk_rows=5) among 1:n, n:1 and padding
CHUNKS = [[(1, 1)] * 6 + [(2, 1)] + [(1, 1)] * 3 + [(1, 2)], [(1, 1), (1, 2), (1, 1), (3, 1), (1, 1), (1, 1)]]


def _inputs(seed: int):
    batch = make_batch(CHUNKS, s_vocab=VS, t_vocab=VT)
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(*batch["s_ids"].shape, VS, generator=g, dtype=torch.float64)).requires_grad_()
    t = 2 * torch.randn(*batch["t_ids"].shape, VT, generator=g, dtype=torch.float64)
    return batch, s, t


def _cache_batch(t_logits, k: int) -> dict:
    """What the cache stores at every teacher position (float64 here): the top-k ids and their log p at T."""
    vals, ids = torch.log_softmax(t_logits / T, -1).topk(k, dim=-1)
    return {"topk_ids": ids, "topk_logprobs": vals}


def _truncated_reference(s, t, batch, k: int, beta: float):
    """GOLD written out per 1:1 position against p̃ = p_T on its top-k ids, 0 elsewhere (float64, autograd)."""
    rest_s = [i for i in range(VS) if i not in SHARED_S.tolist()]
    rest_t = [i for i in range(VT) if i not in SHARED_T.tolist()]
    w_m = len(SHARED_T) / VT
    total = s.new_zeros(())
    for e, ps, pt in zip(*[x.tolist() for x in one_to_one_positions(batch)]):
        q = torch.softmax(s[e, ps] / T, -1)
        p = torch.softmax(t[e, pt] / T, -1)
        top = p.topk(k).indices
        p = torch.zeros_like(p).index_copy(0, top, p[top])  # the truncated teacher: not renormalised
        qm, pm = q[SHARED_S], p[SHARED_T]
        on = pm > 0  # 0 · log 0 = 0
        if beta == 0:
            jsd = (pm[on] * (pm[on] / qm[on]).log()).sum()
        else:
            mix = beta * pm + (1 - beta) * qm
            jsd = beta * (pm[on] * (pm[on] / mix[on]).log()).sum() + (1 - beta) * (qm * (qm / mix).log()).sum()
        qs = q[rest_s].sort(descending=True).values
        pr = p[rest_t].sort(descending=True).values
        l1 = (torch.nn.functional.pad(qs, (0, len(rest_t) - len(rest_s))) - pr).abs().sum()
        total = total + w_m * jsd + (1 - w_m) * l1
    return total


@pytest.mark.parametrize("beta", [0.5, 0.0, 0.3])
def test_full_vocabulary_cache_is_the_live_loss(beta):
    batch, s, t = _inputs(1)
    live, n_live = gold_hybrid_loss(s, t, batch, SHARED_S, SHARED_T, temperature=T, beta=beta)
    (g_live,) = torch.autograd.grad(live, s)
    got, n = cached_gold_kd(s, _cache_batch(t, VT), batch, SHARED_S, SHARED_T, vt=VT, temperature=T, beta=beta,
                            chunk_rows=5)
    (g_got,) = torch.autograd.grad(got, s)
    assert int(n) == int(n_live) == 13
    assert got.dtype == live.dtype == torch.float64 and live.item() > 0.1
    assert got.item() == pytest.approx(live.item(), rel=1e-6)
    torch.testing.assert_close(g_got, g_live, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("beta", [0.5, 0.0, 0.3])
def test_top_k_cache_is_gold_against_the_truncated_teacher(beta):
    batch, s, t = _inputs(2)
    k = 4
    got, n = cached_gold_kd(s, _cache_batch(t, k), batch, SHARED_S, SHARED_T, vt=VT, temperature=T, beta=beta,
                            chunk_rows=5)
    (g_got,) = torch.autograd.grad(got, s)
    want = _truncated_reference(s, t, batch, k, beta)
    (g_want,) = torch.autograd.grad(want, s)
    assert int(n) == 13
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-12)
    assert g_got.abs().sum() > 0


def test_top_k_cache_stays_within_the_documented_bound():
    """|cached - full-logit GOLD| <= Σ_rows w_m beta U (1 + ln(1/beta) + ln(S/U)) + w_u (R - U), U / R the
    teacher's shared / all mass outside the top-k (cached.cached_gold_kd's docstring); the gap is not 0."""
    batch, s, t = _inputs(3)
    beta, k = 0.5, 4
    full = gold_hybrid_loss(s, t, batch, SHARED_S, SHARED_T, temperature=T, beta=beta)[0].item()
    got = cached_gold_kd(s, _cache_batch(t, k), batch, SHARED_S, SHARED_T, vt=VT, temperature=T, beta=beta)[0].item()
    w_m = len(SHARED_T) / VT
    bound = 0.0
    for e, _, pt in zip(*[x.tolist() for x in one_to_one_positions(batch)]):
        p = torch.softmax(t[e, pt] / T, -1)
        off = torch.ones(VT, dtype=torch.bool)
        off[p.topk(k).indices] = False
        shared = torch.zeros(VT, dtype=torch.bool)
        shared[SHARED_T] = True
        u, r = float(p[off & shared].sum()), float(p[off].sum())
        if u > 0:
            bound += w_m * beta * u * (1 + math.log(1 / beta) + math.log(len(SHARED_T) / u))
        bound += (1 - w_m) * (r - u)
    assert 1e-3 < abs(got - full) <= bound


def test_sampled_cache_is_refused_and_no_one_to_one_chunk_is_an_attached_zero():
    batch, s, t = _inputs(4)
    cb = {**_cache_batch(t, 4), "shared_logmass": torch.zeros(t.shape[:2])}
    with pytest.raises(UserError, match="sampled"):
        cached_gold_kd(s, cb, batch, SHARED_S, SHARED_T, vt=VT, temperature=T)
    none = make_batch([[(2, 1), (1, 2)]], s_vocab=VS, t_vocab=VT)
    s0 = torch.randn(1, none["s_ids"].shape[1], VS, dtype=torch.float64, requires_grad=True)
    t0 = torch.randn(1, none["t_ids"].shape[1], VT, dtype=torch.float64)
    got, n = cached_gold_kd(s0, _cache_batch(t0, 4), none, SHARED_S, SHARED_T, vt=VT, temperature=T)
    assert int(n) == 0 and got.item() == 0.0 and got.requires_grad


def test_gold_row_block_follows_chunk_rows_up_to_its_ceiling():
    from sakd.losses.baselines import GOLD_CHUNK_ROWS, gold_chunk_rows
    assert GOLD_CHUNK_ROWS == 256
    assert gold_chunk_rows(1024) == 256 and gold_chunk_rows(257) == 256
    assert gold_chunk_rows(64) == 64 and gold_chunk_rows(256) == 256
