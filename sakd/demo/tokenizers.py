"""Two genuinely different tokenizers for the offline demo, trained with 🤗 tokenizers.

- teacher: byte-level BPE with Qwen2/Qwen3's pre-tokenisation regex (``Ġ`` for a
  leading space), ~8k entries, trained on the corpus plus the Python standard
  library's docstrings (a broader mix than the student's);
- student: SentencePiece-style BPE (``▁`` via Metaspace, byte fallback so that no
  text is unknown), ~2k entries, trained on the corpus only.

Two byte-level BPEs trained on the same text would share 99.8% of the smaller
vocabulary and hide alignment bugs; these two do not.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sakd.models.tokenizers import QWEN_SPLIT  # the demo teacher splits text as Qwen does

EOS = "<|endoftext|>"


def stdlib_docstrings(max_chars: int = 2_000_000) -> Iterator[str]:
    """Docstrings of the Python standard library, in a fixed order."""
    root = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    total += len(doc)
                    yield doc
                    if total >= max_chars:
                        return


def train_teacher_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=None)


def train_student_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Llama/SentencePiece-style: ``▁`` marks a space, unseen characters fall back to
    ``<0xNN>`` byte tokens (which must be in the vocabulary, so we add all 256)."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = meta
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(byte_tokens),
        special_tokens=specials,
        limit_alphabet=120,  # rare characters go to byte fallback
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Re-build the model with the byte tokens right after the specials (as in Llama's vocabulary).
    trained = tok.get_vocab()
    merges = _merges(tok)
    vocab: dict[str, int] = {}
    for t in specials + byte_tokens + sorted(trained, key=trained.get):
        vocab.setdefault(t, len(vocab))
    final = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    final.add_special_tokens(specials)
    final.pre_tokenizer = meta
    final.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=final, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def _merges(tok: Tokenizer) -> list[tuple[str, str]]:
    import json

    model = json.loads(tok.to_str())["model"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def build_demo_tokenizers(train_text: str, out_dir: str | Path, teacher_vocab: int = 8192,
                          student_vocab: int = 2048) -> tuple[Path, Path]:
    """Train both tokenizers and save them under ``out_dir/{teacher,student}-tokenizer``."""
    out = Path(out_dir)
    paragraphs = [p for p in train_text.split("\n\n") if p.strip()]
    teacher = train_teacher_tokenizer(iter(paragraphs + list(stdlib_docstrings())), teacher_vocab)
    student = train_student_tokenizer(iter(paragraphs), student_vocab)
    t_dir, s_dir = out / "teacher-tokenizer", out / "student-tokenizer"
    teacher.save_pretrained(t_dir)
    student.save_pretrained(s_dir)
    return t_dir, s_dir
