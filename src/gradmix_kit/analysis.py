"""Statistics for comparing mixing methods from run folders: confidence intervals over seeds, steps-to-reach, and a
per-method comparison against a baseline (uniform by default).

Reads the run folder format written by ``gradmix run`` (``config.json``, ``metrics.jsonl``, ``summary.json``).
Student t quantiles come from scipy (``pip install gradmix[experiments]``). Tables are built once as data
(``Table``: header, rows, note) and rendered to Markdown or HTML from it (``render_markdown``, ``render_html``).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "HEADLINE_METRICS",
    "NO_DIFFERENCE",
    "SUMMARY_METRICS",
    "Run",
    "RunFolderError",
    "Table",
    "compare_runs",
    "comparison_markdown",
    "comparison_table",
    "decide",
    "eval_series",
    "expand_run_dirs",
    "load_run",
    "load_runs",
    "mean_ci",
    "metric_label",
    "render_html",
    "render_markdown",
    "steps_to_reach",
    "summary_lines",
    "summary_value",
    "t_quantile",
    "target_name",
]

# Summary metrics compared across methods: key -> (label for tables, lower is better).
SUMMARY_METRICS: dict[str, tuple[str, bool]] = {
    "avg_val_loss": ("avg val loss", True),
    "worst_val_loss": ("worst val loss", True),
    "avg_val_accuracy": ("avg val accuracy", False),
    "target_val_loss": ("target val loss", True),
}


def summary_value(summary: dict[str, Any], key: str) -> Any:
    """A summary metric by key: a top-level field, or ``eval_metrics/<name>`` (your own metric's final value)."""
    if key.startswith("eval_metrics/"):
        return (summary.get("eval_metrics") or {}).get(key[len("eval_metrics/") :])
    return summary.get(key)


def metric_label(key: str, result: dict[str, Any] | None = None) -> tuple[str, bool]:
    """(label for tables, lower is better) of a summary metric key; own metrics are higher-is-better unless their
    run listed them in ``eval.lower_is_better``. The target loss names its target set when ``result`` (a
    ``compare_runs`` result) knows it: ``target val loss (target: medical)``."""
    target = (result or {}).get("target")
    if key == "target_val_loss" and target:
        label, lower = SUMMARY_METRICS[key]
        return f"{label} (target: {target})", lower
    if key in SUMMARY_METRICS:
        return SUMMARY_METRICS[key]
    labels = (result or {}).get("labels") or {}
    if key in labels:
        label, lower = labels[key]
        return str(label), bool(lower)
    if key.startswith("eval_metrics/"):
        return key[len("eval_metrics/") :], False
    return key, True


def _own_metric_keys(runs: Sequence[Run]) -> dict[str, tuple[str, bool]]:
    keys: dict[str, tuple[str, bool]] = {}
    for run in runs:
        lower = set(run.summary.get("eval_metrics_lower_is_better") or [])
        for name in run.summary.get("eval_metrics") or {}:
            key = f"eval_metrics/{name}"
            previous = keys.get(key, (name, False))
            keys[key] = (name, previous[1] or name in lower)
    return keys


class RunFolderError(ValueError):
    """A run folder is missing a required file or holds malformed content."""


# -- Student t quantile ----------------------------------------------------------------------------------------


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution with ``df`` degrees of freedom (e.g. t_{0.975, 2} = 4.303), from
    ``scipy.stats.t.ppf``."""
    p = float(p)
    df = float(df)
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: probability p must lie strictly between 0 and 1, got {p}")
    if not (df > 0 and math.isfinite(df)):
        raise ValueError(f"t_quantile: degrees of freedom must be a finite number > 0, got {df}")
    try:
        from scipy.stats import t as student_t
    except ImportError as exc:
        raise ImportError("confidence intervals need scipy: pip install 'gradmix[experiments]'") from exc
    return float(student_t.ppf(p, df))


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student t confidence interval of the mean over independent values (e.g. seeds).

    One value gives (value, nan, nan): an interval needs at least two seeds. Non-finite values are an error - a
    diverged seed must be reported as such, not averaged.
    """
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("mean_ci: no values given")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"mean_ci: value {arr[bad[0]]} at position {int(bad[0])} is not finite")
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"mean_ci: confidence must lie strictly between 0 and 1, got {confidence}")
    mean = float(arr.mean())
    if arr.size == 1:
        return mean, math.nan, math.nan
    half_width = t_quantile(0.5 + confidence / 2.0, arr.size - 1) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return mean, mean - half_width, mean + half_width


