"""Held-out quality measured in a tokenizer-independent unit: bits per byte.

BPB = (total negative log-likelihood of the text, in bits) / (UTF-8 bytes of the
text). Per-token perplexity depends on how many tokens a tokenizer cuts the text
into, so it cannot compare models with different tokenizers; BPB can.

Scoring uses SLIDING windows with a context budget in BYTES: every scored token
sees at least ``context_bytes`` bytes of the text before it (or the whole text
before it, near the start), whatever the tokenizer. Two models with different
tokenizers are therefore scored with the same amount of real context, and no
token is scored right after a window restart with nothing but the start token
in front of it (except the first token of each text)."""

from __future__ import annotations

import bisect
import inspect
import math

import torch

# the start token is chosen in the tokenizer layer (BOS, else the document separator, never a chat marker)
from sakd.align.tokens import start_token_id

# Bytes of real context every scored token gets at least (the default of eval.context_bytes).
# The demo's windows (eval.seq_len=256) hold ~730 bytes of student text (2.86 bytes per token on the
# held-out plays) and ~865 of teacher text (3.38): 384 bytes of context leave about half of each
# student window to score (2.1 forward tokens per scored token). The demo teacher gains nothing
# from more: 2.1786 bits/byte at 384 and at 512 bytes, 2.1895 with independent windows.
DEFAULT_CONTEXT_BYTES = 384


