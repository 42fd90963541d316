"""The teacher cache on chat data: built over the packed chat rows (the teacher sees each example alone,
through the rows' restarting position ids), keyed by the rows themselves, and read back into the same
losses as the live teacher; the teacher's assistant-only held-out bits per byte travel in the manifest."""

import pytest
import torch

from sakd.teacher_cache import manifest as tm
from sakd.teacher_cache import reader as tc
from sakd.teacher_cache.builder import build_cache
from sakd.data.text import Collator, pad_id
from sakd.train.distill import distill, setup, teacher_heldout_bpb
from sakd.errors import UserError
from sakd.train.cached_step import cached_step_loss
from sakd.train.objective import count_targets, micro_step_loss
from tests.train.test_chat_loop import _cfg, chat_file  # noqa: F401  (the fixture)

QUIET = dict(log=lambda *_: None)
WEIGHTS = {"kd": 1.0, "chunk": 1.0, "ce": 1.0}


def _terms(run, cfg, batch, cb=None):
    counts = count_targets([batch], cfg, run.vocab.mapping)
    shared_s, shared_t = run.vocab.shared_s, run.vocab.shared_t
    with torch.no_grad():
        if cb is not None:
            return cached_step_loss(run.student, cb, batch, shared_s, shared_t, cfg, WEIGHTS, counts,
                                    run.accelerator, mapping=run.vocab.mapping)[1]
        return micro_step_loss(run.teacher, run.student, run.aux, batch, shared_s, shared_t, cfg, WEIGHTS, counts,
                               run.accelerator, {}, torch.Generator(), len(run.teacher_tok),
                               mapping=run.vocab.mapping)[1]


@pytest.mark.parametrize("logit", ["shared_kl", "mapped_kl"])
def test_a_full_cache_of_packed_chat_rows_gives_the_live_losses(tiny_assets, tmp_path, chat_file, logit):
    """k = V, float32 codec: the cache holds the teacher's whole distribution, so every cached term equals
    the live one on a packed row; its distributions are the teacher's on each example alone, which the
    row read as one sequence (examples attending to each other) does not give."""
    cfg = _cfg(tiny_assets, tmp_path, chat_file, **{"loss.logit": logit, "loss.temperature": 2.0,
                                                           "data.seq_len": 256})
    run = setup(cfg, **QUIET)
    vt = len(run.teacher_tok)
    build_cache(cfg, tmp_path / "cache", k=vt, codec="float32", **QUIET)
    cache = tc.TeacherCache(tmp_path / "cache", tm.expected_manifest(
        cfg, run.train.fingerprints, student_tok=run.student_tok, teacher_tok=run.teacher_tok, vocab=run.vocab))
    assert len(cache) == len(run.train)
    idx = [1, 0]
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in idx])
    assert int(((batch["t_pos"] == 0) & batch["t_mask"]).sum()) >= 2 * len(idx)  # several examples a row
    cb = cache.batch(idx, batch["t_ids"].shape[1], check=batch)
    live, cached = _terms(run, cfg, batch), _terms(run, cfg, batch, cb)
    assert set(live) == set(cached) == set(WEIGHTS)
    for name in WEIGHTS:
        assert float(cached[name]) == pytest.approx(float(live[name]), rel=1e-4), name
    # the cached distributions are the teacher's on each example ALONE; the row read as one sequence differs
    row = batch["t_pos"][0]
    starts = [int(j) for j in (row == 0).nonzero().squeeze(1) if batch["t_mask"][0, j]] + [int(batch["t_mask"][0].sum())]
    dense = torch.full((batch["t_ids"].shape[1], vt), float("-inf"))
    dense.scatter_(1, cb["topk_ids"][0].long(), cb["topk_logprobs"][0].float())
    with torch.no_grad():
        alone = torch.cat([run.teacher(input_ids=batch["t_ids"][:1, a:b]).logits[0, :, :vt]
                           for a, b in zip(starts, starts[1:])])
        joined = run.teacher(input_ids=batch["t_ids"][:1, :starts[-1]]).logits[0, :, :vt]
    n = starts[-1]
    torch.testing.assert_close(dense[:n], torch.log_softmax(alone / 2.0, -1), rtol=0, atol=1e-5)
    assert (torch.log_softmax(joined / 2.0, -1) - dense[:n]).abs().max() > 1e-3

def test_chat_cache_serves_a_run_and_is_refused_for_other_rows(tiny_assets, tmp_path, chat_file):
    """`model.teacher_cache` on chat data: the run trains without loading the teacher and reports the
    teacher's assistant-only bits per byte measured at build time (equal to the live measurement). A
    run whose rows differ (here: losses on the user turns too, so other loss masks) is refused, naming
    the rows' fingerprint."""
    cfg = _cfg(tiny_assets, tmp_path, chat_file, **{"loss.logit": "mapped_kl"})
    manifest = build_cache(cfg, tmp_path / "cache", k=16, **QUIET)
    run = setup(cfg, **QUIET)
    assert manifest["teacher_heldout_bpb"] == pytest.approx(teacher_heldout_bpb(run, cfg), rel=1e-5)
    cached_cfg = _cfg(tiny_assets, tmp_path / "c", chat_file, **{"loss.logit": "mapped_kl",
                                                                  "model.teacher_cache": str(tmp_path / "cache")})
    lines: list[str] = []
    res = distill(cached_cfg, progress=False, log=lines.append)
    assert res["steps"] == 3 and res["teacher_bpb"] == manifest["teacher_heldout_bpb"]
    assert any("read from the cache" in str(l) for l in lines)
    assert res["student_bpb_final"] != res["student_bpb_initial"]  # it trained
    other = _cfg(tiny_assets, tmp_path / "o", chat_file, **{"loss.logit": "mapped_kl", "data.train_on_prompt": True,
                                                             "model.teacher_cache": str(tmp_path / "cache")})
    with pytest.raises(UserError, match=r"n_spans|spans_sha256"):
        setup(other, **QUIET)
