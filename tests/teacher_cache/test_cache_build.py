"""Building the teacher cache: a build killed at a random moment and resumed is byte-identical to an
uninterrupted one; 2 processes (gloo, CPU) write the same cache as 1; train.max_time stops between
shards; a cache that will not fit is refused before the teacher runs; KA caches hold M routings;
the packed codec round-trips its ids exactly."""

import filecmp
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from sakd.data.text import span_data
from sakd.teacher_cache import manifest as tm
from sakd.teacher_cache import reader as tc
from sakd.teacher_cache.builder import build_cache
from sakd.teacher_cache.codec import decode_packed, encode_packed
from sakd.config import load_config
from sakd.errors import UserError
from tests.conftest import ROOT, tiny_overrides
from tests.train.process_runs import accelerate_launch
from tests.train.process_runs import launch_env as _env

QUIET = dict(log=lambda *_: None)
EXTRA = {"data.max_examples": 96, "loss.temperature": 2.0}


def _cli(tiny_assets, tmp_path, out, *flags, launch=()):
    return [*launch, *([] if launch else [sys.executable]), "-m", "sakd.cli", "cache-teacher",
            "--out", str(out), "--shard-spans", "4", "--batch-size", "2", "--no-progress", *flags,
            *tiny_overrides(tiny_assets, tmp_path / "run", **EXTRA)]


def _same_cache(a, b) -> None:
    names = sorted(p.name for p in a.iterdir() if p.name != "build.json")
    assert names == sorted(p.name for p in b.iterdir() if p.name != "build.json")
    assert "manifest.json" in names and "building.json" not in names and len(names) > 5
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, mismatch


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    """An uninterrupted one-process build through the CLI."""
    d = tmp_path_factory.mktemp("ref")
    r = subprocess.run(_cli(tiny_assets, d, d / "cache"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return d / "cache"


def test_codec_round_trip():
    g = torch.Generator().manual_seed(0)
    for vocab, k in ((151_936, 64), (600, 64), (70, 70), (1000, 1)):
        lp = torch.log_softmax(3 * torch.randn(50, vocab, generator=g), -1)
        vals, ids = lp.topk(k)
        rest = torch.log1p(-vals.exp().sum(1).clamp(max=1 - 1e-7))
        rows, top = encode_packed(ids, vals, vocab)
        got_ids, got = decode_packed(rows, top, rest, vocab, k)
        assert torch.equal(got_ids, ids.sort(1).values)
        want = lp.gather(1, got_ids)
        assert torch.allclose(got.exp().sum(1) + rest.exp(), torch.ones(50), atol=1e-5)
        assert ((got - want).abs() <= 1.0).all()  # the coarsest level, far in the tail


def test_resume_after_sigkill_is_byte_identical(tiny_assets, tmp_path, reference):
    out = tmp_path / "cache"
    proc = subprocess.Popen(_cli(tiny_assets, tmp_path, out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # a random moment in the first half of the build (an idle machine writes a shard in ~10 ms, so a fixed
    # delay after the first shard could outlast the whole build): after 1..12 of 24 shards, possibly mid-write
    target = random.randint(1, 12)
    while (len(list(out.glob("shard-*.safetensors"))) < target and time.time() < deadline
           and proc.poll() is None):
        time.sleep(0.002)
    time.sleep(random.uniform(0, 0.01))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_written = len(list(out.glob("shard-*.safetensors")))
    assert not (out / "manifest.json").exists() and (out / "building.json").exists()
    assert 1 <= n_written < 24
    with pytest.raises(UserError, match="--resume"):
        tc.TeacherCache(out)  # a cache being built is never read as one
    r = subprocess.run(_cli(tiny_assets, tmp_path, out), cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and "--resume" in r.stderr  # without --resume: refused, one line
    r = subprocess.run(_cli(tiny_assets, tmp_path, out, "--resume"), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already written: resuming" in r.stdout + r.stderr
    assert not list(out.glob(".shard-*"))  # no temporary left (a killed write is overwritten, then renamed)
    _same_cache(out, reference)


def test_two_processes_write_the_same_cache_as_one(tiny_assets, tmp_path, reference):
    out = tmp_path / "cache"
    r = subprocess.run(_cli(tiny_assets, tmp_path, out, launch=accelerate_launch(2)), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "build.json").read_text())["processes"] == 2
    _same_cache(out, reference)


def test_max_time_stops_between_shards_then_resumes(tiny_assets, tmp_path, reference):
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / "run", **EXTRA, **{"train.max_time": "0s"}))
    kw = dict(shard_spans=4, batch_size=2, **QUIET)
    assert build_cache(cfg, tmp_path / "cache", **kw) is None  # the deadline has passed at once
    assert not (tmp_path / "cache" / "manifest.json").exists()
    cfg.train.max_time = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference's process: bytes equal for the same kernels and thread count
    try:
        assert build_cache(cfg, tmp_path / "cache", resume=True, **kw)["n_spans"] == 96
    finally:
        torch.set_num_threads(threads)
    _same_cache(tmp_path / "cache", reference)
    cfg.train.max_time = "0s"
    assert build_cache(cfg, tmp_path / "c2", **kw) is None
    with pytest.raises(UserError, match="spans_per_shard = 4, but this run has 3"):  # other options: refused
        build_cache(cfg, tmp_path / "c2", resume=True, **dict(kw, shard_spans=3))


def test_a_cache_that_does_not_fit_is_refused(tiny_assets, tmp_path, monkeypatch):
    import shutil as sh

    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / "run", **EXTRA))
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match="only 0.00 GiB are free"):
        build_cache(cfg, tmp_path / "cache", **QUIET)


def test_ka_cache_holds_m_routings(tiny_assets, tmp_path):
    from sakd.data.text import Collator, pad_id

    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / "run", **{
        "data.max_examples": 8, "moe.mode": "ka", "moe.ka_samples": 2, "moe.sample_prob": 1.0}))
    m = build_cache(cfg, tmp_path / "ka", shard_spans=4, **QUIET)
    assert m["samples"] == 2 and m["ka"]["sample_prob"] == 1.0
    data = span_data(cfg, **QUIET)
    idx = [0, 1, 2]
    batch = Collator(pad_id(data.student_tok), pad_id(data.teacher_tok))([data.train[i] for i in idx])
    expect = tm.expected_manifest(cfg, data.train.spans)
    cb = tc.TeacherCache(tmp_path / "ka", expect).batch(idx, batch["t_ids"].shape[1], check=batch)
    a, b = cb["samples"]
    assert a["topk_logprobs"].shape == b["topk_logprobs"].shape == (3, batch["t_ids"].shape[1], 64)
    assert not torch.equal(a["topk_logprobs"], b["topk_logprobs"])  # two different sampled routings
    with pytest.raises(UserError, match="moe.ka_samples"):
        other = load_config(None, tiny_overrides(tiny_assets, tmp_path / "run", **{
            "data.max_examples": 8, "moe.mode": "ka", "moe.ka_samples": 3, "moe.sample_prob": 1.0}))
        tc.TeacherCache(tmp_path / "ka", tm.expected_manifest(other, data.train.spans))