# -- run folders -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run folder, loaded. ``summary_derived`` is True when summary.json was absent (e.g. a run still going)
    and the summary was rebuilt from the last evaluation in metrics.jsonl. ``label``, when set (``gradmix report
    --label``), is the name the run is grouped by, before the config's label and method."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    summary_derived: bool = False
    domains: list[str] = field(default_factory=list)
    label: str | None = None

    @property
    def method(self) -> str:
        """The name runs are grouped by: ``label`` if set, else the config's label (a named variant of a method),
        else the method."""
        return str(
            self.label
            or self.config.get("label")
            or self.config.get("method")
            or self.summary.get("method")
            or _parse_folder_name(self.path)[0]
        )

    @property
    def seed(self) -> int | None:
        for source in (self.config.get("seed"), self.summary.get("seed"), _parse_folder_name(self.path)[1]):
            if source is not None:
                return int(source)
        return None

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)


def target_name(runs: Iterable[Run]) -> str | None:
    """The target set the runs' ``target_val_loss`` is measured on (``data.target`` of their configs, e.g.
    ``medical``; a path is shortened to its file name), names joined by ", " when runs differ; None without one."""
    names: list[str] = []
    for run in runs:
        value = run.config.get("target") or (run.config.get("data") or {}).get("target")
        if value:
            text = str(value)
            name = Path(text).name if ("/" in text or "\\" in text) else text
            if name not in names:
                names.append(name)
    return ", ".join(names) or None


def _parse_folder_name(path: Path) -> tuple[str, int | None]:
    """``{method}-seed{seed}`` (comparison folders) -> (method, seed); anything else -> (folder name, None)."""
    stem, sep, seed = path.name.rpartition("-seed")
    if sep and stem and seed.isdigit():
        return stem, int(seed)
    return path.name, None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, read as the library reads them (``gradmix.writers.JsonlWriter.read``): a
    last line without its newline is the half-written append of a killed run and is skipped; any other bad line is
    an error naming the file and line."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.endswith("\n"):
                break  # a kill during the last append
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunFolderError(f"{path} line {line_number} is not valid JSON: {exc}") from exc
            if not isinstance(record, dict) or "step" not in record:
                raise RunFolderError(f"{path} line {line_number} is not a metrics record with a 'step' field")
            records.append(record)
    return records


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _domain_order(config: dict[str, Any], metrics: list[dict[str, Any]]) -> list[str]:
    """Domains in config order, then any extra names the metrics mention, in first-seen order."""
    names = [str(d) for d in config.get("domains") or []]
    seen = set(names)
    for record in metrics:
        for key in ("weights", "val_loss", "train_loss"):
            for name in record.get(key) or {}:
                if name not in seen:
                    seen.add(name)
                    names.append(name)
    return names


