"""Evaluation: bits per byte for text and chat, retention, expert usage, the ``sakd evaluate`` and
``sakd align`` commands."""
