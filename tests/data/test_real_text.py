"""Real text through the data layer: decomposed Unicode, Cyrillic and CJK byte budgets, short documents,
spans that cannot be aligned, and the token a window starts with (real Qwen3 / SmolLM2 tokenizers)."""

import json
import unicodedata

import pytest

from sakd.align.tokens import start_token_id, text_normal_form, unicode_form
from sakd.data.text import SpanDataset, collate, cut_spans, read_source, span_budget

pytestmark = pytest.mark.real_tokenizers

NFD_TEXT = unicodedata.normalize("NFD", "Café, naïve résumé — Ångström. ") * 20  # e + U+0301, as web text has


@pytest.fixture(scope="module")
def pair():
    from sakd.models.tokenizers import qwen_tokenizer, smollm2_tokenizer

    return smollm2_tokenizer(), qwen_tokenizer(chat=True)


def test_chat_checkpoint_windows_start_with_the_document_separator(pair):
    """Qwen3 chat checkpoints: no BOS, EOS <|im_end|> (end of a turn), pad <|endoftext|>."""
    smol, qwen_chat = pair
    assert qwen_chat.bos_token_id is None and qwen_chat.eos_token == "<|im_end|>"
    assert qwen_chat.pad_token == "<|endoftext|>"
    assert start_token_id(qwen_chat) == qwen_chat.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert start_token_id(smol) == smol.bos_token_id  # a BOS wins where there is one
    from sakd.evaluate.bpb import start_token_id as reexported
    assert reexported is start_token_id


def test_decomposed_text_is_composed_on_read_and_aligns_with_qwen(pair, tmp_path):
    smol, qwen = pair
    assert unicode_form(qwen) == "NFC" and text_normal_form(smol, qwen) == "NFC"
    p = tmp_path / "nfd.txt"
    p.write_text(NFD_TEXT, encoding="utf-8")
    (text,) = read_source(str(p)).texts
    assert text == unicodedata.normalize("NFC", NFD_TEXT) != NFD_TEXT
    ds = SpanDataset([text], smol, qwen, seq_len=512, teacher_seq_len=512)
    item = ds[0]
    assert not ds.skipped and item["n_bytes"] == len(text.encode())  # every byte, both sides


def test_sakd_align_reads_decomposed_text(tmp_path, capsys):
    from sakd.cli import main

    p = tmp_path / "nfd.txt"
    p.write_text(NFD_TEXT, encoding="utf-8")
    assert main(["align", "--teacher-tokenizer", "qwen-real", "--student-tokenizer", "smollm2-real",
                 "--text", str(p), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["text_bytes"] == len(unicodedata.normalize("NFC", NFD_TEXT).encode())


def test_a_span_that_cannot_be_aligned_becomes_an_empty_counted_item(pair):
    """Spans are encoded lazily: one bad span (here decomposed text that bypassed the reader) must not stop
    a run hours in. It yields the start token alone (no targets) and is recorded with its reason."""
    smol, qwen = pair
    good = "A plain sentence of text. " * 10
    ds = SpanDataset([good, NFD_TEXT], smol, qwen, seq_len=256, teacher_seq_len=256)
    bad = ds[1]
    assert bad["s_ids"] == [ds.s_start] and bad["t_ids"] == [ds.t_start] and bad["chunks"] == []
    assert 1 in ds.skipped and "NFC" in ds.skipped[1]
    batch = collate([ds[0], bad], 0, 0)
    assert batch["skipped"].tolist() == [False, True]
    assert not batch["s_mask"][1, 1:].any() and not batch["chunk_mask"][1].any()  # nothing to learn from


def test_every_span_failing_fails_at_once(pair):
    from sakd.align.tokens import AlignmentError

    smol, qwen = pair
    with pytest.raises(AlignmentError, match="NFC"):
        SpanDataset([NFD_TEXT] * 3, smol, qwen, seq_len=256, teacher_seq_len=256)


@pytest.mark.parametrize("text", ["Привет, как дела? Всё хорошо, спасибо. " * 400,
                                  "東京は日本の首都です。今日は良い天気ですね。 " * 300])
def test_span_budget_is_applied_in_bytes(pair, text):
    """The budget is measured in bytes per token; applied in characters, Cyrillic (2 bytes) and CJK (3)
    spans were 2-3x too long and encode_pair cut most of each away."""
    smol, qwen = pair
    budget = span_budget(smol, qwen, [text], 128, 256)
    spans = cut_spans([text], budget)
    assert "".join(spans) == text
    assert all(len(s.encode()) <= budget for s in spans)
    assert all(len(s.encode()) >= budget // 2 for s in spans[:-1])
    ds = SpanDataset(spans, smol, qwen, seq_len=128, teacher_seq_len=256)
    kept = sum(ds[i]["n_bytes"] for i in range(len(spans))) / len(text.encode())
    assert kept > 0.95, kept


def test_short_documents_are_packed_into_full_rows(pair):
    """A corpus of short documents (wikitext-like lines of a few words): spans pack whole documents up to
    the budget, so rows are text, not padding."""
    smol, qwen = pair
    docs = [f" = Section {i} = " if i % 7 == 0 else f"Line {i} of a short article about item {i % 13}."
            for i in range(3000)]
    budget = span_budget(smol, qwen, docs, 128, 256)
    spans = cut_spans(docs, budget)
    assert spans[0].split("\n\n")[:2] == docs[:2]  # whole documents, in order, a blank line between
    assert "\n\n".join(spans) == "\n\n".join(docs)
    ds = SpanDataset(spans, smol, qwen, seq_len=128, teacher_seq_len=256)

    def pad_fraction(items):  # of the student's seq_len x rows: what a row holds that is not text
        return 1 - sum(len(x["s_ids"]) for x in items) / (128 * len(items))

    pad = pad_fraction([ds[i] for i in range(len(spans) - 1)])  # the last span is a remainder
    print(f"short documents: {len(docs)} docs -> {len(spans)} spans, student pad fraction {pad:.3f}")
    assert pad < 0.15, pad
    assert pad_fraction([ds._encode(d) for d in docs[:400]]) > 0.8  # one document per row, as before
