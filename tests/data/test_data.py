import json

import pytest

from sakd.data.text import cut_spans, heldout_texts, read_source, read_with_fallback, split_heldout
from sakd.errors import UserError


def test_spans_cover_text_exactly_and_cut_at_whitespace():
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer " * 20
    spans = cut_spans([text], 50)
    assert "".join(spans) == text
    assert all(len(s) <= 50 for s in spans)
    assert all(s[0].isspace() for s in spans[1:])  # a span starts at the whitespace before a word


def test_short_texts_are_packed_whole_and_long_ones_cut():
    """Texts shorter than the budget are packed (a blank line between), never cut; a long text is cut on its
    own, never joined to its neighbours (tests/data/test_real_text.py: the pad fraction this saves)."""
    assert cut_spans(["aaa bbb", "ccc ddd"], 100) == ["aaa bbb\n\nccc ddd"]
    long = "word " * 40
    assert cut_spans(["aaa", long, "bbb"], 100) == ["aaa", *cut_spans([long], 100), "bbb"]


def test_txt_jsonl_and_replacement_count(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"hello \xff\xfe world\n")
    src = read_source(str(p))
    assert src.replaced_bytes == 2 and src.texts == ["hello \ufffd\ufffd world\n"]
    j = tmp_path / "a.jsonl"
    j.write_text(json.dumps({"id": 1, "text": "one"}) + "\n\n" + json.dumps({"id": 2, "text": "two"}) + "\n")
    assert read_source(str(j)).texts == ["one", "two"]


@pytest.mark.parametrize("content, match", [
    (b"", "no text"), (b"  \n\t \n", "no text"), (b"\x00\x01\x02binary", "binary"),
])
def test_bad_text_files(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=match):
        read_source(str(p))


def test_bad_jsonl_and_columns(tmp_path):
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_source(str(j))
    j.write_text('{"a": "x", "b": "y"}\n')
    with pytest.raises(UserError, match="text_column"):
        read_source(str(j))
    assert read_source(str(j), text_column="b").texts == ["y"]


def test_parquet_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x y", "z"], "n": [1, 2]}), p)
    assert read_source(str(p)).texts == ["x y", "z"]
    with pytest.raises(UserError, match="no column 'text'"):
        read_source(str(p), text_column="text")


def test_save_to_disk_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a b", "c"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_source(str(tmp_path / "ds")).texts == ["a b", "c"]


def test_missing_source_and_announced_fallback(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_source(str(tmp_path / "nope.txt"))
    good = tmp_path / "good.txt"
    good.write_text("fallback text")
    logs = []
    src = read_with_fallback([str(tmp_path / "nope.txt"), str(good)], log=logs.append)
    assert src.texts == ["fallback text"] and src.notes and "fallback" in logs[0]


def test_builtin_shakespeare_split_is_disjoint():
    train = read_source("sakd:shakespeare-train").texts
    held = read_source("sakd:shakespeare-heldout").texts
    assert len(train) == 36 and len(held) == 2
    assert not set(train) & set(held)


def test_heldout_helpers():
    texts = ["alpha beta gamma delta", "epsilon"]
    out = heldout_texts(texts, 12)
    assert out == ["alpha beta"]
    tr, ho = split_heldout(["x" * 10 + "\n" + "y" * 10], 0.3, 0)
    assert tr[0] + ho[0] == "x" * 10 + "\n" + "y" * 10 and ho[0].startswith("\n")
