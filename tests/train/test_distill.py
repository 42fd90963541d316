"""The loop and its objective on tiny models (CPU, fp32)."""

import pytest
import torch
from safetensors.torch import load_file

from sakd.train import objective
from sakd.config import load_config
from sakd.data.text import Collator, pad_id
from sakd.train.distill import EpochOrder, distill, setup
from sakd.train.heads import fused_head_weight
from sakd.losses import forward_kl
from tests.conftest import tiny_overrides
from sakd_test_helpers import router_parameters


def _weights(out):
    return load_file(str(out / "student" / "model.safetensors"))


class CpuAcc:
    """The Accelerator methods the objective uses, on CPU fp32."""
    autocast = staticmethod(lambda: torch.autocast("cpu", enabled=False))
    unwrap_model = staticmethod(lambda m: m)


def _micro_step(run, cfg, n_examples: int, step: int = 10):
    """objective.micro_step_loss on the first ``n_examples`` training spans: (batch, weights, loss, terms, flags)."""
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(n_examples)])
    weights = objective.term_weights(cfg, step)
    loss, terms, flags = objective.micro_step_loss(
        run.teacher, run.student, run.aux, batch, run.vocab.shared_s, run.vocab.shared_t, cfg, weights,
        objective.count_targets([batch], cfg, run.vocab.mapping), CpuAcc, {}, torch.Generator().manual_seed(0),
        len(run.teacher_tok), mapping=run.vocab.mapping)
    return batch, weights, loss, terms, flags


@pytest.mark.parametrize("logit", ["shared_kl", "mapped_kl"])
def test_accumulation_invariance(tiny_assets, tmp_path, logit):
    """batch 8 x accumulation 1 == batch 2 x accumulation 4 (losses normalised once per optimizer step)."""
    common = {"train.max_steps": 2, "loss.ce_weight": 0.5, "loss.chunk_weight": 0.5, "loss.logit": logit}
    a = load_config(None, tiny_overrides(tiny_assets, tmp_path / "a", **common, **{"train.batch_size": 8}))
    b = load_config(None, tiny_overrides(tiny_assets, tmp_path / "b", **common,
                                         **{"train.batch_size": 2, "train.grad_accum": 4}))
    distill(a, progress=False, log=lambda *_: None)
    distill(b, progress=False, log=lambda *_: None)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    init = load_file(str(tiny_assets["student"] / "model.safetensors"))
    moved = 0
    for k in wa:
        # atol 2e-6: Adam divides a near-zero gradient by its own root mean square, which turns float32
        # summation-order noise (one batch of 8 against four of 2) into ~1e-6 on a few weights
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=2e-6)
        moved += int(not torch.equal(wa[k], init[k]))
    assert moved > 0


@pytest.mark.parametrize("mode", ["topk", "sar"])
def test_every_trainable_parameter_gets_a_finite_nonzero_gradient(tiny_assets, tmp_path, mode):
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path, **{
        "loss.ce_weight": 0.5, "loss.chunk_weight": 0.5, "loss.hidden.weight": 0.5, "loss.attention.weight": 0.5,
        "loss.contrastive.weight": 0.5, "moe.mode": mode}))
    run = setup(cfg, log=lambda *_: None)
    batch, weights, loss, terms, flags = _micro_step(run, cfg, 4)
    assert set(weights) == {"kd", "ce", "chunk", "hidden", "attention", "contrastive"}
    loss.backward()
    assert flags["nonfinite_teacher"] == 0 and all(v > 0 for v in terms.values()), terms
    named = list(run.student.named_parameters()) + list(run.aux.named_parameters())
    for name, p in named:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in run.teacher.parameters())
    if mode == "sar":
        from sakd.models import moe
        sar = moe.SARRouter(run.teacher, lr=1e-2)
        objective.sar_router_step(sar, run.teacher, run.student, batch, run.vocab.shared_s, run.vocab.shared_t,
                                  cfg, CpuAcc, len(run.teacher_tok))
        for p in router_parameters(run.teacher):
            assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("divergence, logit", [("forward_kl", "shared_kl"), ("jsd", "shared_kl"),
                                               ("forward_kl", "mapped_kl"), ("jsd", "mapped_kl")])
