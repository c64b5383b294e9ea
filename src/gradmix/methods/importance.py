"""Importance sampling: static weights = the target set's histogram over the generic domains (clusters).

This is the main baseline of the DGA paper (Fan, Grangier, Ablin, arXiv 2410.02498): embed the target examples,
assign each to its nearest cluster of the generic corpus, and sample cluster i with probability proportional to
its target count. It ignores gradients and never changes, so under a limited token budget it repeats small
clusters many times (the failure DGA is meant to avoid).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradmix.methods.base import MixingMethod, WeightError
from gradmix.stats import DomainStats

__all__ = ["Importance", "importance_weights"]


def importance_weights(
    target_counts: Any, num_domains: int, pseudo_count: float = 0.0, uniform_mix: float = 0.0
) -> np.ndarray:
    """(1 - uniform_mix) * (c + pseudo_count) / sum(c + pseudo_count) + uniform_mix / K, validated.

    Raises ``WeightError`` naming the cluster for a negative/non-finite count, a wrong length, or all-zero counts.
    """
    counts = np.asarray(target_counts, dtype=np.float64)
    if counts.ndim != 1:
        raise WeightError(f"importance: target_counts must be a 1-D vector, got shape {counts.shape}")
    if counts.shape[0] != num_domains:
        raise WeightError(
            f"importance: target_counts has {counts.shape[0]} entries but there are {num_domains} "
            "domains (one count of target examples per cluster)"
        )
    bad = np.flatnonzero(~np.isfinite(counts) | (counts < 0))
    if bad.size:
        i = int(bad[0])
        raise WeightError(f"importance: target_counts[{i}] = {counts[i]}; counts must be finite and >= 0")
    if not counts.sum() > 0:
        raise WeightError("importance: target_counts are all zero: no target example was assigned to any cluster")
    pseudo_count = float(pseudo_count)
    if not (np.isfinite(pseudo_count) and pseudo_count >= 0):
        raise ValueError(f"importance: pseudo_count must be a finite number >= 0, got {pseudo_count}")
    uniform_mix = float(uniform_mix)
    if not (0.0 <= uniform_mix <= 1.0):
        raise ValueError(f"importance: uniform_mix must be in [0, 1], got {uniform_mix}")
    smoothed = counts + pseudo_count
    histogram = smoothed / smoothed.sum()
    return (1.0 - uniform_mix) * histogram + uniform_mix / num_domains


class Importance(MixingMethod):
    """Static weights from the target set's cluster histogram, optionally smoothed.

    Args:
        num_domains: K clusters.
        target_counts: length K, target examples assigned to each cluster (e.g. ``clusters.json["target_counts"]``).
        pseudo_count: additive (Laplace) smoothing per cluster. Default 0: the paper's baseline is the raw
            histogram, and with K in the thousands and a few thousand target examples a pseudo-count of 1 would hand
            most of the mass to clusters the target never reached.
        uniform_mix: share of a uniform distribution mixed in (0 = none); a scale-free way to keep every cluster
            reachable.
    """

    name = "importance"
    needs_target_counts = True

    def __init__(
        self, num_domains: int, target_counts: Any = None, pseudo_count: float = 0.0, uniform_mix: float = 0.0
    ) -> None:
        if target_counts is None:
            raise ValueError(
                "method 'importance' needs target_counts=[...] (target examples per cluster, e.g. from "
                "`gradmix cluster --target`)"
            )
        if not isinstance(num_domains, (int, np.integer)) or num_domains < 1:
            raise ValueError(f"num_domains must be a positive integer, got {num_domains!r}")
        self.pseudo_count = float(pseudo_count)
        self.uniform_mix = float(uniform_mix)
        weights = importance_weights(target_counts, int(num_domains), pseudo_count, uniform_mix)
        super().__init__(num_domains, initial_weights=weights)

    def _update(self, stats: DomainStats) -> np.ndarray:
        return self._weights
