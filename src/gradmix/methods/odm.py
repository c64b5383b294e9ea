"""ODM: online data mixing as an adversarial bandit (EXP3) whose reward is the training loss.

Albalak, Pan, Raffel, Wang, "Efficient Online Data Mixing For Language Model Pre-Training" (arXiv 2312.02406),
Algorithm 1. Each domain is an arm; a domain with a high training loss has more left to learn, so it pays off.

Numerics: the released implementation evaluates exp(eps * R_hat) on the raw cumulative rewards, which grow without
bound and overflow float64 after a few hundred updates. Softmax is shift-invariant, so here the cumulative rewards
are stored relative to their maximum (max = 0 after every update) and the policy is computed with log-sum-exp: the
same policy at any number of updates, never an overflow.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradmix.methods.base import (
    MixingMethod,
    normalize_log_weights,
    state_int,
    state_vector,
    unmeasurable_domains,
)
from gradmix.stats import DomainStats

__all__ = ["ODM", "exploration_rate"]

_FLOOR = 1e300  # lowest relative estimated reward kept (exp(eps * -1e300) is 0 for any eps > 1e-290)


def exploration_rate(num_domains: int, round_index: int) -> float:
    """eps_t = min(1/K, sqrt(ln K / (K t))) for round t >= 1 (ODM Algorithm 1); eps_0 = 1/K."""
    if round_index < 0:
        raise ValueError(f"odm: round index must be >= 0, got {round_index}")
    if round_index == 0:
        return 1.0 / num_domains
    return min(1.0 / num_domains, math.sqrt(math.log(num_domains) / (num_domains * round_index)))


class ODM(MixingMethod):
    """Online Data Mixing (Albalak et al. 2023, Algorithm 1), one bandit round per update.

    At round t (t counts this method's updates), for every domain k with a finite loss L_k in the record:

        r_k     = reward_scale * L_k / pi_k          (importance-weighted reward; pi = weights it was sampled with)
        R_hat_k = R_hat_k + r_k                      (cumulative estimate; domains not sampled get no reward)
        pi      = (1 - K eps_t) softmax(eps_{t-1} R_hat) + eps_t

    The exponent uses eps_{t-1} and the mixing term eps_t, as in the paper and its released code.

    Adaptation: the paper draws one domain per (micro)batch; our batches mix domains, so every domain present in the
    batch (finite loss) gets its own importance-weighted reward in the same round.

    Args:
        num_domains: K.
        reward_scale: rewards are multiplied by this (> 0); the released code divides losses by 10 (0.1 here).
            It sets how fast the policy sharpens, since eps_t * R_hat grows like sqrt(t) * reward.
        reward_smoothing: None for the cumulative sum above (EXP3). A value a in [0, 1) instead keeps a moving
            average R_hat_k = a R_hat_k + (1 - a) r_k for the sampled domains (the authors' released runs also have
            a "smoothed mean" variant with a = 0.5), which forgets old rewards as the losses drift.
    """

    name = "odm"
    required_stats = frozenset({"loss"})

    def __init__(self, num_domains: int, reward_scale: float = 1.0, reward_smoothing: float | None = None) -> None:
        super().__init__(num_domains)
        reward_scale = float(reward_scale)
        if not np.isfinite(reward_scale) or reward_scale <= 0:
            raise ValueError(f"odm: reward_scale must be a finite number > 0, got {reward_scale}")
        if reward_smoothing is not None:
            reward_smoothing = float(reward_smoothing)
            if not (0.0 <= reward_smoothing < 1.0):
                raise ValueError(f"odm: reward_smoothing must lie in [0, 1) or be None, got {reward_smoothing}")
        self.reward_scale = reward_scale
        self.reward_smoothing = reward_smoothing
        self._estimated_reward = np.zeros(self.num_domains)
        self._rounds = 0

    @property
    def estimated_reward(self) -> np.ndarray:
        """R_hat; in cumulative mode relative to its maximum (only differences matter to the policy)."""
        return self._estimated_reward.copy()

    @property
    def rounds(self) -> int:
        """Bandit rounds played (t of the last update)."""
        return self._rounds

    def _update(self, stats: DomainStats) -> np.ndarray | None:
        loss = np.asarray(stats.loss, dtype=np.float64)
        probs = self._weights
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            reward = self.reward_scale * loss / probs
        sampled = np.isfinite(loss) & np.isfinite(reward)
        if not sampled.any():
            self.last_skip_reason = "odm: no domain has a finite loss (and reward) in this record; weights kept"
            return None

        estimate = self._estimated_reward.copy()
        if self.reward_smoothing is None:
            estimate[sampled] += reward[sampled]
            # A domain trained on whose loss could not be computed (NaN/inf) keeps its weight (MixingMethod.update);
            # its cumulative estimate keeps its gap to the best of the others, so that it is not starved either
            # once its loss comes back (without a reward it would fall further behind every round).
            held = unmeasurable_domains(stats) & ~sampled  # (the others include the sampled ones: never empty)
            if held.any():
                estimate[held] += estimate[~held].max() - self._estimated_reward[~held].max()
            # Renormalise (max = 0): the values stay bounded and the policy is unchanged. Gaps wider than
            # _FLOOR already mean a Gibbs weight of exactly 0, so clipping them changes nothing either.
            with np.errstate(over="ignore"):
                estimate = np.maximum(estimate - estimate.max(), -_FLOOR)
        else:
            a = self.reward_smoothing
            estimate[sampled] = a * estimate[sampled] + (1.0 - a) * reward[sampled]
        if not np.all(np.isfinite(estimate)):
            self.last_skip_reason = f"odm: estimated rewards became non-finite ({estimate!r}); weights kept"
            return None

        round_index = self._rounds + 1
        eps_now = exploration_rate(self.num_domains, round_index)
        eps_before = exploration_rate(self.num_domains, round_index - 1)
        _, gibbs = normalize_log_weights(eps_before * estimate)
        new = max(1.0 - self.num_domains * eps_now, 0.0) * gibbs + eps_now

        self._estimated_reward = estimate
        self._rounds = round_index
        return new

    def _extra_state(self) -> dict[str, Any]:
        return {"estimated_reward": self._estimated_reward.tolist(), "rounds": self._rounds}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        estimate = state_vector(state, "estimated_reward", "odm", self.num_domains)
        rounds = state_int(state, "rounds", "odm")  # a negative round index fails exploration_rate at the update
        self._estimated_reward = estimate
        self._rounds = rounds
