"""Which inputs does the horizon plan need, and which can a probe give? (issue #19, the fifteenth round)

The tenth round's plan (``bench_pike_horizon.plan``: the mix minimising the average loss predicted over the steps so
far) reaches the goals when it is told the curvatures, the step size, the noise levels and the state. Here it runs on
sampled trajectories (``MixtureSampler`` counts, the data noise drawn, as ``run_exact``) and is fed, per input,
either the truth or what the probe would measure on the measuring batch of each update (simulated as
``run_exact(estimates=True)``: unbiased ||grad L_k||^2 and tr Sigma_k from the n_k examples of task k, NaN below 2;
the task's sample loss ``1/2 a_k (u_k . theta)^2 + xbar_k . theta``). ``--told`` lists what it is told:

- ``a``: the curvatures a_k (otherwise ``sum_t G_k / sum_t 2 L_k`` over the run's measurements: exact in this family,
  where ||grad L_k||^2 = 2 a_k L_k);
- ``s``: the noise levels sigma_k^2 (otherwise the run's mean of the measured tr Sigma_k over the dimension d);
- ``l``: the state, from the true task losses (otherwise from an EMA (0.7) of the measured losses);
- ``p``: the state propagated from the initial loss through the realised counts with the believed a, sigma and eta
  (no loss measurement after the start);
- ``f``: nothing but the initial loss: the per-step rates ``alpha_k = eta a_k`` and the noise scale ``eta / d`` are
  fitted (least squares) to the interval-mean training losses, and the state is propagated with them.

The step size is told except with ``f``. Not a method: a screen of what a method would have to measure. Score: the
bench's (expected final loss given the counts drawn) over uniform's on the same seeds, mean of the per-seed ratios
and their 95% t half-width.

    python benchmarks/screen_pike_plan_inputs.py --told ap [--random 20 --random-seed S] [--seeds 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import types
import warnings
from typing import Any

import numpy as np
from bench_pike_horizon import plan
from scipy.optimize import least_squares
from scipy.stats import t as t_dist

from gradmix import MixtureSampler
from gradmix_kit.pike_toy import ToyProblem, probe_estimates, random_settings, run_static, suite

_EMA = 0.7


def _measured_curvature(sum_sq: np.ndarray, sum_twice_loss: np.ndarray) -> np.ndarray:
    """a_k = sum G_k / sum 2 L_k (at least 1e-6); a task whose losses sum to <= 0 gets the others' median."""
    positive = sum_twice_loss > 0
    ratio = np.clip(sum_sq / np.where(positive, sum_twice_loss, 1.0), 1e-6, None)
    return np.where(positive, ratio, float(np.median(ratio[positive])) if positive.any() else 1.0)


def interval_means(
    rates: np.ndarray, noise_scale: float, counts: np.ndarray, trace: np.ndarray, b: int, every: int, start: float
) -> np.ndarray:
    """Interval-mean losses under ``L' = (1 - alpha n / b)^2 L + 1/2 alpha nu (n . trSigma) / b^2`` with each
    interval's counts held at their mean (closed form within an interval)."""
    out = np.empty_like(counts)
    loss = np.full(counts.shape[1], start, dtype=np.float64)
    offsets = np.arange(every)[:, None]
    for i, count in enumerate(counts):
        rho = (1.0 - rates * count / b) ** 2
        inject = 0.5 * rates * noise_scale * float(count @ trace) / b**2
        moving = np.abs(1.0 - rho) > 1e-12
        fixed = np.where(moving, inject / np.where(moving, 1.0 - rho, 1.0), 0.0)
        path = np.where(moving, rho**offsets * (loss - fixed) + fixed, loss + offsets * inject)
        out[i] = path.mean(axis=0)
        loss = rho * path[-1] + inject
    return out


def fit_rates(
    means: np.ndarray, examples: np.ndarray, counts: np.ndarray, trace: np.ndarray, b: int, every: int, start: float
) -> tuple[np.ndarray, float]:
    """Least-squares (alpha_k, nu) for ``interval_means``, residuals weighted by sqrt(n) / sqrt(tr Sigma_k)."""
    k = means.shape[1]
    seen = np.isfinite(means) & (examples > 0)
    weight = np.sqrt(examples) / np.sqrt(trace)[None, :]

    def residuals(p: np.ndarray) -> np.ndarray:
        predicted = interval_means(np.exp(p[:k]), float(np.exp(p[k])), counts, trace, b, every, start)
        return np.where(seen, (predicted - np.where(seen, means, 0.0)) * weight, 0.0).ravel()

    low = np.concatenate([np.full(k, np.log(1e-5)), [np.log(1e-10)]])
    high = np.concatenate([np.full(k, np.log(1.99)), [np.log(1e4)]])
    x0 = np.clip(np.concatenate([np.full(k, np.log(0.05)), [np.log(1e-3)]]), low + 1e-9, high - 1e-9)
    result = least_squares(residuals, x0, bounds=(low, high), max_nfev=200)
    return np.exp(result.x[:k]), float(np.exp(result.x[k]))


