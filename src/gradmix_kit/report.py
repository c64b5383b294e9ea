"""HTML + PNG reports from run folders: the decision first (which method to pick per headline metric, and whether
its difference to the baseline is beyond noise), then a method comparison with confidence intervals over seeds, the
runs' warnings and configuration, mixing weights over time, per-domain validation loss and train/validation gap.

The page is static (no JavaScript); images sit next to it and are referenced by relative paths, so the output folder
can be copied or archived as is. matplotlib is optional (``pip install 'gradmix[report]'``) and is imported only when
a report is written; figures are drawn with its object API on an Agg canvas, so the user's pyplot backend and global
state are never touched.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from gradmix.checkpoint import atomic_write, write_json_atomic
from gradmix_kit.analysis import (
    SUMMARY_METRICS,
    Run,
    Table,
    compare_runs,
    comparison_table,
    decide,
    eval_series,
    expand_run_dirs,
    load_run,
    metric_label,
    render_html,
    render_markdown,
    summary_lines,
    summary_value,
    target_name,
)

__all__ = ["MAX_DOMAIN_PANELS", "write_diagnosis_report", "write_report"]

# Beyond this many domains (e.g. DGA's fine clusters) the per-domain grids show only the average / worst panels.
MAX_DOMAIN_PANELS = 12


def _require_matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("gradmix reports need matplotlib; install it with: pip install 'gradmix[report]'") from exc
    return Figure, FigureCanvasAgg


def _new_figure(width: float, height: float) -> Any:
    figure_class, canvas_class = _require_matplotlib()
    figure = figure_class(figsize=(width, height), layout="constrained")
    canvas_class(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    figure.savefig(path, dpi=100)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "run"


def _group_by_method(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    for members in groups.values():
        members.sort(key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0))
    return groups


def _union_domains(runs: Iterable[Run]) -> list[str]:
    names: list[str] = []
    for run in runs:
        names.extend(d for d in run.domains if d not in names)
    return names


def _method_colors(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: palette(i % palette.N) for i, m in enumerate(methods)}


def _grid(count: int, columns: int = 3) -> tuple[int, int]:
    columns = min(columns, count)
    return math.ceil(count / columns), columns


# -- series across seeds ---------------------------------------------------------------------------------------


def _mean_over_seeds(
    series: list[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, mean, min, max) over the steps every seed evaluated; None if no step is shared."""
    series = [(s, v) for s, v in series if s.size]
    if not series:
        return None
    common = series[0][0]
    for steps, _ in series[1:]:
        common = np.intersect1d(common, steps)
    if common.size == 0:
        return None
    stacked = np.stack([v[np.searchsorted(s, common)] for s, v in series])
    return common, stacked.mean(axis=0), stacked.min(axis=0), stacked.max(axis=0)