def _summary_from_metrics(metrics: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"method": config.get("method"), "seed": config.get("seed")}
    if metrics:
        summary["steps"] = int(metrics[-1]["step"])
    evals = [r for r in metrics if isinstance(r.get("val_loss"), dict) and r["val_loss"]]
    if evals:
        last = evals[-1]
        summary["final_val_loss"] = dict(last["val_loss"])
        losses = [_finite(v) for v in last["val_loss"].values()]
        finite_losses = [v for v in losses if v is not None]
        if len(finite_losses) == len(losses):
            summary["avg_val_loss"] = float(np.mean(finite_losses))
            summary["worst_val_loss"] = float(np.max(finite_losses))
        accuracy = last.get("val_accuracy")
        if isinstance(accuracy, dict) and accuracy:
            summary["final_val_accuracy"] = dict(accuracy)
            values = [_finite(v) for v in accuracy.values()]
            finite_values = [v for v in values if v is not None]
            if len(finite_values) == len(values):
                summary["avg_val_accuracy"] = float(np.mean(finite_values))
    targets = [r for r in metrics if r.get("target_val_loss") is not None]
    if targets:
        summary["target_val_loss"] = targets[-1]["target_val_loss"]
    own = [r for r in metrics if isinstance(r.get("eval_metrics"), dict) and r["eval_metrics"]]
    if own:
        summary["eval_metrics"] = {name: _scalar_metric(value) for name, value in own[-1]["eval_metrics"].items()}
    return summary


def _scalar_metric(value: Any) -> float | None:
    """One number from a metric value: itself, or the mean of a {domain: value} mapping (None if any is missing)."""
    if isinstance(value, dict):
        numbers = [_finite(v) for v in value.values()]
        finite = [v for v in numbers if v is not None]
        if not numbers or len(finite) != len(numbers):
            return None
        return float(np.mean(finite))
    return _finite(value)


def load_run(run_dir: str | Path) -> Run:
    """Load one run folder. metrics.jsonl is required; config.json and summary.json are used when present."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunFolderError(f"run folder {path} does not exist or is not a directory")
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise RunFolderError(f"run folder {path} has no metrics.jsonl (is it a run folder written by `gradmix run`?)")
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    metrics = _read_metrics(metrics_path)
    summary_path = path / "summary.json"
    if summary_path.is_file():
        summary, derived = _read_json(summary_path), False
    else:
        summary, derived = _summary_from_metrics(metrics, config), True
    return Run(
        path=path,
        config=config,
        metrics=metrics,
        summary=summary,
        summary_derived=derived,
        domains=_domain_order(config, metrics),
    )


def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders from a mix of run folders and comparison folders (those holding comparison.json)."""
    expanded: list[Path] = []
    for entry in paths:
        path = Path(entry)
        listing = path / "comparison.json"
        if listing.is_file() and not (path / "metrics.jsonl").is_file():
            runs = _read_json(listing).get("runs")
            if not isinstance(runs, list) or not runs:
                raise RunFolderError(f"{listing} has no 'runs' list")
            expanded.extend(path / str(r) for r in runs)
        else:
            expanded.append(path)
    return expanded


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Load run folders (comparison folders are expanded into their runs)."""
    return [load_run(p) for p in expand_run_dirs(paths)]


# -- time series -----------------------------------------------------------------------------------------------


def _eval_value(record: dict[str, Any], key: str) -> float | None:
    if key == "target_val_loss":
        return _finite(record.get("target_val_loss"))
    if key.startswith("eval_metrics/"):
        return _scalar_metric((record.get("eval_metrics") or {}).get(key[len("eval_metrics/") :]))
    if key.startswith("val_loss/"):
        return _finite((record.get("val_loss") or {}).get(key[len("val_loss/") :]))
    if key.startswith("val_accuracy/"):
        return _finite((record.get("val_accuracy") or {}).get(key[len("val_accuracy/") :]))
    source = {"avg_val_loss": "val_loss", "worst_val_loss": "val_loss", "avg_val_accuracy": "val_accuracy"}.get(key)
    if source is None:
        raise ValueError(
            f"unknown metric key {key!r}; use avg_val_loss, worst_val_loss, avg_val_accuracy, target_val_loss, "
            "val_loss/<domain> or val_accuracy/<domain>"
        )
    per_domain = record.get(source)
    if not isinstance(per_domain, dict) or not per_domain:
        return None
    values = [_finite(v) for v in per_domain.values()]
    finite = [v for v in values if v is not None]
    if len(finite) != len(values):  # a missing domain would bias the average: skip this evaluation
        return None
    return float(np.max(finite)) if key == "worst_val_loss" else float(np.mean(finite))


def eval_series(run: Run, key: str = "avg_val_loss") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of an evaluation metric, sorted by step. A step logged twice (a resumed run) keeps its
    latest record; evaluations where the metric is missing or not finite are left out."""
    by_step: dict[int, float] = {}
    for record in run.metrics:
        value = _eval_value(record, key)
        if value is None:
            continue
        by_step[int(record["step"])] = value
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def steps_to_reach(run: Run, threshold: float, key: str = "avg_val_loss") -> float | None:
    """First step at which the metric (a loss) reaches ``threshold``, or None if it never does.

    Between the last evaluation above the threshold and the first at or below it the loss is interpolated
    linearly, so the answer is not quantised to the evaluation interval. If the very first evaluation is already
    at or below the threshold, its step is returned (nothing is known before it).
    """
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"steps_to_reach: threshold must be finite, got {threshold}")
    steps, values = eval_series(run, key)
    hits = np.flatnonzero(values <= threshold)
    if hits.size == 0:
        return None
    first = int(hits[0])
    if first == 0:
        return float(steps[0])
    step_before, value_before = float(steps[first - 1]), float(values[first - 1])
    step_after, value_after = float(steps[first]), float(values[first])
    fraction = (value_before - threshold) / (value_before - value_after)
    return step_before + fraction * (step_after - step_before)


