"""Fixtures for the alignment tests: two small demo tokenizers trained here, and
the real Qwen3/SmolLM2 pair (built once per session, cached on disk)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A few KB of the corpus: enough for tokenizers that cut words differently.
_TRAIN_PLAYS = ("hamlet", "king-lear")


def pytest_configure(config):
    # Until pyproject.toml registers it (the lead owns that file).
    config.addinivalue_line("markers", "real_tokenizers: uses the real Qwen3 and SmolLM2 tokenizers (built offline)")


@pytest.fixture(scope="session")
def train_paragraphs() -> list[str]:
    from sakd.data.corpus import load_plays

    plays = load_plays()
    text = "\n".join(plays[name][:20_000] for name in _TRAIN_PLAYS)
    return [p for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="session")
def demo_pair(train_paragraphs):
    """(student, teacher): SentencePiece-style BPE with byte fallback vs byte-level BPE."""
    from sakd.demo.tokenizers import train_student_tokenizer, train_teacher_tokenizer

    student = train_student_tokenizer(iter(train_paragraphs), vocab_size=600)
    teacher = train_teacher_tokenizer(iter(train_paragraphs), vocab_size=700)
    student.name_or_path, teacher.name_or_path = "demo-student", "demo-teacher"
    return student, teacher


@pytest.fixture(scope="session")
def real_pair():
    """(student, teacher) = (SmolLM2, Qwen3), the real vocabularies."""
    from sakd.models.tokenizers import qwen_tokenizer, smollm2_tokenizer

    return smollm2_tokenizer(), qwen_tokenizer()