def test_fused_head_gives_the_logits_path_loss_and_gradients(tiny_assets, tmp_path, divergence, logit):
    """loss.fused_head (hidden state + head weight into the loss) == the same step through [B, L, V] logits."""
    results = []
    for fused in (True, False):
        cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / str(fused), **{"loss.logit": logit,
            "loss.ce_weight": 0.5, "loss.chunk_weight": 0, "loss.divergence": divergence, "loss.temperature": 1.5,
            "loss.chunk_rows": 7, "loss.fused_head": fused}))
        run = setup(cfg, log=lambda *_: None)
        _, weights, loss, terms, _ = _micro_step(run, cfg, 4)
        assert set(weights) == {"kd", "ce"}
        assert (fused_head_weight(run.student, cfg, weights, CpuAcc) is not None) == fused
        loss.backward()
        results.append((loss.detach(), terms, {n: p.grad.clone() for n, p in run.student.named_parameters()}))
    (la, ta, ga), (lb, tb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=0)
    assert ta.keys() == tb.keys() and all(abs(ta[k] - tb[k]) <= 1e-5 * abs(tb[k]) for k in ta)
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-5 * gb[name].abs().max().item())


@pytest.mark.parametrize("over, fused", [
    ({}, True), ({"loss.chunk_weight": 0.5}, False), ({"loss.gap_weighting": True}, False),
    ({"loss.baseline": "uld"}, False), ({"loss.fused_head": False}, False),
    ({"loss.baseline": "uld", "loss.kd_weight": 0}, True)])  # CE alone: fused whatever the logit loss
def test_fused_head_applies_only_where_every_logit_term_supports_it(tiny_assets, tmp_path, over, fused):
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path, **{"loss.ce_weight": 0.5, "loss.chunk_weight": 0,
                                                                      **over}))
    student = AutoModelForCausalLM.from_pretrained(tiny_assets["student"])
    w = fused_head_weight(student, cfg, objective.term_weights(cfg, 10), None)
    assert (w is student.get_output_embeddings().weight) if fused else w is None
    student.config.final_logit_softcapping = 30.0  # a model whose logits are not hidden @ W.T
    assert fused_head_weight(student, cfg, objective.term_weights(cfg, 10), None) is None


def test_same_tokenizer_reduces_to_plain_kd(tiny_assets, tmp_path):
    """Both sides with the student's tokenizer: the shared-vocabulary loss at 1:1 chunks == full-vocabulary KD."""
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path, **{
        "model.teacher_tokenizer": tiny_assets["student"], "model.teacher": tiny_assets["student"]}))
    run = setup(cfg, log=lambda *_: None)
    assert torch.equal(run.vocab.shared_s, run.vocab.shared_t)
    assert torch.equal(run.vocab.shared_s, torch.arange(len(run.student_tok)))  # every id, itself
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(3)])
    assert torch.equal(batch["s_ids"], batch["t_ids"])
    assert bool(objective.one_to_one(batch)[batch["chunk_mask"]].all())
    torch.manual_seed(1)
    s_logits = torch.randn(*batch["s_ids"].shape, len(run.student_tok), dtype=torch.float64)
    t_logits = torch.randn_like(s_logits)
    ours = objective.logit_term_sum("shared_kl", s_logits, t_logits, batch, run.vocab.shared_s, run.vocab.shared_t,
                                    cfg.loss)
    mask = batch["s_mask"][:, 1:]
    plain = forward_kl(s_logits[:, :-1], t_logits[:, :-1], mask, reduction="sum")
    torch.testing.assert_close(ours, plain, rtol=1e-10, atol=1e-10)


def test_epoch_order_is_resumable_and_sharded():
    a = EpochOrder(10, seed=3)
    first = a.next(7)
    state = a.state()
    rest = a.next(9)  # crosses into epoch 1
    b = EpochOrder(10, seed=3)
    b.load(state)
    assert b.next(9) == rest and sorted(first + rest[:3]) == list(range(10))
    shards = [EpochOrder(10, seed=3, rank=r, world=2).next(5) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(10))


def test_gap_weighting_against_float64_reference():
    """w_i = D_i / mean(D) (detached, clipped), loss = sum_i w_i D_i; uniform gaps give plain KD."""
    from sakd.train.objective import gap_weighted_kd

    torch.manual_seed(0)
    B, L, V = 1, 4, 5
    batch = {"chunk_mask": torch.tensor([[True, True, True]]),
             "chunk_s_start": torch.tensor([[1, 2, 3]]), "chunk_s_end": torch.tensor([[2, 3, 4]]),
             "chunk_t_start": torch.tensor([[1, 2, 3]]), "chunk_t_end": torch.tensor([[2, 3, 4]])}
    s = torch.randn(B, L, V, dtype=torch.float64)
    t = torch.randn(B, L, V, dtype=torch.float64)
    shared = torch.arange(V)
    got = gap_weighted_kd(s, t, batch, shared, shared, "forward_kl", 1.0, clip=100.0)
    d = []
    for pos in range(3):
        p = torch.softmax(t[0, pos], -1)
        q = torch.softmax(s[0, pos], -1)
        d.append(float((p * (p.log() - q.log())).sum()))
    mean = sum(d) / 3
    want = sum((x / mean) * x for x in d)
    assert abs(float(got) - want) < 1e-9
    clipped = gap_weighted_kd(s, t, batch, shared, shared, "forward_kl", 1.0, clip=1.0)
    want_c = sum(min(x / mean, 1.0) * x for x in d)
    assert abs(float(clipped) - want_c) < 1e-9


