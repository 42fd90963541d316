"""Bits per byte of held-out conversations over the assistant's content only.

Each conversation is rendered by the model's own tokenizer and chat template (``sakd.data.chat.render``); the
tokens lying wholly inside an assistant content are scored (NLL in bits), and their bytes counted. Template
bytes (``<|im_start|>assistant\\n``) and user turns are context, never scored: they differ between the two
tokenizers' templates, so scoring them would not compare like with like. A conversation longer than
``max_len`` tokens is scored up to ``max_len``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sakd.align.tokens import start_token_id
from sakd.data.chat import RowSkipped, tokens_inside, encode_side


def scored_rows(tokenizer, conversations, max_len: int) -> list[tuple[list[int], list[int], int]]:
    """(ids, scored token indices, scored bytes) per conversation."""
    start = start_token_id(tokenizer)
    rows = []
    for conv in conversations:
        try:
            side = encode_side(tokenizer, conv.messages, start)
        except RowSkipped:
            continue
        enc = side.enc
        n = min(len(enc.ids), max_len)
        ks = []
        for m, r in zip(conv.messages, side.ranges):
            if m["role"] == "assistant" and r is not None:
                ks += [k for k in tokens_inside(enc, *r) if 0 < k < n]
        n_bytes = sum(enc.byte_ends[k] - enc.byte_starts[k] for k in ks)
        if ks:
            rows.append((enc.ids[:n], ks, n_bytes))
    return rows


@torch.no_grad()
def assistant_nll(model, tokenizer, conversations, max_len: int = 512, batch_size: int = 8,
                  device="cpu") -> tuple[float, int, int]:
    """(bits, bytes, tokens) summed over the assistant contents of ``conversations``."""
    rows = scored_rows(tokenizer, conversations, max_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bits, n_bytes, n_tok = 0.0, 0, 0
    was = model.training
    model.eval()
    for a in range(0, len(rows), batch_size):
        part = rows[a:a + batch_size]
        L = max(len(ids) for ids, _, _ in part)
        x = torch.full((len(part), L), pad, dtype=torch.long)
        mask = torch.zeros(len(part), L, dtype=torch.long)
        for b, (ids, _, _) in enumerate(part):
            x[b, :len(ids)] = torch.tensor(ids)
            mask[b, :len(ids)] = 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logp = F.log_softmax(logits, dim=-1)
        for b, (ids, ks, nb) in enumerate(part):
            k = torch.tensor(ks, device=logp.device)
            tgt = x[b, k].to(logp.device)
            bits -= float(logp[b, k - 1, tgt].sum()) / math.log(2)
            n_bytes += nb
            n_tok += len(ks)
    model.train(was)
    return bits, n_bytes, n_tok
