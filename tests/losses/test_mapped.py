"""mapped_kl (sakd/losses/mapped.py, sakd/align/mapping.py) against a float64 reference written the slow,
obvious way: enumerate the teacher's tokens, compare byte strings.

The two tokenizers are hand-made so that every case occurs: a byte-level BPE teacher whose tokens
split a multi-byte character (``cafÃ`` + ``©`` for "café"), and a SentencePiece-style student with
``▁`` tokens and byte fallback (``<0xNN>``); student tokens start inside teacher tokens (k > 0) and
run past their ends (the realised-path extension)."""

from __future__ import annotations

import math

import pytest
import torch

from sakd.align.mapping import build_tables
from sakd.align.tokens import align, encode_with_bytes
from sakd.align.vocab import token_strings
from sakd.losses.divergences import forward_kl
from sakd.losses.mapped import mapped_coverage, mapped_kd, mapped_positions

from batches import byte_level_teacher, metaspace_student, phi_ref as _phi_ref, text_batch

TEXTS = ["the café theatre said thé", "naïve 東京 🙂 the thé atre"]


def teacher_tokenizer():
    return byte_level_teacher(["the", " the", " theatre", "caf", " caf", " said", " sa", "th", "at", "re", " atre",
                               " na", "ïve", " thé"])


def student_tokenizer():
    return metaspace_student(list("abcdefghijklmnopqrstuvwxyz") + ["▁", "é", "ï"],
                             ["▁the", "▁th", "ea", "tre", "▁ca", "▁sa", "id", "▁na", "ve", "▁t", "he", "é▁"])


@pytest.fixture(scope="module")
def pair():
    return student_tokenizer(), teacher_tokenizer()


def _batch(s_tok, t_tok, texts=TEXTS):
    return text_batch(s_tok, t_tok, texts)


# ------------------------------------------------------------------------- the slow reference

