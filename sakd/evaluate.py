"""Held-out quality measured in a tokenizer-independent unit: bits per byte.

BPB = (total negative log-likelihood of the text, in bits) / (UTF-8 bytes of the
text). Per-token perplexity depends on how many tokens a tokenizer cuts the text
into, so it cannot compare models with different tokenizers; BPB can."""

from __future__ import annotations

import math

import torch


def start_token_id(tokenizer) -> int:
    """The token every window starts with: BOS if the tokenizer has one, else EOS."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a BOS nor an EOS token")
    return tid


def scoring_windows(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Each text tokenized once (no special tokens), cut into windows of ``max_len - 1`` tokens, each
    prefixed with the start token: every token of the text is in exactly one window."""
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


@torch.no_grad()
def nll_bits(model, tokenizer, texts: list[str], max_len: int = 512, batch_size: int = 8,
             device: str | torch.device = "cpu") -> tuple[float, int, int]:
    """Summed NLL in bits over every token of ``texts``, the UTF-8 byte count, the token count.

    Each text is tokenized once without special tokens and cut into windows of
    ``max_len - 1`` tokens; each window is prefixed with the start token, so every
    token of the text is scored exactly once (the first one given only the start token).
    """
    was_training = model.training
    model.eval()
    windows = scoring_windows(tokenizer, texts, max_len)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    total_nats, n_tokens = 0.0, 0
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        ids, mask = pad_windows(chunk)
        ids, mask = ids.to(device), mask.long().to(device)
        # Columns past the tokenizer's vocabulary (Qwen3: 151,936 vs 151,669) name no
        # token; they are dropped before the softmax.
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[..., :len(tokenizer)]
        for i in range(len(chunk)):  # one window at a time: a single [L, V] fp32 temporary (150k vocabularies)
            row = logits[i, :-1].float()
            nll = torch.logsumexp(row, dim=-1) - row.gather(-1, ids[i, 1:, None]).squeeze(-1)  # -log p(next)
            valid = mask[i, 1:].bool()
            total_nats += nll[valid].double().sum().item()
            n_tokens += int(valid.sum())
    model.train(was_training)
    return total_nats / math.log(2), n_bytes, n_tokens


def bits_per_byte(model, tokenizer, texts: list[str], max_len: int = 512, batch_size: int = 8,
                  device: str | torch.device = "cpu") -> float:
    """Held-out bits per byte: summed NLL in bits / UTF-8 bytes of ``texts``."""
    bits, n_bytes, _ = nll_bits(model, tokenizer, texts, max_len, batch_size, device)
    return bits / max(n_bytes, 1)
