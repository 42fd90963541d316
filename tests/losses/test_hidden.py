import pytest
import torch
import torch.nn.functional as F

from batches import MIXED, identity_batch, make_batch
from sakd.errors import UserError
from sakd.losses.hidden import HiddenProjector, hidden_state_loss, layer_map


def test_layer_map_uniform_hand_values():
    assert layer_map(4, 8) == [(1, 2), (2, 4), (3, 6), (4, 8)]
    assert layer_map(3, 4) == [(1, 1), (2, 3), (3, 4)]          # 1.33 -> 1, 2.67 -> 3
    assert layer_map(4, 6) == [(1, 2), (2, 3), (3, 5), (4, 6)]  # 1.5 -> 2 and 4.5 -> 5: half-up
    assert layer_map(2, 2) == [(1, 1), (2, 2)]


def test_layer_map_n_pairs_and_explicit():
    assert layer_map(4, 8, n_pairs=2) == [(2, 4), (4, 8)]
    assert layer_map(4, 8, n_pairs=3) == [(1, 2), (3, 6), (4, 8)]  # round(4/3)=1, round(8/3)=3
    assert layer_map(4, 8, pairs=[(0, 0), (4, 8)]) == [(0, 0), (4, 8)]
    with pytest.raises(UserError, match="out of range"):
        layer_map(4, 8, pairs=[(5, 1)])
    with pytest.raises(UserError):
        layer_map(4, 8, n_pairs=5)


def _states(batch, n_layers, dim, side, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ids = batch[f"{side}_ids"]
    return tuple(torch.randn(*ids.shape, dim, generator=g, dtype=dtype) for _ in range(n_layers + 1))


@torch.no_grad()
def _reference(s_hidden, t_hidden, batch, projector, pairs, kind):
    """Slow and obvious: loop over examples and chunks, read the chunk table directly."""
    total, n = 0.0, 0
    B, C = batch["chunk_mask"].shape
    for b in range(B):
        for c in range(C):
            if not batch["chunk_mask"][b, c]:
                continue
            ps, pt = int(batch["chunk_s_end"][b, c]) - 1, int(batch["chunk_t_end"][b, c]) - 1
            acc = 0.0
            for i, j in pairs:
                lin = projector.proj[HiddenProjector.key((i, j))]
                hs = lin.weight.double() @ s_hidden[i][b, ps].double() + lin.bias.double()
                ht = t_hidden[j][b, pt].double()
                if kind == "mse":
                    acc += float(((hs - ht) ** 2).sum() / ht.numel())
                else:
                    acc += 1.0 - float(hs @ ht / (hs.norm() * ht.norm()))
            total += acc / len(pairs)
            n += 1
    return total, n


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_matches_float64_reference(kind):
    batch = make_batch(MIXED)
    pairs = layer_map(2, 4)
    torch.manual_seed(0)
    proj = HiddenProjector(6, 5, pairs).double()
    s_h, t_h = _states(batch, 2, 6, "s", 1), _states(batch, 4, 5, "t", 2)
    got, n = hidden_state_loss(s_h, t_h, batch, proj, pairs, kind=kind)
    want, want_n = _reference(s_h, t_h, batch, proj, pairs, kind)
    assert int(n) == want_n == 9
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_zero_for_identical_states_with_identity_projector():
    batch = identity_batch([5, 3])
    pairs = layer_map(2, 2)
    proj = HiddenProjector(4, 4, pairs, identity_init=True).double()
    s_h = tuple(h.requires_grad_() for h in _states(batch, 2, 4, "s", 3))
    t_h = tuple(h.detach().clone() for h in s_h)
    for kind in ("mse", "cosine"):
        loss, n = hidden_state_loss(s_h, t_h, batch, proj, pairs, kind=kind)
        assert int(n) == 8
        assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss, _ = hidden_state_loss(s_h, t_h, batch, proj, pairs, kind="mse")
    loss.backward()
    assert all(h.grad is None or h.grad.abs().max() < 1e-12 for h in s_h)


def test_reads_only_the_last_token_of_each_chunk():
    """Teacher states equal to the student's at chunk ends only: loss 0; changing a
    state inside a multi-token chunk changes nothing, changing a chunk end does."""
    batch = make_batch(MIXED)
    pairs = [(1, 1)]
    proj = HiddenProjector(3, 3, pairs, identity_init=True).double()
    s_h = _states(batch, 1, 3, "s", 4)
    t_h = list(_states(batch, 1, 3, "t", 5))
    m = batch["chunk_mask"]
    b, c = m.nonzero(as_tuple=True)
    t_h[1][b, batch["chunk_t_end"][b, c] - 1] = s_h[1][b, batch["chunk_s_end"][b, c] - 1]
    assert hidden_state_loss(s_h, t_h, batch, proj, pairs)[0].item() == pytest.approx(0.0, abs=1e-12)
    # Example 0, chunk 1 covers student tokens 2..3 (end 4): token 2 is inside, token 3 is the end.
    inside = [h.clone() for h in s_h]
    inside[1][0, 2] += 10.0
    assert hidden_state_loss(inside, t_h, batch, proj, pairs)[0].item() == pytest.approx(0.0, abs=1e-12)
    end = [h.clone() for h in s_h]
    end[1][0, 3] += 1.0
    assert hidden_state_loss(end, t_h, batch, proj, pairs)[0].item() == pytest.approx(1.0, rel=1e-9)  # (1²+1²+1²)/3


def test_gradients_reach_student_and_projector_not_teacher():
    batch = make_batch(MIXED)
    pairs = [(1, 2), (2, 3)]
    proj = HiddenProjector(4, 6, pairs)
    assert set(proj.proj.keys()) == {"s1_t2", "s2_t3"}
    s_h = tuple(torch.randn(*batch["s_ids"].shape, 4, requires_grad=True) for _ in range(3))
    t_h = tuple(torch.randn(*batch["t_ids"].shape, 6, requires_grad=True) for _ in range(4))
    loss, _ = hidden_state_loss(s_h, t_h, batch, proj, pairs, kind="cosine")
    loss.backward()
    assert s_h[1].grad.abs().sum() > 0 and s_h[2].grad.abs().sum() > 0
    assert s_h[0].grad is None  # layer 0 is in no pair
    assert all(t.grad is None for t in t_h)
    assert proj.proj["s1_t2"].weight.grad.abs().sum() > 0


def test_float32_mse_hand_value():
    # One example, one 1:1 chunk, D=2: student end state (1, 2), teacher (3, 2) -> ((1-3)^2 + 0) / 2 = 2.
    batch = make_batch([[(1, 1)]])
    s = torch.zeros(1, 2, 2)
    t = torch.zeros(1, 2, 2)
    s[0, 1] = torch.tensor([1.0, 2.0])
    t[0, 1] = torch.tensor([3.0, 2.0])
    loss, n = hidden_state_loss((s, s), (t, t), batch, None, [(1, 1)])
    assert loss.item() == 2.0 and int(n) == 1
    cos, _ = hidden_state_loss((s, s), (t, t), batch, None, [(1, 1)], kind="cosine")
    assert cos.item() == pytest.approx(1 - F.cosine_similarity(s[0, 1], t[0, 1], dim=0).item(), abs=1e-7)