def _last_eval(run: Run, key: str) -> tuple[float, float] | None:
    steps, values = eval_series(run, key)
    if steps.size == 0:
        return None
    return float(steps[-1]), float(values[-1])


# -- comparison ------------------------------------------------------------------------------------------------


def _interval(values: Sequence[float], confidence: float) -> dict[str, Any]:
    """JSON-friendly interval record; non-finite values (diverged seeds) are counted, and make the mean None."""
    arr = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(arr)
    record: dict[str, Any] = {
        "n": int(arr.size),
        "n_nonfinite": int((~finite).sum()),
        "values": [float(v) if math.isfinite(v) else None for v in arr],
        "mean": None,
        "low": None,
        "high": None,
    }
    if arr.size and finite.all():
        mean, low, high = mean_ci(arr, confidence)
        record.update(mean=mean, low=None if math.isnan(low) else low, high=None if math.isnan(high) else high)
    return record


def compare_runs(
    runs: Sequence[Run | str | Path],
    baseline: str | None = "uniform",
    *,
    confidence: float = 0.95,
    label: Callable[[Run], str] | None = None,
) -> dict[str, Any]:
    """Per-method statistics over seeds, and paired differences against a baseline method.

    For each method (``label(run)``, default ``run.method``) and each summary metric present (avg/worst val loss,
    avg val accuracy, target val loss): mean and ``confidence`` Student t interval over seeds. Against the baseline,
    paired by seed: the relative difference (m - b) / |b| with its interval, and the steps ratio
    steps_to_reach(method, L_b) / S_b, where L_b is the baseline's last evaluated average validation loss and S_b
    that evaluation's step (< 1: the method matched the baseline's final quality sooner). Seeds that never reach
    L_b are counted in ``reached`` vs ``n`` and left out of the ratio's mean. An absent baseline is not an error
    (a single-method report): the paired entries are then omitted and ``baseline`` is None. ``target`` names the
    target set of ``target_val_loss`` (``target_name``), and the labels name it.
    """
    loaded = [r if isinstance(r, Run) else load_run(r) for r in runs]
    if not loaded:
        raise ValueError("compare_runs: no runs given")
    label = label or (lambda run: run.method)
    groups: dict[str, dict[Any, Run]] = {}
    for run in loaded:
        group = groups.setdefault(label(run), {})
        seed = run.seed if run.seed is not None else f"run{len(group)}"
        if seed in group:
            raise ValueError(
                f"compare_runs: method {label(run)!r} has two runs with seed {seed}: {group[seed].path} and "
                f"{run.path}; compare them separately, or tell them apart with `gradmix report RUN1 RUN2 --label "
                "NAME1,NAME2` (one name per folder given; label= in Python)"
            )
        group[seed] = run

    own = _own_metric_keys(loaded)
    metric_keys = [k for k in [*SUMMARY_METRICS, *own] if any(summary_value(r.summary, k) is not None for r in loaded)]
    baseline_runs = groups.get(baseline) if baseline is not None else None
    target = target_name(loaded)
    result: dict[str, Any] = {
        "baseline": baseline if baseline_runs else None,
        "requested_baseline": baseline,
        "confidence": confidence,
        "metrics": metric_keys,
        "target": target,
        "labels": {k: list(own[k] if k in own else metric_label(k, {"target": target})) for k in metric_keys},
        "methods": {},
    }
    for method, by_seed in groups.items():
        seeds = sorted(by_seed, key=lambda s: (isinstance(s, str), s))
        entry: dict[str, Any] = {
            "seeds": seeds,
            "runs": [str(by_seed[s].path) for s in seeds],
        }
        for key in metric_keys:
            values = [summary_value(by_seed[s].summary, key) for s in seeds]
            present = [math.nan if _finite(v) is None else float(v) for v in values if v is not None]
            if present:
                entry[key] = _interval(present, confidence)
        if baseline_runs:
            entry["relative"] = {}
            for key in metric_keys:
                pairs = [
                    (summary_value(by_seed[s].summary, key), summary_value(baseline_runs[s].summary, key))
                    for s in seeds
                    if s in baseline_runs
                ]
                diffs = []
                for value, reference in pairs:
                    value, reference = _finite(value), _finite(reference)
                    if value is None or reference is None or reference == 0:
                        diffs.append(math.nan)
                    else:
                        diffs.append((value - reference) / abs(reference))
                if diffs:
                    entry["relative"][key] = _interval(diffs, confidence)
            ratios, paired = [], 0
            for s in seeds:
                if s not in baseline_runs:
                    continue
                reference = _last_eval(baseline_runs[s], "avg_val_loss")
                if reference is None or reference[0] <= 0:
                    continue
                paired += 1
                reached = steps_to_reach(by_seed[s], reference[1])
                if reached is not None:
                    ratios.append(reached / reference[0])
            if paired:
                ratio: dict[str, Any] = (
                    _interval(ratios, confidence) if ratios else {"mean": None, "low": None, "high": None}
                )
                ratio.update(n=paired, reached=len(ratios))
                entry["steps_ratio"] = ratio
        result["methods"][method] = entry
    return result