def _train_val_gap(run: Run, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """Validation minus training loss at each evaluation. The training loss is the mean of the per-step losses
    logged since the previous evaluation: one step's loss on a few examples is too noisy to compare."""
    val_steps, val_values = eval_series(run, f"val_loss/{domain}")
    train_points = []
    for record in run.metrics:
        value: Any = (record.get("train_loss") or {}).get(domain)
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            train_points.append((int(record["step"]), number))
    if not train_points or not val_steps.size:
        return np.array([], dtype=np.int64), np.array([])
    train_steps = np.array([p[0] for p in train_points])
    train_values = np.array([p[1] for p in train_points])
    steps, gaps = [], []
    previous = -math.inf
    for step, val in zip(val_steps, val_values):
        window = (train_steps > previous) & (train_steps <= step)
        previous = step
        if window.any():
            steps.append(int(step))
            gaps.append(val - float(train_values[window].mean()))
    return np.array(steps, dtype=np.int64), np.array(gaps)


def _average_gap(run: Run, domains: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    per_domain = [_train_val_gap(run, d) for d in domains if d in run.domains]
    merged = _mean_over_seeds(per_domain)  # same alignment logic: steps where every domain has a gap
    if merged is None:
        return np.array([], dtype=np.int64), np.array([])
    return merged[0], merged[1]


# -- figures ---------------------------------------------------------------------------------------------------

_ALERT_COLORS = {"collapse": "crimson", "starved": "darkorange", "overfitting": "purple", "repetition": "teal"}


def _alerts(run: Run) -> list[dict[str, Any]]:
    """Every alert the run's records hold, in step order (a step logged twice keeps its latest record)."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for record in run.metrics:
        entries = record.get("alerts")
        if isinstance(entries, list) and entries:
            by_step[int(record.get("step", 0))] = [a for a in entries if isinstance(a, dict)]
    return [a for step in sorted(by_step) for a in by_step[step]]


def _record_series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a top-level numeric record field (a KPI such as ``weight_entropy``)."""
    by_step: dict[int, float] = {}
    for record in run.metrics:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[int(record["step"])] = float(value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


KPI_PANELS = [
    ("weight_entropy", "entropy of the mix (nats)"),
    ("effective_domains", "effective domains (exp entropy)"),
    ("max_weight", "largest weight"),
    ("probe_seconds", "time in the probe (s per record)"),
    ("update_seconds", "time in updates (s per record)"),
]


def _eval_metric_names(runs: Sequence[Run]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for record in run.metrics:
            for name in record.get("eval_metrics") or {}:
                if name not in names:
                    names.append(name)
    return names


def _plot_weights(run: Run, path: Path) -> Path | None:
    records = [r for r in run.metrics if isinstance(r.get("weights"), dict) and r["weights"]]
    if not records:
        return None
    domains = [d for d in run.domains if any(d in r["weights"] for r in records)]
    steps = np.array([int(r["step"]) for r in records])
    matrix = np.array([[float(r["weights"].get(d) or 0.0) for r in records] for d in domains])
    figure = _new_figure(8, 4.5)
    axes = figure.add_subplot()
    axes.stackplot(steps, matrix, labels=domains, step="post" if run.method in ("round_robin", "random") else None)
    axes.set_xlim(steps.min(), max(steps.max(), steps.min() + 1))
    axes.set_ylim(0, 1)
    axes.set_xlabel("step")
    axes.set_ylabel("sampling weight")
    seed = "" if run.seed is None else f", seed {run.seed}"
    axes.set_title(f"Mixing weights: {run.method}{seed}")
    # alerts: a dashed line at the step, labelled with the kind (and domain) at the top
    by_step: dict[int, list[dict[str, Any]]] = {}
    for alert in _alerts(run):
        if isinstance(alert.get("step"), (int, float)):
            by_step.setdefault(int(alert["step"]), []).append(alert)
    for step, alerts in list(by_step.items())[:30]:  # one line per step, its alerts in one label
        color = _ALERT_COLORS.get(str(alerts[0].get("kind")), "black")
        axes.axvline(step, color=color, linestyle="--", linewidth=1.0, alpha=0.8)
        kinds: dict[str, list[str]] = {}
        for alert in alerts:
            kinds.setdefault(str(alert.get("kind")), []).append(str(alert.get("domain") or ""))
        label = "; ".join(f"{kind}: {', '.join(d for d in ds if d)}".rstrip(": ") for kind, ds in kinds.items())
        axes.text(
            step,
            0.98,
            label,
            rotation=90,
            va="top",
            ha="right",
            fontsize="x-small",
            color=color,
            bbox={"facecolor": "white", "alpha": 0.6, "linewidth": 0, "pad": 1},
        )
    if len(domains) <= 20:
        axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    return _save(figure, path)


def _plot_metric_grid(
    groups: dict[str, list[Run]],
    panels: list[tuple[str, Any]],
    colors: dict[str, Any],
    ylabel: str,
    suptitle: str,
    path: Path,
    *,
    zero_line: bool = False,
) -> Path | None:
    """One panel per (title, series_fn(run) -> (steps, values)); one line per method, mean over seeds with the
    min-max band across seeds."""
    drawn = []
    for title, series_fn in panels:
        lines = {}
        for method, runs in groups.items():
            merged = _mean_over_seeds([series_fn(r) for r in runs])
            if merged is not None:
                lines[method] = merged
        if lines:
            drawn.append((title, lines))
    if not drawn:
        return None
    rows, columns = _grid(len(drawn))
    figure = _new_figure(4.2 * columns + 1.5, 3.2 * rows)
    for index, (title, lines) in enumerate(drawn):
        axes = figure.add_subplot(rows, columns, index + 1)
        for method, (steps, mean, low, high) in lines.items():
            axes.plot(steps, mean, color=colors[method], label=method, marker="." if steps.size < 30 else None)
            if not np.allclose(low, high):
                axes.fill_between(steps, low, high, color=colors[method], alpha=0.15, linewidth=0)
        if zero_line:
            axes.axhline(0.0, color="gray", linewidth=0.8)
        axes.set_title(title, fontsize="medium")
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize="small")
    figure.suptitle(suptitle)
    return _save(figure, path)


def _has_deltas(result: dict[str, Any]) -> bool:
    """True when some method other than the baseline has a paired difference to plot."""
    baseline = result.get("baseline")
    return bool(baseline) and any(
        (rec or {}).get("mean") is not None
        for method, entry in result["methods"].items()
        if method != baseline
        for rec in (entry.get("relative") or {}).values()
    )


def _plot_comparison(result: dict[str, Any], colors: dict[str, Any], path: Path) -> Path | None:
    """Paired differences to the baseline with their intervals (a line at 0: the baseline) when there is a
    baseline and another method; else the values themselves as bars from 0."""
    if _has_deltas(result):
        return _plot_deltas(result, colors, path)
    return _plot_values(result, colors, path)


def _plot_deltas(result: dict[str, Any], colors: dict[str, Any], path: Path) -> Path | None:
    """One panel per metric: each method's relative difference to the baseline in %, paired by seed (point: mean,
    whiskers: confidence interval, dots: seeds), and a line at 0. Nothing is zoomed away: 0 is always in view, so
    a 1% difference looks like 1%."""
    baseline = result["baseline"]
    methods = [m for m in result["methods"] if m != baseline]

    def record(method: str, key: str) -> dict[str, Any]:
        return (result["methods"][method].get("relative") or {}).get(key) or {}

    keys = [k for k in result["metrics"] if any(record(m, k).get("mean") is not None for m in methods)]
    if not keys:
        return None
    figure = _new_figure(max(4.0, 1.5 + 0.9 * len(methods)) * len(keys), 4.4)
    for index, key in enumerate(keys):
        axes = figure.add_subplot(1, len(keys), index + 1)
        extremes = [0.0]
        for position, method in enumerate(methods):
            rec = record(method, key)
            if rec.get("mean") is None:
                continue
            mean = 100.0 * rec["mean"]
            error = None
            if rec.get("low") is not None and rec.get("high") is not None:
                low, high = 100.0 * rec["low"], 100.0 * rec["high"]
                error = [[mean - low], [high - mean]]
                extremes += [low, high]
            axes.errorbar(
                [position], [mean], yerr=error, fmt="o", color=colors[method], capsize=6, markersize=7, linewidth=2
            )
            seeds = [100.0 * v for v in rec.get("values") or [] if v is not None]
            axes.scatter([position + 0.12] * len(seeds), seeds, color="black", s=9, zorder=3)
            axes.annotate(
                f"{mean:+.2f}%",
                (position, mean),
                xytext=(-9, 0),
                textcoords="offset points",
                fontsize="small",
                va="center",
                ha="right",
            )
            extremes += [*seeds, mean]
        axes.axhline(0.0, color="black", linewidth=1.0)
        low, high = min(extremes), max(extremes)
        margin = 0.12 * (high - low) if high > low else 1.0
        axes.set_ylim(low - margin, high + margin)
        axes.set_xlim(-0.6, len(methods) - 0.4)
        axes.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        label, lower_better = metric_label(key, result)
        axes.set_ylabel(f"Δ vs {baseline} (%)")
        axes.set_title(
            f"{label}\n({'below' if lower_better else 'above'} 0: better than {baseline})", fontsize="medium"
        )
        axes.grid(axis="y", alpha=0.3)
    confidence = round(float(result.get("confidence", 0.95)) * 100)
    figure.suptitle(
        f"Relative difference to {baseline}, paired by seed: mean and {confidence}% CI over seeds (dots: seeds); "
        f"an interval across 0 is no difference beyond noise"
    )
    return _save(figure, path)


def _plot_values(result: dict[str, Any], colors: dict[str, Any], path: Path) -> Path | None:
    """Final values per method as bars from 0 (mean, whiskers: confidence interval, dots: seeds)."""
    keys = [
        k
        for k in result["metrics"]
        if any((e.get(k) or {}).get("mean") is not None for e in result["methods"].values())
    ]
    if not keys:
        return None
    methods = list(result["methods"])
    figure = _new_figure(max(4.0, 1.0 + 0.9 * len(methods)) * len(keys), 4.2)
    for index, key in enumerate(keys):
        axes = figure.add_subplot(1, len(keys), index + 1)
        extremes = [0.0]
        for position, method in enumerate(methods):
            record = result["methods"][method].get(key) or {}
            if record.get("mean") is None:
                continue
            mean = record["mean"]
            error = None
            if record.get("low") is not None:
                error = [[mean - record["low"]], [record["high"] - mean]]
                extremes += [record["low"], record["high"]]
            axes.bar(position, mean, color=colors[method], yerr=error, capsize=5, alpha=0.85)
            seeds = [v for v in record["values"] if v is not None]
            axes.scatter([position] * len(seeds), seeds, color="black", s=10, zorder=3)
            extremes += [*seeds, mean]
        low, high = min(extremes), max(extremes)  # 0 included: bars start at 0
        axes.set_ylim(low - 0.05 * (high - low) if low < 0 else 0.0, high + 0.08 * (high - low or 1.0))
        axes.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        label, lower_better = metric_label(key, result)
        axes.set_title(f"{label} ({'lower' if lower_better else 'higher'} is better)", fontsize="medium")
        axes.grid(axis="y", alpha=0.3)
    confidence = round(float(result.get("confidence", 0.95)) * 100)
    figure.suptitle(f"Final metrics per method: mean and {confidence}% CI over seeds (dots: seeds; bars from 0)")
    return _save(figure, path)


# -- HTML ------------------------------------------------------------------------------------------------------


def _format_number(value: Any, digits: int = 4) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{number:.{digits}f}" if math.isfinite(number) else str(number)


def _runs_table(runs: Sequence[Run], out_dir: Path) -> str:
    columns: list[tuple[str, Any]] = [
        (
            "run",
            lambda r: _relative(r.path, out_dir) + (" (no summary.json: from metrics)" if r.summary_derived else ""),
        ),
        ("method", lambda r: r.method),
        ("seed", lambda r: "" if r.seed is None else str(r.seed)),
        ("steps", lambda r: str(r.summary.get("steps", r.metrics[-1]["step"] if r.metrics else ""))),
    ]
    own_names = dict.fromkeys(n for r in runs for n in (r.summary.get("eval_metrics") or {}))
    own = [f"eval_metrics/{name}" for name in own_names]
    for key in [*SUMMARY_METRICS, *own]:
        if any(summary_value(r.summary, key) is not None for r in runs):
            label = metric_label(key, {"target": target_name(runs)})[0]
            columns.append((label, lambda r, key=key: _format_number(summary_value(r.summary, key))))
    if any(r.summary.get("alerts") is not None for r in runs):
        columns.append(("alerts", lambda r: "" if r.summary.get("alerts") is None else str(r.summary["alerts"])))
    if any(r.summary.get("wall_time_s") is not None for r in runs):
        columns.append(("wall time (s)", lambda r: _format_number(r.summary.get("wall_time_s"), 1)))
    if any(r.summary.get("step_time_s") is not None for r in runs):
        columns.append(("step time (s)", lambda r: _format_number(r.summary.get("step_time_s"), 3)))
    if any(_max_repeats(r) is not None for r in runs):
        columns.append(("max passes over a domain", lambda r: "" if _max_repeats(r) is None else str(_max_repeats(r))))
    return render_html(
        Table(header=[name for name, _ in columns], rows=[[str(fn(r)) for _, fn in columns] for r in runs])
    )


def _max_repeats(run: Run) -> int | None:
    for record in reversed(run.metrics):
        repeats = record.get("repeats")
        if isinstance(repeats, dict) and repeats:
            values = [v for v in repeats.values() if isinstance(v, (int, float))]
            return int(max(values)) if values else None
    return None


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #666; font-size: 0.9em; }
"""


def _figure_html(path: Path | None, out_dir: Path, caption: str) -> str:
    if path is None:
        return ""
    source = html.escape(path.relative_to(out_dir).as_posix(), quote=True)
    return (
        f'<figure><img src="{source}" alt="{html.escape(caption, quote=True)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    title: str | None = None,
    *,
    baseline: str | None = "uniform",
    confidence: float = 0.95,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write ``report.html`` with its PNG plots, ``comparison.md`` and ``comparison_stats.json`` into ``out_dir``.

    ``run_dirs`` are run folders or comparison folders (holding comparison.json; expanded into their runs).
    ``labels``: one name per entry of ``run_dirs``, to tell apart runs of the same method and seed (two versions
    of one run): a run folder's runs are grouped under the name, a comparison folder's under ``name:method``.

    Both the page and ``comparison.md`` open with the decision (``analysis.summary_lines``: per headline metric
    the best method, its paired difference to the baseline with the interval, whether it is beyond noise, and a
    recommendation), then the comparison table, the warnings and alerts the runs recorded, and the runs'
    configuration. Plots: the paired differences to the baseline with their intervals (a line at 0; without a
    baseline, the values as bars from 0), validation loss over steps (average, worst, the target and per domain)
    and the train/validation gap per domain (mean over seeds per method; a note says why a gap can be negative),
    and the mixing weights as stacked areas for each method's lowest seed. Parts whose data the runs do not log
    are left out. Returns the HTML path.
    """
    _require_matplotlib()
    runs = _load_labelled(run_dirs, labels)
    if not runs:
        raise ValueError("write_report: no run folders given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = _group_by_method(runs)
    colors = _method_colors(list(groups))
    domains = _union_domains(runs)
    show_domains = len(domains) <= MAX_DOMAIN_PANELS

    result = compare_runs(runs, baseline=baseline, confidence=confidence)
    table = comparison_table(result)
    decisions = decide(result)
    summary = summary_lines(result, decisions)
    warnings_found = _run_warnings(runs, out)
    configuration = _configuration_rows(runs, groups, out)
    gap_note = _negative_gap_note(runs, domains)
    markdown = _markdown_document(summary, table, warnings_found, configuration, gap_note)
    atomic_write(out / "comparison.md", lambda fh: fh.write(markdown), mode="w")
    write_json_atomic(out / "comparison_stats.json", {**result, "decision": decisions})

    figures: list[tuple[Path | None, str]] = []
    confidence_pct = round(confidence * 100)
    figures.append(
        (
            _plot_comparison(result, colors, out / "comparison.png"),
            (
                f"Relative difference of each method to {result['baseline']}, paired by seed, in % (point: mean, "
                f"whiskers: {confidence_pct}% confidence interval, dots: seeds; the line at 0 is "
                f"{result['baseline']}: an interval across it is no difference beyond noise)"
            )
            if _has_deltas(result)
            else f"Final metrics per method (bars from 0: mean, whiskers: {confidence_pct}% confidence interval, "
            "dots: seeds)",
        )
    )
    loss_panels: list[tuple[str, Any]] = [
        ("average over domains", lambda r: eval_series(r, "avg_val_loss")),
        ("worst domain", lambda r: eval_series(r, "worst_val_loss")),
    ]
    if any(eval_series(r, "target_val_loss")[0].size for r in runs):
        target_title = f"target: {result['target']}" if result.get("target") else "target"
        loss_panels.append((target_title, lambda r: eval_series(r, "target_val_loss")))
    if show_domains:
        loss_panels += [(d, lambda r, d=d: eval_series(r, f"val_loss/{d}")) for d in domains]
    figures.append(
        (
            _plot_metric_grid(
                groups,
                loss_panels,
                colors,
                "validation loss",
                "Validation loss (mean over seeds, band: min-max)",
                out / "val_loss.png",
            ),
            "Validation loss over training steps",
        )
    )
    gap_panels: list[tuple[str, Any]] = [("average over domains", lambda r: _average_gap(r, domains))]
    if show_domains:
        gap_panels += [(d, lambda r, d=d: _train_val_gap(r, d)) for d in domains]
    figures.append(
        (
            _plot_metric_grid(
                groups,
                gap_panels,
                colors,
                "val − train loss",
                "Generalisation gap: validation minus recent training loss",
                out / "train_val_gap.png",
                zero_line=True,
            ),
            "Train/validation gap per domain (training loss averaged since the previous evaluation)"
            + (f". {gap_note}" if gap_note else ""),
        )
    )
    metric_names = _eval_metric_names(runs)
    if metric_names:
        metric_panels = [(name, lambda r, name=name: eval_series(r, f"eval_metrics/{name}")) for name in metric_names]
        figures.append(
            (
                _plot_metric_grid(
                    groups,
                    metric_panels,
                    colors,
                    "value",
                    "Your own evaluation metrics (eval.metrics; mean over seeds, band: min-max)",
                    out / "eval_metrics.png",
                ),
                "Your own metrics at each evaluation",
            )
        )
    kpi_panels = [
        (label, lambda r, key=key: _record_series(r, key))
        for key, label in KPI_PANELS
        if any(_record_series(r, key)[0].size for r in runs)
    ]
    if kpi_panels:
        figures.append(
            (
                _plot_metric_grid(
                    groups,
                    kpi_panels,
                    colors,
                    "value",
                    "Mixing KPIs (mean over seeds, band: min-max)",
                    out / "kpis.png",
                ),
                "KPIs of the mix and cost of the probe and updates over steps",
            )
        )
    for index, (method, members) in enumerate(groups.items()):
        representative = members[0]
        seed = "" if representative.seed is None else f" (seed {representative.seed})"
        figures.append(
            (
                _plot_weights(representative, out / f"weights_{index:02d}_{_slug(method)}.png"),
                f"Mixing weights over steps: {method}{seed} (dashed lines: alerts)",
            )
        )

    page_title = title or f"gradmix report: {', '.join(groups)}"
    notes = []
    if not show_domains:
        notes.append(f"{len(domains)} domains: per-domain panels are left out (more than {MAX_DOMAIN_PANELS}).")
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<h1>{html.escape(page_title)}</h1>",
        f'<p class="note">{len(runs)} run(s), {len(groups)} method(s): {html.escape(", ".join(groups))}. '
        f"Generated {generated}.</p>",
        _summary_html(summary),
        "<h2>Comparison</h2>",
        render_html(table),
        "<h2>Runs</h2>",
        _runs_table(runs, out),
        "<h2>Warnings and alerts</h2>",
        _warnings_html(warnings_found),
        _alerts_html(runs, out),
        "<h2>Run configuration</h2>",
        render_html(Table(header=["setting", "value"], rows=configuration)),
        "<h2>Plots</h2>",
        *[f'<p class="note">{html.escape(n)}</p>' for n in notes],
        *[_figure_html(path, out, caption) for path, caption in figures if path is not None],
        *_diagnosis_sections(runs, out),
    ]
    document = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(page_title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    report_path = out / "report.html"
    atomic_write(report_path, lambda fh: fh.write(document), mode="w")
    return report_path


# -- labels, summary, configuration, warnings -------------------------------------------------------------------


def _load_labelled(run_dirs: Sequence[str | Path], labels: Sequence[str] | None) -> list[Run]:
    """The runs of ``run_dirs``; with ``labels`` (one per entry) each run is grouped under its entry's name (a
    comparison folder's runs under ``name:method``)."""
    if labels is None:
        return [load_run(p) for p in expand_run_dirs(run_dirs)]
    labels = [str(label).strip() for label in labels]
    if len(labels) != len(run_dirs):
        raise ValueError(
            f"--label: {len(labels)} name(s) for {len(run_dirs)} folder(s); give one name per run or comparison "
            "folder, in the same order (e.g. --label old,new)"
        )
    if not all(labels):
        raise ValueError("--label: a name is empty; give one non-empty name per folder (e.g. --label old,new)")
    runs = []
    for entry, label in zip(run_dirs, labels):
        paths = expand_run_dirs([entry])
        comparison = paths != [Path(entry)]
        for path in paths:
            run = load_run(path)
            run.label = f"{label}:{run.method}" if comparison else label
            runs.append(run)
    return runs


def _summary_html(lines: Sequence[str]) -> str:
    """The Markdown summary lines as HTML: headings, bullets, paragraphs and **bold**."""

    def inline(text: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))

    parts: list[str] = []
    bullets: list[str] = []
    for line in [*lines, ""]:
        if line.startswith("- "):
            bullets.append(f"<li>{inline(line[2:])}</li>")
            continue
        if bullets:
            parts.append("<ul>" + "".join(bullets) + "</ul>")
            bullets = []
        if line.startswith("## "):
            parts.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.strip():
            parts.append(f"<p>{inline(line)}</p>")
    return "\n".join(parts)


def _negative_gap_note(runs: Sequence[Run], domains: Sequence[str]) -> str:
    """Why validation can come out below training loss here, when it does in any plotted gap; else ""."""
    negative: list[str] = []
    for run in runs:
        gaps = [_train_val_gap(run, d)[1] for d in domains if d in run.domains]
        if any(values.size and float(values.min()) < 0.0 for values in gaps) and run.method not in negative:
            negative.append(run.method)
    if not negative:
        return ""
    dropouts = sorted(
        {float(model["dropout"]) for r in runs if "dropout" in (model := dict(r.config.get("model") or {}))}
    )
    every = sorted({str((r.config.get("train") or {}).get("eval_every")) for r in runs} - {"None"})
    if any(dropouts):
        dropout = (
            f" Training runs with dropout {'/'.join(f'{d:g}' for d in dropouts)} (train mode), validation without "
            "it (eval mode), which also raises the training loss."
        )
    elif dropouts:
        dropout = " Dropout is 0 in these runs, so train and eval mode compute the same loss: dropout is not the cause."
    else:
        dropout = ""
    return (
        f"Some gaps are negative (validation loss below training loss; runs of {', '.join(negative)}). How the two "
        "are measured allows it: the training loss of a domain is the mean of its per-step losses since the previous "
        "evaluation, each from that step's forward pass before its update, so it describes the model over the last "
        f"{'/'.join(every) or 'few'} steps, while the validation loss is measured after the last of them, by the "
        "newer model; while the loss still falls, this lag puts training above validation. The validation loss is "
        "computed in eval mode, without gradients, on a fixed set of held-out documents of each domain (up to "
        "train.eval_windows_per_domain windows), which can be easier or harder than the training documents; the "
        f"training loss comes from the few examples of that domain in each mixed batch.{dropout}"
    )


def _distinct(values: Iterable[Any]) -> str:
    """One value, or the distinct values joined and marked when the runs differ ("" when none is known)."""
    texts: list[str] = []
    for value in values:
        if value is None or value == "":
            continue
        text = str(value)
        if text not in texts:
            texts.append(text)
    if len(texts) > 1:
        return " | ".join(texts) + " (differs between runs)"
    return texts[0] if texts else ""


def _corpus_record(run: Run) -> dict[str, Any] | None:
    record = (run.config.get("data_info") or {}).get("corpus_record")
    if isinstance(record, dict):
        return record
    for folder in (run.path, run.path.parent):
        path = folder / "corpus_record.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None
    return None


def _record_text(record: dict[str, Any] | None) -> tuple[str, str]:
    """(the corpus record in one line: fingerprint and documents per domain, the software in one line)."""
    if not record:
        return "", ""
    domains = record.get("domains") or {}
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "domains": {d: [v.get("train_sha256"), v.get("val_sha256")] for d, v in domains.items()},
                "target": (record.get("target") or {}).get("sha256"),
            },
            sort_keys=True,
        ).encode("utf-8")
    ).hexdigest()[:12]
    parts = []
    for name, value in domains.items():
        source = f", {value['source']}" if value.get("source") else ""
        parts.append(f"{name} {value.get('train_docs')}/{value.get('val_docs')}{source}")
    target = record.get("target")
    corpus = f"{record.get('corpus')}, fingerprint {fingerprint} (SHA-256 of the documents); train/val documents: "
    corpus += "; ".join(parts)
    if isinstance(target, dict):
        corpus += f"; target {target.get('name')}: {target.get('docs')} documents"
    software = record.get("software") or {}
    software_text = ", ".join(f"{k} {v}" for k, v in software.items() if v is not None)
    return corpus, software_text


