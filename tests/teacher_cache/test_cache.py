"""The sparse teacher cache: what it stores (against the teacher computed directly, float64),
that the cached losses equal the dense ones when nothing is cut (k = V, float32 codec), its size on
disk, and that a cache built for another run (or by an older sakd) is refused."""

import json
import math

import pytest
import torch

from sakd.data.text import span_data
from sakd.teacher_cache import manifest as tm
from sakd.teacher_cache import reader as tc
from sakd.teacher_cache.builder import build_cache
from sakd.data.text import Collator, pad_id
from sakd.errors import UserError
from sakd.losses.cached import cached_chunk_likelihood, cached_shared_kd
from sakd.losses.crosstok import chunk_likelihood_loss, one_to_one_positions, shared_vocab_kd
from sakd.models.load import load_teacher
from tests.teacher_cache.tiny_cache import QUIET, T, build_tiny_cache
from tests.teacher_cache.tiny_cache import cache_cfg as _cfg


@pytest.fixture(scope="module")
def built(tiny_assets, tmp_path_factory):
    """k=64, packed, several shards (small shard_spans) so that shard boundaries are crossed."""
    built = build_tiny_cache(tiny_assets, tmp_path_factory.mktemp("cache"), "c64", k=64, shard_spans=12)
    return {**built, "teacher": load_teacher(str(tiny_assets["teacher"]), torch.device("cpu"), "float32")}


@pytest.fixture(scope="module")
def built_full(built, tmp_path_factory):
    """k = the whole teacher vocabulary, float32: nothing is cut or rounded."""
    d = tmp_path_factory.mktemp("cache_full")
    vt = len(built["data"].teacher_tok)
    build_cache(built["cfg"], d / "full", k=vt, codec="float32", **QUIET)
    return d / "full"


def _vocab(data):
    from sakd.align.vocab import build_vocab_map

    return build_vocab_map(data.student_tok, data.teacher_tok)


def test_cached_values_equal_the_teacher_computed_directly(built):
    """Decoded packed rows: the top-k ids exactly, log-probs within the 5-bit levels' error, masses
    that sum to 1 with the rest; rests and token log-probs to fp16."""
    data, teacher = built["data"], built["teacher"]
    vt = len(data.teacher_tok)
    shared = torch.zeros(vt, dtype=torch.bool)
    shared[_vocab(data).shared_t] = True
    cache = tc.TeacherCache(built["dir"])
    assert len(cache) == len(data.train) == built["manifest"]["n_spans"]
    assert built["manifest"]["shards"] > 1
    for i in (0, 5, 13, len(data.train) - 1):  # 13: not the first span of its shard
        ids = torch.tensor(data.train[i]["t_ids"])
        with torch.no_grad():  # one span alone, unbatched, float64 from here on
            z = teacher(input_ids=ids[None]).logits[0, :, :vt].double()
        logp = torch.log_softmax(z / T, -1)
        n = ids.numel()
        batch = _batch(data, [i])
        cb = cache.batch([i], n, check=batch)
        top, lp = cb["topk_ids"][0], cb["topk_logprobs"][0].double()
        assert top.shape == (n, 64) and all(len(set(r.tolist())) == 64 for r in top)
        ref_vals, ref_ids = logp.topk(64)
        assert torch.equal(top.sort(-1).values, ref_ids.sort(-1).values)  # the k largest, exactly
        ref = logp.gather(1, top)
        big = ref > ref.max(1, keepdim=True).values - 4  # where the mass is: within e^-4 of the top
        assert ((lp - ref).abs()[big] <= 0.45).all() and ((lp - ref).abs().max(1).values[:, None] >= 0).all()
        assert (lp.exp() - ref.exp()).abs().sum(1).max() <= 0.1  # total variation on the top-k
        rest = torch.log1p(-logp.exp().gather(1, top).sum(1))
        torch.testing.assert_close(cb["rest_logprob"][0].double(), rest, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(lp.exp().sum(1) + rest.exp(), torch.ones(n, dtype=torch.float64), atol=1e-4,
                                   rtol=0)
        in_top = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, top, True)
        shared_rest = torch.log((logp.exp() * (shared & ~in_top)).sum(1))
        torch.testing.assert_close(cb["shared_rest_logprob"][0].double(), shared_rest, atol=2e-3, rtol=2e-3)
        logp1 = torch.log_softmax(z, -1)  # the chunk likelihood reads temperature 1
        want = torch.zeros(n, dtype=torch.float64)
        want[1:] = logp1[torch.arange(n - 1), ids[1:]]
        torch.testing.assert_close(cb["token_logprob"][0].double(), want, atol=2e-3, rtol=1e-3)


