"""projected_kl (sakd/losses/projected.py, sakd/align/classes.py) against a float64 reference written the
slow, obvious way: enumerate the teacher's tokens and every offset, compare byte strings, build the classes
from φ's image by hand, sum the student's probabilities bucket by bucket.

Hand-made pair: a byte-level BPE teacher whose pre-tokenizer splits ``"\\n"`` from letters and splits a
multi-byte character (``cafÃ`` + ``©``), and a Metaspace student with byte fallback (``<0xNN>`` for 東, 京
and 🙂) whose tokens merge across the teacher's boundaries (``"\\nThe"``, ``",\\n"``, ``"é▁"``): tokens outside
φ's image, positions inside teacher tokens (k > 0) and running past them (the realised path)."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from batches import (bpe_spec, byte_level_teacher, metaspace_student, phi_ref as _phi_ref, start_id as _start,
                     text_batch)
from sakd.align.classes import build_classes
from sakd.align.mapping import build_tables
from sakd.align.tokens import align, encode_with_bytes
from sakd.align.vocab import token_strings
from sakd.losses.divergences import forward_kl
from sakd.losses.mapped import mapped_coverage, mapped_positions
from sakd.losses.projected import KINDS, cached_projected_kd, projected_kd
from sakd.teacher_cache.builder import mapped_fields

TEXTS = ["The café,\nThe theatre said thé\nAnd me.", "naïve 東京 🙂 the thé atre,\nThe end\n\nAnd"]


def teacher_tokenizer() -> PreTrainedTokenizerFast:
    return byte_level_teacher(["the", " the", " theatre", "The", "caf", " caf", " said", " sa", "th", "at", "re",
                               " atre", " na", "ïve", " thé", "And", " me", " end", "\n\n"])


def student_tokenizer() -> PreTrainedTokenizerFast:
    return metaspace_student(list("abcdefghijklmnopqrstuvwxyzATE") + ["▁", "é", "ï", "\n", ",", ".", "N", "d"],
                             ["▁the", "▁th", "ea", "tre", "▁ca", "▁sa", "id", "▁na", "ve", "▁t", "he", "é▁", "\nThe",
                              ",\n", "\nAnd", "▁me.", "▁me", "The", "▁end", "\n\n"])


def gemma_style_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece with byte fallback as Gemma 3's tokenizer.json has it: spaces normalised to ``▁``, no
    prefix space, and ``"\\n"`` / ``"\\n\\n"`` as added (not special) tokens, which have no vocabulary bytes."""
    chars = list("abcdefghijklmnopqrstuvwxyzATE") + ["▁", "é", "ï", ",", ".", "N", "d"]
    words = ["▁the", "th", "▁ca", "fé", "▁sa", "id", "The", "▁me", "And", "▁end", "re"]
    base = [f"<0x{b:02X}>" for b in range(256)] + list(dict.fromkeys(chars))
    spec = bpe_spec(words, base, ["<pad>", "<bos>", "<eos>"])
    tok = Tokenizer(models.BPE(vocab=spec["vocab"], merges=spec["merges"], byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    tok.add_tokens(["\n", "\n\n"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def pair():
    s_tok, t_tok = student_tokenizer(), teacher_tokenizer()
    tables = build_tables(s_tok, t_tok)
    return s_tok, t_tok, tables, build_classes(s_tok, tables)


def _batch(s_tok, t_tok, texts=TEXTS):
    return text_batch(s_tok, t_tok, texts)


# ------------------------------------------------------------------------- the slow reference

def _classes_ref(s_tok, t_tok):
    """cls(u): the longest prefix of u's bytes spelt by a token of φ's image (representative: an ordinary
    token over a byte-fallback one, then the lowest id); -1: none."""
    s_str, t_str = token_strings(s_tok), token_strings(t_tok)
    image = set()
    for v, b in enumerate(t_str):
        if b and v < len(t_tok):
            for k in range(len(b)):
                u = _phi_ref(b[k:], s_tok, s_str)
                if u >= 0:
                    image.add(u)

    def rep(bts):
        ids = [u for u in image if s_str[u] == bts]
        return min(ids, key=lambda u: (s_tok.convert_ids_to_tokens(u).startswith("<0x"), u)) if ids else -1

    cls = []
    for u, b in enumerate(s_str):
        c = -1
        if b and u < len(s_tok):
            for n in range(len(b), 0, -1):
                c = rep(b[:n])
                if c >= 0:
                    break
        cls.append(c)
    return cls


def reference(s_logits, t_logits, texts, s_tok, t_tok, kinds=False):
    """Σ_j w_j Σ_B P_j(B) log(P_j(B) / q̄_j(B)) in float64, every candidate enumerated."""
    s_str, t_str = token_strings(s_tok), token_strings(t_tok)
    cls = _classes_ref(s_tok, t_tok)
    t_ok = [i for i, b in enumerate(t_str) if b and i < len(t_tok)]
    t_logits = t_logits[..., :len(t_tok)]
    total = torch.zeros((), dtype=torch.float64)
    by_kind = {k: 0.0 for k in KINDS}
    n = 0
    for x, text in enumerate(texts):
        data = text.encode("utf-8")
        s = encode_with_bytes(s_tok, text, start_token=_start(s_tok))
        t = encode_with_bytes(t_tok, text, start_token=_start(t_tok))
        for (ss, se, ts, te) in align(s, t):
            if any(s_str[s.ids[q]] != data[s.byte_starts[q]:s.byte_ends[q]] for q in range(ss, se)) or any(
                    t_str[t.ids[q]] != data[t.byte_starts[q]:t.byte_ends[q]] for q in range(ts, te)):
                continue
            for j in range(ss, se):
                bj, ej = s.byte_starts[j], s.byte_ends[j]
                i = next(q for q in range(ts, te) if t.byte_starts[q] <= bj < t.byte_ends[q])
                ai, ci = t.byte_starts[i], t.byte_ends[i]
                k, pi = bj - ai, data[ai:bj]
                p = torch.softmax(t_logits[x, i - 1].double(), -1)
                P = {}
                for v in t_ok:
                    if t_str[v].startswith(pi) and len(t_str[v]) > k:
                        u = _phi_ref(t_str[v][k:], s_tok, s_str)
                        if u >= 0:
                            P[cls[u]] = P.get(cls[u], 0.0) + p[v]
                Z = sum(P.values())
                P = {c: m / Z for c, m in P.items()}
                tj = s.ids[j]
                src = cls[_phi_ref(t_str[t.ids[i]][k:], s_tok, s_str)]
                if src != tj:  # the realised path's mass moves from src's label to t_j's
                    mass = p[t.ids[i]] / Z
                    if ej > ci:
                        m = next(q for q in range(ts, te) if t.byte_starts[q] < ej <= t.byte_ends[q])
                        for l in range(i + 1, m):
                            mass = mass * torch.softmax(t_logits[x, l - 1].double(), -1)[t.ids[l]]
                        pm = torch.softmax(t_logits[x, m - 1].double(), -1)
                        mass = mass * sum(pm[v] for v in t_ok if t_str[v].startswith(data[t.byte_starts[m]:ej]))
                    mass = torch.minimum(mass, P.get(src, torch.zeros((), dtype=torch.float64)))
                    P[src] = P.get(src, 0.0) - mass
                    P[tj] = P.get(tj, 0.0) + mass
                q = torch.softmax(s_logits[x, j - 1], -1)
                split = cls[tj] != tj and float(P.get(tj, 0.0)) > 0
                bucket = lambda u: u if (split and u == tj) else cls[u]  # noqa: E731
                qb = {}
                for u in range(q.numel()):
                    b = bucket(u) if u < len(cls) else -1
                    qb[b] = qb.get(b, 0.0) + q[u]
                kl = sum(m * (m.log() - qb[c].log()) for c, m in P.items() if float(m) > 0)
                w = Z if k > 0 else 1.0
                total = total + w * kl
                kind = "one_to_one" if (se - ss == 1 and te - ts == 1) else "chunk_first" if k == 0 else "inside"
                by_kind[kind] += float(torch.as_tensor(w * kl).detach())
                n += 1
    return (total, n, by_kind) if kinds else (total, n)


def _logits(batch, side, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(*batch[f"{side}_ids"].shape, vocab, generator=g)


# ------------------------------------------------------------------------- tests

def test_every_case_occurs(pair):
    """Tokens outside φ's image, k > 0, the realised path over several teacher tokens, split characters,
    byte fallback, and a class whose members merge a newline with the next word."""
    s_tok, t_tok, tables, classes = pair
    batch = _batch(s_tok, t_tok)
    pos = mapped_positions(batch, tables)
    assert (pos.k == 0).any() and (pos.k > 0).any() and pos.ext.any()
    assert int((pos.m - pos.i)[pos.ext].max()) >= 2
    s_str = token_strings(s_tok)
    tj = batch["s_ids"][pos.b, pos.j]
    outside = [s_str[u] for u in tj.tolist() if int(classes.cls[u]) != u]
    assert {b"\nT", b"\nAnd", b" me."} <= set(outside)
    assert int(classes.cls[s_tok.convert_tokens_to_ids("\nAnd")]) == s_tok.convert_tokens_to_ids("\n")
    assert any(s_tok.convert_ids_to_tokens(u).startswith("<0x") for u in tj.tolist())
    assert classes.cls.tolist()[:len(s_tok)] == _classes_ref(s_tok, t_tok)


@pytest.mark.parametrize("fused", [False, True])
def test_loss_and_gradient_match_float64_reference(pair, fused):
    s_tok, t_tok, tables, classes = pair
    batch = _batch(s_tok, t_tok)
    vs, vt = len(s_tok), len(t_tok)
    t_logits = _logits(batch, "t", vt + 5, 1)
    t_logits[..., vt:] = 30.0  # padding columns past the tokenizer: never candidates
    log = {}
    if fused:
        g = torch.Generator().manual_seed(2)
        hidden = torch.randn(*batch["s_ids"].shape, 8, generator=g, requires_grad=True)
        weight = (0.7 * torch.randn(vs + 3, 8, generator=g)).requires_grad_()  # 3 head columns past the tokenizer
        loss, n = projected_kd(hidden, t_logits, batch, tables, classes, t_vocab_size=vt, head_weight=weight,
                               chunk_rows=3, log=log)
        loss.backward()
        h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        ref, n_ref, kinds = reference(h64 @ w64.T, t_logits.double(), TEXTS, s_tok, t_tok, kinds=True)
        ref.backward()
        torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)
        rtol = 1e-5
    else:
        s_logits = _logits(batch, "s", vs, 0).requires_grad_()
        loss, n = projected_kd(s_logits, t_logits, batch, tables, classes, t_vocab_size=vt, chunk_rows=5, log=log)
        loss.backward()
        s64 = s_logits.detach().double().requires_grad_()
        ref, n_ref, kinds = reference(s64, t_logits.double(), TEXTS, s_tok, t_tok, kinds=True)
        ref.backward()
        torch.testing.assert_close(s_logits.grad.double(), s64.grad, rtol=1e-6, atol=1e-7)
        rtol = 1e-6
    assert int(n) == n_ref > 30
    assert math.isclose(float(loss.detach()), float(ref.detach()), rel_tol=rtol)
    for name in KINDS:
        assert int(log[name + "_n"]) > 0
        assert math.isclose(float(log[name]), kinds[name], rel_tol=1e-5, abs_tol=1e-6)


def test_one_tokenizer_is_plain_full_vocabulary_kd():
    s_tok = student_tokenizer()
    tables = build_tables(s_tok, s_tok)
    classes = build_classes(s_tok, tables)
    batch = _batch(s_tok, s_tok)
    v = len(s_tok)
    s_logits = _logits(batch, "s", v, 0).requires_grad_()
    t_logits = _logits(batch, "t", v, 1)
    loss, n = projected_kd(s_logits, t_logits, batch, tables, classes)
    mask = torch.zeros(batch["s_ids"].shape, dtype=torch.bool)
    mask[:, :-1] = (batch["s_chunk"] >= 0)[:, 1:]  # row j - 1 predicts text token j
    ref = forward_kl(s_logits[mask].double(), t_logits[mask].double(), reduction="sum")
    assert int(n) == int(mask.sum())
    assert math.isclose(float(loss.detach()), float(ref.detach()), rel_tol=1e-6)
    cb = _cache_batch(t_logits, batch, tables, v, k=v)
    got, n2 = cached_projected_kd(s_logits, cb, batch, tables, classes)
    assert int(n2) == int(n) and math.isclose(float(got.detach()), float(ref.detach()), rel_tol=1e-5)


def _cache_batch(t_logits, batch, tables, vt, k, temperature=1.0):
    """The fields ``TeacherCache.batch`` serves (exact float32 top-k; sakd/teacher_cache/builder.py)."""
    lp = torch.log_softmax(t_logits[..., :vt].float() / temperature, -1)
    vals, ids = lp.topk(k, -1)
    logz, path = mapped_fields(t_logits, batch, tables, vt=vt, temperature=temperature)
    return {"topk_ids": ids, "topk_logprobs": vals, "mapped_logz": logz, "mapped_path": path}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_cache_equals_the_live_loss_and_the_reference(pair, temperature):
    s_tok, t_tok, tables, classes = pair
    batch = _batch(s_tok, t_tok)
    vs, vt = len(s_tok), len(t_tok)
    t_logits = _logits(batch, "t", vt, 1)
    s_logits = _logits(batch, "s", vs, 0).requires_grad_()
    cb = _cache_batch(t_logits, batch, tables, vt, k=vt, temperature=temperature)
    log = {}
    got, n = cached_projected_kd(s_logits, cb, batch, tables, classes, temperature=temperature, chunk_rows=4,
                                 log=log)
    got.backward()
    s64 = s_logits.detach().double().requires_grad_()
    ref, n_ref = reference(s64 / temperature, t_logits.double() / temperature, TEXTS, s_tok, t_tok)
    ref.backward()
    assert int(n) == n_ref
    assert math.isclose(float(got.detach()), float(ref.detach()), rel_tol=1e-5)
    torch.testing.assert_close(s_logits.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)
    live, _ = projected_kd(s_logits.detach(), t_logits, batch, tables, classes, temperature=temperature)
    assert math.isclose(float(got.detach()), float(live.detach()), rel_tol=1e-5)
    assert sum(int(log[k + "_n"]) for k in KINDS) == n_ref


def test_top_k_cache_is_close_to_the_live_loss_and_keeps_the_gradient_sign(pair):
    s_tok, t_tok, tables, classes = pair
    batch = _batch(s_tok, t_tok)
    vs, vt = len(s_tok), len(t_tok)
    t_logits = 4.0 * _logits(batch, "t", vt, 1)  # peaked: the top 16 hold nearly all the mass
    s_logits = _logits(batch, "s", vs, 0).requires_grad_()
    live, _ = projected_kd(s_logits, t_logits, batch, tables, classes)
    g_live, = torch.autograd.grad(live, s_logits)
    got, _ = cached_projected_kd(s_logits, _cache_batch(t_logits, batch, tables, vt, k=16), batch, tables, classes)
    g_got, = torch.autograd.grad(got, s_logits)
    assert abs(float(got.detach()) - float(live.detach())) < 0.05 * float(live.detach())
    assert float(torch.nn.functional.cosine_similarity(g_got.flatten(), g_live.flatten(), dim=0)) > 0.95


def test_no_suppression_inside_a_class(pair):
    """Moving student probability between two tokens of one class, neither of them a realised token, leaves
    the loss unchanged: only the class total is compared (mapped_kl pushes both towards zero)."""
    s_tok, t_tok, tables, classes = pair
    batch = _batch(s_tok, t_tok)
    vs, vt = len(s_tok), len(t_tok)
    t_logits = _logits(batch, "t", vt, 1)
    s_logits = _logits(batch, "s", vs, 0)
    nl = s_tok.convert_tokens_to_ids("\n")
    pos = mapped_positions(batch, tables)
    realised = set(batch["s_ids"][pos.b, pos.j].tolist())
    members = [u for u in range(vs) if int(classes.cls[u]) == nl and u != nl and u not in realised]
    assert len(members) >= 2  # e.g. "\nAn", "\n\n" outside the texts' tokens
    a, b = members[:2]
    moved = s_logits.clone()
    both = torch.logaddexp(moved[..., a], moved[..., b])
    moved[..., a], moved[..., b] = both + math.log(0.1), both + math.log(0.9)
    base, _ = projected_kd(s_logits, t_logits, batch, tables, classes)
    got, _ = projected_kd(moved, t_logits, batch, tables, classes)
    assert math.isclose(float(got.detach()), float(base.detach()), rel_tol=1e-5)
    # ...and the gradient on a token outside every class's realised bucket is q(u) (1 - P(c)/q̄(c)): equal
    # for two tokens of one class in proportion to their probabilities
    x = s_logits.clone().requires_grad_()
    loss, _ = projected_kd(x, t_logits, batch, tables, classes)
    g, = torch.autograd.grad(loss, x)
    rows = pos.j - 1
    ga, gb = g[pos.b, rows, a], g[pos.b, rows, b]
    qa, qb = torch.softmax(x.detach(), -1)[pos.b, rows, a], torch.softmax(x.detach(), -1)[pos.b, rows, b]
    torch.testing.assert_close(ga / qa, gb / qb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["byte_level", "metaspace", "sentencepiece_byte_fallback"])
def test_every_text_position_gets_a_target_on_every_family(family):
    """Each tokenizer family as the teacher of the Metaspace student and as the student of the byte-level
    teacher: every student position that predicts text has a target, except a chunk opening a text with a
    synthetic prefix space (one per text at most)."""
    make = {"byte_level": teacher_tokenizer, "metaspace": student_tokenizer,
            "sentencepiece_byte_fallback": gemma_style_tokenizer}[family]
    for s_tok, t_tok in ((student_tokenizer(), make()), (make(), teacher_tokenizer())):
        batch = _batch(s_tok, t_tok)
        pos = mapped_positions(batch, build_tables(s_tok, t_tok))
        have = torch.zeros(batch["s_ids"].shape, dtype=torch.bool)
        have[pos.b, pos.j] = True
        text = batch["s_chunk"] >= 0
        text[:, 0] = False
        missing = text & ~have
        # only the chunk opening a text with a synthetic "▁" (no text byte of its own) may go without one
        assert (batch["s_chunk"][missing] == 0).all(), (family, missing.nonzero().tolist())
        assert int(missing.sum()) <= 4
    if family == "sentencepiece_byte_fallback":
        s_tok, t_tok = student_tokenizer(), make()
        batch = _batch(s_tok, t_tok)
        assert t_tok.convert_tokens_to_ids("\n") in batch["t_ids"].flatten().tolist()  # the added "\n" is used
        got, total = mapped_coverage(batch, build_tables(s_tok, t_tok))
        assert total - got == 4  # the student's two synthetic "▁" openings (3 + 1 tokens), as checked above


def test_unsupported_tokens_counts_what_no_target_can_reach(pair):
    """``sakd align``'s mapped_unsupported_student_tokens: tokens outside φ's image (``"\\nT"``, ``" me."``) are
    reached by their class; only positions without a target stay unsupported here."""
    from sakd.losses.projected import unsupported_tokens

    s_tok, t_tok, tables, classes = pair
    batch = _batch(s_tok, t_tok)
    got, total = mapped_coverage(batch, tables)
    un = unsupported_tokens(batch, tables, classes)
    assert un["total"] == total
    assert un["projected"] == total - got
    assert un["outside_image"] >= total - got + 5
    # a student token none of whose prefixes the teacher can name is unsupported
    cut = classes.cls.clone()
    tj = batch["s_ids"][1, 1:].tolist()
    cut[[u for u in range(cut.numel()) if u in tj]] = -1
    cell = torch.where(tables.phi >= 0, cut[tables.phi.clamp(min=0)], torch.full_like(tables.phi, -1))
    from sakd.align.classes import ClassTables
    assert unsupported_tokens(batch, tables, ClassTables(cut, cell))["projected"] > un["projected"]


@pytest.mark.parametrize("cached", [False, True])
def test_the_student_softmax_is_taken_in_place_in_each_gathered_block(pair, cached, monkeypatch):
    """The projected kernels take each row block's softmax in place (no second [rows, V] float32 buffer):
    RowBlockLoss marks the block it gathered ``_owned`` for them (row_blocks.overwrites_block); the caller's
    logits are left as they were."""
    import sakd.losses.projected as projected

    s_tok, t_tok, tables, classes = pair
    batch = _batch(s_tok, t_tok)
    vs, vt = len(s_tok), len(t_tok)
    t_logits = _logits(batch, "t", vt, 1)
    s_logits = _logits(batch, "s", vs, 0).requires_grad_()
    keep = s_logits.detach().clone()
    seen, real = [], projected.softmax32

    def spy(x, T):
        out = real(x, T)
        seen.append(getattr(x, "_owned", False) and out.data_ptr() == x.data_ptr())
        return out

    monkeypatch.setattr(projected, "softmax32", spy)
    if cached:
        cb = _cache_batch(t_logits, batch, tables, vt, k=vt)
        loss, n = cached_projected_kd(s_logits, cb, batch, tables, classes, chunk_rows=7)
    else:
        loss, n = projected_kd(s_logits, t_logits, batch, tables, classes, t_vocab_size=vt, chunk_rows=7)
    loss.backward()
    assert len(seen) == math.ceil(int(n) / 7) > 1 and all(seen)
    assert torch.equal(s_logits.detach(), keep)
