"""PiKE's new default on text, paired by seed against uniform and the old default (issue #19, item 4).

    python benchmarks/summarize_pike_text.py --runs runs/pike_regime_v2,runs/pike_regime_v2_old [--json PATH]

Reads run folders ``<dir>/<label>-seed<S>/`` from the given comparison folders: the new default (``--new``, default
``pike``), the old default (``--old``, default ``pike_v1``: ``variant = "gradmix_v1"``) and ``uniform``, all made
on this machine (runs are deterministic per machine, not across CPUs: see BENCHMARKS.md). Prints, paired by seed
with 95% t intervals: the change of the final average and worst-domain validation loss against uniform (in %), the
first evaluation step at which each method's average validation loss reaches uniform's final value of the same seed,
and the realised share of training tokens per domain (from the runs' cumulative ``tokens``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats


def interval(values: list[float]) -> str:
    arr = np.asarray(values, dtype=float)
    if arr.size < 2:
        return f"{arr.mean():+.2f}%"
    half = scipy_stats.t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size)
    return f"{arr.mean():+.2f}% ± {half:.2f}%"


def read_run(folder: Path) -> dict[str, Any]:
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["step"], float(np.mean(list(r["val_loss"].values())))) for r in rows if r.get("val_loss")]
    tokens: dict[str, float] = {}
    for r in rows:
        for name, count in (r.get("tokens") or {}).items():
            tokens[name] = tokens.get(name, 0.0) + float(count or 0)
    total = sum(tokens.values()) or 1.0
    return {
        "avg": float(summary["avg_val_loss"]),
        "worst": float(summary["worst_val_loss"]),
        "evals": evals,
        "shares": {k: v / total for k, v in tokens.items()},
    }


def collect(folders: list[Path], label: str) -> dict[int, dict[str, Any]]:
    runs: dict[int, dict[str, Any]] = {}
    for folder in folders:
        for run in sorted(folder.glob(f"{label}-seed*")):
            if (run / "summary.json").exists():
                seed = int(run.name.rsplit("-seed", 1)[1])
                if seed in runs:
                    raise SystemExit(f"{label} seed {seed} appears twice: {run}")
                runs[seed] = read_run(run)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated comparison folders")
    parser.add_argument("--new", default="pike")
    parser.add_argument("--old", default="pike_v1")
    parser.add_argument("--json")
    args = parser.parse_args()
    folders = [Path(p) for p in args.runs.split(",")]
    uniform = collect(folders, "uniform")
    out: dict[str, Any] = {"runs": args.runs, "methods": {}}
    for label, name in ((args.new, "new default"), (args.old, "old default (gradmix_v1)")):
        runs = collect(folders, label)
        seeds = sorted(set(runs) & set(uniform))
        if not seeds:
            print(f"{name}: no runs paired with uniform")
            continue
        avg = [100 * (runs[s]["avg"] / uniform[s]["avg"] - 1) for s in seeds]
        worst = [100 * (runs[s]["worst"] / uniform[s]["worst"] - 1) for s in seeds]
        reach = []
        for s in seeds:
            hit = [step for step, value in runs[s]["evals"] if value <= uniform[s]["avg"]]
            reach.append(hit[0] if hit else None)
        shares = {k: float(np.mean([runs[s]["shares"].get(k, 0.0) for s in seeds])) for k in runs[seeds[0]]["shares"]}
        out["methods"][label] = {
            "seeds": seeds,
            "avg_pct": avg,
            "worst_pct": worst,
            "steps_to_uniform_final": reach,
            "realised_shares": shares,
        }
        print(f"{name} vs uniform, seeds {seeds}: average {interval(avg)}, worst domain {interval(worst)}")
        print(f"   steps to uniform's final average loss per seed (None = not reached): {reach}")
        print("   realised token shares: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