def test_on_policy_items_encode_the_generated_text_on_both_sides(tiny_assets, tmp_path):
    from sakd.train.onpolicy import generate_items, prompt_of

    assert prompt_of("To be or not to be", 0.5) == "To be or"
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path))
    run = setup(cfg, log=lambda *_: None)
    torch.manual_seed(0)
    items = generate_items(run.student, run.train, [0, 1], new_tokens=8, temperature=1.0)
    for i, it in zip([0, 1], items):
        s_text = run.student_tok.decode(it["s_ids"][1:])
        t_text = run.teacher_tok.decode(it["t_ids"][1:])
        assert s_text.strip() == t_text.strip()  # the same characters on both sides
        assert s_text.strip() != run.train.spans[i].strip()  # and not the original span
        last = it["chunks"][-1]
        assert last[1] == len(it["s_ids"]) and last[3] == len(it["t_ids"])  # chunks cover both sides


@pytest.mark.parametrize("policy", ["recompute", "skip"])
def test_fp16_teacher_overflow_is_recomputed_in_fp32_or_skipped(tiny_assets, tmp_path, policy):
    """A teacher whose fp16 forward overflows (final norm scaled up) but is finite in fp32."""
    from transformers import AutoModelForCausalLM

    t = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"])
    with torch.no_grad():
        t.model.norm.weight.fill_(6e4)  # representable in fp16; normalised states x 6e4 overflow there
    t.save_pretrained(tmp_path / "hot")
    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / "run", **{
        "model.teacher": tmp_path / "hot", "model.teacher_tokenizer": tiny_assets["teacher"],
        "model.teacher_dtype": "float16", "train.nonfinite_teacher": policy}))
    run = setup(cfg, log=lambda *_: None)
    batch = Collator(pad_id(run.student_tok), pad_id(run.teacher_tok))([run.train[i] for i in range(2)])
    with torch.no_grad():
        assert not torch.isfinite(run.teacher(input_ids=batch["t_ids"]).logits).all()  # fp16 overflows
    _, _, loss, terms, flags = _micro_step(run, cfg, 2, step=0)
    loss.backward()
    assert flags["nonfinite_teacher"] == 1
    assert next(run.teacher.parameters()).dtype == torch.float16  # restored after the fp32 pass
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in run.student.parameters() if p.grad is not None)
    if policy == "recompute":
        assert flags.get("recomputed_fp32") == 1 and "kd" in terms and terms["kd"] > 0
    else:
        assert "recomputed_fp32" not in flags and "kd" not in terms


def test_background_encoding_gives_the_same_run(tiny_assets, tmp_path):
    """data.num_workers=1 (next step's spans encoded while a step computes) == encoding inside the step."""
    runs = {}
    for workers in (0, 1):
        cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path / str(workers), **{
            "data.num_workers": workers, "train.max_steps": 3, "loss.chunk_weight": 0.5}))
        distill(cfg, progress=False, log=lambda *_: None)
        runs[workers] = _weights(tmp_path / str(workers))
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_mapped_kl_counts_every_student_position_that_gets_a_target(tiny_assets, tmp_path):
    """Nearly every student position has a mapped target: only chunks opening a span with a synthetic "▁"
    (one per example at most) go without. The step's KD count is cross-entropy's (one normaliser)."""
    from sakd.losses.mapped import mapped_positions

    cfg = load_config(None, tiny_overrides(tiny_assets, tmp_path, **{"loss.logit": "mapped_kl", "loss.ce_weight": 1}))
    run = setup(cfg, log=lambda *_: None)
    batch, weights, loss, terms, _ = _micro_step(run, cfg, 6)
    counts = objective.count_targets([batch], cfg, run.vocab.mapping)
    n = len(mapped_positions(batch, run.vocab.mapping))
    assert counts["kd"] == counts["ce"]
    pos = mapped_positions(batch, run.vocab.mapping)
    text = batch["s_chunk"] >= 0
    text[:, 0] = False
    missing = text.clone()
    missing[pos.b, pos.j] = False
    assert not (missing & ~text).any()
    assert (batch["s_chunk"][missing] == 0).all()  # only the chunk that opens a span
    assert n >= 0.95 * counts["ce"]
    assert terms["kd"] > 0 and torch.isfinite(loss)
