"""Fair-PiKE (Balanced-PiKE in v2 of Li et al., arXiv 2502.06244): PiKE on a tilted objective.

Instead of the average loss, Fair-PiKE decreases the tilted loss (1/tau) log sum_k exp(tau L_k), which approaches
the worst task's loss as tau grows. Its gradient is sum_k y_k grad L_k with loss weights
y_k = softmax(tau L)_k (tau times that in the paper's dual form; the overall scale cancels below), so PiKE is run
on sum_k y_k L_k.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from gradmix.methods.pike import PiKE
from gradmix.stats import DomainStats

__all__ = ["FairPiKE"]


class FairPiKE(PiKE):
    """PiKE with each domain's gradient terms scaled by its loss weight y_k (Fair / Balanced-PiKE).

    This is gradmix's reading of Balanced-PiKE (the paper states the tilted objective and its dual, not the terms of
    the update): under low gradient conflict the first-order decrease of sum_j y_j L_j after a step on the mixed
    gradient sum_k w_k grad L_k is eta sum_k w_k y_k ||grad L_k||^2 (cross terms dropped), so y_k multiplies task k's
    squared-norm statistic G_k wherever PiKE uses it: in the default (bound) form both the linear term
    lam_k = -y_k G_k + (L eta / 2b) S_k and the self-limiting term kappa_k = L eta y_k G_k (the quadratic term of the
    tilted objective is bounded the same way); in Algorithm 1's step the gain zeta1 y_k G_k. The variance term S_k is
    NOT tilted by default (``tilt_variance=False``): the mixture only changes what is sampled, the model still
    trains on the unweighted batch mean, so the noise of the step is that of the untilted batch. Tilting it too
    (``tilt_variance=True``, the literal "scale every term of task k by y_k") was measured to backfire: the worst
    language of the multilingual benchmark has a large sigma^2, its net step is negative, and multiplying that step
    by its large y_k pushed its weight DOWN (BENCHMARKS.md). ``tilt_power=2`` treats y_k grad L_k as task k's
    gradient, a stronger tilt toward high-loss tasks.

    Because the bound's minimiser (and PiKE's normalised step) is invariant to the overall scale of y, we use
    y_k / mean(y) = K softmax(tau L)_k over the domains with valid statistics, so tau -> 0 is exactly PiKE with
    ``loss_tilt=0`` (PiKE's own loss tilt is off here by default: the two would count the losses twice) and a
    large tau puts the whole gain on the highest-loss domain. ``tau = 3`` is the paper's best fairness/average
    trade-off. ``loss`` is the per-domain training loss of the update interval (every step's, from ``MixingCore``);
    a NaN/Inf loss makes the domain invalid for the update (its weight is kept, as in PiKE). Every other parameter is
    PiKE's, ``variant`` included, except that ``mix_evidence`` defaults to 0: the tilt toward high-loss domains is
    the objective, not a noisy estimate.
    """

    name: ClassVar[str] = "fair_pike"
    required_stats: ClassVar[frozenset[str]] = frozenset({"grad_sq_norm", "grad_var", "loss"})

    def __init__(
        self,
        num_domains: int,
        *,
        tau: float = 3.0,
        tilt_power: int = 1,
        tilt_variance: bool = False,
        **pike_params: Any,
    ) -> None:
        tau_value = float(tau)
        if not math.isfinite(tau_value) or tau_value < 0:
            raise ValueError(f"fair_pike: tau must be a finite number >= 0, got {tau!r}")
        if tilt_power not in (1, 2):
            raise ValueError(f"fair_pike: tilt_power must be 1 or 2, got {tilt_power!r}")
        # Fair-PiKE's own tilt already scales the gain by the losses; PiKE's horizon tilt is not applied twice.
        pike_params.setdefault("loss_tilt", 0.0)
        pike_params.setdefault("gain", "grad_norm")  # its gradient terms are the measured ones, tilted by y_k
        # Its mix leans on the losses by design (a fairness objective, not an estimate to be tested against the
        # gradient statistics' noise): PiKE's evidence factor is off unless asked for.
        pike_params.setdefault("mix_evidence", 0.0)
        super().__init__(num_domains, **pike_params)
        self.tau = tau_value
        self.tilt_power = int(tilt_power)
        self.tilt_variance = bool(tilt_variance)

    def _update(self, stats: DomainStats) -> np.ndarray | None:
        new = super()._update(stats)
        if self.last_terms is not None:  # the tilt y_k / mean(y) behind this update (diagnostics)
            self.last_terms["tilt"] = self._last_tilt
        return new

    def _valid_domains(self, stats: DomainStats) -> np.ndarray:
        assert stats.loss is not None  # update() has already run stats.require(required_stats)
        return super()._valid_domains(stats) & np.isfinite(stats.loss)

    def _can_reuse(self, stats: DomainStats) -> np.ndarray:
        """The tilt needs this interval's loss: a domain without one cannot stand in with pooled statistics."""
        assert stats.loss is not None  # required by Fair-PiKE
        return np.isfinite(np.asarray(stats.loss, dtype=np.float64))

    def _domain_tilt(self, stats: DomainStats, valid: np.ndarray) -> np.ndarray:
        """y_k / mean(y) = n_valid * softmax(tau L)_k over the valid domains (0 elsewhere), raised to tilt_power."""
        if self.tau == 0.0:
            return np.where(valid, 1.0, 0.0)
        assert stats.loss is not None  # update() has already run stats.require(required_stats)
        with np.errstate(over="ignore", invalid="ignore"):
            below_max = np.where(valid, stats.loss - np.max(stats.loss[valid]), -np.inf)  # <= 0, may be -inf
            exp = np.where(valid, np.exp(self.tau * below_max), 0.0)
        relative = int(valid.sum()) * exp / exp.sum()
        return relative**self.tilt_power
