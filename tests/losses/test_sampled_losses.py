"""The KD losses from a sampled teacher cache (sakd/teacher_cache/sampled.py) are unbiased, for shared_kl,
mapped_kl and projected_kl, on the hand-made pair of tests/losses/test_projected.py (positions inside teacher
tokens, the realised path, tokens outside φ's image), at T = 2.

Exactly: each loss's student gradient is an AFFINE function of the per-id teacher weights w (count / N for a
draw), and at w = p_T it is the full-distribution gradient (float64 reference). With E[count / N] = p_T
(tests/teacher_cache/test_sampled_codec.py) that is E[gradient] = full gradient. Tested: a decoded draw gives
the gradient of its dense weights; g(α w1 + (1 - α) w2) = α g(w1) + (1 - α) g(w2) for two draws; g(p_T) = the
float64 reference.

Statistically (shared_kl, projected_kl): with ḡ the mean of R draws' gradients and g the exact one,
E‖ḡ - g‖² = Σ_e Var(g_e) / R for an unbiased estimator (a bias b adds ‖b‖², which does not shrink with R);
r = ‖ḡ - g‖² / (Σ_e var̂_e / R), var̂ from the same draws, is ~1. A top-12 cache (the same number of ids, the
head renormalised: biased) gives r far above the bound on the same statistic. mapped_kl is left to the exact
test: inside a teacher token its target is p(v) / Z_j over the candidates, and draws from the unconditional
p hit them with probability Z_j per draw, so the estimator's variance grows like 1 / Z_j and R = 300 draws
leave rows where no candidate but t_i (exact) was ever drawn (docs/performance.md)."""

from __future__ import annotations

import math

import pytest
import torch

from sakd.align.vocab import build_vocab_map
from sakd.losses.cached import cached_shared_kd
from sakd.losses.cached_mapped import cached_mapped_kd
from sakd.losses.crosstok import one_to_one_positions
from sakd.losses.mapped import mapped_kd
from sakd.losses.projected import cached_projected_kd
from sakd.teacher_cache import sampled
from sakd.teacher_cache.builder import mapped_fields
from tests.losses.test_projected import TEXTS, _batch, _logits, pair, reference  # noqa: F401 (pair: a fixture)

T, N, R = 2.0, 12, 300
BOUND = 1.6  # r for an unbiased estimator: 1 on average


