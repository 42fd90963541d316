"""Logit losses between a student and a teacher with different tokenizers.

Positions and vocabularies never meet by id. Positions meet through byte-aligned
chunks (batch format: sakd/data/text.py): chunk c covers student tokens
[chunk_s_start, chunk_s_end) and teacher tokens [chunk_t_start, chunk_t_end), and
token k is predicted by the logits at position k - 1. Vocabularies meet through the
string-level map shared_s[i] ↔ shared_t[i] (sakd/align/vocab.py).

Return convention (every loss here): ``(loss_sum, n)`` — the sum of a per-item loss
and the number of items as an int64 0-dim tensor (items are positions, or for
``chunk_likelihood_loss`` the weight total), so that the loop can add sums over
micro-batches and divide once per optimizer step (``shared_vocab_kd`` adds a third,
logging-only value). Everything is
computed in float32 (float64 inputs stay float64, except inside ``kd_loss``).

Default losses: ``shared_vocab_kd`` on 1:1 chunks, ``chunk_likelihood_loss`` (ALM)
on the other chunks. The benchmark's baselines (ULD, GOLD's hybrid, truncation) are in
sakd/losses/baselines.py."""

from __future__ import annotations

import math

import torch

from sakd.errors import UserError
from sakd.losses.batch import count as _count, field as _field, one_to_one_positions  # noqa: F401 (re-exported)
from sakd.losses.divergences import divergence_sum
from sakd.losses.row_blocks import head_rows


# ---------------------------------------------------------------------------------------------
# 1. Shared-vocabulary KD on 1:1 chunks (the default logit loss).
# ---------------------------------------------------------------------------------------------

def largest_id(ids: torch.Tensor) -> int:
    """``int(ids.max())``, read once per tensor: the shared ids are fixed for a run, and each read of a device
    value is a host sync (it waits for the queued kernels); the loop calls the loss once per teacher pass."""
    m = getattr(ids, "_largest_id", None)
    if m is None:
        m = ids._largest_id = int(ids.max())
    return m


def shared_vocab_kd(s_logits: torch.Tensor, t_logits: torch.Tensor, batch, shared_s: torch.Tensor,
                    shared_t: torch.Tensor, *, divergence: str = "forward_kl", temperature: float = 1.0,
                    beta: float = 0.5, t_vocab_size: int | None = None, chunk_rows: int = 1024,
                    outside_mass: bool = True, head_weight: torch.Tensor | None = None):
    """Divergence between next-token distributions restricted to the shared vocabulary.

    At every 1:1 chunk, take student logits at chunk_s_start - 1 on columns shared_s
    and teacher logits at chunk_t_start - 1 on columns shared_t ([N, S] each); both
    softmaxes over these S columns renormalise, and the divergence ``divergence`` (as in
    ``kd_loss``) compares them (forward_kl = KL(p_T|S ‖ q_S|S)). Source: strict 1:1
    shared-vocabulary KL ("Rethinking cross-tokenizer on-policy distillation", 2026;
    RESEARCH.md §2). With one tokenizer on both sides (shared = arange(V), all chunks 1:1)
    this is exactly plain full-vocabulary KD over all positions, and no column is gathered.

    s_logits [B, Ls, Vs], t_logits [B, Lt, Vt_model]: t_vocab_size (the teacher
    tokenizer's length) bounds the shared ids: the model's padding columns (Qwen3: 151,936
    vs 151,669) name no token. With ``head_weight`` [Vs, H] (the student's output layer),
    s_logits is instead the student's last hidden state [B, Ls, H] and the head is fused
    into the loss: the student's logits never exist. The [N, S] selections are never
    gathered whole either: ``divergence_sum`` walks the rows in row blocks of ``chunk_rows``.
    Gradients reach both sides (the SAR router step trains the teacher through this loss):
    detach the side that is frozen.

    Returns (loss_sum, n, teacher_mass_outside): sum over the N positions, n = N, and
    the mean over them (detached, for logging) of the teacher's probability (at
    temperature 1, full vocabulary) on tokens outside the shared vocabulary — the part
    of its prediction this loss cannot transfer (None when ``outside_mass`` is False: it costs a
    full-vocabulary pass over the teacher rows and serves only the log)."""
    b, s_pos, t_pos = one_to_one_positions(batch)
    vt = t_logits.shape[-1] if t_vocab_size is None else int(t_vocab_size)
    if shared_t.numel() and largest_id(shared_t) >= vt:
        raise UserError(f"shared teacher ids reach {largest_id(shared_t)} but the teacher vocabulary has {vt} "
                        "tokens: rebuild the vocabulary map for this teacher tokenizer")
    shared_s, shared_t = shared_s.to(s_logits.device), shared_t.to(t_logits.device)
    ls, lt = s_logits.shape[1], t_logits.shape[1]
    # Rows of the flattened [B * L, V] views (views, not copies, even for a column-sliced teacher).
    s_rows, t_rows = b * ls + s_pos, b.to(t_logits.device) * lt + t_pos.to(t_logits.device)
    loss_sum = divergence_sum(divergence, s_logits.flatten(0, 1), t_logits.flatten(0, 1), s_rows=s_rows,
                              t_rows=t_rows, s_cols=shared_s, t_cols=shared_t, head_weight=head_weight,
                              temperature=temperature, beta=beta, chunk_rows=chunk_rows)
    outside = teacher_mass_outside(t_logits, b, t_pos, shared_t, vt, chunk_rows) if outside_mass else None
    return loss_sum, _count(b.numel(), s_logits), outside


