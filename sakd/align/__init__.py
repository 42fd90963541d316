"""Cross-tokenizer alignment: tokens as byte spans of the text and the chunks where two tokenisations meet
(``tokens``), the vocabulary map by token string (``vocab``), the tables that carry a teacher distribution onto
the student's vocabulary through the bytes (``mapping``) and the classes of student tokens (``classes``). The
real Qwen3/SmolLM2 tokenizers are built in ``sakd.models.tokenizers``."""

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
