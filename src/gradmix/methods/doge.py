"""DoGE, online: domain reweighting by gradient alignment with a target (Fan, Pagliardini, Jaggi, "DoGE: Domain
Reweighting with Generalization Estimation", ICML 2024), in its out-of-domain form where the generalisation
signal of domain i is the alignment of its gradient with the target gradient.

    W_{t+1} proportional to W_t * exp(clip(mu * a_t, -c, c)),    a_t,i = <grad L_i, grad L_target>
    average_weights = mean of W_1 .. W_T                  (DoGE reports the averaged weights as its mixture)

How it differs from DGA (gradmix.methods.dga): same exponentiated step on the same alignments, but
  * no EMA on the weights: each step acts fully (DGA's EMA variant damps and smooths it);
  * the step is clipped per domain to [-clip, clip] instead of rescaled (DGA's ``normalize``), so raw alignments keep
    their relative size until one exceeds the clip;
  * DoGE keeps the running (uniform) average of the iterates: the paper trains a proxy model and retrains with the
    averaged weights. Online, one can sample with the current iterate (default) or with the average.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradmix.methods.base import MixingMethod, normalize_log_weights, state_int, validate_weights
from gradmix.methods.dga import ALIGNMENT_NORMALIZATIONS, scale_alignments, usable_alignments
from gradmix.stats import DomainStats

__all__ = ["DoGE"]


class DoGE(MixingMethod):
    """Online DoGE with step clipping and a running average of the weights.

    A NaN/Inf alignment (domain absent from the probed batch) gets exponent 0; with no usable alignment, or all 0,
    the update is skipped (``last_skip_reason``) and the average is left alone (nothing was measured).

    Args:
        num_domains: K.
        step_size: mu. Default 1.0: the clip, not mu, then bounds the step when raw alignments are large.
        clip: bound on each domain's log-weight step |mu * a_i| (None = no clip). Default 1.0: a weight changes by
            at most a factor e per update, whatever the scale of the raw inner products.
        normalize: "none" (default, raw alignments as in DoGE), "max_abs" or "rms" (see DGA).
        sample_with_average: if True, ``weights`` (what the sampler uses) is ``average_weights``; default False =
            sample with the current iterate, the online form.
        initial_weights: W_0; default uniform.
    """

    name = "doge"
    required_stats = frozenset({"target_alignment"})
    needs_target = True

    def __init__(
        self,
        num_domains: int,
        step_size: float = 1.0,
        clip: float | None = 1.0,
        normalize: str = "none",
        sample_with_average: bool = False,
        initial_weights: Any = None,
    ) -> None:
        super().__init__(num_domains, initial_weights=initial_weights)
        self.step_size = float(step_size)
        if not (np.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"doge: step_size must be a finite number > 0, got {step_size}")
        self.clip = None if clip is None else float(clip)
        if self.clip is not None and not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"doge: clip must be a finite number > 0 or None, got {clip}")
        if normalize not in ALIGNMENT_NORMALIZATIONS:
            raise ValueError(f"doge: normalize must be one of {ALIGNMENT_NORMALIZATIONS}, got {normalize!r}")
        self.normalize = normalize
        self.sample_with_average = bool(sample_with_average)
        with np.errstate(divide="ignore"):
            self._log_current, _ = normalize_log_weights(np.log(self._weights))
        self._average = self._weights.copy()  # before any update: W_0
        self._averaged_count = 0

    @property
    def current_weights(self) -> np.ndarray:
        """The latest iterate W_t."""
        return normalize_log_weights(self._log_current)[1]

    @property
    def average_weights(self) -> np.ndarray:
        """Mean of the iterates W_1..W_T after T updates (W_0 before the first)."""
        return self._average.copy()

    def _update(self, stats: DomainStats) -> np.ndarray | None:
        alignment, usable = usable_alignments(stats)
        if not usable.any():
            self.last_skip_reason = "doge: no usable target alignment (all NaN/Inf or no probed examples)"
            return None
        if not np.any(alignment[usable] != 0):
            self.last_skip_reason = "doge: every target alignment is 0 (zero gradient)"
            return None
        scaled = scale_alignments(alignment, usable, self.normalize)
        if scaled is None:
            self.last_skip_reason = "doge: alignment scale is 0 or not finite"
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            step = self.step_size * scaled
        if self.clip is not None:
            step = np.clip(step, -self.clip, self.clip)  # also tames +-inf from an overflowing product
        if not np.all(np.isfinite(step)):
            self.last_skip_reason = "doge: step_size * alignment is not finite; set clip or lower step_size"
            return None
        self._log_current, current = normalize_log_weights(self._log_current + step)
        self._averaged_count += 1
        self._average = self._average + (current - self._average) / self._averaged_count
        self._average = self._average / self._average.sum()  # keep rounding drift out of the sum
        return self._average if self.sample_with_average else current

    def _extra_state(self) -> dict[str, Any]:
        return {
            "current_log_weights": [None if not np.isfinite(v) else float(v) for v in self._log_current],
            "average_weights": self._average.tolist(),
            "averaged_count": self._averaged_count,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        for key in ("current_log_weights", "average_weights", "averaged_count"):
            if key not in state:
                raise ValueError(f"doge state has no {key!r} (not a DoGE checkpoint?)")
        raw = state["current_log_weights"]
        if len(raw) != self.num_domains:
            raise ValueError(f"doge state has {len(raw)} log-weights, expected {self.num_domains}")
        log_current = np.array([-np.inf if v is None else float(v) for v in raw], dtype=np.float64)
        if np.isnan(log_current).any() or np.isposinf(log_current).any():
            raise ValueError("doge state has a NaN/+inf log-weight")
        self._log_current, _ = normalize_log_weights(log_current)
        self._average = validate_weights(state["average_weights"], self.num_domains, what="doge average_weights")
        self._averaged_count = state_int(state, "averaged_count", "doge")