def run_plan(problem: ToyProblem, seed: int, told: str, every: int = 10, hedge: float = 0.0) -> float:
    """One sampled run of the plan fed the inputs ``told`` names (module docstring); the bench's score."""
    s = problem.setting
    k, b, d = s.num_tasks, s.batch_size, problem.dim
    rng = np.random.default_rng(seed)  # the data: the same draws as uniform's (common random numbers)
    probe_rng = np.random.default_rng([seed, 1])
    weights = np.full(k, 1.0 / k)
    sampler = MixtureSampler([2**40] * k, b, weights, seed=seed)
    theta = problem.theta0.copy()
    per_step = np.zeros((s.steps, k))
    sum_sq, sum_twice_loss, sum_trace, measured = np.zeros(k), np.zeros(k), np.zeros(k), np.zeros(k)
    pooled_loss = np.full(k, np.nan)
    interval_loss, interval_n = np.zeros(k), np.zeros(k)
    means: list[np.ndarray] = []
    examples: list[np.ndarray] = []
    for step in range(1, s.steps + 1):
        domains, _ = sampler.next_arrays()
        counts = np.bincount(domains, minlength=k).astype(np.float64)
        per_step[step - 1] = counts
        mean_noise = rng.normal(size=(k, d)) * np.sqrt(problem.noise_var / np.maximum(counts, 1.0))[:, None]
        sample_loss = 0.5 * problem.curvature * (problem.directions @ theta) ** 2 + mean_noise @ theta
        interval_loss += counts * sample_loss
        interval_n += counts
        due = step % every == 0
        if due:
            sq, var = probe_estimates(probe_rng, problem, theta, counts, mean_noise)
            ok = np.isfinite(sq)
            sum_sq[ok] += sq[ok]
            sum_twice_loss[ok] += 2.0 * sample_loss[ok]
            sum_trace[ok] += var[ok]
            measured[ok] += 1
            fresh = counts >= 1
            blended = np.where(np.isfinite(pooled_loss), _EMA * pooled_loss + (1 - _EMA) * sample_loss, sample_loss)
            pooled_loss = np.where(fresh, blended, pooled_loss)
            means.append(np.where(interval_n > 0, interval_loss / np.maximum(interval_n, 1.0), np.nan))
            examples.append(interval_n.copy())
            interval_loss[:], interval_n[:] = 0.0, 0.0
        true_losses = problem.task_losses(theta)
        drift = (counts * problem.curvature * (problem.directions @ theta)) @ problem.directions
        theta = theta - problem.lr / b * (drift + counts @ mean_noise)
        if not (due and np.all(measured >= 2) and np.all(np.isfinite(pooled_loss))):
            continue
        lr = problem.lr
        curvature = problem.curvature.copy() if "a" in told else _measured_curvature(sum_sq, sum_twice_loss)
        noise = problem.noise_var.copy() if "s" in told else np.maximum(sum_trace / measured, 1e-12) / d
        moment = 2.0 * (true_losses if "l" in told else np.maximum(pooled_loss, 0.0)) / curvature
        if "f" in told:  # rescaled problem: eta = 1, curvature = alpha, noise = nu tr Sigma, moment = 2 L / alpha
            trace = np.maximum(sum_trace / measured, 1e-12)
            mean_counts = np.array([per_step[i : i + every].mean(axis=0) for i in range(0, step, every)])
            curvature, scale = fit_rates(np.array(means), np.array(examples), mean_counts, trace, b, every, 1.0)
            lr, noise = 1.0, scale * trace
        if "p" in told or "f" in told:  # the state propagated from the initial loss through the realised counts
            moment = 2.0 * s.initial_loss / curvature
            for count in per_step[:step]:
                moment = (1 - lr * curvature * count / b) ** 2 * moment + lr**2 * float(count @ noise) / b**2
        believed: Any = types.SimpleNamespace(
            curvature=curvature, noise_var=noise, dim=d, smoothness=float(curvature.max()),
            setting=types.SimpleNamespace(batch_size=b),
        )  # fmt: skip
        planned = plan(believed, moment, lr, max(step, every), weights)
        if np.all(np.isfinite(planned)):
            weights = (1.0 - hedge) * planned + hedge / k
            weights = weights / weights.sum()
            sampler.set_weights(weights)
    return float(problem.expected_losses(per_step)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--told", default="", help="any of a, s, l, p, f (module docstring)")
    parser.add_argument("--hedge", type=float, default=0.0, help="share of the batch kept uniform")
    parser.add_argument("--random", type=int, default=0, help="this many settings of random_settings (0: the suite)")
    parser.add_argument("--random-seed", type=int, default=123)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    if set(args.told) - set("aslpf"):
        parser.error(f"--told {args.told!r}: use letters from 'aslpf'")
    warnings.simplefilter("ignore")  # L-BFGS probes steps past the stability limit; they score inf and are dropped
    settings = random_settings(args.random, args.random_seed) if args.random else suite()
    rows = {}
    for setting in settings:
        problem = ToyProblem(setting)
        k = setting.num_tasks
        base = np.array([run_static(problem, np.full(k, 1.0 / k), seed=s).expected[-1] for s in range(args.seeds)])
        arm = np.array([run_plan(problem, s, args.told, hedge=args.hedge) for s in range(args.seeds)])
        ratios = arm / base
        half = float(t_dist.ppf(0.975, args.seeds - 1) * ratios.std(ddof=1) / np.sqrt(args.seeds))
        rows[setting.name] = {"ratio": float(ratios.mean()), "ci95": half, "per_seed": ratios.tolist()}
        print(f"| {setting.name} | {ratios.mean():.3f} ± {half:.3f} |", flush=True)
    values = np.array([row["ratio"] for row in rows.values()])
    above = int((values > 1.02).sum())
    print(f"mean {values.mean():.3f}, max {values.max():.3f}, settings above 1.02: {above}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"args": vars(args), "settings": rows, "mean": float(values.mean()), "max": float(values.max())}, fh
            )


if __name__ == "__main__":
    main()
