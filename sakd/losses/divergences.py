"""Token-level divergences between the student's and the teacher's next-token distributions.

The public losses (``forward_kl``, ``reverse_kl``, ``generalized_jsd``, ``tvd``, ``kd_loss``,
``sparse_forward_kl``) take logits ``[..., V]`` (any leading dims, e.g. ``[B, L, V]`` or ``[N, V]``)
and an optional bool ``mask [...]``; each returns a float32 scalar: the mean (``reduction="mean"``)
or the sum (``"sum"``) of the per-position divergence over the positions where ``mask`` is True.
With every position masked out the result is 0 (not NaN), so an empty batch cannot poison a step.
The other losses build on this module: ``divergence_sum`` (row- and column-indexed pairs: shared_kl),
``linear_cross_entropy_sum`` (the objective's cross-entropy with the output layer fused in), and the
per-block kernels and their pieces (mapped_kl, projected_kl and their cached forms).

Notation, per position: ``q = softmax(s / T)`` (student), ``p = softmax(t / T)`` (teacher). The
temperature divides both logits; there is no ``T**2`` factor inside (the training loop applies it).

The losses run through ``RowBlockLoss`` (``sakd/losses/row_blocks.py``, whose docstring gives the memory
budget): one row block at a time in float32, with the analytic gradient of both arguments computed in the
forward pass.
"""

from __future__ import annotations

import math

import torch

from sakd.errors import UserError
from sakd.losses.row_blocks import Kernel, RowBlockLoss, check_settings


# ---------------------------------------------------------------------------------------------
# Per-block kernels. Each takes one row block of its inputs, returns (loss per row [n] float32,
# gradients w.r.t. the scaled logits z = logits / T of the differentiable inputs, or None where
# not needed). They may overwrite their own float32 temporaries but never their inputs.
# ---------------------------------------------------------------------------------------------

