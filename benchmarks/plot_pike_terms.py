"""Plot, per domain over training, the two terms PiKE compares and the weights it chose (issue #14, item 2).

    python benchmarks/plot_pike_terms.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/pike_terms.png

Reads each run's ``metrics.jsonl``: ``update_terms`` (written after every PiKE update: ``grad_sq_norm`` =
the ||grad L_k||^2 estimate the update used, ``variance_2b`` = sigma_k^2 / (2 b)) and ``weights`` (the sampled
mix). One row of three panels per run: the two terms per domain on a log scale, and the weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read(run: Path) -> tuple[list[str], dict[str, list], dict[str, list]]:
    terms: dict[str, list] = {"step": [], "grad_sq_norm": [], "variance_2b": []}
    weights: dict[str, list] = {"step": [], "weights": []}
    names: list[str] = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if isinstance(record.get("weights"), dict):
            names = list(record["weights"])
            weights["step"].append(record["step"])
            weights["weights"].append([record["weights"][n] for n in names])
        update = record.get("update_terms")
        if update and "grad_sq_norm" in update:
            terms["step"].append(record.get("update_step", record["step"]))
            for key in ("grad_sq_norm", "variance_2b"):
                value = update[key]
                terms[key].append([value.get(n) for n in names] if isinstance(value, dict) else value)
    return names, terms, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default="benchmarks/results/pike_terms.png")
    args = parser.parse_args()
    runs = [Path(r) for r in args.runs]
    fig, axes = plt.subplots(len(runs), 3, figsize=(15, 3.6 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs):
        names, terms, weights = read(run)
        for i, name in enumerate(names):
            color = f"C{i}"
            for ax, key, label in ((row[0], "grad_sq_norm", "||grad L_k||^2"), (row[1], "variance_2b", "sigma_k^2/2b")):
                values = [v[i] if v is not None and v[i] is not None else float("nan") for v in terms[key]]
                ax.plot(terms["step"], values, color=color, label=name)
                ax.set_yscale("log")
                ax.set_title(f"{run.name}: {label}")
            row[2].plot(weights["step"], [w[i] for w in weights["weights"]], color=color, label=name)
        row[2].set_title(f"{run.name}: sampled weights")
        for ax in row:
            ax.set_xlabel("step")
        row[2].legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
