"""Token-level divergences between the student's and the teacher's next-token distributions.

The public losses (``forward_kl``, ``reverse_kl``, ``generalized_jsd``, ``tvd``, ``kd_loss``,
``sparse_forward_kl``) take logits ``[..., V]`` (any leading dims, e.g. ``[B, L, V]`` or ``[N, V]``)
and an optional bool ``mask [...]``; each returns a float32 scalar: the mean (``reduction="mean"``)
or the sum (``"sum"``) of the per-position divergence over the positions where ``mask`` is True.
With every position masked out the result is 0 (not NaN), so an empty batch cannot poison a step.
The other losses build on this module: ``divergence_sum`` (row- and column-indexed pairs: shared_kl),
``linear_cross_entropy_sum`` (the objective's cross-entropy with the output layer fused in), the
per-block kernels and ``RowBlockLoss`` itself (mapped_kl, projected_kl and their cached forms).

Notation, per position: ``q = softmax(s / T)`` (student), ``p = softmax(t / T)`` (teacher). The
temperature divides both logits; there is no ``T**2`` factor inside (the training loop applies it).

Memory: a vocabulary of 151,936 makes one ``[rows, V]`` float32 tensor ~0.6 MB per row, so plain
autograd (which saves the log-softmax outputs of both sides for backward) costs several such
tensors for the whole batch. Here one ``torch.autograd.Function``, ``RowBlockLoss``, walks the
selected rows in row blocks of ``chunk_rows`` rows (the config key ``loss.chunk_rows``), upcasting one
block at a time to float32 (inputs may be fp16/bf16). A per-block kernel returns the loss of each row
and its analytic gradient in the same forward pass; the gradient is written into a buffer of the
input's shape and dtype (the one autograd would allocate anyway), and the graph keeps only these
buffers, not the inputs. Backward recomputes nothing: it scales the buffers by the incoming gradient
(so it can run once). At most one block of ``[chunk_rows, V]`` float32 temporaries exists at a time,
whatever the number of rows. Masked rows are skipped (never read). With the student's output layer
fused in (``head_weight``), a block's logits are computed from the hidden state inside the block and
the full logits never exist.

Gradients exist for both arguments (student and teacher logits): the loop trains the student
through ``KL(p_T || q_S)``, and student-aware routing trains the teacher's router through the same
loss with the student detached. Only the gradients autograd asks for are computed.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from sakd.errors import UserError

Kernel = Callable[[Sequence[torch.Tensor], float, Sequence[bool]], tuple]


# ---------------------------------------------------------------------------------------------
# Per-block kernels. Each takes one row block of its inputs, returns (loss per row [n] float32,
# gradients w.r.t. the scaled logits z = logits / T of the differentiable inputs, or None where
# not needed). They may overwrite their own float32 temporaries but never their inputs.
# ---------------------------------------------------------------------------------------------

def log_softmax32(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(x / T) in float32, in a fresh tensor (the kernels overwrite it; the caller's input
    is never modified) -- except for a row block of logits this module computed itself (marked
    ``_owned``), which is overwritten in place."""
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
    """softmax(x / T) in float32: a fresh tensor, or for a chunk of logits this module computed itself
    (marked ``_owned``, as ``log_softmax32``) in place."""
    owned = getattr(x, "_owned", False) and x.dtype == torch.float32
    z = x if owned else x.to(torch.float32, copy=True)
    return softmax_(z.div_(temperature) if temperature != 1.0 else z)


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


# ---------------------------------------------------------------------------------------------
# The row-block autograd Function shared by all losses.
# ---------------------------------------------------------------------------------------------

def head_rows(x2: torch.Tensor, rows: torch.Tensor, vt: int, dtype, head: torch.Tensor | None) -> torch.Tensor:
    """Rows ``rows`` of a flattened [N, ·] model output as logits [len(rows), vt] in ``dtype``: ``x2`` holds the
    logits, or with ``head`` [V_cols, H] the last hidden state, multiplied by the output layer here (in the
    hidden state's dtype, as the model's own head would): a fused head computes only the rows asked for."""
    x = x2.index_select(0, rows)
    if head is None:
        return x[:, :vt].to(dtype)
    return (x @ head[:vt].to(x.dtype).T).to(dtype)


def overwrites_block(kernel: Kernel) -> Kernel:
    """``kernel`` may take its block 0's softmax in place: RowBlockLoss marks the blocks it gathers ``_owned``."""
    kernel.overwrites_block = True
    return kernel


def _row_blocks(n_rows: int, chunk_rows: int):
    for a in range(0, n_rows, chunk_rows):
        yield slice(a, min(a + chunk_rows, n_rows))


