"""Cross-tokenizer alignment: tokens as byte spans of the text (``tokens``), the
vocabulary map by token string (``vocab``), and the real Qwen3/SmolLM2
tokenizers built offline (``real``)."""

from sakd.align.tokens import AlignmentError, Encoded, align, chunk_stats, encode_with_bytes
from sakd.align.vocab import VocabMap, build_vocab_map, same_id_same_string, token_strings

__all__ = [
    "AlignmentError",
    "Encoded",
    "VocabMap",
    "align",
    "build_vocab_map",
    "chunk_stats",
    "encode_with_bytes",
    "same_id_same_string",
    "token_strings",
]