def _batch(data, idx):
    return Collator(pad_id(data.student_tok), pad_id(data.teacher_tok))([data.train[i] for i in idx])


def _dense_inputs(built, idx, seed=0):
    data, teacher = built["data"], built["teacher"]
    batch = _batch(data, idx)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["t_ids"], attention_mask=batch["t_mask"].long()).logits
    g = torch.Generator().manual_seed(seed)
    vs = len(data.student_tok)
    s_logits = (3 * torch.randn(*batch["s_ids"].shape, vs, generator=g)).requires_grad_(True)
    return batch, t_logits[..., :len(data.teacher_tok)], s_logits


def test_full_vocabulary_cache_equals_the_dense_losses(built, built_full):
    idx = [3, 0, 17, 40]
    batch, t_logits, s_logits = _dense_inputs(built, idx)
    vocab = _vocab(built["data"])
    cache = tc.TeacherCache(built_full)
    cb = cache.batch(idx, batch["t_ids"].shape[1], check=batch)
    n_o2o = one_to_one_positions(batch)[0].numel()
    assert n_o2o > 20 and int((batch["chunk_mask"].sum())) > n_o2o  # both kinds of chunk occur

    dense, n_dense, _ = shared_vocab_kd(s_logits, t_logits.double(), batch, vocab.shared_s, vocab.shared_t,
                                        divergence="forward_kl", temperature=T)
    (g_dense,) = torch.autograd.grad(dense, s_logits)
    cached, n_cached = cached_shared_kd(s_logits, cb, batch, vocab.shared_s, vocab.shared_t, temperature=T)
    (g_cached,) = torch.autograd.grad(cached, s_logits)
    assert int(n_cached) == int(n_dense) == n_o2o
    assert dense.item() > 1.0
    assert abs(cached.item() - dense.item()) <= 1e-4 * dense.item()
    torch.testing.assert_close(g_cached, g_dense.float(), rtol=1e-4, atol=1e-6)

    for kw in ({"temperature": 10.0}, {"temperature": 1.0, "only_multi": False, "weight": "teacher_tokens"}):
        d_sum, d_w = chunk_likelihood_loss(s_logits, t_logits, batch, **kw)
        (gd,) = torch.autograd.grad(d_sum, s_logits)
        c_sum, c_w = cached_chunk_likelihood(s_logits, cb, batch, **kw)
        (gc,) = torch.autograd.grad(c_sum, s_logits)
        assert int(c_w) == int(d_w) > 0 and d_sum.item() > 0
        assert abs(c_sum.item() - d_sum.item()) <= 1e-4 * d_sum.item()
        torch.testing.assert_close(gc, gd, rtol=1e-4, atol=1e-7)


def test_top64_packed_cache_bounds_the_dense_kd_and_keeps_chunk_likelihood(built):
    """k = 64 coarsens the teacher to 65 buckets: the KL can only shrink (data-processing
    inequality; the 5-bit levels move a little mass between buckets, hence the 1 % slack); the chunk
    likelihood does not depend on k (fp16 rounding only)."""
    idx = [1, 2, 30, 63]
    batch, t_logits, s_logits = _dense_inputs(built, idx, seed=1)
    vocab = _vocab(built["data"])
    cb = tc.TeacherCache(built["dir"]).batch(idx, batch["t_ids"].shape[1], check=batch)
    dense = shared_vocab_kd(s_logits, t_logits, batch, vocab.shared_s, vocab.shared_t, temperature=T)[0]
    cached = cached_shared_kd(s_logits, cb, batch, vocab.shared_s, vocab.shared_t, temperature=T)[0]
    assert 0 < cached.item() <= dense.item() * (1 + 1e-2)
    d_sum = chunk_likelihood_loss(s_logits, t_logits, batch, temperature=10.0)[0]
    c_sum = cached_chunk_likelihood(s_logits, cb, batch, temperature=10.0)[0]
    assert abs(c_sum.item() - d_sum.item()) <= 2e-3 * d_sum.item()


