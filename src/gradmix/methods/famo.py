"""FAMO adapted to data mixing: move the mix so every domain's log-loss falls at the same rate.

Liu, Liu, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization" (NeurIPS 2023), Algorithm 1.
FAMO keeps task logits xi, task weights z = softmax(xi), takes the model step along
d = c * sum_k (z_k / L_k) grad L_k with c = (sum_k z_k / L_k)^-1, then measures each task's log-loss decrease
delta_k = log L_k(before) - log L_k(after) and updates xi <- xi - beta (J^T delta + gamma xi), J = d z / d xi:
a task whose loss fell faster than the z-weighted average loses weight.

Adaptation, stated plainly:
* z is used as the *sampling* weights, so the expected training gradient is sum_k z_k grad L_k, not FAMO's
  loss-normalised c * sum_k (z_k / L_k) grad L_k (the 1/L_k factor has no sampling counterpart without skewing the
  batch towards easy domains); only FAMO's logit update is kept.
* delta is measured between consecutive statistics records (the losses of two successive update intervals, on
  different batches), not before/after one step on the same batch, so it is noisier; the first record only
  stores the losses.
* The paper's derivation is plain gradient descent on xi; its released implementation uses Adam
  (lr 0.025, weight decay 0.01), which is the default here because a plain step of that size barely moves xi.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gradmix.methods.base import MixingMethod, normalize_log_weights, state_vector
from gradmix.stats import DomainStats

__all__ = ["FAMO", "softmax_jacobian_transpose_product"]

_OPTIMIZERS = ("adam", "sgd")


def softmax_jacobian_transpose_product(logits: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """J^T v for J = d softmax(logits) / d logits, i.e. z * (v - z.v) (J is symmetric: diag(z) - z z^T)."""
    _, z = normalize_log_weights(np.asarray(logits, dtype=np.float64))
    v = np.asarray(vector, dtype=np.float64)
    return z * (v - float(z @ v))


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in values]


class FAMO(MixingMethod):
    """FAMO's logit update (Liu et al. 2023, Algorithm 1) driving the sampling weights z = softmax(xi).

    Each update, with the previous record's losses L_prev and this record's losses L (minus the floor L*):

        delta_k = log(L_prev_k - L*_k) - log(L_k - L*_k)
        g       = J^T delta + gamma xi,     (J^T delta)_k = z_k (delta_k - sum_j z_j delta_j)
        xi      <- xi - beta g                (optimizer="sgd", the paper's equation)
                   or one Adam step on g      (optimizer="adam", the released code)

    A domain whose loss is missing (NaN/Inf, or <= L*) in either record has no delta: its logit and optimizer
    state are left unchanged, and the other domains' gradient is the one of the restricted simplex (the missing
    delta is imputed as the z-weighted mean of the observed ones, which zeroes its own component exactly).

    Args:
        num_domains: K.
        step_size: beta >= 0 (released code: 0.025).
        weight_decay: gamma >= 0 on the logits, pulling towards uniform (released code: 0.01).
        optimizer: "adam" (default, as released) or "sgd" (the paper's plain update).
        min_loss: L*, a lower bound of each domain's loss (scalar or length K; FAMO's l*, default 0).
        adam_betas, adam_eps: Adam's moment decay rates and denominator epsilon (torch defaults).
    """

    name = "famo"
    required_stats = frozenset({"loss"})

    def __init__(
        self,
        num_domains: int,
        step_size: float = 0.025,
        weight_decay: float = 0.01,
        optimizer: str = "adam",
        min_loss: float | Sequence[float] = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
    ) -> None:
        super().__init__(num_domains)
        step_size, weight_decay, adam_eps = float(step_size), float(weight_decay), float(adam_eps)
        if not np.isfinite(step_size) or step_size < 0:
            raise ValueError(f"famo: step_size (beta) must be a finite number >= 0, got {step_size}")
        if not np.isfinite(weight_decay) or weight_decay < 0:
            raise ValueError(f"famo: weight_decay (gamma) must be a finite number >= 0, got {weight_decay}")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"famo: optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
        betas = tuple(float(b) for b in adam_betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"famo: adam_betas must be two numbers in [0, 1), got {adam_betas!r}")
        if not np.isfinite(adam_eps) or adam_eps <= 0:
            raise ValueError(f"famo: adam_eps must be a finite number > 0, got {adam_eps}")
        floor = (
            np.broadcast_to(np.asarray(min_loss, dtype=np.float64), (self.num_domains,))
            if np.ndim(min_loss) == 0
            else np.asarray(min_loss, dtype=np.float64).reshape(-1)
        )
        if floor.shape[0] != self.num_domains:
            raise ValueError(f"famo: min_loss has {floor.shape[0]} entries but there are {self.num_domains} domains")
        bad = np.flatnonzero(~np.isfinite(floor))
        if bad.size:
            raise ValueError(f"famo: min_loss has a non-finite value {floor[bad[0]]} for domain {int(bad[0])}")

        self.step_size = step_size
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.min_loss = floor.copy()
        self.adam_betas = betas
        self.adam_eps = adam_eps
        self._logits = np.zeros(self.num_domains)
        self._previous_log_loss = np.full(self.num_domains, np.nan)
        self._adam_mean = np.zeros(self.num_domains)
        self._adam_sq_mean = np.zeros(self.num_domains)
        self._adam_steps = np.zeros(self.num_domains, dtype=np.int64)  # per domain: missing domains skip steps

    @property
    def logits(self) -> np.ndarray:
        """xi (the weights are softmax(xi))."""
        return self._logits.copy()

    def _log_loss(self, loss: np.ndarray) -> np.ndarray:
        shifted = np.asarray(loss, dtype=np.float64) - self.min_loss
        valid = np.isfinite(shifted) & (shifted > 0)
        return np.where(valid, np.log(np.where(valid, shifted, 1.0)), np.nan)

    def _update(self, stats: DomainStats) -> np.ndarray | None:
        assert stats.loss is not None  # update() has already run stats.require(required_stats)
        log_loss = self._log_loss(stats.loss)
        had_baseline = bool(np.isfinite(self._previous_log_loss).any())
        delta = self._previous_log_loss - log_loss  # NaN where either record lacks the domain
        # Only consecutive records count: a domain missing now has no baseline next time.
        self._previous_log_loss = log_loss
        observed = np.isfinite(delta)
        if not observed.any():
            if not had_baseline and np.isfinite(log_loss).any():
                return self._weights  # first usable record: stored as the baseline for the next delta
            self.last_skip_reason = (
                "famo: no domain has a valid loss (finite, above min_loss) in both this and "
                "the previous record; logits kept"
            )
            return None

        _, z = normalize_log_weights(self._logits)
        observed_mass = float(z[observed].sum())
        mean_delta = (
            float(z[observed] @ delta[observed]) / observed_mass if observed_mass > 0 else float(delta[observed].mean())
        )  # z underflowed to 0 there: any finite value works
        filled = np.where(observed, delta, mean_delta)
        grad = softmax_jacobian_transpose_product(self._logits, filled) + self.weight_decay * self._logits

        logits = self._logits.copy()
        if self.optimizer == "sgd":
            logits[observed] -= self.step_size * grad[observed]
            mean, sq_mean, steps = self._adam_mean, self._adam_sq_mean, self._adam_steps
        else:
            mean, sq_mean, steps = self._adam_mean.copy(), self._adam_sq_mean.copy(), self._adam_steps.copy()
            beta1, beta2 = self.adam_betas
            g = grad[observed]
            steps[observed] += 1
            mean[observed] = beta1 * mean[observed] + (1.0 - beta1) * g
            sq_mean[observed] = beta2 * sq_mean[observed] + (1.0 - beta2) * g * g
            correction1 = 1.0 - beta1 ** steps[observed]
            correction2 = 1.0 - beta2 ** steps[observed]
            denom = np.sqrt(sq_mean[observed]) / np.sqrt(correction2) + self.adam_eps
            logits[observed] -= (self.step_size / correction1) * mean[observed] / denom
        if not np.all(np.isfinite(logits)):
            self.last_skip_reason = f"famo: logit update is non-finite ({logits!r}); logits kept"
            return None

        self._logits = logits
        self._adam_mean, self._adam_sq_mean, self._adam_steps = mean, sq_mean, steps
        return normalize_log_weights(logits)[1]

    def _extra_state(self) -> dict[str, Any]:
        return {
            "logits": self._logits.tolist(),
            "previous_log_loss": _nan_to_none(self._previous_log_loss),
            "adam_mean": self._adam_mean.tolist(),
            "adam_sq_mean": self._adam_sq_mean.tolist(),
            "adam_steps": self._adam_steps.tolist(),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        k = self.num_domains
        logits = state_vector(state, "logits", "famo", k)
        previous = state_vector(state, "previous_log_loss", "famo", k, finite=False)  # None/NaN: no baseline
        mean = state_vector(state, "adam_mean", "famo", k)
        sq_mean = state_vector(state, "adam_sq_mean", "famo", k, nonnegative=True)
        steps = state_vector(state, "adam_steps", "famo", k, nonnegative=True)
        if np.any(steps != np.round(steps)):
            raise ValueError(f"famo: checkpointed adam_steps must be integers >= 0, got {state['adam_steps']!r}")
        self._logits = logits
        self._previous_log_loss = previous
        self._adam_mean, self._adam_sq_mean, self._adam_steps = mean, sq_mean, steps.astype(np.int64)