def _configuration_rows(runs: Sequence[Run], groups: dict[str, list[Run]], out_dir: Path) -> list[list[str]]:
    """What the runs were: steps, batch, model and its size, threads, corpus (and its record), methods, seeds."""

    def section(run: Run, name: str) -> dict[str, Any]:
        value = run.config.get(name)
        return value if isinstance(value, dict) else {}

    methods = []
    for name, members in groups.items():
        config = members[0].config
        method = str(config.get("method") or members[0].summary.get("method") or name)
        params = config.get("method_params") or {}
        detail = ", ".join(f"{k}={v}" for k, v in params.items())
        inner = method if method != name else ""
        inner = f"{inner}{', ' if inner and detail else ''}{detail}"
        seeds = ", ".join("?" if r.seed is None else str(r.seed) for r in members)
        methods.append(f"{name}{f' ({inner})' if inner else ''}: seeds {seeds}")

    def model_text(run: Run) -> str:
        model = section(run, "model")
        return ", ".join(f"{k}={v}" for k, v in model.items()) if model else ""

    def parameters_text(run: Run) -> str:
        count = run.config.get("model_parameters")
        return f"{int(count):,} ({int(count) / 1e6:.2f}M)" if isinstance(count, (int, float)) else ""

    def steps_text(run: Run) -> str:
        planned = run.config.get("steps", run.summary.get("steps"))
        done = run.summary.get("steps_done")
        if planned is not None and done is not None and int(done) != int(planned):
            return f"{planned} (this run stopped at {done})"
        return "" if planned is None else str(planned)

    def threads_text(run: Run) -> str:
        threads = run.config.get("threads")
        device = run.config.get("device")
        text = f"{threads} thread(s)" if threads else ("torch's default threads" if "threads" in run.config else "")
        if threads and run.config.get("threads_requested") == "auto":
            text += " (auto)"
        return f"{text}, device {device}" if device and text else text

    def data_text(run: Run) -> str:
        data = section(run, "data")
        keys = ("window", "vocab_size", "holdout_fraction", "max_docs_per_domain", "languages", "domains")
        return ", ".join(f"{k}={data[k]}" for k in keys if data.get(k) is not None)

    def train_text(run: Run) -> str:
        train = section(run, "train")
        keys = ("lr", "warmup_steps", "weight_decay", "grad_clip", "eval_every", "eval_windows_per_domain")
        return ", ".join(f"{k}={train[k]}" for k in keys if train.get(k) is not None)

    records = [_record_text(_corpus_record(r)) for r in runs]
    rows = [
        ["runs", f"{len(runs)} run(s), {len(groups)} method(s)"],
        ["methods (seeds)", "; ".join(methods)],
        ["steps", _distinct(steps_text(r) for r in runs)],
        [
            "batch size",
            _distinct(r.config.get("batch_size") or section(r, "train").get("batch_size") for r in runs),
        ],
        ["model", _distinct(model_text(r) for r in runs)],
        ["model parameters", _distinct(parameters_text(r) for r in runs)],
        ["threads", _distinct(threads_text(r) for r in runs)],
        ["corpus", _distinct(r.config.get("corpus") or section(r, "data").get("corpus") for r in runs)],
        ["target set (target val loss)", _distinct([target_name(runs)])],
        ["domains", _distinct(", ".join(r.domains) for r in runs)],
        ["data", _distinct(data_text(r) for r in runs)],
        ["training", _distinct(train_text(r) for r in runs)],
        ["corpus record", _distinct(text for text, _ in records)],
        ["software", _distinct(text for _, text in records)],
    ]
    return [row for row in rows if row[1]]