def test_batches_stay_sparse_padded_and_checked(built):
    data = built["data"]
    vt = len(data.teacher_tok)
    idx = [7, 8, 9]
    batch = _batch(data, idx)
    B, Lt = batch["t_ids"].shape
    cb = tc.TeacherCache(built["dir"]).batch(idx, Lt, check=batch)
    assert cb["topk_ids"].shape == (B, Lt, 64) and cb["topk_ids"].dtype == torch.long
    assert cb["topk_logprobs"].shape == (B, Lt, 64) and cb["topk_logprobs"].dtype == torch.float32
    for key in ("rest_logprob", "shared_rest_logprob", "token_logprob"):
        assert cb[key].shape == (B, Lt)
    assert cb["mapped_logz"].shape == cb["mapped_path"].shape == batch["s_ids"].shape
    assert all(vt not in v.shape for v in cb.values() if isinstance(v, torch.Tensor))  # never [.., V]
    assert torch.equal(cb["lengths"], batch["t_mask"].sum(1))
    pad = ~batch["t_mask"]
    assert pad.any()  # spans of different lengths: padding exists and reads "no mass" / 0
    assert (cb["token_logprob"][pad] == 0).all() and torch.isinf(cb["rest_logprob"][pad]).all()
    assert (cb["token_logprob"][:, 0] == 0).all()
    bad = dict(batch, t_ids=batch["t_ids"].clone())
    bad["t_ids"][1, 3] += 1
    with pytest.raises(UserError, match="teacher tokens differ"):
        tc.TeacherCache(built["dir"]).batch(idx, Lt, check=bad)


