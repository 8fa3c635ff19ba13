"""aligndistil: token-level alignment of language models with AlignDistil (arXiv 2503.02832)."""

__version__ = "0.1.0"
