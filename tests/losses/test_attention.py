import pytest
import torch

from batches import MIXED, identity_batch, make_batch
from sakd.errors import UserError
from sakd.losses.attention import attention_transfer_loss, chunk_attention


def _causal_attention(mask, heads, seed, dtype=torch.float64):
    """Random softmax attention [B, H, L, L], causal, padded keys masked (as HF does)."""
    g = torch.Generator().manual_seed(seed)
    B, L = mask.shape
    scores = torch.randn(B, heads, L, L, generator=g, dtype=dtype)
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & mask[:, None, None, :]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)


def _reference_chunk_attention(attn, ends, token_chunk, chunk_mask):
    """Slow and obvious: loops over query chunks, key tokens."""
    B, H, L, _ = attn.shape
    C = ends.shape[1]
    out = torch.zeros(B, C, C, dtype=torch.float64)
    for b in range(B):
        for q in range(C):
            if not chunk_mask[b, q]:
                continue
            row = attn[b, :, int(ends[b, q])].double().mean(0)
            for x in range(L):
                k = int(token_chunk[b, x])
                if k >= 0:
                    out[b, q, k] += row[x]
            out[b, q] /= out[b, q].sum()
    return out


def test_hand_example():
    # start token + 2 one-token chunks; one head.
    attn = torch.tensor([[[[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.5, 0.2, 0.3]]]])
    got = chunk_attention(attn, torch.tensor([[1, 2]]), torch.tensor([[-1, 0, 1]]), torch.tensor([[True, True]]))
    # row of chunk 0: start mass dropped -> [1, 0]; row of chunk 1: (0.2, 0.3) / 0.5.
    torch.testing.assert_close(got, torch.tensor([[[1.0, 0.0], [0.4, 0.6]]]))


def test_multi_token_key_chunks_add_their_mass():
    # Chunk 0 = tokens 1, 2; chunk 1 = token 3; two heads averaged.
    attn = torch.zeros(1, 2, 4, 4)
    attn[0, 0, 3] = torch.tensor([0.4, 0.1, 0.2, 0.3])
    attn[0, 1, 3] = torch.tensor([0.0, 0.3, 0.3, 0.4])
    attn[0, :, 2] = torch.tensor([0.5, 0.25, 0.25, 0.0])
    got = chunk_attention(attn, torch.tensor([[2, 3]]), torch.tensor([[-1, 0, 0, 1]]), torch.tensor([[True, True]]))
    # query chunk 1, head mean over tokens: [0.2, 0.2, 0.25, 0.35] -> chunk 0: 0.45, chunk 1: 0.35, / 0.8
    torch.testing.assert_close(got[0, 1], torch.tensor([0.45 / 0.8, 0.35 / 0.8]))
    torch.testing.assert_close(got[0, 0], torch.tensor([1.0, 0.0]))


def test_rows_are_distributions_over_earlier_chunks_and_match_reference():
    batch = make_batch(MIXED)
    for side in ("s", "t"):
        attn = _causal_attention(batch[f"{side}_mask"], 3, seed=1)
        ends = batch[f"chunk_{side}_end"] - 1
        got = chunk_attention(attn, ends, batch[f"{side}_chunk"], batch["chunk_mask"])
        want = _reference_chunk_attention(attn, ends, batch[f"{side}_chunk"], batch["chunk_mask"])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        m = batch["chunk_mask"]
        torch.testing.assert_close(got.sum(-1)[m], torch.ones(int(m.sum()), dtype=torch.float64))
        assert got[~m].abs().max() == 0                                   # padded query chunks
        assert torch.triu(got, diagonal=1).abs().max() == 0              # no key chunk after the query
        assert (got >= 0).all()


def _reference_loss(s_attn, t_attn, batch, pairs):
    total = 0.0
    m = batch["chunk_mask"]
    per_pair = []
    for i, j in pairs:
        p = _reference_chunk_attention(t_attn[j - 1], batch["chunk_t_end"] - 1, batch["t_chunk"], m)
        q = _reference_chunk_attention(s_attn[i - 1], batch["chunk_s_end"] - 1, batch["s_chunk"], m)
        kl = torch.zeros(m.shape, dtype=torch.float64)
        for b in range(m.shape[0]):
            for c in range(m.shape[1]):
                for k in range(m.shape[1]):
                    if p[b, c, k] > 0:
                        kl[b, c] += p[b, c, k] * torch.log(p[b, c, k] / q[b, c, k])
        per_pair.append(kl)
    total = (sum(per_pair) / len(pairs))[m].sum()
    return float(total), int(m.sum())


def test_loss_matches_float64_reference():
    batch = make_batch(MIXED)
    s_attn = tuple(_causal_attention(batch["s_mask"], 2, seed=10 + i) for i in range(2))
    t_attn = tuple(_causal_attention(batch["t_mask"], 4, seed=20 + i) for i in range(3))
    pairs = [(1, 2), (2, 3)]
    got, n = attention_transfer_loss(s_attn, t_attn, batch, pairs)
    want, want_n = _reference_loss(s_attn, t_attn, batch, pairs)
    assert int(n) == want_n == 9
    assert got.item() == pytest.approx(want, rel=1e-10)
    assert got.item() > 0


def test_zero_for_identical_attention_under_identity_alignment():
    batch = identity_batch([6, 3])
    attn = tuple(_causal_attention(batch["s_mask"], 2, seed=30 + i).requires_grad_() for i in range(2))
    same = tuple(a.detach().clone() for a in attn)
    loss, n = attention_transfer_loss(attn, same, batch, [(1, 1), (2, 2)])
    assert int(n) == 9
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert max(a.grad.abs().max().item() for a in attn) < 1e-12


def test_gradient_reaches_student_only_and_layer_zero_is_rejected():
    batch = make_batch(MIXED)
    s_attn = (_causal_attention(batch["s_mask"], 2, seed=40).float().requires_grad_(),)
    t_attn = (_causal_attention(batch["t_mask"], 2, seed=41).float().requires_grad_(),)
    loss, _ = attention_transfer_loss(s_attn, t_attn, batch, [(1, 1)])
    loss.backward()
    assert s_attn[0].grad.abs().sum() > 0 and t_attn[0].grad is None
    with pytest.raises(UserError, match=">= 1"):
        attention_transfer_loss(s_attn, t_attn, batch, [(0, 1)])


def test_with_a_tiny_hugging_face_model():
    """The real input format: eager attentions of a tiny Llama on a padded batch."""
    from transformers import AutoModelForCausalLM

    from sakd.models.tiny import llama_config

    batch = identity_batch([6, 3])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(11, hidden=16, layers=2, heads=2, intermediate=32),
                                             attn_implementation="eager")
    out = model(input_ids=batch["s_ids"], attention_mask=batch["s_mask"].long(), output_attentions=True,
                output_hidden_states=True)
    assert len(out.attentions) == 2 and len(out.hidden_states) == 3
    a = chunk_attention(out.attentions[1].detach(), batch["chunk_s_end"] - 1, batch["s_chunk"], batch["chunk_mask"])
    m = batch["chunk_mask"]
    torch.testing.assert_close(a.sum(-1)[m], torch.ones(int(m.sum())))
    loss, n = attention_transfer_loss(out.attentions, out.attentions, batch, [(1, 1), (2, 2)])
    assert int(n) == 9 and abs(loss.item()) < 1e-6