def _run_warnings(runs: Sequence[Run], out_dir: Path) -> list[list[str]]:
    """[where, step, kind, message]: what the runs warned about - the corpus check of a comparison, runs without
    a summary, runs stopped early, warnings recorded as ``events`` in metrics.jsonl - and a count of the alerts
    per run (listed one by one in the alerts table)."""
    rows: list[list[str]] = []
    seen_folders: list[Path] = []
    for folder in [out_dir, *(r.path.parent for r in runs)]:
        listing = folder / "comparison.json"
        if not listing.is_file() or any(listing.resolve() == p.resolve() for p in seen_folders):
            continue
        seen_folders.append(listing)
        try:
            data = json.loads(listing.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for message in (data.get("corpus_warnings") if isinstance(data, dict) else None) or []:
            rows.append([_relative(folder, out_dir), "", "corpus or software", str(message)])
    for run in runs:
        where = _relative(run.path, out_dir)
        if run.summary_derived:
            rows.append(
                [
                    where,
                    "",
                    "unfinished",
                    "no summary.json: the run did not finish (or is still going); its numbers are from the last "
                    "evaluation in metrics.jsonl",
                ]
            )
        if run.summary.get("stopped_early"):
            rows.append([where, "", "stopped early", str(run.summary["stopped_early"])])
        messages: dict[str, int] = {}
        for record in run.metrics:
            for event in record.get("events") or []:
                if str(event) not in messages:
                    messages[str(event)] = int(record.get("step", 0))
        rows += [[where, str(step), "warning", message] for message, step in messages.items()]
        alerts = _alerts(run)
        if alerts:
            kinds: dict[str, int] = {}
            for alert in alerts:
                kinds[str(alert.get("kind"))] = kinds.get(str(alert.get("kind")), 0) + 1
            counts = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
            rows.append([where, "", "alerts", f"{len(alerts)} alert(s): {counts} (see the alerts table)"])
    return rows


def _warnings_html(rows: list[list[str]]) -> str:
    if not rows:
        return '<p class="note">No warnings: no corpus or software difference, early stop or recorded warning.</p>'
    shown = rows[:200]
    note = f"{len(rows)} warning(s)" + (f"; the first {len(shown)} are listed" if len(rows) > len(shown) else "")
    return render_html(Table(header=["where", "step", "kind", "message"], rows=shown, note=note + "."))


def _markdown_document(
    summary: list[str],
    table: Table,
    warnings_found: list[list[str]],
    configuration: list[list[str]],
    gap_note: str,
) -> str:
    """``comparison.md``: the summary, the comparison table, warnings and alerts, the run configuration."""
    parts = ["\n".join(summary), "## Comparison\n\n" + render_markdown(table).rstrip("\n")]
    if warnings_found:
        shown = warnings_found[:50]
        lines = [
            f"- {where}{f' step {step}' if step else ''}: {kind}: {message}" for where, step, kind, message in shown
        ]
        if len(warnings_found) > len(shown):
            lines.append(f"- ... and {len(warnings_found) - len(shown)} more (report.html lists them)")
        parts.append("## Warnings and alerts\n\n" + "\n".join(lines))
    else:
        parts.append(
            "## Warnings and alerts\n\nNone: no corpus or software difference, early stop, recorded warning or "
            "alert (collapse, starved, overfitting, repetition)."
        )
    if gap_note:
        parts.append("## Train/validation gap\n\n" + gap_note)
    parts.append("## Run configuration\n\n" + render_markdown(Table(header=["setting", "value"], rows=configuration)))
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"


# -- alerts and diagnosis ---------------------------------------------------------------------------------------


def _alerts_html(runs: Sequence[Run], out_dir: Path) -> str:
    rows = []
    for run in runs:
        for alert in _alerts(run):
            rows.append(
                [
                    _relative(run.path, out_dir),
                    str(alert.get("step", "")),
                    str(alert.get("kind", "")),
                    str(alert.get("domain") or ""),
                    str(alert.get("message", "")),
                ]
            )
    if not rows:
        return '<p class="note">No alerts (collapse, starved, overfitting, repetition) were raised.</p>'
    shown = rows[:200]
    note = f"{len(rows)} alert(s)" + (f"; the first {len(shown)} are listed" if len(rows) > len(shown) else "") + "."
    return render_html(Table(header=["run", "step", "kind", "domain", "why"], rows=shown, note=note))


def _find_diagnoses(runs: Sequence[Run], out_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    seen: list[Path] = []
    for folder in [out_dir, *(r.path for r in runs), *(r.path.parent for r in runs)]:
        for candidate in (folder / "diagnosis.json", folder / "diagnosis" / "diagnosis.json"):
            if candidate.is_file() and candidate.resolve() not in [p.resolve() for p in seen]:
                seen.append(candidate)
    found = []
    for path in seen:
        try:
            found.append((path, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue
    return found


def _diagnosis_sections(runs: Sequence[Run], out_dir: Path) -> list[str]:
    sections = []
    for index, (path, diagnosis) in enumerate(_find_diagnoses(runs, out_dir)):
        heatmap = _plot_cosine_heatmap(diagnosis, out_dir / f"diagnosis_{index:02d}_heatmap.png")
        sections.append(f"<h2>Gradient conflict diagnosis ({html.escape(_relative(path, out_dir))})</h2>")
        sections.append(_diagnosis_summary_html(diagnosis))
        sections.append(_figure_html(heatmap, out_dir, "Mean cosine between the domains' gradients"))
    return sections


def _interval_text(diagnosis: dict[str, Any], key: str) -> str:
    bounds = diagnosis.get(key)
    if not bounds or len(bounds) != 2:
        return ""
    level = diagnosis.get("confidence")
    label = f"{level:.0%} interval" if isinstance(level, (int, float)) else "interval"
    return f" ({label} {_format_number(bounds[0], 3)} to {_format_number(bounds[1], 3)})"


def _diagnosis_summary_html(diagnosis: dict[str, Any]) -> str:
    rows = [
        ["verdict", str(diagnosis.get("verdict", ""))],
        [
            "c (max conflict: max over pairs and blocks of -cosine, floored at 0)",
            _format_number(diagnosis.get("c"), 3) + _interval_text(diagnosis, "c_interval"),
        ],
        [
            "c-bar (max positive cosine)",
            _format_number(diagnosis.get("c_bar"), 3) + _interval_text(diagnosis, "c_bar_interval"),
        ],
        ["share of pairs with cosine < 0", _format_number(diagnosis.get("conflict_fraction"), 3)],
        [
            f"share of pairs with cosine < -{diagnosis.get('threshold', 0.1)}",
            _format_number(diagnosis.get("conflict_fraction_threshold"), 3),
        ],
        ["beta at the uniform mix (PiKE's bound needs > 0)", _format_number(diagnosis.get("beta_uniform"), 3)],
        [
            "measurements (usable)",
            f"{diagnosis.get('num_measurements', '')} ({diagnosis.get('usable_measurements', '')})",
        ],
    ]
    table = render_html(Table(header=["quantity", "value"], rows=rows))
    pairs = diagnosis.get("conflicting_pairs") or []
    pair_rows = [[" / ".join(p.get("domains", [])), _format_number(p.get("cosine"), 3)] for p in pairs[:20]]
    pair_table = render_html(Table(header=["conflicting pair", "cosine"], rows=pair_rows)) if pair_rows else ""
    return (
        f"<p><strong>Recommendation.</strong> {html.escape(str(diagnosis.get('recommendation', '')))}</p>"
        + table
        + pair_table
    )


def _plot_cosine_heatmap(diagnosis: dict[str, Any], path: Path) -> Path | None:
    """Two panels: the cosine over the whole run, and each pair's worst block (lowest block cosine: what c is)."""
    names = diagnosis.get("domains") or []
    cosine = diagnosis.get("cosine")
    if not names or not cosine:
        return None
    panels = [("whole run", cosine)]
    if diagnosis.get("cosine_min_window"):
        window = diagnosis.get("window")
        panels.append((f"worst block (blocks of ~{window} steps)", diagnosis["cosine_min_window"]))
    size = max(4.0, 0.6 * len(names) + 2.5)
    figure = _new_figure(size * len(panels) + 1.0, size)
    image = None
    for index, (title, values) in enumerate(panels):
        matrix = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=np.float64)
        axes = figure.add_subplot(1, len(panels), index + 1)
        image = axes.imshow(np.ma.masked_invalid(matrix), cmap="RdBu", vmin=-1.0, vmax=1.0)
        axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axes.set_yticks(range(len(names)), names)
        if len(names) <= 16:
            for i in range(len(names)):
                for j in range(len(names)):
                    if np.isfinite(matrix[i, j]):
                        axes.text(
                            j,
                            i,
                            f"{matrix[i, j]:+.2f}",
                            ha="center",
                            va="center",
                            fontsize="small",
                            color="white" if abs(matrix[i, j]) > 0.6 else "black",
                        )
        axes.set_title(title, fontsize="medium")
    figure.colorbar(image, ax=figure.axes, label="cosine of the gradients")
    figure.suptitle(
        f"Gradient cosines between domains (c = {_format_number(diagnosis.get('c'), 2)}, "
        f"c-bar = {_format_number(diagnosis.get('c_bar'), 2)})"
    )
    return _save(figure, path)


def _plot_cosine_over_time(diagnosis: dict[str, Any], path: Path) -> Path | None:
    series = diagnosis.get("cosine_over_time") or {}
    steps = diagnosis.get("steps") or []
    if not series or not steps:
        return None
    figure = _new_figure(8, 4.2)
    axes = figure.add_subplot()
    for pair, values in list(series.items())[:20]:
        arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        axes.plot(steps[: arr.size], arr, label=pair.replace("|", " / "), marker="." if len(steps) < 40 else None)
    axes.axhline(0.0, color="gray", linewidth=0.8)
    threshold = diagnosis.get("threshold")
    if isinstance(threshold, (int, float)):
        axes.axhline(-float(threshold), color="crimson", linewidth=0.8, linestyle="--")
    for block in (diagnosis.get("blocks") or [])[:50]:
        first, last = block.get("steps") or [None, None]
        if first is None:
            continue
        for index, pair in enumerate(list(series)[:20]):
            value = (block.get("cosine") or {}).get(pair)
            lo, hi = (block.get("interval") or {}).get(pair) or [None, None]
            if value is None or lo is None:
                continue
            color = f"C{index % 10}"
            axes.plot([first, last], [value, value], color=color, linewidth=2.5, alpha=0.8)
            axes.fill_between([first, last], [lo, lo], [hi, hi], color=color, alpha=0.12, linewidth=0)
    axes.set_ylim(-1.05, 1.05)
    axes.set_xlabel("step")
    axes.set_ylabel("cosine")
    axes.set_title(
        "Gradient cosines: per step (thin, noisy) and per block with interval (thick, shaded); dashed: threshold",
        fontsize="medium",
    )
    axes.grid(alpha=0.3)
    if len(series) <= 20:
        axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    return _save(figure, path)


def write_diagnosis_report(diagnosis: dict[str, Any], out_dir: str | Path, title: str | None = None) -> Path:
    """``diagnosis.html`` with ``cosine_heatmap.png`` and ``cosine_over_time.png`` for a ``gradmix diagnose``
    result (the dict written to ``diagnosis.json``). Returns the HTML path."""
    _require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heatmap = _plot_cosine_heatmap(diagnosis, out / "cosine_heatmap.png")
    over_time = _plot_cosine_over_time(diagnosis, out / "cosine_over_time.png")
    page_title = title or "gradmix: gradient conflict diagnosis"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    domains = ", ".join(str(d) for d in diagnosis.get("domains") or [])
    body = [
        f"<h1>{html.escape(page_title)}</h1>",
        f'<p class="note">Domains: {html.escape(domains)}. Source: {html.escape(str(diagnosis.get("source", "")))}. '
        f"Generated {generated}.</p>",
        _diagnosis_summary_html(diagnosis),
        _figure_html(
            heatmap,
            out,
            "Cosine between the domains' gradients: over the whole run, and each pair's worst block (the basis of c)",
        ),
        _figure_html(
            over_time,
            out,
            "Per-step cosines (noisy: few examples per domain per step; +-1 means that step's noise exceeded its "
            "signal) and the block estimates c and c-bar are taken from",
        ),
        '<p class="note">c and c-bar are the constants of PiKE\'s low gradient conflict assumption '
        "(arXiv 2502.06244): every pairwise cosine lies in [-c, c-bar]. Estimated per block of steps as the ratio "
        "of the summed Gramian entries, with simultaneous t-intervals; the verdict is 'not enough evidence' while "
        "the interval of c straddles a threshold. See gradmix.diagnostics for the exact estimators.</p>",
    ]
    document = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(page_title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    path = out / "diagnosis.html"
    atomic_write(path, lambda fh: fh.write(document), mode="w")
    return path
