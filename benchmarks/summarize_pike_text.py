"""PiKE's new default on text, paired by seed against uniform and the old default (issue #19, item 4).

    python benchmarks/summarize_pike_text.py --runs runs/pike_regime_v2 \
        --recorded benchmarks/results/pike_regime_comparison.json [--new pike] [--json PATH]

Reads the new default's run folders (``<runs>/<new>-seed<S>/``) and, for uniform and the old default, the per-seed
values recorded in ``--recorded`` (a ``gradmix compare`` JSON; the runs are deterministic per seed, and any uniform
runs found in ``--runs`` are checked against the record). Prints, paired by seed with 95% t intervals: the change of
the final average and worst-domain validation loss against uniform (in %), the step at which the new default's
average validation loss first reaches uniform's final value, and the realised share of training tokens per domain.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True)
    parser.add_argument("--recorded", required=True)
    parser.add_argument("--new", default="pike", help="label of the new default's runs in --runs")
    parser.add_argument("--old", default="pike", help="label of the old default in --recorded")
    parser.add_argument("--json")
    args = parser.parse_args()
    recorded = json.loads(Path(args.recorded).read_text())["methods"]
    seeds = recorded["uniform"]["seeds"]
    uniform = {
        s: (recorded["uniform"]["avg_val_loss"]["values"][i], recorded["uniform"]["worst_val_loss"]["values"][i])
        for i, s in enumerate(seeds)
    }
    old = {
        s: (recorded[args.old]["avg_val_loss"]["values"][i], recorded[args.old]["worst_val_loss"]["values"][i])
        for i, s in enumerate(recorded[args.old]["seeds"])
    }
    runs = Path(args.runs)
    new: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        folder = runs / f"{args.new}-seed{seed}"
        if (folder / "summary.json").exists():
            new[seed] = read_run(folder)
        check = runs / f"uniform-seed{seed}"
        if (check / "summary.json").exists():
            again = read_run(check)["avg"]
            same = "identical" if again == uniform[seed][0] else f"DIFFERS ({again} vs {uniform[seed][0]})"
            print(f"uniform seed {seed} re-run: {same} to the recorded value")
    paired = sorted(new)
    if not paired:
        raise SystemExit(f"no {args.new}-seed*/summary.json in {runs}")
    out: dict[str, Any] = {"seeds": paired, "runs": str(runs), "recorded": args.recorded}
    for label, values in (("new default", {s: (new[s]["avg"], new[s]["worst"]) for s in paired}), ("old default", old)):
        common = [s for s in paired if s in values]
        avg = [100 * (values[s][0] / uniform[s][0] - 1) for s in common]
        worst = [100 * (values[s][1] / uniform[s][1] - 1) for s in common]
        out[label] = {"avg_pct": avg, "worst_pct": worst}
        print(f"{label:12s} vs uniform ({len(common)} seeds): average {interval(avg)}, worst domain {interval(worst)}")
    common = [s for s in paired if s in old]
    avg = [100 * (new[s]["avg"] / old[s][0] - 1) for s in common]
    print(f"new vs old   ({len(common)} seeds): average {interval(avg)}")
    out["new_vs_old_avg_pct"] = avg
    reach = []
    for s in paired:
        target = uniform[s][0]
        hit = [step for step, value in new[s]["evals"] if value <= target]
        reach.append(hit[0] if hit else None)
    final_step = new[paired[0]]["evals"][-1][0]
    print(f"steps to uniform's final average loss (new default, per seed; {final_step} = the last evaluation): {reach}")
    shares = {k: float(np.mean([new[s]["shares"].get(k, 0.0) for s in paired])) for k in new[paired[0]]["shares"]}
    print(
        "realised token shares (new default, mean over seeds): " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items())
    )
    out["steps_to_uniform_final"] = reach
    out["realised_shares"] = shares
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
