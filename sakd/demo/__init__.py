"""The offline demo: its assets (shipped as package data), the demo tokenizers, pre-training of the tiny pair,
and ``sakd demo`` itself."""
