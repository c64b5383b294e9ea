"""PiKE on its own toy problem (Example 2.1 of arXiv 2502.06244, generalised): where the answer is known.

    python benchmarks/bench_pike_toy.py [--seeds 16] [--update-every 10] [--settings NAME,...] [--json PATH]
    python benchmarks/bench_pike_toy.py --random 20 --seeds 8 --no-best-static    (settings it was not chosen on)
    python benchmarks/bench_pike_toy.py --arms "default mixer" --default-params '{"shrinkage_centre": "median"}'
                                                                                  (a candidate in the default's place)
    python benchmarks/bench_pike_toy.py --arms "default mixer" --probe-every 1    (measure every step: how much of
                                                                                  the gap is estimation noise)

For every setting of ``gradmix_kit.pike_toy.suite()`` (K = 2-8 tasks, curvatures and noise levels 10-100x apart,
b = 4-64, eta from 0.05 to 0.9 of the stability limit, two settings with positive gradient cosines), or with
``--random N`` for N settings drawn from the same family (``random_settings``), it runs:

- uniform, and the best static mix in hindsight (grid, 2 seeds),
- the per-step oracle: conceptual PiKE with the true L and eta, fed exact statistics every step,
- ``variant="paper"`` (Algorithm 1 literally), ``variant="gradmix_v1"`` (the pre-0.2 default) and the default,
  each with exact statistics every ``update_every`` steps (``exact``) and through the default Mixer path
  (``Mixer(..., update_every=N)`` with its own probe, nothing else set; ``mixer``).

Score: the final expected loss E[L(theta_T)] given the per-step counts the run drew (the data noise averaged out
exactly, so only the chosen mix is scored), relative to uniform's (its Mixer run for Mixer arms), mean of the
per-seed ratios with a 95% t interval; and the step at which the seed-mean expected loss first reaches uniform's final
value and stays there ("-" = never). The score is blind to one thing: a method that reacts to the state the noise
left (more weight to a task whose parameter drifted) makes the counts depend on the noise, and averaging the noise out
as if it did not drops that benefit. So every arm also records its realised final loss, the population loss of the
parameters it ended with: mean over seeds relative to uniform's, with a paired 95% interval (unbiased, much noisier;
the last column, for the default's Mixer arm). Writes a markdown table to stdout and the numbers to ``--json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from gradmix.methods import make_method
from gradmix.methods.base import MixingMethod
from gradmix_kit.pike_toy import (
    ToyProblem,
    ToyRun,
    ToySetting,
    best_static,
    oracle_method,
    random_settings,
    run_exact,
    run_mixer,
    suite,
)

VARIANTS: dict[str, dict[str, Any]] = {"paper": {"variant": "paper"}, "v1": {"variant": "gradmix_v1"}, "default": {}}


def interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and 95% t half-width."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan
    half = float(scipy_stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, half


def steps_to(curves: list[np.ndarray], level: float) -> int | None:
    """First step from which the seed-mean expected loss stays at or below ``level`` (None: never)."""
    mean = np.mean(curves, axis=0)
    above = np.flatnonzero(mean > level)
    if not above.size:
        return 0
    return int(above[-1]) + 1 if above[-1] + 1 < len(mean) else None


@dataclass
class Arm:
    """One arm's runs over the seeds: the scores, the curves, the realised shares and the realised final losses."""

    finals: np.ndarray  # E[L(theta_T)] given the counts, per seed (the score)
    curves: list[np.ndarray]
    shares: np.ndarray
    realised: np.ndarray  # the population loss at theta_T, per seed


def run_arm(seeds: range, build: Callable[[int], ToyRun]) -> Arm:
    runs = [build(seed) for seed in seeds]
    return Arm(
        finals=np.array([r.expected[-1] for r in runs]),
        curves=[r.expected for r in runs],
        shares=np.mean([r.counts / r.counts.sum() for r in runs], axis=0),
        realised=np.array([r.final for r in runs]),
    )