def test_bytes_per_token_at_k64(built):
    """On disk = the format's arithmetic (+ a few bytes of offsets and headers per span); for the
    real pair's 151,936-column teacher the arithmetic gives <= 160 bytes per teacher token."""
    from sakd.teacher_cache.builder import bytes_per_token
    from sakd.teacher_cache.codec import row_bytes

    m = built["manifest"]
    files = sorted(built["dir"].glob("shard-*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    train = built["data"].train
    n_tokens = sum(len(train[i]["t_ids"]) for i in range(len(train)))
    n_student = sum(len(train[i]["s_ids"]) for i in range(len(train)))
    assert n_tokens == m["n_tokens"]
    vt = len(built["data"].teacher_tok)
    n_ext = sum(int(torch.isfinite(tc.TeacherCache(built["dir"]).span(i)["mapped_path"]).sum()) for i in range(len(train)))
    arrays = n_tokens * (row_bytes(vt, 64) + 8) + n_student * 2 + n_ext * 6
    assert 0 < n_ext < 0.2 * n_student
    print(f"cache bytes per teacher token at k=64 packed (V={vt}): {total / n_tokens:.1f}")
    assert arrays <= total <= arrays + 40 * len(train) + 2000 * len(files)
    assert m["bytes_per_token"] == pytest.approx(total / n_tokens)
    assert row_bytes(151_936, 64) == 146
    assert bytes_per_token(151_936, 64, "packed", student_per_teacher=61_105 / 52_919) <= 157  # Hamlet's ratio


def test_old_format_and_unfinished_builds_are_refused(built, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(built["dir"], old)
    man = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps(dict(man, format_version=1)))
    with pytest.raises(UserError, match="format 1.*rebuild it with sakd cache-teacher"):
        tc.TeacherCache(old)
    (old / "manifest.json").unlink()
    (old / "building.json").write_text("{}")
    with pytest.raises(UserError, match="--resume"):
        tc.TeacherCache(old)


def test_manifest_mismatch_is_refused_naming_the_key(built, tiny_assets, tmp_path):
    cfg, data = built["cfg"], built["data"]
    spans = data.train.spans
    ok = tm.expected_manifest(cfg, spans, k=64, codec="packed")
    tc.TeacherCache(built["dir"], ok)  # the run it was built for: accepted
    other_tok = _cfg(tiny_assets, tmp_path, **{"model.teacher_tokenizer": tiny_assets["student"]})
    seq = _cfg(tiny_assets, tmp_path, **{"data.seq_len": 40})
    cases = [
        (tm.expected_manifest(other_tok, spans), "model.teacher_tokenizer"),
        (tm.expected_manifest(seq, span_data(seq, **QUIET).train.spans), "data.seq_len"),
        (tm.expected_manifest(cfg, spans, k=32), "built for k = 64"),
        (tm.expected_manifest(cfg, spans, codec="float32"), "codec"),
        (tm.expected_manifest(_cfg(tiny_assets, tmp_path, **{"loss.temperature": 1.0}), spans), "loss.temperature"),
        (tm.expected_manifest(cfg, spans[:-1]), "n_spans"),
        (tm.expected_manifest(cfg, spans[:-1] + [spans[-1] + "x"]), "spans_sha256"),
    ]
    for expect, key in cases:
        with pytest.raises(UserError, match=key) as e:
            tc.TeacherCache(built["dir"], expect)
        assert "\n" not in str(e.value) and "cache-teacher" in str(e.value)
    # other teacher weights under the same name: the content hash tells them apart
    forged = dict(ok, teacher_sha256="0" * 64)
    with pytest.raises(UserError, match="model.teacher"):
        tc.TeacherCache(built["dir"], forged)


def test_refusals(built, tiny_assets, tmp_path):
    for extra, key in (({"moe.mode": "sar"}, "moe.mode"), ({"loss.divergence": "reverse_kl"}, "loss.divergence"),
                       ({"loss.logit": "mapped_kl", "loss.divergence": "jsd"}, "loss.divergence"),
                       ({"loss.baseline": "uld"}, "loss.baseline"), ({"loss.hidden.weight": 0.5}, "loss.hidden.weight"),
                       ({"loss.on_policy_prob": 0.5}, "loss.on_policy_prob")):
        with pytest.raises(UserError, match=key):
            tm.check_cached_config(_cfg(tiny_assets, tmp_path, **extra))
    tm.check_cached_config(built["cfg"])
    tm.check_cached_config(_cfg(tiny_assets, tmp_path, **{"loss.logit": "mapped_kl", "moe.mode": "ka"}))
    with pytest.raises(UserError, match="moe.mode=sar"):
        build_cache(_cfg(tiny_assets, tmp_path, **{"moe.mode": "sar"}), tmp_path / "x", **QUIET)
    with pytest.raises(UserError, match="already holds a finished cache"):
        build_cache(built["cfg"], built["dir"], **QUIET)


def test_span_data_is_the_loops_dataset(built):
    from sakd.train.distill import setup

    run = setup(built["cfg"], log=lambda *_: None)
    assert run.train.spans == built["data"].train.spans
    assert run.heldout == built["data"].heldout
    for i in (0, 11):
        assert run.train[i] == built["data"].train[i]


def test_cached_shared_kd_is_the_bucketed_kl_written_out(tmp_path):
    """k < V, hand-built batch: every term of the documented formula computed the slow way in
    float64 (teacher top-k ∩ shared, the exact shared rest U, renormalisation by M, student rest)."""
    from tests.losses.batches import make_batch

    g = torch.Generator().manual_seed(3)
    vs, vt, k = 11, 13, 4
    batch = make_batch([[(1, 1)] * 5 + [(2, 1)], [(1, 1), (1, 2), (1, 1)]], s_vocab=vs, t_vocab=vt)
    shared_t = torch.tensor([1, 3, 4, 6, 8, 9, 12])
    shared_s = torch.tensor([2, 0, 5, 7, 1, 10, 3])
    B, Lt = batch["t_ids"].shape
    t_logits = 2 * torch.randn(B, Lt, vt, generator=g, dtype=torch.float64)
    s_logits = 2 * torch.randn(B, batch["s_ids"].shape[1], vs, generator=g, dtype=torch.float64)
    mask = torch.zeros(vt, dtype=torch.bool)
    mask[shared_t] = True
    from sakd.teacher_cache.builder import sparse_rows

    r = sparse_rows(t_logits.reshape(-1, vt), torch.zeros(B * Lt, dtype=torch.long), mask, k=k, temperature=T)
    cb = {"topk_ids": r["topk_ids"].reshape(B, Lt, k), "topk_logprobs": r["topk_logprobs"].reshape(B, Lt, k),
          "shared_rest_logprob": r["shared_rest_logprob"].reshape(B, Lt)}
    got, n = cached_shared_kd(s_logits, cb, batch, shared_s, shared_t, temperature=T)

    b, sp, tp = one_to_one_positions(batch)
    want, cut = 0.0, 0
    for e, s_pos, t_pos in zip(b.tolist(), sp.tolist(), tp.tolist()):
        p = torch.softmax(t_logits[e, t_pos] / T, -1).tolist()
        top = torch.topk(t_logits[e, t_pos], k).indices.tolist()
        A = [i for i, t in enumerate(shared_t.tolist()) if t in top]          # shared positions in the top-k
        U = sum(p[t] for t in shared_t.tolist() if t not in top)
        M = sum(p[shared_t[i]] for i in A) + U
        q = torch.softmax(s_logits[e, s_pos, shared_s] / T, -1).tolist()
        q_rest = 1 - sum(q[i] for i in A)
        want += sum(p[shared_t[i]] / M * math.log(p[shared_t[i]] / M / q[i]) for i in A)
        want += U / M * math.log(U / M / q_rest)
        cut += len(A) < k
    assert int(n) == b.numel() == 7 and cut > 0  # some rows have non-shared ids in their top-k
    assert got.item() == pytest.approx(want, rel=1e-6)
    # and it is below the dense shared-vocabulary KL (data-processing inequality), strictly here
    dense = shared_vocab_kd(s_logits, t_logits, batch, shared_s, shared_t, temperature=T)[0]
    assert got.item() < dense.item()