class Draws:
    """The exact fields of a sampled cache batch for ``t_logits``, and ``R`` independent draws of its ids."""

    def __init__(self, t_logits, batch, tables, vt, shared_t, seed):
        self.lp = torch.log_softmax(t_logits[..., :vt].double() / T, -1)      # [B, Lt, vt]
        B, Lt, _ = self.lp.shape
        shared = self.shared = torch.zeros(vt, dtype=torch.bool)
        shared[shared_t] = True
        own = torch.zeros(B, Lt, dtype=torch.float64)
        own[:, 1:] = self.lp[:, :-1].gather(2, batch["t_ids"][:, 1:, None]).squeeze(2)
        logz, path = mapped_fields(t_logits, batch, tables, vt=vt, temperature=T)
        inf = torch.full((B, Lt), -math.inf)
        self.fixed = {"rest_logprob": inf, "shared_rest_logprob": inf, "token_logprob_T": own.float(),
                      "shared_logmass": torch.logsumexp(self.lp.masked_fill(~shared, -math.inf), -1).float(),
                      "mapped_logz": logz, "mapped_path": path}
        flat = self.lp.flatten(0, 1).repeat(R, 1)
        u = torch.rand(flat.shape[0], N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        data, n = sampled.encode_entries(sampled.draw(flat, u), vt, N)
        ids, lp = sampled.decode_entries(data, n, flat.shape[0], vt, N)  # through the cache's own codec
        self.ids, self.dlp = ids.view(R, B, Lt, N), lp.view(R, B, Lt, N)

    def batch(self, r: int) -> dict:
        return {"topk_ids": self.ids[r], "topk_logprobs": self.dlp[r], **self.fixed}


    def dense(self, w: torch.Tensor) -> dict:
        """The cache batch of per-id weights w [B, Lt, vt] (every id a slot; log w, -inf where 0)."""
        B, Lt, vt = w.shape
        return {"topk_ids": torch.arange(vt).expand(B, Lt, vt), "topk_logprobs": w.float().log(), **self.fixed}

    def weights(self, r: int) -> torch.Tensor:
        """Draw r as dense weights count / N [B, Lt, vt]."""
        B, Lt, _ = self.lp.shape
        return torch.zeros_like(self.lp).scatter_add_(2, self.ids[r], self.dlp[r].double().exp())

    def top(self, k: int) -> dict:
        """An exact top-k cache batch (the top-k code path: the head renormalised with the exact rests)."""
        vals, ids = self.lp.topk(k, -1)
        off = self.lp.scatter(-1, ids, -math.inf)
        return {"topk_ids": ids, "topk_logprobs": vals.float(), "rest_logprob": torch.logsumexp(off, -1).float(),
                "shared_rest_logprob": torch.logsumexp(off.masked_fill(~self.shared, -math.inf), -1).float(),
                "mapped_logz": self.fixed["mapped_logz"], "mapped_path": self.fixed["mapped_path"]}


def _grad(loss_fn, s_logits, cb) -> torch.Tensor:
    s = s_logits.detach().clone().requires_grad_()
    loss, _ = loss_fn(s, cb)
    return torch.autograd.grad(loss, s)[0].double().flatten()


def _statistic(loss_fn, s_logits, draws) -> torch.Tensor:
    return torch.stack([_grad(loss_fn, s_logits, draws.batch(r)) for r in range(R)])


def _ratio(g, ref) -> float:
    mean, var = g.mean(0), g.var(0)
    return float(((mean - ref) ** 2).sum() / (var.sum() / g.shape[0]))


@pytest.fixture(scope="module")
def setup(pair):
    s_tok, t_tok, tables, classes = pair
    batch = _batch(s_tok, t_tok)
    vs, vt = len(s_tok), len(t_tok)
    vocab = build_vocab_map(s_tok, t_tok)
    t_logits = 1.5 * _logits(batch, "t", vt, 1)
    s_logits = _logits(batch, "s", vs, 0)
    draws = Draws(t_logits, batch, tables, vt, vocab.shared_t, seed=3)
    return {"batch": batch, "tables": tables, "classes": classes, "vocab": vocab, "t": t_logits, "s": s_logits,
            "draws": draws, "pair": pair}


def _shared_ref(s, t, batch, vocab):
    """Dense shared-vocabulary forward KL at the 1:1 chunks, float64."""
    b, sp, tp = one_to_one_positions(batch)
    p = torch.log_softmax(t[b, tp][:, vocab.shared_t].double() / T, -1)
    q = torch.log_softmax(s[b, sp][:, vocab.shared_s] / T, -1)
    return (p.exp() * (p - q)).sum()


def _losses(setup):
    """name -> (loss_fn(s_logits, cache_batch), float64 reference gradient)."""
    s, batch, tables, classes, vocab = (setup[k] for k in ("s", "batch", "tables", "classes", "vocab"))
    s_tok, t_tok = setup["pair"][:2]
    refs = {}
    for name in ("shared_kl", "mapped_kl", "projected_kl"):
        s64 = s.double().requires_grad_()
        if name == "shared_kl":
            loss = _shared_ref(s64, setup["t"], batch, vocab)
        elif name == "mapped_kl":
            loss = mapped_kd(s64, setup["t"].double(), batch, tables, temperature=T)[0]
        else:
            loss = reference(s64 / T, setup["t"].double() / T, TEXTS, s_tok, t_tok)[0]
        refs[name] = torch.autograd.grad(loss, s64)[0].flatten()
    fns = {"shared_kl": lambda x, cb: cached_shared_kd(x, cb, batch, vocab.shared_s, vocab.shared_t, temperature=T),
           "mapped_kl": lambda x, cb: cached_mapped_kd(x, cb, batch, tables, temperature=T),
           "projected_kl": lambda x, cb: cached_projected_kd(x, cb, batch, tables, classes, temperature=T)}
    return {k: (fns[k], refs[k]) for k in fns}


@pytest.mark.parametrize("name", ["shared_kl", "mapped_kl", "projected_kl"])
def test_gradient_is_affine_in_the_weights_and_exact_at_p(setup, name):
    fn, ref = _losses(setup)[name]
    d, s = setup["draws"], setup["s"]
    assert float(ref.abs().sum()) > 1.0
    torch.testing.assert_close(_grad(fn, s, d.dense(d.lp.exp())), ref, rtol=1e-5, atol=1e-6)  # w = p_T
    for r in (0, 1):  # a decoded draw (N slots) = the dense form of its weights
        torch.testing.assert_close(_grad(fn, s, d.batch(r)), _grad(fn, s, d.dense(d.weights(r))), rtol=1e-5,
                                   atol=1e-6)
    w1, w2, a = d.weights(0), d.weights(1), 0.3
    mix = _grad(fn, s, d.dense(a * w1 + (1 - a) * w2))
    torch.testing.assert_close(mix, a * _grad(fn, s, d.dense(w1)) + (1 - a) * _grad(fn, s, d.dense(w2)),
                               rtol=1e-5, atol=1e-6)
    assert float((_grad(fn, s, d.dense(w1)) - ref).abs().max()) > 1e-3  # one draw is not the mean


@pytest.mark.parametrize("name", ["shared_kl", "projected_kl"])
def test_gradient_averaged_over_draws_matches_the_full_gradient(setup, name):
    fn, ref = _losses(setup)[name]
    g = _statistic(fn, setup["s"], setup["draws"])
    r_sampled = _ratio(g, ref)
    assert r_sampled < BOUND, r_sampled
    g_top = _grad(fn, setup["s"], setup["draws"].top(N))  # deterministic: its bias is all of ‖ḡ - g‖²
    r_top = float(((g_top - ref) ** 2).sum() / (g.var(0).sum() / R))
    assert r_top > 5 * BOUND, r_top  # 15 for shared_kl
