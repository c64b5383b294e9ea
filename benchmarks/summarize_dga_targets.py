"""One table for DGA on several targets (issue #14, item 4): the runs of ``benchmarks/dga_targets.sh``.

    python benchmarks/summarize_dga_targets.py [--runs runs] [--ks 16,64] [--targets medical,news,literature]

For each target and k, over the seeds: the target validation loss of uniform / importance / DGA / DoGE, its
relative change (paired by seed) against uniform and against importance sampling, the average validation loss over
the generic clusters against uniform, and how many clusters the target's documents fall into (clusters.json).
Reads every run folder under ``runs/bench_dga_<target>_k<k>*`` (a method run separately, e.g. ``..._doge``, is
picked up too). Writes ``benchmarks/results/dga_targets.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradmix_kit.analysis import compare_runs, expand_run_dirs

METHODS = ("uniform", "importance", "dga", "doge")


def _fmt(record: dict | None, pct: bool = False) -> str:
    if not record or record.get("mean") is None:
        return "-"
    mean, low, high = record["mean"], record.get("low"), record.get("high")
    half = None if low is None or high is None else (high - low) / 2
    if pct:
        return f"{100 * mean:+.2f}% ± {100 * half:.2f}%" if half is not None else f"{100 * mean:+.2f}%"
    return f"{mean:.4f} ± {half:.4f}" if half is not None else f"{mean:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--ks", default="16,64")
    parser.add_argument("--targets", default="medical,news,literature")
    parser.add_argument("--json", default="benchmarks/results/dga_targets.json")
    args = parser.parse_args()
    root = Path(args.runs)
    rows, out = [], {}
    for target in args.targets.split(","):
        for k in (int(v) for v in args.ks.split(",")):
            folders = sorted(root.glob(f"bench_dga_{target}_k{k}")) + sorted(root.glob(f"bench_dga_{target}_k{k}_*"))
            runs = [r for r in expand_run_dirs(folders) if r.name.split("-seed")[0] in METHODS]
            if not runs:
                continue
            vs_uniform = compare_runs(runs, baseline="uniform")
            vs_importance = compare_runs(runs, baseline="importance")
            clusters = json.loads((root / f"dga_{target}_k{k}" / "clusters.json").read_text())
            counts = clusters.get("target_counts") or []
            total = sum(counts) or 1
            spread = sum(1 for c in counts if c > 0)
            top = max(counts) / total if counts else float("nan")
            out[f"{target}_k{k}"] = {"vs_uniform": vs_uniform, "vs_importance": vs_importance,
                                     "target_clusters": spread, "top_cluster_share": top}
            for method in METHODS:
                entry = vs_uniform["methods"].get(method)
                if entry is None:
                    continue
                rel_u = entry.get("relative", {})
                rel_i = vs_importance["methods"].get(method, {}).get("relative", {})
                rows.append(
                    f"| {target} | {k} | {spread} ({100 * top:.0f}%) | {method} | {_fmt(entry.get('target_val_loss'))} | "
                    f"{_fmt(rel_u.get('target_val_loss'), True) if method != 'uniform' else '-'} | "
                    f"{_fmt(rel_i.get('target_val_loss'), True) if method != 'importance' else '-'} | "
                    f"{_fmt(rel_u.get('avg_val_loss'), True) if method != 'uniform' else '-'} |"
                )
    header = ("| target | k | clusters holding target docs (largest share) | method | target val loss | "
              "Δ target vs uniform | Δ target vs importance | Δ avg generic loss vs uniform |\n"
              "|---|---|---|---|---|---|---|---|")
    table = header + "\n" + "\n".join(rows)
    print(table)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    Path(args.json).with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