def _format_interval(record: dict[str, Any] | None, *, percent: bool = False, digits: int = 4) -> str:
    if not record:
        return ""
    if record.get("mean") is None:
        bad = record.get("n_nonfinite", 0)
        return f"diverged ({bad}/{record.get('n', 0)})" if bad else "n/a"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    precision = 2 if percent else digits
    text = f"{record['mean'] * scale:+.{precision}f}{unit}" if percent else f"{record['mean']:.{precision}f}"
    if record.get("high") is not None:
        half = (record["high"] - record["mean"]) * scale
        text += f" ± {half:.{precision}f}{unit}"
    return text


@dataclass(frozen=True)
class Table:
    """A table as data: column names, rows of cell texts, and a note printed under it. Rendered by
    ``render_markdown`` and ``render_html``; nothing parses a rendered table back."""

    header: list[str]
    rows: list[list[str]]
    note: str = ""


def comparison_table(result: dict[str, Any]) -> Table:
    """``compare_runs``' result as a table: mean ± CI half-width per metric, paired Δ vs the baseline."""
    metric_keys = result["metrics"]
    baseline = result.get("baseline")
    methods = result["methods"]
    labels = [metric_label(k, result)[0] for k in metric_keys]
    header = ["method", "seeds", *labels]
    if baseline:
        header += [f"Δ {label} vs {baseline}" for label in labels]
        header.append(f"steps to {baseline}'s final loss (ratio)")
    rows = []
    for method, entry in methods.items():
        row = [method, str(len(entry["seeds"]))] + [_format_interval(entry.get(k)) for k in metric_keys]
        if baseline:
            relative = entry.get("relative", {})
            row += [_format_interval(relative.get(k), percent=True) for k in metric_keys]
            ratio = entry.get("steps_ratio")
            if ratio is None:
                row.append("")
            else:
                text = _format_interval(ratio, digits=2) if ratio.get("mean") is not None else "never"
                row.append(f"{text} ({ratio['reached']}/{ratio['n']} reached)")
        rows.append(row)
    confidence = round(float(result.get("confidence", 0.95)) * 100)
    note = f"Mean ± {confidence}% confidence half-width (Student t over seeds; none with one seed)."
    if baseline:
        note += (
            f" Δ: relative difference to {baseline}, paired by seed. Steps ratio: step at which the method's"
            f" average validation loss first reaches {baseline}'s final one, divided by {baseline}'s steps."
        )
    elif result.get("requested_baseline"):
        note += f" Baseline {result['requested_baseline']!r} is not among the runs: no paired differences."
    return Table(header=header, rows=rows, note=note)


