"""The row-block mechanism shared by the losses: ``RowBlockLoss``, one ``torch.autograd.Function`` that sums a
per-row loss over selected rows one row block at a time, with the gradient computed in the forward pass; the
``Kernel`` it calls on each block; ``head_rows`` (rows of a model output as logits, a fused output layer
included); ``overwrites_block``; and ``check_settings`` (the settings every row-block loss validates). The
kernels themselves live with their losses (``sakd/losses/divergences.py``, ``mapped.py``, ``projected.py``,
``cached_mapped.py``).

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
