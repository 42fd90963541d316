import math

import pytest
import torch
from torch import nn

from sakd.losses.contrastive import info_nce, mean_pool


def test_mean_pool_excludes_start_and_padding():
    hidden = torch.tensor([[[100.0], [1.0], [3.0], [-50.0]],
                           [[100.0], [4.0], [-50.0], [-50.0]]])
    token_chunk = torch.tensor([[-1, 0, 1, -1], [-1, 0, -1, -1]])  # start, text..., padding
    torch.testing.assert_close(mean_pool(hidden, token_chunk >= 0), torch.tensor([[2.0], [4.0]]))
    assert mean_pool(hidden, torch.zeros(2, 4, dtype=torch.bool)).abs().max() == 0  # empty row: zeros


def test_hand_case_batch_of_two():
    eye = torch.eye(2)
    # Orthonormal pairs, tau = 1: logits = I, each row -log(e / (e + 1)).
    loss, n = info_nce(eye, eye, None, temperature=1.0)
    assert int(n) == 2
    assert loss.item() == pytest.approx(2 * math.log(1 + math.exp(-1)), rel=1e-6)
    loss, _ = info_nce(eye, eye, None, temperature=0.5)
    assert loss.item() == pytest.approx(2 * math.log(1 + math.exp(-2)), rel=1e-6)
    # Both students point at teacher 0: logits rows (1, 0), (1, 0).
    s = torch.tensor([[2.0, 0.0], [3.0, 0.0]])                  # norms differ: cosine ignores them
    row = math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))
    assert info_nce(s, eye, None, temperature=1.0)[0].item() == pytest.approx(row, rel=1e-6)
    # Columns (1, 1) and (0, 0): each column's CE is log 2.
    sym = info_nce(s, eye, None, temperature=1.0, symmetric=True)[0].item()
    assert sym == pytest.approx(0.5 * (row + 2 * math.log(2)), rel=1e-6)


def _reference(s, t, proj, tau, symmetric):
    """float64, loops."""
    with torch.no_grad():
        tp = [proj.weight.double() @ t[j].double() + proj.bias.double() for j in range(t.shape[0])]
        B = s.shape[0]
        sim = torch.zeros(B, B, dtype=torch.float64)
        for i in range(B):
            for j in range(B):
                a, b = s[i].double(), tp[j]
                sim[i, j] = (a @ b) / (a.norm() * b.norm()) / tau
        rows = sum(-(sim[i, i] - torch.logsumexp(sim[i], 0)) for i in range(B))
        if not symmetric:
            return float(rows)
        cols = sum(-(sim[i, i] - torch.logsumexp(sim[:, i], 0)) for i in range(B))
        return float(0.5 * (rows + cols))


@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_float64_reference_with_projection(symmetric):
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 6)
    proj = nn.Linear(6, 4)
    got, n = info_nce(s, t, proj, temperature=0.07, symmetric=symmetric)
    assert int(n) == 5
    assert got.item() == pytest.approx(_reference(s, t, proj, 0.07, symmetric), rel=1e-5)
    got64, _ = info_nce(s.double(), t.double(), proj.double(), temperature=0.07, symmetric=symmetric)
    assert got64.dtype == torch.float64
    assert got64.item() == pytest.approx(_reference(s, t, proj, 0.07, symmetric), rel=1e-12)


def test_gradients_reach_student_and_projector_not_teacher():
    torch.manual_seed(1)
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 6, requires_grad=True)
    proj = nn.Linear(6, 4)
    info_nce(s, t, proj)[0].backward()
    assert s.grad.abs().sum() > 0 and proj.weight.grad.abs().sum() > 0
    assert t.grad is None


def test_matched_pairs_beat_shuffled_pairs():
    """Student vectors equal to their own teacher's: loss near its floor; shuffling the pairs raises it."""
    torch.manual_seed(2)
    t = torch.randn(8, 16)
    good = info_nce(t, t, None, temperature=0.07)[0].item()
    bad = info_nce(t[torch.randperm(8)], t, None, temperature=0.07)[0].item()
    assert good < 0.5 < bad
