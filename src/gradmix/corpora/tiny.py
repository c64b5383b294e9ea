"""Placeholder (rewritten below)."""
TINY_DOC_SEPARATOR = "<|doc|>"


def load_tiny_corpus():
    raise NotImplementedError