def log_softmax32(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(x / T) in float32, in a fresh tensor (the kernels overwrite it; the caller's input
    is never modified) -- except for a row block of logits ``RowBlockLoss`` computed or gathered itself
    (marked ``_owned``), which is overwritten in place."""
    if getattr(x, "_owned", False) and x.dtype == torch.float32:
        z = x.div_(temperature)  # in place: no second [rows, V] buffer
        z -= torch.logsumexp(z, dim=-1, keepdim=True)
        return z
    # the fused log_softmax kernel is ~20% faster than logsumexp + subtract; the scaled copy is a
    # temporary (at most two [rows, V] float32 buffers per row block at once, whatever the input dtype)
    return torch.log_softmax(x.to(torch.float32, copy=True).div_(temperature), dim=-1)


def softmax_(z: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension, in place in ``z`` (float32/64) and returned. Written as max, exp,
    sum, divide: torch.softmax's CPU kernel takes about twice as long on rows of thousands of columns
    (27 vs 13 ms for 770 x 8,192 float32 on one thread, torch 2.13); the values agree to rounding."""
    z.sub_(z.amax(-1, keepdim=True)).exp_()
    return z.div_(z.sum(-1, keepdim=True))


def softmax32(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(x / T) in float32: a fresh tensor, or for a block of logits ``RowBlockLoss``
    computed or gathered itself (marked ``_owned``, as ``log_softmax32``) in place."""
    owned = getattr(x, "_owned", False) and x.dtype == torch.float32
    z = x if owned else x.to(torch.float32, copy=True)
    return softmax_(z.div_(temperature) if temperature != 1.0 else z)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a loss computes in: float32 for 16- and 32-bit inputs; float64 stays float64 (the float64
    reference tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def kl_rows(log_a: torch.Tensor, log_b: torch.Tensor, need_a: bool, need_b: bool, a: torch.Tensor | None = None):
    """KL(a || b) per row from log-probs (both consumed: overwritten in place to save memory); ``a``: the
    probabilities themselves when the caller has them (else exp(log_a)).

    dKL/dz_a = a * (log a - log b - KL)   (softmax Jacobian applied to log a - log b + 1)
    dKL/dz_b = b - a
    Entries with a == 0 contribute 0 (0 log 0 = 0; this also covers -inf logits on both sides)."""
    a = log_a.exp() if a is None else a
    r = log_a.sub_(log_b)  # r = log a - log b, reusing log_a's storage
    r.masked_fill_(a == 0, 0.0)
    if need_a:
        loss = (a * r).sum(-1)
        grad_a = r.sub_(loss[:, None]).mul_(a)
    else:
        loss = r.mul_(a).sum(-1)
        grad_a = None
    grad_b = log_b.exp_().sub_(a) if need_b else None
    return loss, grad_a, grad_b


def _forward_kl_kernel(parts, temperature, need):
    s, t = parts
    loss, g_t, g_s = kl_rows(log_softmax32(t, temperature), log_softmax32(s, temperature), need[1], need[0])
    return loss, (g_s, g_t)


def _reverse_kl_kernel(parts, temperature, need):
    s, t = parts
    loss, g_s, g_t = kl_rows(log_softmax32(s, temperature), log_softmax32(t, temperature), need[0], need[1])
    return loss, (g_s, g_t)


def _jsd_kernel(parts, temperature, need, *, beta: float):
    """beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q, for 0 < beta < 1.

    Since sum_j m_j log m_j = beta*sum p log m + (1-beta)*sum q log m, the loss equals
    beta*sum p log p + (1-beta)*sum q log q - sum m log m, whence dL/dq_j = (1-beta)(log q_j - log m_j)
    and dL/dz_s = (1-beta) * q * (log q - log m - KL(q||m)); symmetrically for the teacher."""
    s, t = parts
    log_q = log_softmax32(s, temperature)
    log_p = log_softmax32(t, temperature)
    # log m via logaddexp: exp-then-log would turn beta*p underflowing to 0 into log m = -inf.
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    p, q = log_p.exp(), log_q.exp()
    d_p = log_p.sub_(log_m).masked_fill_(p == 0, 0.0)  # log p - log m
    d_q = log_q.sub_(log_m).masked_fill_(q == 0, 0.0)  # log q - log m
    del log_m
    kl_pm = (p * d_p).sum(-1)
    kl_qm = (q * d_q).sum(-1)
    loss = beta * kl_pm + (1.0 - beta) * kl_qm
    g_s = d_q.sub_(kl_qm[:, None]).mul_(q).mul_(1.0 - beta) if need[0] else None
    g_t = d_p.sub_(kl_pm[:, None]).mul_(p).mul_(beta) if need[1] else None
    return loss, (g_s, g_t)


def _tvd_kernel(parts, temperature, need):
    """0.5 * sum |p - q|. With g = sign(p - q) (0 where equal: the zero subgradient),
    dL/dq = -g/2, so dL/dz_s = -q * (g - <q, g>) / 2 and dL/dz_t = p * (g - <p, g>) / 2."""
    s, t = parts
    q = log_softmax32(s, temperature).exp_()
    p = log_softmax32(t, temperature).exp_()
    diff = p - q
    loss = 0.5 * diff.abs().sum(-1)
    g = diff.sign_()
    g_s = g_t = None
    if need[0]:
        g_s = (g - (q * g).sum(-1, keepdim=True)).mul_(q).mul_(-0.5)
    if need[1]:
        g_t = (g - (p * g).sum(-1, keepdim=True)).mul_(p).mul_(0.5)
    return loss, (g_s, g_t)


def sparse_forward_kl_kernel(parts, temperature, need):
    """KL between (k+1)-bucket distributions: the teacher's top-k ids plus the rest; see
    ``sparse_forward_kl``. With P = sum of the teacher's bucket masses (1 up to rounding),
    dL/dz_j = P*q_j - p_j on the top-k ids, and P*q_j - p_rest * q_j / q_rest off them."""
    s, ids, lp, rest = parts
    z = s.to(torch.float32, copy=True).div_(temperature)
    lse = torch.logsumexp(z, dim=-1)
    log_q_top = z.gather(1, ids) - lse[:, None]
    z.scatter_(1, ids, -math.inf)  # z now holds only the logits off the top-k ids
    lse_rest = torch.logsumexp(z, dim=-1)  # -inf when the top-k ids cover the whole vocabulary
    log_q_rest = lse_rest - lse
    lp, rest = lp.float(), rest.float()
    p_top, p_rest = lp.exp(), rest.exp()
    d_top = (lp - log_q_top).masked_fill_(p_top == 0, 0.0)
    d_rest = (rest - log_q_rest).masked_fill_(p_rest == 0, 0.0)
    loss = (p_top * d_top).sum(-1) + p_rest * d_rest
    g_s = None
    if need[0]:
        mass = p_top.sum(-1) + p_rest
        # Off the top-k ids: q_j * P - p_rest * exp(z_j - lse_rest); z = -inf on the top-k ids gives
        # 0 there, and a finite stand-in for lse_rest = -inf (then no id is off the top-k) avoids NaN.
        safe_rest = torch.where(torch.isfinite(lse_rest), lse_rest, torch.zeros_like(lse_rest))
        g_s = (z - lse[:, None]).exp_().mul_(mass[:, None])
        g_s.sub_((z - safe_rest[:, None]).exp_().mul_(p_rest[:, None]))
        g_s.scatter_(1, ids, log_q_top.exp().mul_(mass[:, None]).sub_(p_top))
    return loss, (g_s,)


def _cross_entropy_kernel(parts, temperature, need):
    """-log softmax(s / T)[target] per row; d/dz = softmax(z) - onehot(target). Targets are ids."""
    s, target = parts
    z = log_softmax32(s, temperature)
    loss = -z.gather(1, target[:, None]).squeeze(1)
    g = None
    if need[0]:
        g = z.exp_()
        g.scatter_add_(1, target[:, None], torch.full_like(loss[:, None], -1.0))
    return loss, (g, None)


def _select_rows(lead_shape: torch.Size, mask: torch.Tensor | None, device) -> tuple:
    """(row index or None for all rows, number of selected rows)."""
    n_rows = math.prod(lead_shape)
    if mask is None:
        return None, n_rows
    if mask.dtype != torch.bool or mask.shape != lead_shape:
        raise ValueError(f"mask must be bool of shape {tuple(lead_shape)}, got {mask.dtype} {tuple(mask.shape)}")
    rows = mask.reshape(-1).to(device).nonzero().squeeze(1)
    if rows.numel() == n_rows:
        return None, n_rows  # all selected: slice instead of gathering
    return rows, rows.numel()


def _reduce(total: torch.Tensor, n: int, reduction: str) -> torch.Tensor:
    return total / max(n, 1) if reduction == "mean" else total


def _dense(kernel: Kernel, student_logits, teacher_logits, mask, temperature, reduction, chunk_rows):
    check_settings(temperature, reduction, chunk_rows)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape [..., V]")
    vocab = student_logits.shape[-1]
    rows, n = _select_rows(student_logits.shape[:-1], mask, student_logits.device)
    total = RowBlockLoss.apply(kernel, 2, ((rows, None), (rows, None)), n, chunk_rows, float(temperature),
                               None, student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab))
    return _reduce(total, n, reduction)


# ---------------------------------------------------------------------------------------------
# Public losses.
# ---------------------------------------------------------------------------------------------

def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None, *,
               temperature: float = 1.0, reduction: str = "mean", chunk_rows: int = 1024) -> torch.Tensor:
    """Forward KL, KL(p_T || q_S) = sum_v p_v (log p_v - log q_v): the classic KD loss
    (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", without the T^2 factor).
    Mass-covering: the student pays for every token the teacher finds likely.

    Shapes: logits [..., V] (same shape, any float dtype), mask bool [...] or None.
    Returns a float32 scalar: mean or sum over unmasked positions. Gradients for both logits."""
    return _dense(_forward_kl_kernel, student_logits, teacher_logits, mask, temperature, reduction, chunk_rows)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None, *,
               temperature: float = 1.0, reduction: str = "mean", chunk_rows: int = 1024) -> torch.Tensor:
    """Reverse KL, KL(q_S || p_T) = sum_v q_v (log q_v - log p_v) (mode-seeking; MiniLLM, Gu et al.
    2024, and GKD's beta = 1 end). Shapes, reduction and gradients as in ``forward_kl``."""
    return _dense(_reverse_kl_kernel, student_logits, teacher_logits, mask, temperature, reduction, chunk_rows)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    *, beta: float = 0.5, temperature: float = 1.0, reduction: str = "mean",
                    chunk_rows: int = 1024) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence JSD(beta) of GKD (Agarwal et al. 2024, "On-Policy
    Distillation of Language Models: Learning from Self-Generated Mistakes", Eq. 1), as in TRL's
    ``GKDTrainer.generalized_jsd_loss``:

        m = beta * p_T + (1 - beta) * q_S
        JSD(beta) = beta * KL(p_T || m) + (1 - beta) * KL(q_S || m)        for 0 < beta < 1.

    The ends follow the GKD/TRL convention: beta = 0 IS forward KL(p_T || q_S) and beta = 1 IS
    reverse KL(q_S || p_T). (Taken literally the formula tends to 0 at both ends; the convention
    makes beta interpolate between the two KL directions, and ``beta`` is validated in [0, 1].)
    Shapes, reduction and gradients as in ``forward_kl``."""
    return _dense(divergence_kernel("jsd", beta), student_logits, teacher_logits, mask, temperature, reduction, chunk_rows)


def tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None, *,
        temperature: float = 1.0, reduction: str = "mean", chunk_rows: int = 1024) -> torch.Tensor:
    """Total variation distance 0.5 * sum_v |p_T,v - q_S,v| (in [0, 1]; used as a KD loss by
    DistiLLM, Ko et al. 2024, and Wen et al. 2023, "f-Divergence Minimization for Sequence-Level
    KD"). The subgradient at p == q is taken as 0. Shapes, reduction and gradients as in ``forward_kl``."""
    return _dense(_tvd_kernel, student_logits, teacher_logits, mask, temperature, reduction, chunk_rows)


def sparse_forward_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                      rest_logprob: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0, *,
                      reduction: str = "mean", chunk_rows: int = 1024) -> torch.Tensor:
    """Forward KL from a sparse (cached) teacher: its top-k ids, their log-probs, and the log of
    the remaining mass. Both distributions are coarsened to the same k + 1 buckets (the k ids,
    and "everything else"), and the loss is the exact KL between the bucketed distributions:

        loss = sum_k p_k (log p_k - log q_k) + p_rest (log p_rest - log q_rest),
        q_k = softmax(s / T)[id_k],   q_rest = 1 - sum_k q_k  (student mass off the top-k ids,
                                                               computed as a log-sum-exp, not 1 - sum).

    By the data-processing inequality this is <= the dense KL(p_T || q_S); with k = V and
    rest_logprob = -inf it equals ``forward_kl``. The teacher is never densified to [rows, V].

    Shapes: student_logits [..., V]; topk_ids long [..., k] (distinct ids per row);
    topk_logprobs [..., k] and rest_logprob [...]: the teacher's log-probs AT THE SAME
    TEMPERATURE (the cache writer applies T; here T divides the student logits only).
    Buckets with p = 0 (log-prob -inf, e.g. padding) contribute 0. Gradient: student only
    (the cache is a constant). Returns a float32 scalar: mean or sum over unmasked positions."""
    check_settings(temperature, reduction, chunk_rows)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    k = topk_ids.shape[-1]
    if topk_ids.shape[:-1] != lead or topk_logprobs.shape != topk_ids.shape or rest_logprob.shape != lead:
        raise ValueError(f"sparse teacher shapes do not match student logits {tuple(student_logits.shape)}: "
                         f"topk_ids {tuple(topk_ids.shape)}, topk_logprobs {tuple(topk_logprobs.shape)}, "
                         f"rest_logprob {tuple(rest_logprob.shape)} (want [..., k], [..., k], [...])")
    if k > vocab:
        raise ValueError(f"top-k of {k} ids exceeds the student vocabulary of {vocab}")
    rows, n = _select_rows(lead, mask, student_logits.device)
    total = RowBlockLoss.apply(sparse_forward_kl_kernel, 1, ((rows, None),) * 4, n, chunk_rows, float(temperature),
                               None,
                               student_logits.reshape(-1, vocab), topk_ids.reshape(-1, k).long(),
                               topk_logprobs.detach().reshape(-1, k), rest_logprob.detach().reshape(-1))
    return _reduce(total, n, reduction)


# The divergences by the config's loss name; ``beta`` only matters for "jsd".
_KERNELS: dict[str, Kernel] = {"forward_kl": _forward_kl_kernel, "reverse_kl": _reverse_kl_kernel,
                               "jsd": _jsd_kernel, "tvd": _tvd_kernel}


def divergence_kernel(name: str, beta: float) -> Kernel:
    """The per-block kernel of the divergence ``name``; JSD's ends are the two KL directions."""
    if name not in _KERNELS:
        raise UserError(f"KD loss {name!r} is unknown: use one of {', '.join(_KERNELS)}")
    if name != "jsd":
        return _KERNELS[name]
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise UserError(f"JSD beta {beta!r} is outside [0, 1]: 0 = forward KL, 1 = reverse KL, 0.5 = symmetric")
    if beta in (0, 1):
        return _forward_kl_kernel if beta == 0 else _reverse_kl_kernel
    return lambda parts, temperature, need: _jsd_kernel(parts, temperature, need, beta=float(beta))


def kd_loss(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            mask: torch.Tensor | None = None, *, temperature: float = 1.0, beta: float = 0.5,
            reduction: str = "mean", chunk_rows: int = 1024) -> torch.Tensor:
    """The divergence named ``name`` (one of forward_kl, reverse_kl, jsd, tvd); see those functions."""
    return _dense(divergence_kernel(name, beta), student_logits, teacher_logits, mask, temperature, reduction, chunk_rows)


def _is_arange(cols: torch.Tensor | None, size: int) -> bool:
    return cols is None or (cols.numel() == size and bool((cols == torch.arange(size, device=cols.device)).all()))


def divergence_sum(name: str, student: torch.Tensor, teacher: torch.Tensor, *, s_rows=None, t_rows=None,
                   s_cols=None, t_cols=None, head_weight: torch.Tensor | None = None, temperature: float = 1.0,
                   beta: float = 0.5, chunk_rows: int = 1024) -> torch.Tensor:
    """Sum over N row pairs of the divergence ``name`` between student row ``s_rows[i]`` on columns
    ``s_cols`` and teacher row ``t_rows[i]`` on columns ``t_cols`` (both softmaxes over the selected
    columns only), without gathering the [N, S] selections: each row block is gathered, compared
    and its gradient scattered back in one pass.

    student: logits [R_s, V_s], or with ``head_weight`` [V_s, H] the student's last hidden state
    [R_s, H] (the output layer is then fused in, see ``RowBlockLoss``); teacher: logits [R_t, V_t].
    Row indices: long [N] of distinct rows, or None for rows 0..N-1; column indices: long [S] (the
    same S on both sides, matched in order), or None for all columns. Gradients reach the student
    (logits, or hidden state and weight) and the teacher's logits when they require them."""
    check_settings(temperature, "sum", chunk_rows)
    kernel = divergence_kernel(name, beta)
    n = (s_rows.numel() if s_rows is not None else t_rows.numel() if t_rows is not None
         else min(student.shape[0], teacher.shape[0]))
    width_s = head_weight.shape[0] if head_weight is not None else student.shape[-1]
    s_cols = None if _is_arange(s_cols, width_s) else s_cols
    t_cols = None if _is_arange(t_cols, teacher.shape[-1]) else t_cols
    if head_weight is not None and s_cols is not None:  # the head's rows ARE the student's columns
        head_weight, s_cols = head_weight.index_select(0, s_cols), None
    return RowBlockLoss.apply(kernel, 2, ((s_rows, s_cols), (t_rows, t_cols)), n, chunk_rows, float(temperature),
                              head_weight, student, teacher)


def linear_cross_entropy_sum(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                             rows: torch.Tensor | None = None, *, chunk_rows: int = 1024) -> torch.Tensor:
    """Sum over rows of -log softmax(hidden[r] @ head_weight.T)[targets[i]] with the output layer fused
    in (the [rows, V] logits never exist at once). hidden [R, H], head_weight [V, H], targets long [N],
    rows long [N] or None (rows 0..N-1)."""
    check_settings(1.0, "sum", chunk_rows)
    n = targets.numel()
    return RowBlockLoss.apply(_cross_entropy_kernel, 1, ((rows, None), (None, None)), n, chunk_rows, 1.0,
                              head_weight, hidden, targets)
