"""How far a mix that plans over a horizon gets on PiKE's toy problem, given what the Mixer is not told (issue #19).

    python benchmarks/bench_pike_horizon.py [--random 20 --random-seed 9001] [--arms "plan H=elapsed"] [--json PATH]
    python benchmarks/bench_pike_horizon.py --arms "plan H=elapsed" --sampled-seeds 8    (also on sampled runs)

(Every plan re-solves a K-dimensional problem at every update: the suite takes about 2.5 min and a random draw of 20
2-7 min on one core of a 2-core machine.)

PiKE's bound is one step long. On the unseen draws of the toy family its own per-step optimum (exact statistics,
true L and eta) loses to uniform in most settings, while a static mix chosen in hindsight gains 15-46%
(BENCHMARKS.md, the eighth round). This asks what a mix needs to know to take that room. It runs the toy's
dynamics in expectation (no sampling: the mean and covariance of theta are propagated exactly with fractional
batch shares w_k; the score of ``bench_pike_toy.py`` without the integer counts), and re-plans the mix every
``--update-every`` steps from the true state: the w that minimises the average loss predicted ``H`` steps ahead
if it were held that long. For orthogonal tasks that prediction is closed-form: per task
``m_k <- rho_k^H m_k + c (1 - rho_k^H) / (1 - rho_k)`` with ``rho_k = (1 - eta a_k w_k)^2`` and
``c = eta^2 sum_j w_j sigma_j^2 / b`` (with cosines > 0 the planner still uses it; the dynamics it is scored on do
not). Arms, each relative to uniform (mean ratio over the settings):

- ``best static``: the best of ``gradmix_kit.pike_toy.static_mixes`` (the grid ``bench_pike_toy.py`` searches), in
  hindsight.
- ``plan H=interval``: the horizon is one update interval: about the one-step bound's view.
- ``plan H=remaining``: the run's true remaining steps (needs the run's length).
- ``plan H=elapsed``: the steps so far, as a guess at the steps to come (the run's length not needed).
- ``plan H=elapsed (eta x F)``: the same with a wrong step size (F = 0.3 or 3).
- ``plan H=elapsed (eta = c/L)``: eta not known, put at c / max_k a_k (the family's eta runs from 0.1/L to 1.8/L).
- ``plan H=... (the bound's noise)``: the plan charges each step's noise as PiKE's bound does: the average loss rises
  by ``eta^2 L tr(Sigma_w) / 2b`` (here ``d L / mean(a)`` times the exact charge), split evenly between the tasks,
  since the bound does not say where it lands. (Where runs end at their floors the noise levels alone suffice:
  the next two arms.)
- ``static w ~ 1/sigma (the floors' optimum)``: the static mix whose stationary loss is lowest in the small-step
  limit (``inverse_noise_mix``), read off the noise levels alone.
- ``w ~ sqrt(L_k w_k) / sigma (told the losses)``: that mix tilted toward tasks above their floor, detected from
  the losses and the mix alone (``floor_balance_policy``).

``--sampled-seeds N`` adds the ``plan H=elapsed`` policy on N sampled trajectories per setting (``RealisedStatePlan``
through ``run_exact``: whole examples, the data noise drawn), scored as ``bench_pike_toy.py`` scores and by the
realised final loss, against uniform on the same seeds.

It is an analysis, not a method: every plan reads the true curvatures and parameter moments. Writes a markdown table
to stdout and the numbers to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.stats import t as t_dist

from gradmix.methods.base import MixingMethod
from gradmix.stats import DomainStats
from gradmix_kit.pike_toy import ToyProblem, ToySetting, random_settings, run_exact, run_static, static_mixes, suite


@dataclass
class State:
    """What a policy sees at an update: step t of T, the per-task second moments m_k = E[(u_k^T theta)^2]."""

    step: int
    steps: int
    second_moment: np.ndarray


Policy = Callable[[ToyProblem, State, np.ndarray], np.ndarray]


def predicted_loss_and_grad(
    problem: ToyProblem, weights: np.ndarray, moment: np.ndarray, lr: float, horizon: int, bound_noise: bool = False
) -> tuple[float, np.ndarray]:
    """Sum of a_k m_k after ``horizon`` steps at fixed ``weights`` (orthogonal tasks, closed form), and its gradient
    in the weights. ``bound_noise``: each task's loss gets the same share of the bound's charge ``L tr(Sigma_w)``
    (L = max a, tr = d sigma^2) instead of its exact ``a_k sigma^2`` per coordinate."""
    a, h = problem.curvature, float(horizon)
    scale = problem.smoothness * problem.dim / a if bound_noise else np.ones_like(a)
    shrink = 1.0 - lr * a * weights
    rho, d_rho = shrink * shrink, -2.0 * lr * a * shrink
    inject = lr * lr * float(weights @ problem.noise_var) / problem.setting.batch_size
    d_inject = lr * lr * problem.noise_var / problem.setting.batch_size
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        decay = rho**h
        d_decay = h * rho ** (h - 1.0) * d_rho
        near_one = np.abs(1.0 - rho) <= 1e-12
        gap = np.where(near_one, 1.0, 1.0 - rho)
        accumulated = np.where(near_one, h, (1.0 - decay) / gap)
        d_accumulated = np.where(near_one, h * (h - 1.0) / 2.0, (accumulated - h * rho ** (h - 1.0)) / gap) * d_rho
        total = float(np.sum(a * (decay * moment + inject * scale * accumulated)))
        grad = a * (d_decay * moment + inject * scale * d_accumulated) + d_inject * float(
            np.sum(a * scale * accumulated)
        )
    if not (np.isfinite(total) and np.all(np.isfinite(grad))):
        return float("inf"), np.zeros_like(a)
    return total, grad


def predicted_loss(
    problem: ToyProblem, weights: np.ndarray, moment: np.ndarray, lr: float, horizon: int, bound_noise: bool = False
) -> float:
    return predicted_loss_and_grad(problem, weights, moment, lr, horizon, bound_noise)[0]


def plan(
    problem: ToyProblem,
    moment: np.ndarray,
    lr: float,
    horizon: int,
    current: np.ndarray,
    bound_noise: bool = False,
) -> np.ndarray:
    """The simplex point minimising ``predicted_loss`` (softmax parametrisation, L-BFGS from four starts)."""

    def objective(logits: np.ndarray) -> tuple[float, np.ndarray]:
        w = np.exp(logits - logits.max())
        w = w / w.sum()
        value, grad = predicted_loss_and_grad(problem, w, moment, lr, horizon, bound_noise)
        return value, w * (grad - float(w @ grad))

    starts = [
        np.log(np.maximum(current, 1e-12)),
        np.zeros_like(current),
        -0.5 * np.log(np.maximum(problem.noise_var, 1e-12)),
        -0.5 * np.log(problem.curvature),
    ]
    best_value, best_logits = float("inf"), starts[1]
    for start in starts:
        result = minimize(objective, start, jac=True, method="L-BFGS-B")
        if result.fun < best_value:
            best_value, best_logits = float(result.fun), result.x
    w = np.exp(best_logits - best_logits.max())
    return w / w.sum()


def static_policy(weights: np.ndarray) -> Policy:
    return lambda problem, state, current: weights


def stationary_loss(problem: ToyProblem, weights: np.ndarray) -> float:
    """Average loss a static mix settles at (orthogonal tasks): ``m_k -> c / (1 - rho_k)`` with the notation of
    ``predicted_loss_and_grad``, so task k's floor is ``eta sigma_w^2 / (2 b w_k (2 - eta a_k w_k))``,
    ``sigma_w^2 = sum_j w_j sigma_j^2``. inf where a task does not settle (w_k = 0, or past the stability limit)."""
    a, lr = problem.curvature, problem.lr
    rho = (1.0 - lr * a * weights) ** 2
    inject = lr * lr * float(weights @ problem.noise_var) / problem.setting.batch_size
    if np.any(rho >= 1.0):
        return float("inf")
    return float(np.mean(0.5 * a * inject / (1.0 - rho)))


def inverse_noise_mix(problem: ToyProblem) -> np.ndarray:
    """``w_k ~ 1 / sigma_k``: the mix whose floor is lowest when eta a_k w_k << 1. The floors then average to
    ``(eta / 4b) sigma_w^2 mean_k(1 / w_k)``, which is homogeneous of degree 0 in w, so its minimiser on the simplex
    solves ``sigma_k^2 sum_j (1 / w_j) = sigma_w^2 / w_k^2``: w_k ~ 1 / sigma_k. It needs neither the curvatures nor
    the step size, only the noise levels, which the probe measures (``grad_var``): the one piece of the horizon plan
    a method can read off the statistics it already has. It is blind to a task still far above its floor."""
    inverse = 1.0 / np.sqrt(problem.noise_var)
    return inverse / inverse.sum()


def planning_policy(
    horizon: Callable[[State], int],
    lr_factor: float = 1.0,
    lr_times_smoothness: float | None = None,
    bound_noise: bool = False,
) -> Policy:
    """Plans with eta = ``lr_factor`` x the true one, or, given ``lr_times_smoothness``, eta = that / max_k a_k: a
    prior on eta from the curvature alone (the default PiKE's L*eta range is centred on 1)."""

    def policy(problem: ToyProblem, state: State, current: np.ndarray) -> np.ndarray:
        lr = problem.lr * lr_factor if lr_times_smoothness is None else lr_times_smoothness / problem.smoothness
        return plan(problem, state.second_moment, lr, horizon(state), current, bound_noise)

    return policy


def final_loss(problem: ToyProblem, policy: Policy, every: int) -> float:
    """Expected average loss after the run, the mix re-chosen every ``every`` steps (``ToyProblem.moment_step`` with
    fractional counts b w_k)."""
    steps, batch = problem.setting.steps, problem.setting.batch_size
    mean, cov = problem.theta0.copy(), np.zeros((problem.dim, problem.dim))
    weights = np.full(problem.setting.num_tasks, 1.0 / problem.setting.num_tasks)
    for t in range(steps):
        if t % every == 0:
            weights = policy(problem, State(t, steps, problem.second_moments(mean, cov)), weights)
        mean, cov = problem.moment_step(mean, cov, batch * weights)
    return float(np.mean(0.5 * problem.curvature * problem.second_moments(mean, cov)))


def best_static_ratio(problem: ToyProblem, every: int, uniform: float) -> float:
    """Uniform is the first of ``static_mixes``, so the ratio is at most 1."""
    return min(final_loss(problem, static_policy(w), every) for w in static_mixes(problem)) / uniform


STATIONARY = "static w ~ 1/sigma (the floors' optimum)"
FLOOR_BALANCE = "w ~ sqrt(L_k w_k) / sigma (told the losses)"


def floor_balance_policy(problem: ToyProblem, state: State, current: np.ndarray) -> np.ndarray:
    """``inverse_noise_mix`` scaled by ``sqrt(L_k w_k)``, w the current mix: at the floor of a held mix
    ``L_k w_k`` is the same for every task (``stationary_loss`` at small steps), so a task whose ``L_k w_k`` stands
    above the others' is above its floor and gets more. It reads only what a method can measure: each task's loss
    (here the true expected one) and noise level, and the mix; no curvature, no step size. An analysis arm."""
    loss = 0.5 * problem.curvature * state.second_moment
    above = loss * current / float(np.mean(loss * current))
    weights = inverse_noise_mix(problem) * np.sqrt(above)
    return weights / weights.sum()


def arms(every: int) -> dict[str, Callable[[], Policy]]:
    def elapsed(state: State) -> int:
        return max(state.step, every)

    return {
        "plan H=interval": lambda: planning_policy(lambda s: every),
        "plan H=remaining": lambda: planning_policy(lambda s: s.steps - s.step),
        "plan H=elapsed": lambda: planning_policy(elapsed),
        "plan H=elapsed (eta x 0.3)": lambda: planning_policy(elapsed, 0.3),
        "plan H=elapsed (eta x 3)": lambda: planning_policy(elapsed, 3.0),
        "plan H=elapsed (eta = 0.1/L)": lambda: planning_policy(elapsed, lr_times_smoothness=0.1),
        "plan H=elapsed (eta = 0.3/L)": lambda: planning_policy(elapsed, lr_times_smoothness=0.3),
        "plan H=elapsed (the bound's noise)": lambda: planning_policy(elapsed, bound_noise=True),
        "plan H=interval (the bound's noise)": lambda: planning_policy(lambda s: every, bound_noise=True),
        STATIONARY: lambda: lambda problem, state, current: inverse_noise_mix(problem),
        FLOOR_BALANCE: lambda: floor_balance_policy,
    }


SAMPLED, SAMPLED_REALISED = "sampled plan H=elapsed", "sampled plan H=elapsed (realised)"


class RealisedStatePlan(MixingMethod):
    """``plan H=elapsed`` run on one sampled trajectory (``run_exact``: integer counts from ``MixtureSampler``, the
    data noise drawn): at each update it plans from the realised theta, read off the exact task losses
    (``m_k = 2 L_k / a_k``; no covariance, the state is known). Whether the mean-field plan's gain survives the
    noise of one run and the sampler's rounding, before any statistic is estimated. Not a method: it reads the
    true curvatures, step size and noise levels."""

    name = "plan (realised state)"
    required_stats = frozenset({"loss"})

    def __init__(self, problem: ToyProblem, every: int) -> None:
        super().__init__(problem.setting.num_tasks)
        self.problem, self.every = problem, every

    def _update(self, stats: DomainStats) -> np.ndarray:
        moment = 2.0 * np.asarray(stats.loss) / self.problem.curvature
        return plan(self.problem, moment, self.problem.lr, max(stats.step, self.every), self.weights)


def sampled_ratios(setting: ToySetting, every: int, seeds: int) -> dict[str, float]:
    """``RealisedStatePlan`` against uniform on the same seeds (common random numbers): the ratio of mean final
    expected losses given the counts (``bench_pike_toy``'s score) and of mean realised final losses, each with the
    95% t half-width of the paired per-seed difference over uniform's mean (``... ci95``)."""
    problem = ToyProblem(setting)
    k = setting.num_tasks
    uniform = [run_static(problem, np.full(k, 1.0 / k), seed=s) for s in range(seeds)]
    planned = [run_exact(problem, RealisedStatePlan(problem, every), seed=s, update_every=every) for s in range(seeds)]
    out = {}
    for name, score in ((SAMPLED, lambda r: r.expected[-1]), (SAMPLED_REALISED, lambda r: r.final)):
        arm, base = np.array([score(r) for r in planned]), np.array([score(r) for r in uniform])
        half = t_dist.ppf(0.975, seeds - 1) * np.std(arm - base, ddof=1) / np.sqrt(seeds) if seeds > 1 else np.nan
        out[name] = float(arm.mean() / base.mean())
        out[f"{name} ci95"] = float(half / base.mean())
    return out


def run_setting(setting: ToySetting, every: int, columns: list[str], sampled_seeds: int = 0) -> dict[str, float]:
    problem = ToyProblem(setting)
    k = setting.num_tasks
    uniform = final_loss(problem, static_policy(np.full(k, 1.0 / k)), every)
    row = sampled_ratios(setting, every, sampled_seeds) if sampled_seeds else {}
    if "best static" in columns:
        row["best static"] = best_static_ratio(problem, every, uniform)
    for name, make in arms(every).items():
        if name in columns:
            row[name] = final_loss(problem, make(), every) / uniform
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", type=int, default=0, help="this many settings of random_settings (0: the suite)")
    parser.add_argument("--random-seed", type=int, default=123)
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--json")
    parser.add_argument(
        "--arms", help="comma-separated arms to run (default: all; each plan re-solves at every update)"
    )
    parser.add_argument(
        "--sampled-seeds",
        type=int,
        default=0,
        help="also run 'plan H=elapsed' on this many sampled trajectories per setting (RealisedStatePlan)",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # L-BFGS probes steps past the stability limit; they score inf and are dropped
    settings = random_settings(args.random, args.random_seed) if args.random else suite()
    columns = ["best static", *arms(args.update_every)]
    if args.arms:
        wanted = [a.strip() for a in args.arms.split(",")]
        unknown = sorted(set(wanted) - set(columns))
        if unknown:
            parser.error(f"--arms: unknown arm {unknown[0]!r}; the arms are {columns}")
        columns = [c for c in columns if c in wanted]
    if args.sampled_seeds:
        columns += [SAMPLED, SAMPLED_REALISED]
    print(f"| setting | {' | '.join(columns)} |")
    print("|" + "---|" * (len(columns) + 1))
    started = time.perf_counter()
    rows = {}
    for setting in settings:
        rows[setting.name] = run_setting(setting, args.update_every, columns, args.sampled_seeds)
        row = rows[setting.name]
        cells = [f"{row[c]:.2f}" + (f" ± {row[c + ' ci95']:.2f}" if c + " ci95" in row else "") for c in columns]
        print(f"| {setting.name} | {' | '.join(cells)} |", flush=True)
    summary = {
        c: {"mean": float(np.mean([r[c] for r in rows.values()])), "max": float(np.max([r[c] for r in rows.values()]))}
        for c in columns
    }
    print(
        "| **mean / max** | "
        + " | ".join(f"**{summary[c]['mean']:.3f}** / {summary[c]['max']:.2f}" for c in columns)
        + " |"
    )
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        draw = f"random {args.random_seed}" if args.random else "suite"
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "draw": draw,
                    "update_every": args.update_every,
                    "sampled_seeds": args.sampled_seeds,
                    "settings": rows,
                    "summary": summary,
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
