"""Errors of the corpus builders: one base class so callers can catch every corpus problem at once."""

from __future__ import annotations

__all__ = ["CorpusError", "FetchError"]


class CorpusError(RuntimeError):
    """A corpus cannot be built or loaded (unknown name, bad parameters, missing or corrupted files)."""


class FetchError(CorpusError):
    """A registry package could not be fetched or unpacked; the message names the package and the command."""
