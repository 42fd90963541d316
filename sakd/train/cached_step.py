"""The step loss with the teacher read from a top-k cache (``sakd/teacher_cache/reader.py``) instead of a live
teacher pass: the cached counterpart of ``objective.micro_step_loss``, which ``objective.Objective.loss`` calls
when the run has a teacher cache."""

from __future__ import annotations

import torch

from sakd.config import Config
from sakd.data.chat import model_inputs  # chat data: packed rows give position ids instead of a 2-D mask
from sakd.losses.baselines import gold_chunk_rows
from sakd.train.terms import add_kind_terms, ce_sum


def cached_step_loss(student, cache_batch, batch, shared_s, shared_t, cfg: Config, weights: dict, counts: dict,
                     acc, mapping=None, classes=None, t_vocab: int | None = None):
    """Like ``objective.micro_step_loss`` with the teacher read from a top-k cache (sakd.teacher_cache.reader):
    KD (shared_kl at 1:1 chunks, or mapped_kl / projected_kl at every position) and the chunk likelihood from the
    sparse teacher, never densified to [rows, V]; the GOLD baseline against the top-k-truncated teacher, its weights
    from V_t = ``t_vocab`` (the teacher tokenizer's length, as on the live path). A KA cache holds several routings
    per position: the terms average over them, as over the live teacher passes. ``mapping``: the mapped_kl tables
    (else the cache loads them)."""
    from sakd.losses.cached import cached_chunk_likelihood, cached_gold_kd, cached_shared_kd
    from sakd.losses.cached_mapped import cached_mapped_kd
    from sakd.losses.projected import cached_projected_kd

    lc = cfg.loss
    with acc.autocast():
        s_logits = student(input_ids=batch["s_ids"], **model_inputs(batch, "s"), use_cache=False).logits
    total = s_logits.new_zeros((), dtype=torch.float32)
    terms: dict[str, float] = {}
    views = cache_batch.get("samples") or [cache_batch]

    kinds = {} if lc.method == "projected_kl" else None

    def kd(cb):
        if lc.method == "gold":  # the live path's arguments (logit_term_sum), the same KD normaliser and T^2
            return cached_gold_kd(s_logits, cb, batch, shared_s, shared_t, vt=t_vocab, temperature=lc.temperature,
                                  beta=lc.beta, chunk_rows=gold_chunk_rows(lc.chunk_rows))[0]
        if lc.method == "projected_kl":
            tables = mapping if mapping is not None else cache_batch["mapping"]()
            return cached_projected_kd(s_logits, cb, batch, tables, classes, temperature=lc.temperature,
                                       chunk_rows=lc.chunk_rows, log=kinds)[0]
        if lc.method == "mapped_kl":
            tables = mapping if mapping is not None else cache_batch["mapping"]()
            return cached_mapped_kd(s_logits, cb, batch, tables, temperature=lc.temperature,
                                    chunk_rows=lc.chunk_rows, extend=lc.mapped_extend)[0]
        return cached_shared_kd(s_logits, cb, batch, shared_s, shared_t, temperature=lc.temperature,
                                chunk_rows=lc.chunk_rows)[0]

    for name, value_sum, scale in (
            ("kd", lambda: sum(kd(cb) for cb in views) / len(views), lc.temperature ** 2),
            ("chunk", lambda: sum(cached_chunk_likelihood(s_logits, cb, batch, temperature=lc.chunk_temperature,
                                                          chunk_rows=lc.chunk_rows)[0] for cb in views) / len(views),
             1.0),
            ("ce", lambda: ce_sum(s_logits, batch), 1.0)):
        if name in weights:
            contrib = value_sum().float() / counts[name]
            total = total + weights[name] * scale * contrib
            terms[name] = contrib.detach().double()
    if kinds and "kd" in weights:
        add_kind_terms(terms, kinds, counts["kd"] * len(views))
    return total, terms, {"nonfinite_teacher": 0}
