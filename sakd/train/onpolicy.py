"""On-policy data (GKD, Agarwal et al. 2024; used by the KA/SAR runs of Kim et al. 2025).

With probability ``lmbda`` per optimizer step, the student continues prompts taken from the
batch's own text spans; the generated TEXT is then encoded by both tokenizers and byte-aligned
exactly like any other span, so the teacher scores the very same characters the student wrote
(re-tokenised for the teacher through the text, never by mapping ids). ``lmbda = 0`` keeps the
cheap off-policy mode. On chat data the student writes the assistant's turn instead
(``sakd/train/chat_onpolicy.py``).
"""

from __future__ import annotations

import torch


def prompt_of(text: str, frac: float = 0.5) -> str:
    """The first ``frac`` of a span, cut before a whitespace so the continuation starts a word."""
    cut = max(1, int(len(text) * frac))
    ws = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
    return text[: ws if ws > 0 else cut]


@torch.no_grad()
def generate_items(student, dataset, indices: list[int], *, new_tokens: int, temperature: float,
                   prompt_frac: float = 0.5, counters: dict | None = None) -> list[dict]:
    """Encoded pairs (see ``sakd.data.text.encode_pair``) of prompt + student continuation, one per index.
    Chat data: the student writes the assistant's turns (``sakd/train/chat_onpolicy.py``); the conversations
    that keep the data set's reply are added to ``counters["on_policy_dataset_replies"]``."""
    if getattr(dataset, "encoder", None) is not None:
        from sakd.train.chat_onpolicy import generate_chat_items

        rows, kept = generate_chat_items(student, dataset, indices, new_tokens=new_tokens, temperature=temperature)
        if counters is not None and kept:
            counters["on_policy_dataset_replies"] = counters.get("on_policy_dataset_replies", 0) + kept
        return rows
    tok = dataset.student_tok
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    items = []
    for i in indices:
        prompt = prompt_of(dataset.spans[i], prompt_frac)
        ids = [dataset.s_start] + tok(prompt, add_special_tokens=False)["input_ids"]
        ids = ids[: max(2, dataset.seq_len - new_tokens)]
        x = torch.tensor([ids], device=device)
        out = student.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=temperature,
                               top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else dataset.s_start)
        text = tok.decode(out[0, 1:].tolist(), skip_special_tokens=True)
        items.append(dataset.encode_text(text))  # normalised like the spans, never fatal
    student.train(was_training)
    return items