def render_markdown(table: Table) -> str:
    """A pipe table (``|`` in cells escaped), then the note as a paragraph."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(table.header), "|" + "|".join("---" for _ in table.header) + "|"] + [line(r) for r in table.rows]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def render_html(table: Table, *, note_class: str = "note") -> str:
    """An HTML ``<table>`` (cells escaped), then the note as a paragraph."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in table.rows)
    out = f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"
    if table.note:
        out += f'\n<p class="{note_class}">{html.escape(table.note)}</p>'
    return out


def comparison_markdown(result: dict[str, Any]) -> str:
    """``comparison_table(result)`` rendered as Markdown."""
    return render_markdown(comparison_table(result))


# -- the decision ----------------------------------------------------------------------------------------------

# The metrics the summary decides on, in order: the generic average, the worst domain, the target set (DGA).
HEADLINE_METRICS: tuple[str, ...] = ("avg_val_loss", "worst_val_loss", "target_val_loss")

# Said, literally, whenever a paired interval includes 0.
NO_DIFFERENCE = "no difference beyond noise"


def _delta_text(record: dict[str, Any]) -> str:
    """``-5.85% ± 1.02%`` (relative Δ, mean ± confidence half-width); ``+0.40% (one seed, no interval)``."""
    text = _format_interval(record, percent=True)
    return text if record.get("high") is not None else f"{text} (one seed, no interval)"


def _percent(value: float) -> str:
    """A relative difference in %, with as many decimals (2 to 5) as it takes not to show a non-zero as 0."""
    text = f"{value * 100:+.2f}%"
    for digits in (3, 4, 5):
        if value == 0.0 or float(text[:-1]) != 0.0:
            break
        text = f"{value * 100:+.{digits}f}%"
    return text


def _bounds_text(record: dict[str, Any], confidence: int) -> str:
    """`` (95% CI -0.42% to -0.003%)``: the interval's ends, so an end near 0 shows on which side it is; "" without
    an interval."""
    if record.get("low") is None or record.get("high") is None:
        return ""
    return f" ({confidence}% CI {_percent(record['low'])} to {_percent(record['high'])})"