def _take(x: torch.Tensor, sel, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """Rows ``sel`` (a slice of the selection) of the 2-D/1-D ``x``: through the row index ``rows`` if
    given, restricted to the columns ``cols`` if given. Gathers one row block, never the whole selection."""
    x = x[sel] if rows is None else x.index_select(0, rows[sel])
    return x if cols is None else x.index_select(1, cols)


def _put(full: torch.Tensor, sel, rows, cols, g: torch.Tensor) -> None:
    """The inverse of ``_take`` for a gradient buffer (selected positions are distinct: a copy)."""
    g = g.to(full.dtype)
    if rows is None and cols is None:
        full[sel] = g
        return
    r = torch.arange(sel.start, sel.stop, device=full.device) if rows is None else rows[sel]
    if cols is None:
        full.index_copy_(0, r, g)
    else:
        full.index_put_((r[:, None], cols[None, :]), g)


def _grad_buffer(x: torch.Tensor, index, n_rows: int) -> torch.Tensor:
    """Where the gradient of ``x`` is written: exact zeros where a row or column is not selected (rows
    past ``n_rows`` too, when rows are taken in order); uninitialised only where every entry is written."""
    rows, cols = index
    full = rows is None and cols is None and (x.dim() < 1 or x.shape[0] == n_rows)
    return torch.empty_like(x) if full else torch.zeros_like(x)


class RowBlockLoss(torch.autograd.Function):
    """Sum over N selected rows of a per-row loss, computed one row block (``chunk_rows`` rows) at a time.

    ``tensors`` are 2-D/1-D with the row first; ``index[i] = (rows, cols)`` selects from tensor i its N
    rows (an index tensor, or None for its first N rows) and its columns (an index tensor, or None
    for all), so that differently laid out inputs (student positions / teacher positions, shared
    columns) meet without gathering the whole selection. The first ``n_diff`` tensors may receive
    gradients.

    With ``weight`` [V', H] (else None), the student's output layer is fused in: tensor 0 is the
    student's last hidden state [rows, H], and each block's logits ``h @ weight.T`` exist only inside
    the block; the gradients flow to the hidden state and the weight directly, so the student's
    [rows, V] logits (and their gradient) never exist. The matmuls run in the hidden state's dtype
    (fp16 under a P100's autocast, as the model's own head would), the kernels in float32.

    The analytic gradient of each block is computed in the same pass as its loss and written into a
    gradient buffer of the input's shape and dtype (the buffer autograd would allocate anyway); the
    graph keeps only these buffers, not the inputs, and backward scales them by the incoming gradient.
    So the kernel runs once per block and at most one block of [chunk_rows, V] float32 temporaries
    exists at a time. Backward can run once (the buffers are scaled in place)."""

    @staticmethod
    def forward(ctx, kernel: Kernel, n_diff: int, index, n_rows: int, chunk_rows: int, temperature: float,
                weight, *tensors):
        need_w = weight is not None and ctx.needs_input_grad[6]
        need_x = tuple(ctx.needs_input_grad[7:7 + n_diff])
        grads = [_grad_buffer(x, ix, n_rows) if n else None for x, ix, n in zip(tensors, index, need_x)]
        g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        need = (need_x[0] or need_w, *need_x[1:])  # the kernel's gradient w.r.t. the (block's) student logits
        if weight is not None:
            dtype = tensors[0].dtype if tensors[0].dtype in (torch.float16, torch.bfloat16) else torch.float32
            w = weight.to(dtype)
        # Block 0 is fresh when the fused head computed it or ``_take`` gathered it by a row or column index
        # (else it is a view of the caller's tensor). A gathered block is marked for ``overwrites_block`` kernels
        # only (the projected ones): no kernel reads block 0 twice, but log_softmax32 in place (logsumexp, then
        # subtract) rounds otherwise than torch's log_softmax, so the other losses would move in their last bits.
        gathered = getattr(kernel, "overwrites_block", False) and any(i is not None for i in index[0])
        total = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
        for sel in _row_blocks(n_rows, chunk_rows):
            parts = [_take(x, sel, *ix) for x, ix in zip(tensors, index)]
            if weight is not None:
                h = parts[0].to(dtype)
                parts[0] = (h @ w.T).float()
            if weight is not None or gathered:
                parts[0]._owned = True  # a fresh block: the kernel may take its (log-)softmax in place
            loss, block_grads = kernel(parts, temperature, need)
            total += loss.sum()
            for i, (full, ix, g) in enumerate(zip(grads, index, block_grads)):
                if i == 0 and weight is not None and g is not None:
                    g = g.to(dtype)  # d loss / d logits -> d loss / d hidden, d loss / d weight
                    if need_w:
                        g_weight += (g.T @ h).float()
                    if full is not None:
                        _put(full, sel, ix[0], None, g @ w)
                elif full is not None:
                    _put(full, sel, *ix, g)
        ctx.temperature, ctx.n_inputs = temperature, len(tensors)
        ctx.weight_dtype = weight.dtype if weight is not None else None
        kept = [g_weight, *grads]
        ctx.grad_slots = [g is not None for g in kept]
        ctx.save_for_backward(*[g for g in kept if g is not None])
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        scale = (grad_out / ctx.temperature).to(torch.float32)  # chain rule through z = logits / T
        grads = [next(saved).mul_(scale) if has else None for has in ctx.grad_slots]
        if grads[0] is not None:
            grads[0] = grads[0].to(ctx.weight_dtype)
        grads += [None] * (ctx.n_inputs + 1 - len(grads))
        return (None, None, None, None, None, None, *grads)


def check_settings(temperature: float, reduction: str, chunk_rows: int) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise UserError(f"KD temperature {temperature!r} is not a positive number: set it to e.g. 1.0 or 2.0")
    if reduction not in ("mean", "sum"):
        raise UserError(f"KD loss reduction {reduction!r} is unknown: use 'mean' or 'sum'")
    if not (isinstance(chunk_rows, int) and chunk_rows >= 1):
        raise UserError(f"KD loss chunk_rows {chunk_rows!r} must be a positive integer, e.g. 1024")


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