@torch.no_grad()
def teacher_mass_outside(t_logits, b, t_pos, shared_t, vt: int, chunk_rows: int,
                          head_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of 1 - Σ_shared p_T, from log-sum-exps: 1 - exp(lse_shared - lse_all). With
    ``head_weight`` [Vt_cols, H], ``t_logits`` is the teacher's last hidden state and each row block's logits
    are made from it (the teacher's full [B, Lt, Vt] logits need not exist)."""
    total = torch.zeros((), dtype=torch.float32, device=t_logits.device)
    flat, r = t_logits.flatten(0, 1), b.to(t_logits.device) * t_logits.shape[1] + t_pos.to(t_logits.device)
    for a in range(0, b.numel(), chunk_rows):
        rows = head_rows(flat, r[a:a + chunk_rows], vt, torch.float32, head_weight)   # [n, Vt]
        log_in = torch.logsumexp(rows[:, shared_t], -1) - torch.logsumexp(rows, -1)
        total += (-torch.expm1(log_in)).sum()
    return total / max(b.numel(), 1)


# ---------------------------------------------------------------------------------------------
# 2. Approximate Likelihood Matching on chunks (Minixhofer et al. 2025).
# ---------------------------------------------------------------------------------------------

class _TargetLogProb(torch.autograd.Function):
    """out[i] = log_softmax(x[rows[i], :V])[target[i]], walking the rows in row blocks of ``chunk_rows``.

    Saves only x (already alive: the model's logits), the row index and the
    log-sum-exps; backward recomputes softmax per row block. d out / d z = onehot - softmax."""

    @staticmethod
    def forward(ctx, x, rows, target, vocab: int, chunk_rows: int):
        dtype = torch.promote_types(x.dtype, torch.float32)
        out = x.new_empty(rows.numel(), dtype=dtype)
        lse = x.new_empty(rows.numel(), dtype=dtype)
        for a in range(0, rows.numel(), chunk_rows):
            z = x.index_select(0, rows[a:a + chunk_rows])[:, :vocab].to(dtype)
            lse[a:a + chunk_rows] = torch.logsumexp(z, -1)
            out[a:a + chunk_rows] = z.gather(1, target[a:a + chunk_rows, None]).squeeze(1) - lse[a:a + chunk_rows]
        ctx.vocab, ctx.chunk_rows = vocab, chunk_rows
        ctx.save_for_backward(x, rows, target, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        x, rows, target, lse = ctx.saved_tensors
        grad = torch.zeros_like(x)  # rows not selected, and padding columns >= vocab, get 0
        for a in range(0, rows.numel(), ctx.chunk_rows):
            r, ga = rows[a:a + ctx.chunk_rows], g[a:a + ctx.chunk_rows, None].to(lse.dtype)
            z = x.index_select(0, r)[:, :ctx.vocab].to(lse.dtype)
            gz = (z - lse[a:a + ctx.chunk_rows, None]).exp_().mul_(-ga)
            gz.scatter_add_(1, target[a:a + ctx.chunk_rows, None], ga)
            full = torch.zeros(r.numel(), x.shape[1], dtype=x.dtype, device=x.device)
            full[:, :ctx.vocab] = gz.to(x.dtype)
            grad.index_copy_(0, r, full)  # rows are distinct positions: copy, not add
        return grad, None, None, None, None


def chunk_logprobs(logits: torch.Tensor, ids: torch.Tensor, token_chunk: torch.Tensor, n_chunks: int, *,
                   vocab_size: int | None = None, select: torch.Tensor | None = None,
                   chunk_rows: int = 1024) -> torch.Tensor:
    """Log-likelihood of every chunk under one model: [B, C].

    log P(chunk c) = Σ_{tokens k in c} log softmax(logits[k - 1])[ids[k]] — token k is
    scored by the logits one position earlier. logits [B, L, V] (columns >= vocab_size
    dropped before the softmax), ids / token_chunk [B, L] (chunk -1: start token,
    padding: not scored). ``select`` [B, C] bool limits the work to some chunks (the
    others read 0). Differentiable in logits; memory: no [B, L, V] temporary."""
    B, L, V = logits.shape
    vocab = V if vocab_size is None else int(vocab_size)
    tok = token_chunk >= 0
    tok[:, 0] = False  # position 0 has no predecessor; by the batch format it is the start token anyway
    if select is not None:
        tok &= select.gather(1, token_chunk.clamp(min=0))
    b, k = tok.nonzero(as_tuple=True)
    target = ids[b, k].clamp(0, vocab - 1)
    lp = _TargetLogProb.apply(logits.reshape(B * L, V), b * L + k - 1, target, vocab, chunk_rows)
    out = lp.new_zeros(B, n_chunks)
    return out.index_put((b, token_chunk[b, k]), lp, accumulate=True)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stably (Mächler 2012): log(-expm1(x)) near 0, log1p(-exp(x))
    below -log 2. Each branch gets an input where it is finite, so torch.where's backward
    never multiplies a 0 by an inf."""
    near = x > -math.log(2.0)
    a = torch.log(-torch.expm1(torch.where(near, x, torch.full_like(x, -1.0))))
    c = torch.log1p(-torch.exp(torch.where(near, torch.full_like(x, -1.0), x)))
    return torch.where(near, a, c)


def chunk_likelihood_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, batch, *, temperature: float = 100.0,
                          only_multi: bool = True, weight: str = "student_tokens", subtract_entropy: bool = True,
                          t_vocab_size: int | None = None, epsilon: float = 1e-6, chunk_rows: int = 1024):
    """Approximate Likelihood Matching (ALM; Minixhofer et al. 2025, "Universal Cross-Tokenizer
    Distillation via Approximate Likelihood Matching", §3; tokenkit ``compute_alm_loss`` with
    ``alm_diff_fn="binary_ce"``).

    Per chunk c: ℓ_T = log P_T(c), ℓ_S = log P_S(c) (``chunk_logprobs``, teacher detached).
    Binarise at temperature τ: x = min(ℓ, 0)/τ - ε, p = exp(x_T), q = exp(x_S), and

        BCE(p, q) = -[p log q + (1 - p) log(1 - q)]          (log(1-q) via log1mexp)
        loss_c    = BCE(p, q) - H(p) = KL(Bern(p) ‖ Bern(q))  (subtract_entropy=True, default)

    H(p) does not depend on the student, so both versions have the same gradient
    (tokenkit reports the BCE); the binary KL is 0 exactly when ℓ_S = ℓ_T, which makes
    the logged value readable. ε = 1e-6 keeps x < 0 as in tokenkit.

    only_multi: skip 1:1 chunks (``shared_vocab_kd`` covers them with the full
    distribution; ALM would only see the probability of the observed token there).

    weight: "student_tokens" (default) weights chunk c by its number of student tokens,
    so that the sum is on the same per-student-token footing as the other terms;
    "teacher_tokens" is tokenkit's ``distill_main_path_numerator="token_count"`` (tokens of
    the original — teacher — tokenizer); "chunks" (weight 1) is tokenkit's default
    ``"chunk_count"``.

    Returns (loss_sum, n): Σ_c w_c loss_c over selected chunks, and Σ_c w_c (int64)."""
    mask, n_s, n_t, sel = alm_selection(batch, weight, temperature, only_multi)
    C = mask.shape[1]
    lp_s = chunk_logprobs(s_logits, _field(batch, "s_ids"), _field(batch, "s_chunk"), C, select=sel,
                          chunk_rows=chunk_rows)
    with torch.no_grad():
        lp_t = chunk_logprobs(t_logits, _field(batch, "t_ids"), _field(batch, "t_chunk"), C, select=sel,
                              vocab_size=t_vocab_size, chunk_rows=chunk_rows).to(lp_s.dtype)
    return alm_from_chunk_logprobs(lp_s, lp_t, n_s, n_t, sel, temperature=temperature, weight=weight,
                                   subtract_entropy=subtract_entropy, epsilon=epsilon)


def alm_selection(batch, weight: str, temperature: float, only_multi: bool):
    """Checks and the chunk selection shared by the live and the cached ALM loss:
    (chunk_mask, student tokens per chunk, teacher tokens per chunk, selected chunks)."""
    if weight not in ("student_tokens", "teacher_tokens", "chunks"):
        raise UserError(f"ALM weight {weight!r} is unknown: use 'student_tokens', 'teacher_tokens' or 'chunks'")
    if not temperature > 0:
        raise UserError(f"ALM temperature {temperature!r} must be positive (tokenkit default: 100)")
    mask = _field(batch, "chunk_mask")
    n_s = _field(batch, "chunk_s_end") - _field(batch, "chunk_s_start")
    n_t = _field(batch, "chunk_t_end") - _field(batch, "chunk_t_start")
    sel = mask & ~((n_s == 1) & (n_t == 1)) if only_multi else mask.clone()
    return mask, n_s, n_t, sel


def alm_from_chunk_logprobs(lp_s, lp_t, n_s, n_t, sel, *, temperature: float, weight: str,
                            subtract_entropy: bool, epsilon: float):
    """The binarised ALM loss from chunk log-probs [B, C] (student with grad, teacher detached):
    Σ_c w_c · (BCE(p_c, q_c) − [subtract_entropy] H(p_c)), p = exp(ℓ_T/τ), q = exp(ℓ_S/τ); and Σ_c w_c."""
    # min(., 0): rounding can put a sum of log-probs a hair above 0 (tokenkit clips too).
    x_s = lp_s.clamp(max=0.0) / temperature - epsilon
    x_t = lp_t.clamp(max=0.0) / temperature - epsilon
    p, one_minus_p = x_t.exp(), -torch.expm1(x_t)
    loss = -(p * x_s + one_minus_p * log1mexp(x_s))
    if subtract_entropy:
        loss = loss + (p * x_t + one_minus_p * log1mexp(x_t))
    w = {"student_tokens": n_s, "teacher_tokens": n_t, "chunks": torch.ones_like(n_s)}[weight] * sel
    return (loss * w.to(loss.dtype)).sum(), w.sum()
