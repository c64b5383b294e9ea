"""The static baselines of the PiKE paper (Sec. 5): uniform, fixed, size-proportional, temperature, round robin and
random task. They ignore gradient statistics; round robin and random task change the whole batch's domain at every
step, so they are ``every_step`` methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradmix.methods.base import MixingMethod, WeightError, state_int, validate_weights
from gradmix.stats import DomainStats


def _validate_sizes(sizes: Sequence[float] | None, num_domains: int, method: str) -> np.ndarray:
    if sizes is None:
        raise ValueError(f"method {method!r} needs the domain sizes (sizes=[...]); the Mixer passes them itself")
    arr = np.asarray(sizes, dtype=np.float64).reshape(-1)
    if arr.shape[0] != num_domains:
        raise WeightError(f"{method}: {arr.shape[0]} sizes given for {num_domains} domains")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr <= 0))
    if bad.size:
        raise WeightError(f"{method}: domain {int(bad[0])} has size {arr[bad[0]]}; sizes must be positive")
    return arr


class Uniform(MixingMethod):
    """Every domain gets 1/K."""

    name = "uniform"

    def __init__(self, num_domains: int) -> None:
        super().__init__(num_domains)

    def _update(self, stats: DomainStats) -> np.ndarray:
        return self._weights


class Fixed(MixingMethod):
    """User-given weights, kept for the whole run (normalised to sum to 1)."""

    name = "fixed"

    def __init__(self, num_domains: int, weights: Sequence[float] | Mapping[str, float] | None = None) -> None:
        if weights is None:
            raise ValueError("method 'fixed' needs weights=[...] (one per domain; {name: weight} through the Mixer)")
        super().__init__(num_domains, initial_weights=validate_weights(weights, num_domains))

    def _update(self, stats: DomainStats) -> np.ndarray:
        return self._weights


class Temperature(MixingMethod):
    """w_k proportional to n_k^alpha (alpha = 1/T): alpha = 1 is size-proportional, alpha = 0 is uniform.

    The usual multilingual default (e.g. XLM-R, mT5) is alpha between 0.3 and 0.7; we default to 0.5.
    """

    name = "temperature"
    needs_sizes = True

    def __init__(self, num_domains: int, sizes: Sequence[float] | None = None, alpha: float = 0.5) -> None:
        alpha = float(alpha)
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"temperature: alpha must be a finite number >= 0, got {alpha}")
        sizes_arr = _validate_sizes(sizes, num_domains, self.name)
        self.alpha = alpha
        # Work in log space so huge sizes with alpha > 1 cannot overflow.
        logits = alpha * np.log(sizes_arr)
        weights = np.exp(logits - logits.max())
        super().__init__(num_domains, initial_weights=weights)

    def _update(self, stats: DomainStats) -> np.ndarray:
        return self._weights


class Proportional(Temperature):
    """w_k = n_k / sum n: sample every example equally often."""

    name = "proportional"

    def __init__(self, num_domains: int, sizes: Sequence[float] | None = None) -> None:
        super().__init__(num_domains, sizes=sizes, alpha=1.0)


class RoundRobin(MixingMethod):
    """Whole batch from one domain, in turn 0, 1, ..., K-1, 0, ..."""

    name = "round_robin"
    every_step = True

    def __init__(self, num_domains: int) -> None:
        super().__init__(num_domains, initial_weights=np.eye(num_domains)[0])
        self._next = 1 % num_domains

    def _update(self, stats: DomainStats) -> np.ndarray:
        weights = np.zeros(self.num_domains)
        weights[self._next] = 1.0
        self._next = (self._next + 1) % self.num_domains
        return weights

    def _extra_state(self) -> dict[str, Any]:
        return {"next": self._next}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._next = state_int(state, "next", self.name) % self.num_domains


class RandomTask(MixingMethod):
    """Whole batch from one domain drawn uniformly at random at every step (seeded, resumable)."""

    name = "random"
    every_step = True

    def __init__(self, num_domains: int, seed: int = 0) -> None:
        self.seed = int(seed)
        self._draws = 0
        super().__init__(num_domains, initial_weights=np.eye(num_domains)[self._draw(0, num_domains)])
        self._draws = 1

    def _draw(self, index: int, num_domains: int) -> int:
        # Stateless in the draw index: the RNG state is just a counter, so resume is exact.
        return int(np.random.default_rng([self.seed, index]).integers(num_domains))

    def _update(self, stats: DomainStats) -> np.ndarray:
        weights = np.zeros(self.num_domains)
        weights[self._draw(self._draws, self.num_domains)] = 1.0
        self._draws += 1
        return weights

    def _extra_state(self) -> dict[str, Any]:
        return {"draws": self._draws, "seed": self.seed}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        draws, seed = state_int(state, "draws", self.name), state_int(state, "seed", self.name)
        self._draws, self.seed = draws, seed
