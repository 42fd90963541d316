"""On-policy chat data: the student writes the assistant's turn (GKD, Agarwal et al. 2024; the text version
is ``sakd/train/onpolicy.py``).

For each conversation of a row, the prompt is every message before its last assistant message, rendered by
the STUDENT's chat template with the generation prompt (``<|im_start|>assistant\\n``); the student samples
at most ``new_tokens`` tokens, and its reply is the decoded text up to the template's end-of-turn marker
(what the template writes right after an assistant content: ``<|im_end|>``, ``</s>``). The conversation
with that reply in place of the data set's is then encoded exactly like a data set row
(``sakd.data.chat.ChatEncoder``: each side renders it with its own template, the two are aligned inside the
contents, the losses train the assistant's content), so the teacher scores the very characters the student
wrote, never the student's token ids. A conversation whose reply cannot be used (empty, a prompt too long to
leave room for it, a row the encoder skips) keeps the data set's reply, and is counted.
"""

from __future__ import annotations

import unicodedata

import torch

from sakd.align.tokens import AlignmentError, tokenizer_info
from sakd.data.chat import RowSkipped, pack

_MARK = "\u2063SAKD-REPLY\u2063"


def turn_end_marker(tok) -> str:
    """The text the student's template writes right after an assistant content (first line, stripped), or
    the tokenizer's EOS string when it writes nothing there."""
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}],
                                       tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this probe conversation: EOS then
        text = ""
    after = text.split(_MARK, 1)[1].strip().split("\n")[0].strip() if _MARK in text else ""
    return after or (tok.eos_token or "")


def reply_text(generated: str, stops: list[str], normal_form: str) -> str:
    """The reply in ``generated`` (decoded with special tokens): up to the first stop string, without a
    trailing half character (U+FFFD), in the data's normal form."""
    cut = min([generated.find(s) for s in stops if s and s in generated] or [len(generated)])
    text = generated[:cut].rstrip("\ufffd")
    return text if text.isascii() else unicodedata.normalize(normal_form, text)


def split_prompt(messages: list[dict]) -> tuple[list[dict], list[dict]] | None:
    """(messages before the last assistant message, messages after it), or None without one."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return None if last is None else (messages[:last], messages[last + 1:])


@torch.no_grad()
def student_reply(student, tok, prompt: list[dict], *, start: int, max_len: int, new_tokens: int,
                  temperature: float, stop_ids: list[int], stops: list[str], normal_form: str) -> str | None:
    """The student's sampled reply to ``prompt`` (None when the prompt leaves no room for ``new_tokens``, or
    the template refuses it)."""
    try:
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - e.g. "roles must alternate" on this prompt: the data set's reply stays
        return None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] not in tokenizer_info(tok).added_ids:
        ids = [start] + ids  # as sakd.data.chat.encode_side renders a row
    if len(ids) + new_tokens > max_len:
        return None
    device = next(student.parameters()).device
    x = torch.tensor([ids], device=device)
    out = student.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=temperature, top_k=0,
                           top_p=1.0, max_new_tokens=new_tokens, eos_token_id=stop_ids or None,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else start)
    return reply_text(tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=False), stops, normal_form)


def generate_chat_items(student, dataset, indices: list[int], *, new_tokens: int,
                        temperature: float) -> tuple[list[dict], int]:
    """(one training row per index, made from the student's own replies; how many conversations kept the
    data set's reply). ``dataset``: a ``sakd.data.chat_dataset.ChatDataset``."""
    tok, enc = dataset.student_tok, dataset.encoder
    marker = turn_end_marker(tok)
    stops = [s for s in {marker, tok.eos_token} if s]
    added = tokenizer_info(tok).added_ids  # a stop string that is one added token also stops generation
    stop_ids = sorted({i for s in stops for i in [tok.convert_tokens_to_ids(s)]
                       if i in added and tok.convert_ids_to_tokens(i) == s})
    was_training = student.training
    student.eval()
    rows, kept = [], 0
    for i in indices:
        examples = []
        for messages in dataset[i]["convs"]:
            parts = split_prompt(messages)
            reply = None if parts is None else student_reply(
                student, tok, parts[0], start=enc.s_start, max_len=dataset.seq_len, new_tokens=new_tokens,
                temperature=temperature, stop_ids=stop_ids, stops=stops, normal_form=dataset.normal_form)
            item = None
            if reply:
                try:
                    item = enc.encode(parts[0] + [{"role": "assistant", "content": reply}] + parts[1])
                except (RowSkipped, AlignmentError):
                    item = None
            if item is None:
                kept += 1
                item = enc.encode(messages)  # the same conversation as at start-up: the same item
            examples.append(item)
        # the row's examples packed again (the replies' lengths changed); what overflows the row is dropped
        rows.append(pack(examples, dataset.seq_len, dataset.teacher_seq_len)[0] if dataset.packed else examples[0])
    student.train(was_training)
    return rows, kept