def _verdict(record: dict[str, Any], lower_is_better: bool) -> str:
    """``better`` / ``worse`` (the whole interval on one side of 0), ``identical`` (every paired difference exactly
    0), ``noise`` (the interval includes 0) or ``no interval`` (one paired seed)."""
    values = [v for v in record.get("values") or [] if v is not None]
    if values and all(v == 0.0 for v in values):
        return "identical"
    low, high = record.get("low"), record.get("high")
    if low is None or high is None:
        return "no interval"
    if low <= 0.0 <= high:
        return "noise"
    improved = high < 0.0 if lower_is_better else low > 0.0
    return "better" if improved else "worse"


def decide(result: dict[str, Any], metrics: Sequence[str] = HEADLINE_METRICS) -> list[dict[str, Any]]:
    """Which method to pick, per headline metric, from a ``compare_runs`` result.

    For each metric present (average and worst-domain validation loss, the target's loss with a target set): the
    paired relative differences to the baseline and their confidence intervals over seeds (``relative`` in the
    result) decide. A method *beats* the baseline when its whole interval lies on the better side of 0. The best
    method is the one with the best mean difference among those that beat the baseline; when none does, the one
    with the best mean difference if that is better than the baseline's 0, else the baseline itself (``closest``
    is then the method nearest to it). Each entry: ``metric``, ``label``, ``lower_is_better``, ``baseline``,
    ``best``, ``delta`` (the best method's interval record, None for the baseline), ``verdict`` (``better``,
    ``noise``, ``identical``, ``no interval``, ``worse``, ``baseline``, ``no baseline``), ``closest`` and
    ``closest_delta`` / ``closest_verdict`` (when the baseline is best), ``worse`` ([(method, interval)]: worse than
    the baseline beyond noise), ``n_seeds`` and ``recommendation`` (one sentence: ``Pick X for M (Δ)`` or
    ``No method beats B beyond noise on M``). Without a baseline among the runs the best mean wins, unjudged.
    """
    baseline = result.get("baseline")
    methods: dict[str, dict[str, Any]] = result["methods"]
    decisions: list[dict[str, Any]] = []
    for key in metrics:
        if key not in result["metrics"]:
            continue
        label, lower = metric_label(key, result)
        sign = 1.0 if lower else -1.0  # sign * difference < 0: an improvement
        entry: dict[str, Any] = {
            "metric": key,
            "label": label,
            "lower_is_better": lower,
            "baseline": baseline,
            "best": None,
            "delta": None,
            "verdict": "no baseline",
            "closest": None,
            "closest_delta": None,
            "closest_verdict": None,
            "worse": [],
            "n_seeds": None,
            "recommendation": "",
        }
        if baseline is None:
            means = {m: e[key]["mean"] for m, e in methods.items() if (e.get(key) or {}).get("mean") is not None}
            if means:
                best = min(means, key=lambda m: sign * means[m])
                entry["best"] = best
                entry["recommendation"] = (
                    f"No baseline among the runs: {best} has the best mean {label}, not judged against noise."
                )
            decisions.append(entry)
            continue
        candidates: dict[str, dict[str, Any]] = {}
        for method, method_entry in methods.items():
            record = (method_entry.get("relative") or {}).get(key)
            if method != baseline and record and record.get("mean") is not None:
                candidates[method] = record
        verdicts = {m: _verdict(r, lower) for m, r in candidates.items()}
        entry["worse"] = [(m, candidates[m]) for m in candidates if verdicts[m] == "worse"]
        if not candidates:
            entry.update(best=baseline, verdict="baseline")
            entry["recommendation"] = f"No method beats {baseline} beyond noise on {label} (none was compared)."
            decisions.append(entry)
            continue
        winners = [m for m in candidates if verdicts[m] == "better"]
        pool = winners or list(candidates)
        best = min(pool, key=lambda m: sign * candidates[m]["mean"])
        entry["n_seeds"] = candidates[best].get("n")
        if winners or sign * candidates[best]["mean"] < 0.0:
            entry.update(best=best, delta=candidates[best], verdict=verdicts[best])
        else:  # no method is better on average: the baseline is best
            entry.update(
                best=baseline,
                verdict="baseline",
                closest=best,
                closest_delta=candidates[best],
                closest_verdict=verdicts[best],
            )
        if winners:
            entry["recommendation"] = f"Pick {best} for {label} ({_delta_text(candidates[best])})."
        else:
            entry["recommendation"] = f"No method beats {baseline} beyond noise on {label}."
        decisions.append(entry)
    return decisions


