"""``sakd align``: how two tokenisations of one text meet, in numbers."""

from __future__ import annotations

from pathlib import Path

import torch

from sakd.align.tokens import align, chunk_stats, encode_with_bytes
from sakd.align.vocab import build_vocab_map, same_id_same_string


def align_report(teacher_spec: str, student_spec: str, text_path: Path, *, teacher_model: str | None = None,
                 chunk_mode: str = "boundary", max_len: int = 1024) -> dict:
    """teacher_tokens, student_tokens, chunks, one_to_one_chunks, student_tokens_in_one_to_one (fraction),
    shared_vocab, student_vocab, teacher_vocab, same_id_same_string; with ``teacher_model`` also the
    teacher's mean probability mass on the shared vocabulary at 1:1 chunks."""
    from sakd.data.text import read_source
    from sakd.models.load import load_tokenizer

    t_tok = load_tokenizer(teacher_spec, "teacher")
    s_tok = load_tokenizer(student_spec, "student")
    text = "\n".join(read_source(str(text_path)).texts)
    s = encode_with_bytes(s_tok, text)
    t = encode_with_bytes(t_tok, text)
    chunks = align(s, t, mode=chunk_mode)
    st = chunk_stats(chunks)
    vocab = build_vocab_map(s_tok, t_tok)
    report = {
        "text_bytes": len(text.encode("utf-8")),
        "teacher_tokens": len(t.ids), "student_tokens": len(s.ids),
        "chunks": st["chunks"], "one_to_one_chunks": st["one_to_one_chunks"],
        "student_tokens_in_one_to_one": st["frac_student_in_one_to_one"],
        "teacher_tokens_in_one_to_one": st["frac_teacher_in_one_to_one"],
        "shared_vocab": len(vocab), "student_vocab": len(s_tok), "teacher_vocab": len(t_tok),
        "same_id_same_string": same_id_same_string(s_tok, t_tok),
        "chunk_mode": chunk_mode,
    }
    report.update(_mapped_stats(s_tok, t_tok, text, chunk_mode))
    if teacher_model:
        report["teacher_mass_on_shared_at_one_to_one"] = _teacher_shared_mass(
            teacher_model, t_tok, t, chunks, vocab.shared_t, max_len)
    return report


@torch.no_grad()
def _teacher_shared_mass(model_name: str, t_tok, t, chunks, shared_t: torch.Tensor, max_len: int) -> float:
    """Mean over 1:1 chunks of the teacher's probability on the shared vocabulary at the position that
    predicts the chunk (windows of ``max_len`` tokens, each scored from its own start)."""
    from sakd.models.load import load_teacher

    model = load_teacher(model_name, torch.device("cpu"))
    targets = [c[2] for c in chunks if c[1] - c[0] == 1 and c[3] - c[2] == 1 and c[2] >= 1]
    ids = torch.tensor(t.ids)
    total, n = 0.0, 0
    for w0 in range(0, len(ids), max_len):
        window = ids[w0:w0 + max_len]
        want = [p - 1 - w0 for p in targets if w0 < p < w0 + len(window)]
        if not want:
            continue
        logits = model(input_ids=window[None]).logits[0, :, :len(t_tok)].float()
        probs = torch.softmax(logits[want], dim=-1)
        total += float(probs[:, shared_t].sum(-1).sum())
        n += len(want)
    return total / max(n, 1)


def _mapped_stats(s_tok, t_tok, text: str, chunk_mode: str) -> dict:
    """What ``loss.logit=mapped_kl`` / ``projected_kl`` reach on this text: the share of student positions that
    get a target (shared_kl: only those in 1:1 chunks), the share of the text's student tokens the target can
    never give mass to (``mapped_unsupported_student_tokens``: projected_kl, sakd/losses/projected.py), and
    the share of the teacher's ordinary vocabulary
    whose probability lands on a student token (the rest: specials, padding columns, never mass)."""
    from sakd.align.mapping import mapping_tables, teacher_coverage
    from sakd.data.text import collate, encode_pair, start_token_id
    from sakd.losses.mapped import mapped_coverage

    tables = mapping_tables(s_tok, t_tok)
    big = 1 << 30
    item = encode_pair(text, s_tok, t_tok, start_token_id(s_tok), start_token_id(t_tok), big, big, chunk_mode)
    from sakd.align.classes import build_classes
    from sakd.losses.projected import unsupported_tokens

    batch = collate([item], 0, 0)
    got, total = mapped_coverage(batch, tables)
    # tokens the every-position target can never give mass to (issue 19): projected_kl's, and mapped_kl's
    # first-token map (tokens outside φ's image)
    un = unsupported_tokens(batch, tables, build_classes(s_tok, tables))
    return {"mapped_positions_with_target": got / max(total, 1),
            "mapped_unsupported_student_tokens": un["projected"] / max(un["total"], 1),
            "mapped_kl_student_tokens_outside_image": un["outside_image"] / max(un["total"], 1),
            "mapped_teacher_vocab_reaching_student": teacher_coverage(tables),
            "mapped_table_entries": int(tables.phi.numel()),
            "mapped_table_mib": round(tables.nbytes() / 2**20, 1)}
