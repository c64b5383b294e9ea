"""HTML + PNG reports from run folders: mixing weights over time, per-domain validation loss, train/validation gap,
and a method comparison with confidence intervals over seeds.

The page is static (no JavaScript); images sit next to it and are referenced by relative paths, so the output folder
can be copied or archived as is. matplotlib is optional (``pip install 'gradmix[report]'``) and is imported only when
a report is written; figures are drawn with its object API on an Agg canvas, so the user's pyplot backend and global
state are never touched.
"""

from __future__ import annotations

import html
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
    eval_series,
    load_runs,
    metric_label,
    render_html,
    render_markdown,
    summary_value,
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


def _plot_comparison(result: dict[str, Any], colors: dict[str, Any], path: Path) -> Path | None:
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
        extremes = []
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
        baseline = result.get("baseline")
        base_record = (result["methods"].get(baseline, {}) if baseline else {}).get(key) or {}
        if base_record.get("mean") is not None:
            axes.axhline(base_record["mean"], color="gray", linestyle="--", linewidth=1)
        # Zoom on the values: differences between methods are often ~1% of the loss and invisible from zero.
        low, high = min(extremes), max(extremes)
        margin = 0.15 * (high - low) if high > low else 0.05 * max(abs(high), 1e-3)
        axes.set_ylim(low - margin, high + margin)
        axes.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        label, lower_better = metric_label(key, result)
        axes.set_title(f"{label} ({'lower' if lower_better else 'higher'} is better)", fontsize="medium")
        axes.grid(axis="y", alpha=0.3)
    confidence = round(float(result.get("confidence", 0.95)) * 100)
    figure.suptitle(f"Method comparison: mean and {confidence}% CI over seeds (dots: seeds)")
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
            columns.append((metric_label(key)[0], lambda r, key=key: _format_number(summary_value(r.summary, key))))
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
) -> Path:
    """Write ``report.html`` with its PNG plots, ``comparison.md`` and ``comparison_stats.json`` into ``out_dir``.

    ``run_dirs`` are run folders or comparison folders (holding comparison.json; expanded into their runs). Plots:
    a comparison bar chart with CIs over seeds, validation loss over steps (average, worst and per domain) and the
    train/validation gap per domain (mean over seeds per method), and the mixing weights as stacked areas for each
    method's lowest seed. Parts whose data the runs do not log are left out. Returns the HTML path.
    """
    _require_matplotlib()
    runs = load_runs(run_dirs)
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
    atomic_write(out / "comparison.md", lambda fh: fh.write(render_markdown(table)), mode="w")
    write_json_atomic(out / "comparison_stats.json", result)

    figures: list[tuple[Path | None, str]] = []
    figures.append(
        (
            _plot_comparison(result, colors, out / "comparison.png"),
            "Final metrics per method (bars: mean, whiskers: confidence interval, dots: seeds; dashed: baseline mean)",
        )
    )
    loss_panels: list[tuple[str, Any]] = [
        ("average over domains", lambda r: eval_series(r, "avg_val_loss")),
        ("worst domain", lambda r: eval_series(r, "worst_val_loss")),
    ]
    if any(eval_series(r, "target_val_loss")[0].size for r in runs):
        loss_panels.append(("target", lambda r: eval_series(r, "target_val_loss")))
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
            "Train/validation gap per domain (training loss averaged since the previous evaluation)",
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
        "<h2>Comparison</h2>",
        render_html(table),
        "<h2>Runs</h2>",
        _runs_table(runs, out),
        "<h2>Alerts</h2>",
        _alerts_html(runs, out),
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
    import json

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


def _diagnosis_summary_html(diagnosis: dict[str, Any]) -> str:
    rows = [
        ["verdict", str(diagnosis.get("verdict", ""))],
        ["c (max conflict: max over pairs of -cosine, floored at 0)", _format_number(diagnosis.get("c"), 3)],
        ["c-bar (max positive cosine)", _format_number(diagnosis.get("c_bar"), 3)],
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
    """Two panels: the mean cosine over the run, and each pair's worst stretch (lowest rolling mean: what c is)."""
    names = diagnosis.get("domains") or []
    cosine = diagnosis.get("cosine")
    if not names or not cosine:
        return None
    panels = [("mean over the run", cosine)]
    if diagnosis.get("cosine_min_window"):
        window = diagnosis.get("window")
        panels.append((f"worst stretch ({window}-step rolling mean)", diagnosis["cosine_min_window"]))
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
    axes.set_ylim(-1.05, 1.05)
    axes.set_xlabel("step")
    axes.set_ylabel("cosine (per step)")
    axes.set_title("Per-step gradient cosines between domains (dashed: conflict threshold)")
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
            "Cosine between the domains' gradients: mean over the run, and each pair's worst stretch (the basis of c)",
        ),
        _figure_html(over_time, out, "Per-step cosines (noisy: few examples per domain per step)"),
        '<p class="note">c and c-bar are the constants of PiKE\'s low gradient conflict assumption '
        "(arXiv 2502.06244): every pairwise cosine lies in [-c, c-bar]. Estimated from the mean scale-normalised "
        "Gramian of the run; see gradmix.diagnostics for the exact estimators.</p>",
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
