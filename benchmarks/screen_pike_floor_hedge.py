"""Screen: PiKE's default with its uniform hedge moved toward the floors' optimum w ~ 1/sigma (issue #19, the twelfth
round). Not a method gradmix ships; a candidate run through the Mixer as the toy bench runs its "default mixer" arm.

    python benchmarks/screen_pike_floor_hedge.py [--random 20 --random-seed S] [--floor-tilt] [--seeds 8] --json PATH

At a noise floor the average loss is lowest at w_k ~ 1 / sigma_k (``bench_pike_horizon.inverse_noise_mix``); in
transit that mix starves a slow, noisy task. The candidate keeps the default's mix, 0.35 of the bound's mix plus a
0.65 hedge, and moves the hedge from the even split to w ~ 1 / sigma-hat (the pooled, shrunk ``grad_var``) as the
average measured loss stops falling: ``settled = clip((3 - t) / 2, 0, 1)`` with t the gap between a slow (0.9) and a
fast (0.5) EMA of the mean measured loss over the noise of one record (half the squared jump between successive
records, averaged), after 10 records. ``--floor-tilt`` also scales 1 / sigma-hat by ``sqrt(L_k w_k / mean)``: at
the floor of a held mix ``L_k w_k`` is the same for every task, so a task above the others is above its floor.

Score as ``bench_pike_toy.py``'s: the expected final loss given the counts drawn, over uniform's through the Mixer
on the same seed, the mean of the per-seed ratios, with the shares the sampler realised (examples drawn per task over
all seeds). Prints a row per setting and the mean / max.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from typing import Any

import numpy as np

from gradmix.methods.pike import PiKE
from gradmix.stats import DomainStats
from gradmix_kit.pike_toy import ToyProblem, random_settings, run_mixer, suite


class FloorHedgedPiKE(PiKE):
    """The default PiKE with its hedge moved toward w ~ 1/sigma-hat as the average measured loss settles."""

    def __init__(self, num_domains: int, *, floor_tilt: bool = False, guard: bool = False) -> None:
        super().__init__(num_domains)
        self.floor_tilt = floor_tilt
        self.guard = guard
        self.settled = 0.0
        self._fast: float | None = None
        self._slow: float | None = None
        self._previous = math.nan
        self._jump = 0.0
        self._records = 0

    def _track_settling(self, stats: DomainStats) -> None:
        if stats.loss is None or not np.any(np.isfinite(stats.loss)):
            return
        mean = float(np.nanmean(stats.loss))
        if self._fast is None or self._slow is None:
            self._fast = self._slow = mean
        else:
            jump = 0.5 * (mean - self._previous) ** 2
            self._jump = jump if self._records < 2 else 0.8 * self._jump + 0.2 * jump
            self._fast = 0.5 * self._fast + 0.5 * mean
            self._slow = 0.9 * self._slow + 0.1 * mean
        self._previous = mean
        self._records += 1
        if self._records >= 10 and self._jump > 0:
            gap = (self._slow - self._fast) / math.sqrt(self._jump)
            self.settled = float(np.clip((3.0 - gap) / 2.0, 0.0, 1.0))
        else:
            self.settled = 0.0

    def _guarded(self, target: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Domains whose pooled loss stands above the mean by more than twice its noise keep at least the even
        share; the others share the rest in proportion to ``target``."""
        losses = self._ema_loss[valid]
        noise = self._loss_spread[valid] * (1.0 - self.stats_ema) / (1.0 + self.stats_ema)
        if not np.all(np.isfinite(losses)):
            return target
        even = 1.0 / target.size
        above = losses > float(np.mean(losses)) + 2.0 * np.sqrt(noise)
        guarded = np.where(above, np.maximum(target, even), target)
        free = float(1.0 - guarded[above].sum())
        if free <= 0 or not np.any(~above):
            return np.full(target.size, even)
        guarded[~above] = free * target[~above] / target[~above].sum()
        return guarded

    def _update(self, stats: DomainStats) -> np.ndarray | None:
        self._track_settling(stats)
        return super()._update(stats)

    def _conceptual_step(
        self, gain_stat: np.ndarray, var_stat: np.ndarray, valid: np.ndarray, b: float
    ) -> np.ndarray | None:
        log_weights = super()._conceptual_step(gain_stat, var_stat, valid, b)
        if log_weights is None or self.settled <= 0:
            return log_weights
        weights = np.exp(log_weights)
        noise = np.maximum(var_stat[valid], 1e-12 * max(float(np.max(var_stat[valid])), 1e-300))
        target = 1.0 / np.sqrt(noise)
        if self.floor_tilt:
            level = np.nan_to_num(self._ema_loss[valid], nan=0.0).clip(min=0.0) * self._weights[valid]
            if level.mean() > 0:
                target = target * np.sqrt(level / level.mean())
        target = target / target.sum()
        if self.guard:
            target = self._guarded(target, valid)
        count, mass = int(valid.sum()), float(weights[valid].sum())
        hedge = (1.0 - self.settled) / count + self.settled * target
        weights[valid] = np.maximum(weights[valid] + mass * self.uniform_mix * (hedge - 1.0 / count), 0.0)
        with np.errstate(divide="ignore"):
            return np.asarray(np.log(weights / weights.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", type=int, default=0, help="this many settings of random_settings (0: the suite)")
    parser.add_argument("--random-seed", type=int, default=123)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--floor-tilt", action="store_true")
    parser.add_argument("--guard", action="store_true", help="domains whose loss stands above the mean keep 1/K")
    parser.add_argument("--json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    settings = random_settings(args.random, args.random_seed) if args.random else suite()
    rows: dict[str, dict[str, Any]] = {}
    for setting in settings:
        problem = ToyProblem(setting)
        ratios, counts = [], np.zeros(setting.num_tasks)
        for seed in range(args.seeds):
            uniform = run_mixer(problem, "uniform", seed=seed, update_every=10).expected[-1]
            method = FloorHedgedPiKE(setting.num_tasks, floor_tilt=args.floor_tilt, guard=args.guard)
            run = run_mixer(problem, method, seed=seed, update_every=10)
            ratios.append(run.expected[-1] / uniform)
            counts += run.counts
        # the mix the sampler realised (examples drawn per task over all seeds), not the weights asked for
        shares = counts / counts.sum()
        rows[setting.name] = {"ratio": float(np.mean(ratios)), "realised_shares": shares.round(4).tolist()}
        print(f"{setting.name}: {rows[setting.name]['ratio']:.3f}  realised shares {shares.round(3)}", flush=True)
    values = [row["ratio"] for row in rows.values()]
    print(f"mean {np.mean(values):.3f} max {np.max(values):.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"floor_tilt": args.floor_tilt, "guard": args.guard, "seeds": args.seeds, "settings": rows},
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
