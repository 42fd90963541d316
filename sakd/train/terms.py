"""The pieces of a step's loss that the live step (``objective.micro_step_loss``) and the cached step
(``cached_step.cached_step_loss``) share: the student's cross-entropy term (its targets and its sum) and the
KD term's split by position kind for the log (projected_kl)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sakd.losses.divergences import linear_cross_entropy_sum
from sakd.losses.projected import KINDS


def ce_targets(batch: dict) -> torch.Tensor:
    """[B, L-1] bool: the student's cross-entropy targets (token k+1 predicted at k). Chat data: the batch's
    ``s_loss_mask`` (assistant content and the end-of-turn token, sakd/data/chat.py); text: every real token."""
    return batch.get("s_loss_mask", batch["s_mask"])[:, 1:]


def ce_sum(s_logits, batch, head_weight=None, chunk_rows: int = 1024) -> torch.Tensor:
    """Cross-entropy of the student's own next tokens, summed over target tokens. With ``head_weight``,
    ``s_logits`` is the final hidden state [B, L, H] and the output layer is fused into the loss,
    ``chunk_rows`` (``loss.chunk_rows``) rows of logits at a time."""
    if head_weight is not None:
        keep = ce_targets(batch)
        b, pos = keep.nonzero(as_tuple=True)
        rows = b * s_logits.shape[1] + pos  # position pos predicts token pos + 1
        return linear_cross_entropy_sum(s_logits.flatten(0, 1), head_weight, batch["s_ids"][b, pos + 1], rows,
                                        chunk_rows=chunk_rows)
    logits = s_logits[:, :-1].float()
    targets = batch["s_ids"][:, 1:].masked_fill(~ce_targets(batch), -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


def add_kind_terms(terms: dict, kinds: dict, count: float) -> None:
    """The KD term split by position kind for the log (projected_kl): ``kd_one_to_one`` (1:1 chunks),
    ``kd_chunk_first`` (the first student token of a longer chunk), ``kd_inside`` (inside a teacher token),
    each on the KD term's normaliser, so that the three add up to ``kd``."""
    for k in KINDS:  # tensors: read with the other terms, once per step (term_values)
        terms[f"kd_{k}"] = terms.get(f"kd_{k}", 0.0) + kinds[k].double() / count  # sums on the loss's device
