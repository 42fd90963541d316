"""The sampled teacher cache (sakd/teacher_cache/sampled.py): its entries round-trip, its draws are
reproducible from the seed and have E[count / N] = p_T, what it stores equals the teacher computed
directly, a cache built with --codec sampled trains through ``distill`` (shared_kl and projected_kl),
and a bad codec name is one line."""

import json
import math
import subprocess
import sys

import pytest
import torch

from sakd.data.text import Collator, pad_id
from sakd.models.load import load_teacher
from sakd.teacher_cache import sampled
from sakd.teacher_cache.builder import build_cache
from sakd.teacher_cache.reader import TeacherCache
from tests.conftest import ROOT
from tests.teacher_cache.tiny_cache import QUIET, T, build_tiny_cache
from tests.teacher_cache.tiny_cache import cache_cfg as _cfg


@pytest.fixture(scope="module")
def built(tiny_assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("sampled")
    return {**build_tiny_cache(tiny_assets, d, "s", codec="sampled", shard_spans=12), "d": d}


def test_entries_round_trip():
    g = torch.Generator().manual_seed(0)
    for vocab, n in ((151_936, 12), (600, 12), (50, 16), (40, 1)):
        rows = torch.randint(0, vocab, (37, n), generator=g)
        rows[:5] = rows[:5, :1]                       # some rows: one id drawn N times
        rows = rows.sort(-1).values
        data, n_entries = sampled.encode_entries(rows, vocab, n)
        assert data.dtype == torch.uint8
        assert data.numel() == math.ceil(n_entries * (sampled.id_bits(vocab) + sampled.count_bits(n)) / 8)
        ids, lp = sampled.decode_entries(data, n_entries, rows.shape[0], vocab, n)
        for r in range(rows.shape[0]):
            want = torch.unique(rows[r], return_counts=True)
            u = want[0].numel()
            assert torch.equal(ids[r, :u], want[0])
            torch.testing.assert_close((lp[r, :u].exp() * n).round().long(), want[1])
            assert torch.isinf(lp[r, u:]).all()
            assert len(set(ids[r].tolist())) == n and int(ids[r].max()) < max(vocab, 2 * n)  # distinct padding


def test_counts_estimate_p_without_bias():
    """E[count_v / N] = p_T(v): the mean over R independent positions of the same distribution is within
    5 standard deviations, sqrt(p (1 - p) / (N R)) (multinomial), of p for every id; ids with p = 0 are
    never drawn. Through the builder's own path (sampled_rows, then encode/decode)."""
    g = torch.Generator().manual_seed(1)
    V, N, R = 40, 12, 4000
    logits = 2.0 * torch.randn(3, V, generator=g)
    logits[:, -5:] = -math.inf                       # probability 0
    p = torch.softmax(logits.double() / T, -1)
    shared = torch.ones(V, dtype=torch.bool)
    x = logits.repeat_interleave(R, 0)
    u = torch.rand(x.shape[0], N, generator=g, dtype=torch.float64)
    r = sampled.sampled_rows(x, torch.zeros(x.shape[0], dtype=torch.long), shared, temperature=T, uniforms=u)
    data, n = sampled.encode_entries(r["draw_ids"], V, N)
    ids, lp = sampled.decode_entries(data, n, x.shape[0], V, N)
    freq = torch.zeros(x.shape[0], V, dtype=torch.float64).scatter_add_(1, ids, lp.double().exp())
    mean = freq.view(3, R, V).mean(1)
    sd = (p * (1 - p) / (N * R)).sqrt()
    z = (mean - p).abs() / sd.clamp_min(1e-300)
    assert (mean[:, -5:] == 0).all()
    assert float(z[:, :-5].max()) < 5.0, z.max()
    assert float(z[:, :-5].mean()) > 0.3  # the draws do vary (not the exact p)
    torch.testing.assert_close(freq.sum(1), torch.ones(x.shape[0], dtype=torch.float64))


def test_cache_holds_the_teacher_computed_directly(built, tiny_assets):
    """shared_logmass and token_logprob_T against the teacher in float64 (fp16 storage); every drawn
    id has p_T > 0; counts sum to N."""
    data, cache = built["data"], TeacherCache(built["dir"])
    teacher = load_teacher(str(tiny_assets["teacher"]), torch.device("cpu"), "float32")
    vt = len(data.teacher_tok)
    from sakd.align.vocab import build_vocab_map
    shared = torch.zeros(vt, dtype=torch.bool)
    shared[build_vocab_map(data.student_tok, data.teacher_tok).shared_t] = True
    assert built["manifest"]["codec"] == "sampled" and built["manifest"]["draws"] == sampled.DRAWS
    for i in (0, 13, len(data.train) - 1):
        ids = torch.tensor(data.train[i]["t_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=ids[None]).logits[0, :, :vt].double() / T, -1)
        batch = Collator(pad_id(data.student_tok), pad_id(data.teacher_tok))([data.train[i]])
        cb = cache.batch([i], ids.numel(), check=batch)
        n = ids.numel()
        draws, lp = cb["topk_ids"][0], cb["topk_logprobs"][0]
        torch.testing.assert_close(lp.exp().sum(-1).double(), torch.ones(n, dtype=torch.float64))
        drawn = torch.isfinite(lp)
        assert (logp.gather(1, draws)[drawn] > -30).all()
        m = torch.logsumexp(logp.masked_fill(~shared, -math.inf), -1)
        torch.testing.assert_close(cb["shared_logmass"][0].double(), m, atol=2e-3, rtol=1e-3)
        own = logp[:-1].gather(1, ids[1:, None]).squeeze(1)
        torch.testing.assert_close(cb["token_logprob_T"][0, 1:].double(), own, atol=1e-2, rtol=1e-3)
        assert torch.isinf(cb["rest_logprob"][0]).all() and torch.isinf(cb["shared_rest_logprob"][0]).all()


def test_draws_are_reproducible_from_the_seed(built, tiny_assets):
    """The same config builds byte-identical shards; another train.seed draws other tokens."""
    d = built["d"]
    build_cache(built["cfg"], d / "again", codec="sampled", shard_spans=12, **QUIET)
    for s in range(built["manifest"]["shards"]):
        name = f"shard-{s:05d}.safetensors"
        assert (d / "again" / name).read_bytes() == (built["dir"] / name).read_bytes()
    other = _cfg(tiny_assets, d / "run2", **{"train.seed": 7})
    build_cache(other, d / "seed7", codec="sampled", shard_spans=12, **QUIET)
    a, b = TeacherCache(built["dir"]).span(3), TeacherCache(d / "seed7").span(3)
    assert torch.equal(a["token_logprob"], b["token_logprob"])  # the same teacher
    assert not torch.equal(a["draw_ids"], b["draw_ids"])


def test_bytes_per_token(built):
    """What is on disk is what the layout says: per distinct id id_bits + count_bits, per position the
    fp16 scalars, per student token mapped_logz (+ the sparse path entries, + offsets and hashes)."""
    from safetensors import safe_open

    m = built["manifest"]
    vt = m["teacher_vocab"]
    n_entries, total = 0, 0
    for s in range(m["shards"]):
        with safe_open(str(built["dir"] / f"shard-{s:05d}.safetensors"), framework="pt") as f:
            n_entries += int(f.get_tensor("e_offsets")[-1])
            total += sum(f.get_slice(k).get_shape()[0] * (2 if k in ("shared_logmass", "token_logprob",
                         "token_logprob_T", "mapped_logz") else 0) for k in f.keys())
    bits = sampled.id_bits(vt) + sampled.count_bits(sampled.DRAWS)
    payload = n_entries * bits / 8 + total
    assert payload / m["n_tokens"] < m["bytes_per_token"] < payload / m["n_tokens"] + 12
    assert m["n_tokens"] <= n_entries <= sampled.DRAWS * m["n_tokens"]


def _train(built, assets, name, **extra):
    from sakd.train.distill import distill

    out = built["d"] / name
    cfg = _cfg(assets, out, **{"train.max_steps": 8, "train.lr": 1e-2, "loss.hidden.weight": 0,
                               "loss.attention.weight": 0, "loss.contrastive.weight": 0, **extra})
    r = distill(cfg, progress=False, log=lambda *a: None)
    kd = [h["kd"] for h in json.loads((out / "history.json").read_text())["history"]]
    assert len(kd) == 8 and all(math.isfinite(x) and x > 0 for x in kd)
    return r


def test_distill_trains_from_a_sampled_cache(built, tiny_assets):
    """``distill`` reads the sampled cache. projected_kl (every position): the student's held-out bits/byte
    fall by > 0.2 in 8 steps (the live teacher: 5.97 -> 5.35, the sampled cache 5.51, a packed top-64 cache
    6.48 on this flat, untrained teacher). shared_kl (the 1:1 chunks only) barely moves the student on this
    pair, live or cached: the sampled cache ends within 0.03 bits/byte of the live teacher."""
    r = _train(built, tiny_assets, "projected", **{"loss.logit": "projected_kl", "model.teacher_cache": built["dir"]})
    assert r["student_bpb_final"] < r["student_bpb_initial"] - 0.2, r
    cached = _train(built, tiny_assets, "shared", **{"loss.logit": "shared_kl", "model.teacher_cache": built["dir"]})
    live = _train(built, tiny_assets, "shared-live", **{"loss.logit": "shared_kl"})
    assert abs(cached["student_bpb_final"] - live["student_bpb_final"]) < 0.03, (cached, live)


def test_bad_codec_name_is_one_line(tiny_assets, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sakd.cli", "cache-teacher", "--out", str(tmp_path / "c"),
                           "--codec", "sampeld"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "--codec=sampeld" in lines[0] and "sampled" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "c").exists()