def reference(s_logits, t_logits, texts, s_tok, t_tok, extend=True, only_one_to_one=False, prefix_weight=False,
              divergence="forward_kl", beta=0.5):
    """Σ_j D(Q_j ‖ q_j) in float64 (D: KL, or the generalized JSD / TVD written out), enumerating teacher tokens
    for every student position."""
    s_str, t_str = token_strings(s_tok), token_strings(t_tok)
    t_ok = [i for i, b in enumerate(t_str) if b and i < len(t_tok)]
    t_logits = t_logits[..., :len(t_tok)]  # padding columns name no token
    total = torch.zeros((), dtype=torch.float64)
    n = 0
    for x, text in enumerate(texts):
        data = text.encode("utf-8")
        s = encode_with_bytes(s_tok, text, start_token=s_tok.bos_token_id)
        t = encode_with_bytes(t_tok, text, start_token=t_tok.eos_token_id)
        for (ss, se, ts, te) in align(s, t):
            if only_one_to_one and (se - ss != 1 or te - ts != 1):
                continue
            # a chunk gets targets only where each token's own bytes are its span (no synthetic space)
            if any(s_str[s.ids[q]] != data[s.byte_starts[q]:s.byte_ends[q]] for q in range(ss, se)) or any(
                    t_str[t.ids[q]] != data[t.byte_starts[q]:t.byte_ends[q]] for q in range(ts, te)):
                continue
            for j in range(ss, se):
                bj, ej = s.byte_starts[j], s.byte_ends[j]
                i = next(q for q in range(ts, te) if t.byte_starts[q] <= bj < t.byte_ends[q])
                ai, ci = t.byte_starts[i], t.byte_ends[i]
                k, pi = bj - ai, data[ai:bj]
                p = torch.softmax(t_logits[x, i - 1].double(), -1)
                Q = torch.zeros(s_logits.shape[-1], dtype=torch.float64)
                for v in t_ok:
                    if t_str[v].startswith(pi) and len(t_str[v]) > k:
                        u = _phi_ref(t_str[v][k:], s_tok, s_str)
                        if u >= 0:
                            Q[u] += p[v]
                Z = Q.sum()
                Q = Q / Z
                src = _phi_ref(t_str[t.ids[i]][k:], s_tok, s_str)
                if extend and (ej > ci or src != s.ids[j]):
                    # the realised teacher token's mass goes to the realised student token's cell
                    mass = p[t.ids[i]] / Z
                    if ej > ci:  # times the rest of the realised path up to e_j
                        m = next(q for q in range(ts, te) if t.byte_starts[q] < ej <= t.byte_ends[q])
                        for l in range(i + 1, m):
                            mass = mass * torch.softmax(t_logits[x, l - 1].double(), -1)[t.ids[l]]
                        pm = torch.softmax(t_logits[x, m - 1].double(), -1)
                        prefix = data[t.byte_starts[m]:ej]
                        mass = mass * sum(pm[v] for v in t_ok if t_str[v].startswith(prefix))
                    Q[src] -= mass
                    Q[s.ids[j]] += mass
                logq = torch.log_softmax(s_logits[x, j - 1], -1)
                keep = Q > 0
                kl = (Q[keep] * (Q[keep].log() - logq[keep])).sum()
                if divergence == "jsd":  # beta KL(Q || m) + (1 - beta) KL(q || m), m = beta Q + (1 - beta) q
                    q = logq.exp()
                    m = beta * Q + (1 - beta) * q
                    kl = beta * (Q[keep] * (Q[keep] / m[keep]).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()
                elif divergence == "tvd":
                    kl = 0.5 * (Q - logq.exp()).abs().sum()
                total = total + (Z * kl if prefix_weight else kl)
                n += 1
    return total, n


# ------------------------------------------------------------------------- tests

def _logits(batch, side, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(*batch[f"{side}_ids"].shape, vocab, generator=g)


def test_every_case_occurs(pair):
    """The hand-made pair exercises k = 0 and k > 0, the extension, and split multi-byte characters."""
    s_tok, t_tok = pair
    batch = _batch(s_tok, t_tok)
    pos = mapped_positions(batch, build_tables(s_tok, t_tok))
    assert (pos.k == 0).any() and (pos.k > 0).any() and pos.ext.any()
    assert int((pos.m - pos.i)[pos.ext].max()) >= 2  # a student token over 3 teacher tokens: a mid-path factor
    t_strs = token_strings(t_tok)
    assert any(b and b.endswith(b"\xc3") for b in (t_strs[i] for i in batch["t_ids"].flatten().tolist()))
    got, total = mapped_coverage(batch, build_tables(s_tok, t_tok))
    assert total - got <= 2  # only the chunks opening each text with a synthetic "▁" get no target


@pytest.mark.parametrize("extend", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_loss_and_gradient_match_float64_reference(pair, extend, fused):
    s_tok, t_tok = pair
    tables = build_tables(s_tok, t_tok)
    batch = _batch(s_tok, t_tok)
    vs, vt = len(s_tok), len(t_tok)
    t_logits = _logits(batch, "t", vt + 5, 1)  # 5 padding columns past the tokenizer: never candidates
    t_logits[..., vt:] = 30.0
    if fused:
        g = torch.Generator().manual_seed(2)
        hidden = torch.randn(*batch["s_ids"].shape, 8, generator=g, requires_grad=True)
        weight = (0.7 * torch.randn(vs, 8, generator=g)).requires_grad_()
        loss, n = mapped_kd(hidden, t_logits, batch, tables, t_vocab_size=vt, extend=extend, head_weight=weight,
                            chunk_rows=3)
        loss.backward()
        h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        ref, n_ref = reference(h64 @ w64.T, t_logits.double(), TEXTS, s_tok, t_tok, extend)
        ref.backward()
        # the fused layer multiplies in float32 (hidden @ W.T and g @ W over 289 columns): 1e-5
        torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)
    else:
        s_logits = _logits(batch, "s", vs, 0).requires_grad_()
        loss, n = mapped_kd(s_logits, t_logits, batch, tables, t_vocab_size=vt, extend=extend, chunk_rows=5)
        loss.backward()
        s64 = s_logits.detach().double().requires_grad_()
        ref, n_ref = reference(s64, t_logits.double(), TEXTS, s_tok, t_tok, extend)
        ref.backward()
        torch.testing.assert_close(s_logits.grad.double(), s64.grad, rtol=1e-6, atol=1e-7)
    assert int(n) == n_ref > 20
    assert math.isclose(float(loss.detach()), float(ref.detach()), rel_tol=1e-6)


def test_target_keeps_all_mass_and_prefers_the_realised_token(pair):
    """A teacher sure of its realised tokens gives a target whose mode is the realised student token."""
    s_tok, t_tok = pair
    tables = build_tables(s_tok, t_tok)
    batch = _batch(s_tok, t_tok)
    vt = len(t_tok)
    t_logits = torch.zeros(*batch["t_ids"].shape, vt)
    t_logits[:, :-1].scatter_(2, batch["t_ids"][:, 1:, None], 40.0)  # row i-1 puts its mass on token i
    from sakd.losses.mapped import MappedTargets

    pos = mapped_positions(batch, tables)
    tgt = MappedTargets(t_logits, batch, pos, tables, len(s_tok), vt, 1.0, True)
    Q, _ = tgt(torch.arange(len(pos)))
    torch.testing.assert_close(Q.sum(-1), torch.ones(len(pos)), rtol=0, atol=1e-5)
    realised = batch["s_ids"][pos.b, pos.j]
    assert (Q.argmax(-1) == realised).float().mean() == 1.0


def test_one_tokenizer_is_plain_full_vocabulary_kd(pair):
    _, t_tok = pair
    tables = build_tables(t_tok, t_tok)
    assert tables.identity
    batch = _batch(t_tok, t_tok)
    V = len(t_tok)
    s_logits = _logits(batch, "s", V, 0).requires_grad_()
    t_logits = _logits(batch, "t", V, 1)
    loss, n = mapped_kd(s_logits, t_logits, batch, tables, chunk_rows=4)
    mask = batch["s_mask"][:, 1:]
    ref = forward_kl(s_logits[:, :-1], t_logits[:, :-1], mask, reduction="sum")
    assert int(n) == int(mask.sum())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


def test_real_pair_tables_cover_the_teacher(real_pair_tables):
    tables, s_tok, t_tok = real_pair_tables
    from sakd.align.mapping import teacher_coverage

    # ordinary Qwen tokens and its 12 non-special added ones (<think>, <tool_call>, ...: they spell their text)
    assert tables.sorted_ids.numel() == 151_643 + 12
    assert teacher_coverage(tables) > 0.999
    assert tables.nbytes() < 200 * 2**20


@pytest.fixture(scope="module")
def real_pair_tables():
    from sakd.models.tokenizers import qwen_tokenizer, smollm2_tokenizer

    s_tok, t_tok = smollm2_tokenizer(), qwen_tokenizer()
    return build_tables(s_tok, t_tok), s_tok, t_tok


def _against_reference(pair, **option):
    """mapped_kd with ``option`` (one_to_one_only / prefix_weight) against the float64 reference with the
    same option: loss and gradient at rtol 1e-6. Returns (tables, batch, loss, logits)."""
    s_tok, t_tok = pair
    tables = build_tables(s_tok, t_tok)
    batch = _batch(s_tok, t_tok)
    vs, vt = len(s_tok), len(t_tok)
    t_logits = _logits(batch, "t", vt, 1)
    s_logits = _logits(batch, "s", vs, 0).requires_grad_()
    loss, n = mapped_kd(s_logits, t_logits, batch, tables, t_vocab_size=vt, chunk_rows=5, **option)
    loss.backward()
    s64 = s_logits.detach().double().requires_grad_()
    ref_option = {"only_one_to_one": option.get("one_to_one_only", False),
                  "prefix_weight": option.get("prefix_weight", False),
                  "divergence": option.get("divergence", "forward_kl"), "beta": option.get("beta", 0.5)}
    ref, n_ref = reference(s64, t_logits.double(), TEXTS, s_tok, t_tok, True, **ref_option)
    ref.backward()
    torch.testing.assert_close(s_logits.grad.double(), s64.grad, rtol=1e-6, atol=1e-7)
    assert int(n) == n_ref > 0 and math.isclose(float(loss.detach()), float(ref.detach()), rel_tol=1e-6)
    return tables, batch, loss.detach(), (s_logits.detach(), t_logits, vt)


def test_one_to_one_positions_only_match_the_reference_restricted_to_one_to_one_chunks(pair):
    """loss.mapped_positions=one_to_one (the ablation): the same targets, at the 1:1 chunks only, which are
    the positions shared_kl uses; against the float64 reference restricted the same way."""
    from sakd.losses.batch import one_to_one_positions

    tables, batch, _, _ = _against_reference(pair, one_to_one_only=True)
    pos = mapped_positions(batch, tables, one_to_one_only=True)
    b, sp, _ = one_to_one_positions(batch)
    mine, shared = set(zip(pos.b.tolist(), (pos.j - 1).tolist())), set(zip(b.tolist(), sp.tolist()))
    # the same positions, but a chunk opening a text with a synthetic "▁" (its bytes are not the text's)
    assert mine <= shared and len(shared - mine) <= len(TEXTS)
    assert 0 < len(pos) < len(mapped_positions(batch, tables))


def test_prefix_weight_matches_the_float64_reference(pair):
    """loss.mapped_prefix_weight: every position's KL times Z, the teacher's probability of the candidates
    consistent with the bytes already seen (1 at k = 0): loss and gradient against the reference."""
    tables, batch, loss, (s_logits, t_logits, vt) = _against_reference(pair, prefix_weight=True)
    plain, _ = mapped_kd(s_logits, t_logits, batch, tables, t_vocab_size=vt, chunk_rows=5)
    assert float(loss) < float(plain)  # Z < 1 somewhere: the weighted sum is smaller


@pytest.mark.parametrize("divergence", ["jsd", "tvd"])
def test_other_divergences_match_the_float64_reference(pair, divergence):
    """loss.divergence jsd (beta 0.5) and tvd on the mapped target: loss and gradient against the reference
    with the same divergence written out (the target's zeros enter as -inf log-probabilities)."""
    _against_reference(pair, divergence=divergence, beta=0.5)


@pytest.mark.parametrize("extend", [True, False])
def test_teacher_hidden_state_and_head_give_the_logits_loss(pair, extend):
    """t_head_weight: the teacher's last hidden state and output layer instead of its logits (only the rows a
    chunk needs are multiplied out): the same loss and gradient as from h @ W.T, padding columns included."""
    s_tok, t_tok = pair
    tables = build_tables(s_tok, t_tok)
    batch = _batch(s_tok, t_tok)
    vs, vt = len(s_tok), len(t_tok)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(*batch["t_ids"].shape, 16, generator=g)
    w = 0.8 * torch.randn(vt + 5, 16, generator=g)  # 5 padding columns past the tokenizer
    s_logits = _logits(batch, "s", vs, 0).requires_grad_()
    ref, n_ref = mapped_kd(s_logits, h @ w.T, batch, tables, t_vocab_size=vt, chunk_rows=4, extend=extend)
    (g_ref,) = torch.autograd.grad(ref, s_logits)
    got, n = mapped_kd(s_logits, h, batch, tables, t_vocab_size=vt, chunk_rows=4, extend=extend, t_head_weight=w)
    (g_got,) = torch.autograd.grad(got, s_logits)
    assert int(n) == int(n_ref) > 20 and int(mapped_positions(batch, tables).ext.sum()) > 0
    assert math.isclose(float(got.detach()), float(ref.detach()), rel_tol=1e-5)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7)