def realised_ratio(arm: np.ndarray, baseline: np.ndarray) -> tuple[float, float]:
    """Mean realised final loss over uniform's, and the 95% t half-width of the paired difference over uniform's
    mean. Unbiased where the score is not (``ToyRun``), and much noisier: it needs many seeds."""
    scale = float(np.mean(baseline))
    _, half = interval(arm - baseline)
    return float(np.mean(arm)) / scale, half / scale


def run_setting(
    setting: ToySetting,
    seeds: range,
    every: int,
    *,
    best: bool,
    only: set[str] | None = None,
    variants: dict[str, dict[str, Any]] = VARIANTS,
    probe_every: int | None = None,
) -> dict[str, Any]:
    """Every arm (or those in ``only``) on one setting: ratios to uniform (paired by seed), intervals, steps,
    realised shares."""
    started = time.perf_counter()
    problem = ToyProblem(setting)
    k = setting.num_tasks

    def exact(make: Callable[[], MixingMethod], interval_steps: int) -> Callable[[int], ToyRun]:
        return lambda seed: run_exact(problem, make(), seed=seed, update_every=interval_steps)

    def mixer(method: str, params: dict[str, Any], measure: int | None = probe_every) -> Callable[[int], ToyRun]:
        return lambda seed: run_mixer(
            problem, method, seed=seed, update_every=every, method_params=params, probe_every=measure
        )

    # uniform on each path; the Mixer's only when a Mixer arm runs (it is the slow part of an exact-arms-only run)
    uniform = {"exact": run_arm(seeds, exact(lambda: make_method("uniform", k), every))}
    if only is None or any(name.endswith("mixer") for name in only):
        uniform["mixer"] = run_arm(seeds, mixer("uniform", {}, None))
    row: dict[str, Any] = {"name": setting.name, "setting": setting.__dict__, "arms": {}}
    if best:
        weights, score = best_static(problem, range(2))
        row["arms"]["best static"] = {
            "ratio": score / float(np.mean(uniform["exact"].finals[:2])),
            "weights": weights.tolist(),
        }
    arms: list[tuple[str, Callable[[int], ToyRun]]] = [("oracle", exact(lambda: oracle_method(problem), 1))]
    for label, params in variants.items():
        arms.append((f"{label} exact", exact(functools.partial(make_method, "pike", k, **params), every)))
    for label, params in variants.items():
        arms.append((f"{label} mixer", mixer("pike", params)))
    for name, build in arms:
        if only is not None and name not in only:
            continue
        arm = run_arm(seeds, build)
        baseline = uniform["mixer" if name.endswith("mixer") else "exact"]
        mean, half = interval(arm.finals / baseline.finals)
        real_ratio, real_half = realised_ratio(arm.realised, baseline.realised)
        row["arms"][name] = {
            "ratio": mean,
            "ci95": half,
            "per_seed": (arm.finals / baseline.finals).tolist(),
            "steps_to_uniform_final": steps_to(arm.curves, float(np.mean([c[-1] for c in baseline.curves]))),
            "realised_shares": arm.shares.tolist(),
            "realised_final_ratio": real_ratio,
            "realised_final_ci95": real_half,
        }
    row["seconds"] = time.perf_counter() - started
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--settings", help="comma-separated setting names (default: all)")
    parser.add_argument("--no-best-static", action="store_true", help="skip the grid search (slow)")
    parser.add_argument(
        "--random",
        type=int,
        default=0,
        help="instead of the suite: this many settings drawn from the "
        "same family (gradmix_kit.pike_toy.random_settings), settings the default was not chosen on",
    )
    parser.add_argument("--random-seed", type=int, default=123)
    parser.add_argument("--json")
    parser.add_argument(
        "--arms",
        help="comma-separated arms to run (default: all), e.g. 'default mixer' after a change to the default alone, "
        "or 'best static' for the room a static mix leaves on a random draw",
    )
    parser.add_argument(
        "--update-json",
        help="replace the run arms in this earlier --json result (same settings and seeds; the other arms are kept "
        "as they were: their code did not change) and write it back",
    )
    parser.add_argument(
        "--default-params",
        type=json.loads,
        default={},
        help="PiKE parameters (JSON) for the 'default' arms: a candidate screened in the default's place",
    )
    parser.add_argument(
        "--probe-every",
        type=int,
        help="steps between the Mixer arms' gradient measurements (default: the Mixer's own choice); 1 measures "
        "every step, which shows how much of a gap is estimation noise",
    )
    args = parser.parse_args()
    if (args.default_params or args.probe_every) and args.update_json:
        parser.error(
            "--default-params or --probe-every with --update-json would file a candidate's numbers as the default's"
        )
    variants = {**VARIANTS, "default": dict(args.default_params)}
    only = None if not args.arms else {a.strip() for a in args.arms.split(",")}
    previous: dict[str, Any] | None = None
    if args.update_json:
        with open(args.update_json) as fh:
            previous = json.load(fh)
        if previous["seeds"] != args.seeds or previous["update_every"] != args.update_every:
            raise SystemExit(f"--update-json {args.update_json}: seeds/update_every differ from this run's")
    warnings.simplefilter("ignore")  # skipped updates at tiny batches are expected here; the table says what happened
    settings = random_settings(args.random, args.random_seed) if args.random else suite()
    if args.settings:
        wanted = set(args.settings.split(","))
        settings = [s for s in settings if s.name in wanted]
    seeds = range(args.seeds)
    every = args.update_every
    out: dict[str, Any] = {"seeds": args.seeds, "update_every": every, "settings": []}
    if args.default_params:
        out["default_params"] = args.default_params
    if args.probe_every:
        out["probe_every"] = args.probe_every
    columns = ["best static", "oracle"] + [f"{v} exact" for v in VARIANTS] + [f"{v} mixer" for v in VARIANTS]
    print(
        f"| setting | {' | '.join(columns)} | default mixer: steps to uniform's final (uniform's steps) "
        "| default mixer: realised final loss |"
    )
    print("|" + "---|" * (len(columns) + 3))
    for setting in settings:
        row = run_setting(
            setting,
            seeds,
            every,
            best=not args.no_best_static and (only is None or "best static" in only),
            only=only,
            variants=variants,
            probe_every=args.probe_every,
        )
        if previous is not None:
            earlier = next((r for r in previous["settings"] if r["name"] == setting.name), None)
            if earlier is None:
                raise SystemExit(f"--update-json: setting {setting.name!r} is not in {args.update_json}")
            row = {**earlier, "arms": {**earlier["arms"], **row["arms"]}}
        out["settings"].append(row)
        cells = [row["arms"]["best static"]["ratio"] if "best static" in row["arms"] else None]
        text = ["-" if cells[0] is None else f"{cells[0]:.2f}"]
        text += [
            f"{row['arms'][c]['ratio']:.2f} ± {row['arms'][c]['ci95']:.2f}" if c in row["arms"] else "-"
            for c in columns[1:]
        ]
        default_mixer = row["arms"].get("default mixer")
        if default_mixer is None:
            text += ["not run", "not run"]
        else:
            reach = default_mixer.get("steps_to_uniform_final")
            text.append(f"{'-' if reach is None else reach} ({setting.steps})")
            text.append(
                f"{default_mixer['realised_final_ratio']:.2f} ± {default_mixer['realised_final_ci95']:.2f}"
                if "realised_final_ratio" in default_mixer
                else "-"
            )
        print(f"| {setting.name} | {' | '.join(text)} |", flush=True)
    ratios = np.array([r["arms"]["default mixer"]["ratio"] for r in out["settings"] if "default mixer" in r["arms"]])
    if ratios.size:
        out["default_mixer_mean_ratio"] = float(ratios.mean())
        out["default_mixer_max_ratio"] = float(ratios.max())
        print(
            f"\ndefault through the Mixer: mean ratio {ratios.mean():.3f}, max {ratios.max():.3f} "
            f"(goal: mean <= 0.90, every setting <= 1.02)"
        )
    static = np.array([r["arms"]["best static"]["ratio"] for r in out["settings"] if "best static" in r["arms"]])
    if static.size:
        out["best_static_mean_ratio"] = float(static.mean())
        print(f"\nbest static mix in hindsight: mean ratio {static.mean():.3f} (the room a static mix leaves)")
    target = args.json or args.update_json
    if target:
        with open(target, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