def scoring_windows(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Each text tokenized once (no special tokens), cut into windows of ``max_len - 1`` tokens, each
    prefixed with the start token: every token of the text is in exactly one window. (Independent
    windows: used by the report's expert-usage pass; bits per byte uses :func:`window_plan`.)"""
    start = start_token_id(tokenizer)
    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        windows += [[start] + ids[i:i + max_len - 1] for i in range(0, len(ids), max_len - 1)]
    return windows


def pad_windows(windows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, W] (pad 0, masked) and a bool attention mask [B, W]."""
    width = max(len(w) for w in windows)
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    mask = torch.zeros(len(windows), width, dtype=torch.bool)
    for i, w in enumerate(windows):
        ids[i, :len(w)], mask[i, :len(w)] = torch.tensor(w), True
    return ids, mask


def window_plan(byte_starts: list[int], max_len: int, context_bytes: int) -> list[tuple[int, int, int]]:
    """Sliding windows over one text's tokens, given each token's first byte (non-decreasing).

    Returns ``(c, s, e)`` per window: the window holds the start token and text tokens ``c..e-1``
    (at most ``max_len - 1``) and scores tokens ``s..e-1``. The scored ranges partition the tokens;
    the first window starts at the text's start (c = s = 0). Every later window takes the shortest
    context that covers the budget: the largest ``c <= s`` with ``byte_starts[s] - byte_starts[c] >=
    context_bytes`` (c = 0 if the text before ``s`` is shorter), so every scored token ``j`` has at
    least ``min(context_bytes, byte_starts[j])`` bytes of context. Where the budget needs more than
    ``max_len - 2`` tokens (very short tokens), the context is cut to half the window; such windows
    are counted by :func:`sliding_nll` as ``short_context_tokens``."""
    if max_len < 3:
        raise ValueError(f"evaluation windows of {max_len} tokens cannot hold context and a scored token: "
                         "use eval.seq_len >= 3")
    if context_bytes < 0:
        raise ValueError(f"eval.context_bytes={context_bytes} must be >= 0")
    room, n, plan, s = max_len - 1, len(byte_starts), [], 0
    while s < n:
        c = 0
        if s > 0:
            c = min(s, max(0, bisect.bisect_right(byte_starts, byte_starts[s] - context_bytes) - 1))
            if s - c > room - 1:
                c = s - room // 2
        e = min(n, c + room)
        plan.append((c, s, e))
        s = e
    return plan


def token_byte_starts(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """The text's token ids (no special tokens) and each token's first UTF-8 byte."""
    from sakd.align.tokens import AlignmentError, encode_with_bytes

    try:
        enc = encode_with_bytes(tokenizer, text)
        return enc.ids, enc.byte_starts
    except AlignmentError:
        # A tokenizer whose tokens do not spell the text (a normalizer): its own character offsets.
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        c2b, pos = [0], 0
        for ch in text:
            pos += len(ch.encode("utf-8"))
            c2b.append(pos)
        starts, last = [], 0
        for a, _ in enc["offset_mapping"]:
            last = max(last, c2b[min(a, len(text))])
            starts.append(last)
        return list(enc["input_ids"]), starts


def _keeps_logits(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def sliding_nll(model, tokenizer, texts: list[str], max_len: int = 512, batch_size: int = 8,
                device: str | torch.device = "cpu", context_bytes: int = DEFAULT_CONTEXT_BYTES) -> dict:
    """Summed NLL over every token of ``texts``, scored in sliding windows (:func:`window_plan`).

    Returns {"bits", "bytes", "tokens", "windows", "forward_tokens", "short_context_tokens"}. Windows of
    equal length are batched without padding, and only the scored rows' logits are computed
    (``logits_to_keep``) and turned to fp32, one window at a time (150k-column vocabularies)."""
    was_training = model.training
    model.eval()
    start = start_token_id(tokenizer)
    windows: list[tuple[list[int], int]] = []  # (ids with the start token, scored tokens at its end)
    short = 0
    for text in texts:
        ids, starts = token_byte_starts(tokenizer, text)
        for c, s, e in window_plan(starts, max_len, context_bytes):
            windows.append(([start] + ids[c:e], e - s))
            if s > 0 and starts[s] - starts[c] < min(context_bytes, starts[s]):
                short += e - s
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    # Longest first: windows of one length (all but each text's last) share batches with no padding.
    windows.sort(key=lambda w: -len(w[0]))
    keep_ok = _keeps_logits(model)
    n_vocab = len(tokenizer)
    total_nats, n_tokens = 0.0, 0
    for b in range(0, len(windows), batch_size):
        group = windows[b:b + batch_size]
        ids, mask = pad_windows([w for w, _ in group])
        ids, mask = ids.to(device), mask.long().to(device)
        width = ids.shape[1]
        # window i scores its last n_i tokens, predicted by positions len_i - n_i - 1 .. len_i - 2
        first = min(len(w) - n - 1 for w, n in group)
        kw = {"logits_to_keep": width - first} if keep_ok else {}
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits
        offset = width - logits.shape[1]  # position of logits row 0
        # Columns past the tokenizer's vocabulary (Qwen3: 151,936 vs 151,669) name no token: dropped.
        logits = logits[..., :n_vocab]
        for i, (w, n) in enumerate(group):  # one window at a time: a single [n, V] fp32 temporary
            a = len(w) - n - 1
            rows = logits[i, a - offset:a - offset + n].float()
            target = ids[i, a + 1:a + 1 + n]
            nll = torch.logsumexp(rows, dim=-1) - rows.gather(-1, target[:, None]).squeeze(-1)
            total_nats += nll.double().sum().item()
            n_tokens += n
    model.train(was_training)
    return {"bits": total_nats / math.log(2), "bytes": n_bytes, "tokens": n_tokens, "windows": len(windows),
            "forward_tokens": sum(len(w) for w, _ in windows), "short_context_tokens": short}


def nll_bits(model, tokenizer, texts: list[str], max_len: int = 512, batch_size: int = 8,
             device: str | torch.device = "cpu", context_bytes: int = DEFAULT_CONTEXT_BYTES) -> tuple[float, int, int]:
    """Summed NLL in bits over every token of ``texts``, the UTF-8 byte count, the token count.

    Each text is tokenized once without special tokens and scored in sliding windows of at most
    ``max_len`` tokens (the start token first), every token exactly once, each with at least
    ``context_bytes`` bytes of the text before it in its window (all of it near the text's start).

    Held-out conversations (``sakd.data.chat_formats.Conversation``): the assistant's content only (sakd/evaluate/chat_bpb.py).
    """
    if texts and hasattr(texts[0], "messages"):
        from sakd.evaluate.chat_bpb import assistant_nll

        return assistant_nll(model, tokenizer, texts, max_len, batch_size, device)
    r = sliding_nll(model, tokenizer, texts, max_len, batch_size, device, context_bytes)
    return r["bits"], r["bytes"], r["tokens"]


def bits_per_byte(model, tokenizer, texts: list[str], max_len: int = 512, batch_size: int = 8,
                  device: str | torch.device = "cpu", context_bytes: int = DEFAULT_CONTEXT_BYTES) -> float:
    """Held-out bits per byte: summed NLL in bits / UTF-8 bytes of ``texts`` (sliding windows)."""
    bits, n_bytes, _ = nll_bits(model, tokenizer, texts, max_len, batch_size, device, context_bytes)
    return bits / max(n_bytes, 1)
