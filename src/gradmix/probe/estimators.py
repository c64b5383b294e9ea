"""The probes' estimators, written once: unbiased ||grad L_k||^2 and sigma_k^2 from part means (micro-batch and
sharded probes) or from per-example inner products (fused probe), their count-weighted combination across ranks,
and the Gramian's masking. Pure functions of sums and counts, plus the one running accumulator over part means.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["PartAccumulator", "mask_gram", "part_estimates", "ratio", "u_statistics", "weighted"]

Values = np.ndarray | float
"""Per-group values (an array over groups) or one group's value."""


def part_estimates(
    cross: Values, spread: Values, denominator: Values, num_parts: Values
) -> tuple[np.ndarray, np.ndarray]:
    """(||mu||^2, sigma^2) = (cross / denominator, spread / (num_parts - 1)) from the part sums of
    ``PartAccumulator``; NaN with fewer than two parts.

    E<g_i,g_j> = ||mu||^2 for disjoint parts, so weights m_i m_j / (n^2 - sum m_i^2) (summing to 1) are unbiased;
    with single-example parts this is the classic U-statistic. E sum_i m_i ||g_i - gbar||^2 = (s - 1) sigma^2, exact
    for unequal part sizes (between-part ANOVA sum of squares). The sums are linear in inner products, so per-shard
    partial sums add up to the full-vector ones (the sharded probe)."""
    parts = np.asarray(num_parts, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    ok = (parts >= 2) & (den > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ratio(np.asarray(cross, dtype=np.float64), den, ok), ratio(np.asarray(spread, np.float64), parts - 1, ok)


class PartAccumulator:
    """Running, cancellation-free sums over one group's part mean gradients (weighted Welford update).

    After all parts: ||mu||^2 = cross / (n^2 - sum m_i^2) and sigma^2 = spread / (s - 1), both unbiased
    (``part_estimates``).
    """

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean  # caller-owned buffer, overwritten by the first part
        self.total_weight = 0.0  # examples folded in so far
        self.cross = 0.0  # sum_{i != j} m_i m_j <g_i, g_j>
        self.spread = 0.0  # sum_i m_i ||g_i - gbar||^2
        self.sizes_sq = 0.0
        self.num_parts = 0

    def add(self, part_mean: torch.Tensor, size: float) -> bool:
        """Fold in one part's mean gradient (``part_mean`` is used as scratch). False once sums stop being finite."""
        if self.total_weight == 0.0:
            self.mean.copy_(part_mean)
        else:
            self.cross += 2.0 * self.total_weight * size * float(torch.dot(self.mean, part_mean))
            part_mean.sub_(self.mean)
            self.spread += (
                size * self.total_weight / (self.total_weight + size) * float(torch.dot(part_mean, part_mean))
            )
            self.mean.add_(part_mean, alpha=size / (self.total_weight + size))
        self.total_weight += size
        self.sizes_sq += size * size
        self.num_parts += 1
        return math.isfinite(self.cross) and math.isfinite(self.spread)

    @property
    def denominator(self) -> float:
        """n^2 - sum m_i^2: the number of ordered example pairs across parts."""
        return self.total_weight * self.total_weight - self.sizes_sq

    def estimates(self) -> tuple[float, float]:
        """(||mu||^2, sigma^2); NaN with fewer than two parts."""
        sq, var = part_estimates(self.cross, self.spread, self.denominator, self.num_parts)
        return float(sq), float(var)


def u_statistics(counts: np.ndarray, q: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From per-example gradients g_i of a group (n = counts, Q = ||sum_i g_i||^2, D = sum_i ||g_i||^2): the
    U-statistic ||mu||^2 = (Q - D) / (n (n - 1)) and sigma^2 = (D - Q / n) / (n - 1); NaN below two examples."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = counts >= 2
        safe = np.where(ok, counts, 2.0)
        sq = np.where(ok, (q - d) / (safe * (safe - 1.0)), np.nan)
        var = np.where(ok, (d - q / safe) / (safe - 1.0), np.nan)
    return sq, var


def weighted(values: np.ndarray, weights: np.ndarray, poisoned: np.ndarray | None = None) -> np.ndarray:
    """values * weights where the weight is positive (0 elsewhere, NaN values read as 0), NaN where ``poisoned``:
    a row to all-reduce for a weighted mean of per-rank estimates (a convex mix of unbiased estimates is unbiased)."""
    row = np.where(weights > 0, np.nan_to_num(values) * weights, 0.0)
    return row if poisoned is None else np.where(poisoned, np.nan, row)


def ratio(num: np.ndarray, den: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """num / den where ``ok``, NaN elsewhere (no division by the masked denominators)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, num / np.where(ok, den, 1), np.nan)


def mask_gram(gram: np.ndarray, bad: np.ndarray, diagonal: np.ndarray) -> np.ndarray:
    """The Gramian with NaN rows and columns for the ``bad`` groups (absent, poisoned) and the unbiased
    ||grad L_k||^2 on its diagonal (in place; returned)."""
    gram[bad, :] = np.nan
    gram[:, bad] = np.nan
    np.fill_diagonal(gram, diagonal)
    return gram
