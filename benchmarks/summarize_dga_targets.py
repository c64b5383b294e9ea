"""One table for DGA on several targets (issue #14, item 4): the runs of ``benchmarks/dga_targets.sh``.

    python benchmarks/summarize_dga_targets.py [--runs runs] [--ks 16,64] [--targets medical,news,literature]

For each target and k, over the seeds: the target validation loss of uniform / importance / DGA / DoGE, its
relative change (paired by seed) against uniform and against importance sampling, the average validation loss over
the generic clusters against uniform, and how many clusters the target's documents fall into (clusters.json).
Reads every finished run under ``runs/bench_dga_<target>_k<k>*`` (a method or seeds run separately, e.g.
``..._doge``, are picked up too; the same method and seed twice is an error).
Writes ``benchmarks/results/dga_targets.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradmix_kit.analysis import compare_runs, expand_run_dirs

METHODS = ("uniform", "importance", "dga", "doge")


def _finished_runs(folder: Path) -> list[Path]:
    """The finished runs of a comparison folder, also of one whose compare was cut off (no comparison.json)."""
    if (folder / "comparison.json").is_file():
        runs = expand_run_dirs([folder])
    else:
        runs = sorted(p for p in folder.iterdir() if p.is_dir() and "-seed" in p.name)
    unfinished = [r for r in runs if not (r / "summary.json").is_file()]
    if unfinished:
        print(f"skipping unfinished runs: {', '.join(str(r) for r in unfinished)}")
    return [r for r in runs if r not in unfinished]


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
            runs = [r for f in folders for r in _finished_runs(f) if r.name.split("-seed")[0] in METHODS]
            pairs = [r.name for r in runs]
            if len(pairs) != len(set(pairs)):
                raise SystemExit(f"{target} k={k}: the same method and seed in two folders: {sorted(pairs)}")
            if not runs:
                continue
            vs_uniform = compare_runs(runs, baseline="uniform")
            vs_importance = compare_runs(runs, baseline="importance")
            clusters = json.loads((root / f"dga_{target}_k{k}" / "clusters.json").read_text())
            counts = clusters.get("target_counts") or []
            total = sum(counts) or 1
            spread = sum(1 for c in counts if c > 0)
            top = max(counts) / total if counts else float("nan")
            out[f"{target}_k{k}"] = {
                "vs_uniform": vs_uniform,
                "vs_importance": vs_importance,
                "target_clusters": spread,
                "top_cluster_share": top,
            }
            for method in METHODS:
                entry = vs_uniform["methods"].get(method)
                if entry is None:
                    continue
                rel_u = entry.get("relative", {})
                rel_i = vs_importance["methods"].get(method, {}).get("relative", {})
                where = f"| {target} | {k} | {spread} ({100 * top:.0f}%) | {method} |"
                rows.append(
                    f"{where} {_fmt(entry.get('target_val_loss'))} | "
                    f"{_fmt(rel_u.get('target_val_loss'), True) if method != 'uniform' else '-'} | "
                    f"{_fmt(rel_i.get('target_val_loss'), True) if method != 'importance' else '-'} | "
                    f"{_fmt(rel_u.get('avg_val_loss'), True) if method != 'uniform' else '-'} |"
                )
    header = (
        "| target | k | clusters holding target docs (largest share) | method | target val loss | "
        "Δ target vs uniform | Δ target vs importance | Δ avg generic loss vs uniform |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    table = header + "\n" + "\n".join(rows)
    print(table)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    Path(args.json).with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