_VERDICT_TEXT = {
    "better": "beyond noise",
    "noise": NO_DIFFERENCE,
    "identical": f"identical to the baseline on every seed ({NO_DIFFERENCE})",
    "no interval": "one paired seed: no interval, so it cannot be told from noise",
    "worse": "worse beyond noise",
}


def summary_lines(result: dict[str, Any], decisions: list[dict[str, Any]] | None = None) -> list[str]:
    """The decision as Markdown lines (also plain enough for a terminal): one bullet per headline metric (best
    method, its paired Δ vs the baseline with the interval, and whether it is beyond noise), what is worse than the
    baseline beyond noise, and a one-line recommendation."""
    decisions = decide(result) if decisions is None else decisions
    baseline = result.get("baseline")
    confidence = round(float(result.get("confidence", 0.95)) * 100)
    lines = ["## Summary: which method to pick", ""]
    if len(result["methods"]) == 1:
        only = next(iter(result["methods"]))
        lines.append(
            f"One method ({only}): nothing to choose between. Compare methods with `gradmix compare`, or give "
            "`gradmix report` the runs of several methods."
        )
        return lines
    if not decisions:
        lines.append("No headline metric (validation loss) in these runs: nothing to decide.")
        return lines
    if baseline is None:
        requested = result.get("requested_baseline")
        lines.append(
            f"Baseline {requested!r} is not among the runs: no paired differences, so nothing is judged against "
            "noise (best mean only)."
            if requested
            else "No baseline given: best mean only, nothing judged against noise."
        )
        lines.append("")
    for entry in decisions:
        direction = "lower" if entry["lower_is_better"] else "higher"
        head = f"- **{entry['label']}** ({direction} is better): "
        if entry["verdict"] == "no baseline":
            lines.append(head + (f"best mean {entry['best']}." if entry["best"] else "no values."))
        elif entry["verdict"] == "baseline":
            text = head + f"best {baseline} (the baseline): no method is better on average"
            if entry["closest"] is not None:
                closest_verdict = _VERDICT_TEXT[entry["closest_verdict"]]
                closest_delta = entry["closest_delta"]
                text += (
                    f"; closest {entry['closest']}, Δ vs {baseline} {_delta_text(closest_delta)}"
                    f"{_bounds_text(closest_delta, confidence)}: {closest_verdict}"
                )
            lines.append(text + ".")
        else:
            lines.append(
                head + f"best {entry['best']}, Δ vs {baseline} {_delta_text(entry['delta'])}"
                f"{_bounds_text(entry['delta'], confidence)}: {_VERDICT_TEXT[entry['verdict']]}."
            )
    worse = [f"{m} on {e['label']} ({_delta_text(r)})" for e in decisions for m, r in e["worse"]]
    if worse:
        lines += ["", f"Worse than {baseline} beyond noise: " + "; ".join(worse) + "."]
    lines += ["", "**Recommendation:** " + " ".join(e["recommendation"] for e in decisions if e["recommendation"])]
    if baseline is not None:
        seeds = sorted({e["n_seeds"] for e in decisions if e["n_seeds"]})
        lines += [
            "",
            f"Δ: relative difference to {baseline}, paired by seed, mean ± {confidence}% confidence half-width "
            f"(Student t over {'/'.join(map(str, seeds)) or 'the'} seeds). A method beats {baseline} only when its "
            f"whole interval is on the better side of 0; an interval that includes 0 is {NO_DIFFERENCE}.",
        ]
    return lines
