"""DoReMi, online: exponentiated-gradient ascent on the excess loss over a reference model.

Xie et al., "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining" (NeurIPS 2023), Algorithm 1.
In the paper a small proxy model is trained with these weights and the *average* weights are then used to train the
real model. Here the method runs online on the model being trained: the current weights are the sampling weights,
and the running average (the paper's output) is kept as ``average_weights``.

Adaptation, stated plainly: the paper's excess loss is computed per token on the same batch for the proxy and the
reference model; we get one mean loss per domain, so lambda_k = max(L_k - L_ref_k, 0) is clipped per domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gradmix.methods.base import MixingMethod, normalize_log_weights, state_int, validate_weights
from gradmix.stats import DomainStats, StatsError

__all__ = ["DoReMi"]


def _loss_vector(values: Any, num_domains: int, what: str, *, allow_nan: bool) -> np.ndarray:
    """A length-K float vector; NaN ("not measured") allowed only where ``allow_nan``."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape[0] != num_domains:
        raise StatsError(f"doremi: {what} has {arr.shape[0]} entries but there are {num_domains} domains")
    if not allow_nan:
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ValueError(f"doremi: {what} has a non-finite value {arr[bad[0]]} for domain {int(bad[0])}")
    return arr


class DoReMi(MixingMethod):
    """Online DoReMi (Xie et al. 2023, Algorithm 1).

    Each update, with per-domain training losses L and reference losses L_ref:

        lambda_k = max(L_k - L_ref_k, 0)                       (excess loss)
        alpha'   = alpha * exp(eta * lambda) / Z               (exponentiated step, in log space)
        alpha    = (1 - c) alpha' + c / K                      (smoothing towards uniform)

    and ``average_weights`` is the mean of alpha over all updates (the weights the paper hands to the final run).

    Reference losses come from ``stats.extra["reference_loss"]`` when the probe provides them (the reference model's
    loss on the same batch, as in the paper), else from the ``reference_loss`` parameter (e.g. per-domain losses of
    a reference run at a matching point of training).

    A domain with a non-finite loss or reference loss keeps its weight; the observed domains share their remaining
    mass (above the c/K floor every domain keeps) in proportion to the exponentiated step. With every domain
    observed this is exactly the paper's update.

    Args:
        num_domains: K.
        reference_loss: per-domain reference loss (length K, finite), or None if every record carries
            ``extra["reference_loss"]``.
        step_size: eta >= 0 (paper: 1).
        smoothing: c in [0, 1] (paper: 1e-3); it keeps every weight >= c/K.
    """

    name = "doremi"
    required_stats = frozenset({"loss"})

    def __init__(
        self,
        num_domains: int,
        reference_loss: Sequence[float] | np.ndarray | None = None,
        step_size: float = 1.0,
        smoothing: float = 1e-3,
    ) -> None:
        super().__init__(num_domains)
        step_size = float(step_size)
        if not np.isfinite(step_size) or step_size < 0:
            raise ValueError(f"doremi: step_size (eta) must be a finite number >= 0, got {step_size}")
        smoothing = float(smoothing)
        if not (0.0 <= smoothing <= 1.0):
            raise ValueError(f"doremi: smoothing (c) must lie in [0, 1], got {smoothing}")
        self.step_size = step_size
        self.smoothing = smoothing
        self.reference_loss = (
            None
            if reference_loss is None
            else _loss_vector(reference_loss, self.num_domains, "reference_loss", allow_nan=False)
        )
        self._average = self._weights.copy()
        self._averaged_updates = 0

    @property
    def average_weights(self) -> np.ndarray:
        """Mean of the weights over all updates so far (the paper's output); the initial weights before any."""
        return self._average.copy()

    def excess_loss(self, stats: DomainStats) -> np.ndarray:
        """lambda_k = max(L_k - L_ref_k, 0); NaN where the loss or the reference loss is missing."""
        reference = self._reference_for(stats)
        loss = np.asarray(stats.loss, dtype=np.float64)
        observed = np.isfinite(loss) & np.isfinite(reference)
        excess = np.full(self.num_domains, np.nan)
        excess[observed] = np.maximum(loss[observed] - reference[observed], 0.0)
        return excess

    def _reference_for(self, stats: DomainStats) -> np.ndarray:
        per_batch = stats.extra.get("reference_loss") if stats.extra else None
        if per_batch is not None:
            return _loss_vector(per_batch, self.num_domains, "stats.extra['reference_loss']", allow_nan=True)
        if self.reference_loss is None:
            raise StatsError(
                "doremi needs reference losses: pass reference_loss=[...] (one per domain) or put "
                "extra['reference_loss'] into every statistics record"
            )
        return self.reference_loss

    def _update(self, stats: DomainStats) -> np.ndarray | None:
        excess = self.excess_loss(stats)
        observed = np.isfinite(excess)
        if not observed.any():
            self.last_skip_reason = "doremi: no domain has a finite loss and reference loss; weights kept"
            return None
        step = self.step_size * excess[observed]
        if not np.all(np.isfinite(step)):
            self.last_skip_reason = f"doremi: step_size * excess loss overflows ({excess[observed]!r}); weights kept"
            return None

        floor = self.smoothing / self.num_domains
        new = self._weights.copy()
        current = self._weights[observed]
        if np.any(current > 0):
            # Mass above the floor that the observed domains redistribute; with all observed it is 1 - c.
            free_mass = max(float(current.sum()) - floor * int(observed.sum()), 0.0)
            with np.errstate(divide="ignore"):
                log_current = np.log(current)
            _, tilted = normalize_log_weights(log_current + step)
            new[observed] = free_mass * tilted + floor
        # else: smoothing 0 and every observed domain already at weight 0: nothing to redistribute.

        new = new / new.sum()
        self._averaged_updates += 1
        self._average = self._average + (new - self._average) / self._averaged_updates
        return new

    def _extra_state(self) -> dict[str, Any]:
        return {"average_weights": self._average.tolist(), "averaged_updates": self._averaged_updates}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "average_weights" not in state:
            raise ValueError("doremi: checkpointed state has no field 'average_weights'")
        average = validate_weights(
            state["average_weights"], self.num_domains, what="doremi: checkpointed average_weights"
        )
        updates = state_int(state, "averaged_updates", "doremi")
        self._average = average
        self._averaged_updates = updates
