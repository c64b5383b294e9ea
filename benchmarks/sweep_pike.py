"""Sweep PiKE's constants on the multilingual benchmark corpus (how the defaults were chosen).

    python benchmarks/sweep_pike.py [--config configs/bench_multilingual.toml] [--seeds 0,1] [--steps 600]

Grid over zeta1 (step size on the normalised ||grad L_k||^2), zeta2 (variance penalty), T0 (update interval),
min_weight (floor) and the estimator (statistics from the update step only, or averaged over probe_every steps).
Every setting runs on the same prepared data and seeds as uniform; prints average and worst validation loss
relative to uniform (paired by seed), sorted, and writes benchmarks/results/pike_sweep.json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gradmix_kit.experiment.config import load_config
from gradmix_kit.experiment.runner import prepare_data, run_experiment

GRID: dict[str, list[float | None]] = {
    "zeta1": [0.1, 0.3, 1.0],
    "zeta2": [0.1, 1.0],
    "update_every": [20],
    "min_weight": [0.02],
    "probe_every": [None, 5],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bench_multilingual.toml")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--method", default="pike")
    parser.add_argument("--json", default="benchmarks/results/pike_sweep.json")
    for key in GRID:
        parser.add_argument(f"--{key.replace('_', '-')}", help=f"comma-separated values replacing the grid's {key}")
    args = parser.parse_args()
    grid = dict(GRID)
    for key in GRID:
        given = getattr(args, key)
        if given:
            grid[key] = [
                None if v == "none" else (int(v) if key in ("update_every", "probe_every") else float(v))
                for v in given.split(",")
            ]
    cfg = load_config(args.config)
    if args.steps:
        cfg["steps"] = args.steps
    seeds = [int(s) for s in args.seeds.split(",")]
    data = prepare_data(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="pike-sweep-"))

    def run(method: str, params: dict, mixing: dict, seed: int) -> dict:
        c = copy.deepcopy(cfg)
        c["seed"] = seed
        c["mixing"]["method"] = method
        c["mixing"]["params"] = params
        c["mixing"].update(mixing)
        c["eval"]["continuation_items"] = 0
        name = f"{method}-{abs(hash(json.dumps([params, mixing], sort_keys=True))) % 10**8}-s{seed}"
        return run_experiment(c, tmp / name, data=data, progress=False, write_plots=False)

    base = {s: run("uniform", {}, {}, s) for s in seeds}
    rows: list[dict[str, Any]] = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        setting = dict(zip(keys, values))
        params = {"zeta1": setting["zeta1"], "zeta2": setting["zeta2"], "min_weight": setting["min_weight"]}
        mixing = {"update_every": setting["update_every"], "probe_every": setting["probe_every"]}
        res = [run(args.method, params, mixing, s) for s in seeds]
        d_avg = [r["avg_val_loss"] / base[s]["avg_val_loss"] - 1 for r, s in zip(res, seeds)]
        d_worst = [r["worst_val_loss"] / base[s]["worst_val_loss"] - 1 for r, s in zip(res, seeds)]
        row: dict[str, Any] = {
            **setting,
            "d_avg_val_loss": float(np.mean(d_avg)),
            "d_worst_val_loss": float(np.mean(d_worst)),
            "min_final_weight": float(np.mean([min(r["final_weights"].values()) for r in res])),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.sort(key=lambda r: r["d_avg_val_loss"])
    print("\nbest settings (relative to uniform, mean over seeds; negative = better):")
    for r in rows[:8]:
        print(
            f"  zeta1={r['zeta1']:<4} zeta2={r['zeta2']:<4} T0={r['update_every']:<3} floor={r['min_weight']:<5} "
            f"probe_every={r['probe_every']}: avg {r['d_avg_val_loss']:+.2%}  worst {r['d_worst_val_loss']:+.2%}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(
            {
                "config": args.config,
                "seeds": seeds,
                "steps": cfg["steps"],
                "method": args.method,
                "uniform": {s: base[s]["avg_val_loss"] for s in seeds},
                "rows": rows,
            },
            fh,
            indent=2,
        )


if __name__ == "__main__":
    main()
