"""sakd: student-aware knowledge distillation from a Mixture-of-Experts teacher
into a dense student with a different tokenizer."""

__version__ = "0.1.0"
