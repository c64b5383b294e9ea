"""Tests for gradmix_kit.analysis (CIs, steps-to-reach, comparisons) and gradmix_kit.report (HTML + PNG reports).

Run folders are written by hand here, following the run folder format, with losses from closed-form curves so that
every expected number can be computed independently.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradmix_kit.analysis import (
    RunFolderError,
    compare_runs,
    comparison_markdown,
    eval_series,
    load_run,
    load_runs,
    mean_ci,
    steps_to_reach,
    t_quantile,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- synthetic run folders -------------------------------------------------------------------------------------


def write_run(
    run_dir: Path,
    *,
    method: str,
    seed: int,
    eval_steps,
    avg_losses,
    domains=("en", "fr"),
    spread: float = 0.1,
    steps: int | None = None,
    accuracy: bool = False,
    target: bool = False,
    summary: bool = True,
    summary_avg: float | None = None,
    log_every: int = 50,
) -> Path:
    """A run whose per-domain validation losses at eval step i are avg_losses[i] -/+ spread (two domains), so the
    average is avg_losses[i] and the worst is avg_losses[i] + spread."""
    run_dir.mkdir(parents=True)
    domains = list(domains)
    steps = steps if steps is not None else int(eval_steps[-1])
    offsets = np.linspace(-spread, spread, len(domains))
    config = {
        "name": run_dir.name,
        "method": method,
        "method_params": {},
        "seed": seed,
        "domains": domains,
        "batch_size": 8,
        "steps": steps,
        "corpus": "synthetic",
        "target": "en" if target else None,
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    evals = dict(zip((int(s) for s in eval_steps), avg_losses))
    logged = sorted(set(range(0, steps + 1, log_every)) | set(evals))
    lines = []
    for step in logged:
        share = 0.5 + 0.3 * math.sin(step / 100.0 + seed)
        weights = {domains[0]: share, **{d: (1 - share) / (len(domains) - 1) for d in domains[1:]}}
        record = {
            "step": step,
            "weights": weights,
            "train_loss": {d: 3.0 - step / (2.0 * steps) for d in domains},
            "tokens": {d: 100 * step for d in domains},
            "repeats": {d: step // 200 for d in domains},
        }
        if step in evals:
            record["val_loss"] = {d: evals[step] + off for d, off in zip(domains, offsets)}
            if accuracy:
                record["val_accuracy"] = {d: 0.5 + 0.01 * step / steps for d in domains}
            if target:
                record["target_val_loss"] = evals[step] + 0.05
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary:
        final = avg_losses[-1] if summary_avg is None else summary_avg
        data = {
            "method": method,
            "seed": seed,
            "steps": steps,
            "final_val_loss": {d: final + off for d, off in zip(domains, offsets)},
            "avg_val_loss": final,
            "worst_val_loss": final + spread,
            "wall_time_s": 12.5,
            "step_time_s": 0.01,
        }
        if accuracy:
            data["final_val_accuracy"] = {d: 0.51 for d in domains}
            data["avg_val_accuracy"] = 0.51 + 0.01 * seed
        if target:
            data["target_val_loss"] = final + 0.05
        (run_dir / "summary.json").write_text(json.dumps(data))
    return run_dir


def linear_losses(final: float, start: float = 4.0, steps: int = 1000, every: int = 100):
    eval_steps = list(range(0, steps + 1, every))
    return eval_steps, [start - (start - final) * s / steps for s in eval_steps]


def comparison_folder(root: Path, finals: dict[str, list[float]], **kwargs) -> Path:
    """CMP/{method}-seed{seed} runs with linear loss curves ending at the given finals, plus comparison.json."""
    runs = []
    for method, values in finals.items():
        for seed, final in enumerate(values):
            eval_steps, losses = linear_losses(final)
            name = f"{method}-seed{seed}"
            write_run(root / name, method=method, seed=seed, eval_steps=eval_steps, avg_losses=losses, **kwargs)
            runs.append(name)
    (root / "comparison.json").write_text(
        json.dumps({"runs": runs, "methods": list(finals), "seeds": list(range(max(len(v) for v in finals.values())))})
    )
    return root


# -- Student t and confidence intervals ------------------------------------------------------------------------

# Two-sided 95% / 99% critical values from printed t tables.
KNOWN_T = [
    (0.975, 1, 12.706),
    (0.975, 2, 4.303),
    (0.975, 4, 2.776),
    (0.975, 10, 2.228),
    (0.95, 10, 1.812),
    (0.995, 30, 2.750),
    (0.975, 1000, 1.962),
]


@pytest.mark.parametrize("p, df, expected", KNOWN_T)
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-3)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-3)


def test_t_quantile_closed_forms():
    # df = 1 is Cauchy: q(p) = tan(pi (p - 1/2)); df = 2 has q(p) = (2p - 1) sqrt(2 / (4 p (1 - p))).
    for p in (0.6, 0.9, 0.975, 0.999, 0.01):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-9)
    assert t_quantile(0.5, 3) == 0.0


def test_tables_are_rendered_from_data_not_reparsed():
    from gradmix_kit.analysis import Table, render_html, render_markdown

    table = Table(header=["method", "a|b"], rows=[["x<y", "1 | 2"]], note="n & m")
    assert render_markdown(table) == "| method | a\\|b |\n|---|---|\n| x<y | 1 \\| 2 |\n\nn & m\n"
    page = render_html(table)
    assert "<th>a|b</th>" in page and "<td>x&lt;y</td>" in page and "<td>1 | 2</td>" in page
    assert '<p class="note">n &amp; m</p>' in page
    import gradmix_kit.report as report

    assert not hasattr(report, "markdown_table_to_html")


@pytest.mark.parametrize("p, df", [(0.0, 3), (1.0, 3), (0.5, 0), (0.5, float("nan"))])
def test_t_quantile_rejects_bad_input(p, df):
    with pytest.raises(ValueError):
        t_quantile(p, df)


def test_mean_ci_hand_values():
    mean, low, high = mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3: half = 4.303 / sqrt(3)
    assert mean == pytest.approx(2.0)
    assert high - mean == pytest.approx(4.3027 / math.sqrt(3), abs=1e-3)
    assert mean - low == pytest.approx(high - mean)
    mean, low, high = mean_ci([2, 4, 6, 8, 10])  # sd sqrt(10), n 5: half = 2.776 * sqrt(10) / sqrt(5)
    assert mean == 6
    assert high - mean == pytest.approx(2.7764 * math.sqrt(2), abs=1e-3)
    mean, low, high = mean_ci([1, 2, 3], confidence=0.9)  # t_{0.95, 2} = 2.920
    assert high - mean == pytest.approx(2.9200 / math.sqrt(3), abs=1e-3)


def test_mean_ci_coverage_by_simulation():
    rng = np.random.default_rng(0)
    trials = 2000
    covered = 0
    for _ in range(trials):
        _, low, high = mean_ci(rng.normal(1.0, 2.0, size=4))
        covered += low <= 1.0 <= high
    assert abs(covered / trials - 0.95) < 0.02


def test_mean_ci_edge_cases():
    mean, low, high = mean_ci([2.5])
    assert mean == 2.5 and math.isnan(low) and math.isnan(high)
    assert mean_ci([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError, match="no values"):
        mean_ci([])
    with pytest.raises(ValueError, match="not finite"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)


# -- loading and steps-to-reach --------------------------------------------------------------------------------


def test_steps_to_reach_interpolates_between_evals(tmp_path):
    run = load_run(
        write_run(
            tmp_path / "r", method="uniform", seed=0, eval_steps=[0, 100, 200, 300], avg_losses=[4.0, 3.0, 2.0, 1.5]
        )
    )
    assert steps_to_reach(run, 2.5) == pytest.approx(150.0)
    assert steps_to_reach(run, 2.2) == pytest.approx(180.0)
    assert steps_to_reach(run, 3.0) == pytest.approx(100.0)  # exact hit on an eval point
    assert steps_to_reach(run, 9.0) == 0.0  # already below at the first evaluation
    assert steps_to_reach(run, 1.0) is None
    # worst = avg + 0.1 (4.1, 3.1, 2.1, 1.6): 2.5 is crossed between steps 100 and 200; 'en' = avg - 0.1.
    assert steps_to_reach(run, 2.5, key="worst_val_loss") == pytest.approx(100 + 100 * (3.1 - 2.5) / (3.1 - 2.1))
    assert steps_to_reach(run, 3.5, key="val_loss/en") == pytest.approx(0 + 100 * (3.9 - 3.5) / (3.9 - 2.9))
    with pytest.raises(ValueError, match="unknown metric"):
        steps_to_reach(run, 1.0, key="nonsense")


def test_steps_to_reach_takes_first_crossing_and_skips_incomplete_evals(tmp_path):
    path = write_run(
        tmp_path / "r", method="pike", seed=0, eval_steps=[0, 100, 200, 300], avg_losses=[3.0, 2.0, 2.6, 1.0]
    )
    run = load_run(path)
    assert steps_to_reach(run, 2.5) == pytest.approx(50.0)
    # Blank one domain at step 100: that evaluation no longer counts, so the crossing is 0 -> 300.
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        if record["step"] == 100:
            record["val_loss"]["fr"] = None
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    run = load_run(path)
    assert list(eval_series(run)[0]) == [0, 200, 300]
    assert steps_to_reach(run, 2.5) == pytest.approx(200 + 100 * (2.6 - 2.5) / (2.6 - 1.0))


def test_load_run_errors_name_the_folder(tmp_path):
    empty = tmp_path / "no-metrics"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"no-metrics.*metrics.jsonl"):
        load_run(empty)
    with pytest.raises(RunFolderError, match="does not exist"):
        load_run(tmp_path / "missing")
    bad = write_run(tmp_path / "bad", method="uniform", seed=0, eval_steps=[0, 100], avg_losses=[3.0, 2.0])
    with (bad / "metrics.jsonl").open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(RunFolderError, match="line"):
        load_run(bad)


def test_load_run_without_summary_or_config(tmp_path):
    path = write_run(
        tmp_path / "dga-seed3",
        method="dga",
        seed=3,
        eval_steps=[0, 100, 200],
        avg_losses=[3.0, 2.5, 2.2],
        summary=False,
        target=True,
    )
    (path / "config.json").unlink()
    run = load_run(path)
    assert run.summary_derived
    assert run.method == "dga" and run.seed == 3  # from the folder name
    assert run.summary["avg_val_loss"] == pytest.approx(2.2)
    assert run.summary["worst_val_loss"] == pytest.approx(2.3)
    assert run.summary["target_val_loss"] == pytest.approx(2.25)
    assert set(run.domains) == {"en", "fr"}


# -- comparison ------------------------------------------------------------------------------------------------

FINALS = {"uniform": [2.0, 2.2, 2.4], "pike": [1.9, 2.2, 2.2], "bad": [2.5, 2.6, 2.7]}


def test_compare_runs_hand_numbers(tmp_path):
    runs = load_runs([comparison_folder(tmp_path / "cmp", FINALS)])
    result = compare_runs(runs)
    assert result["baseline"] == "uniform"
    assert set(result["methods"]) == set(FINALS)
    pike = result["methods"]["pike"]
    assert pike["seeds"] == [0, 1, 2]
    assert pike["avg_val_loss"]["mean"] == pytest.approx(2.1)
    # sd of (1.9, 2.2, 2.2) = sqrt(0.03); half-width = t_{0.975,2} sd / sqrt(3) = 4.3027 * 0.1
    assert pike["avg_val_loss"]["high"] - 2.1 == pytest.approx(0.43027, abs=1e-4)
    assert pike["worst_val_loss"]["mean"] == pytest.approx(2.2)
    expected_relative = [(1.9 - 2.0) / 2.0, 0.0, (2.2 - 2.4) / 2.4]
    assert pike["relative"]["avg_val_loss"]["mean"] == pytest.approx(np.mean(expected_relative))
    assert pike["relative"]["avg_val_loss"]["values"] == pytest.approx(expected_relative)
    # Linear curves from 4.0: the method reaches the baseline's final F_b at 1000 (4 - F_b) / (4 - F_m).
    expected_ratios = [(4 - 2.0) / (4 - 1.9), 1.0, (4 - 2.4) / (4 - 2.2)]
    assert pike["steps_ratio"]["mean"] == pytest.approx(np.mean(expected_ratios))
    assert (pike["steps_ratio"]["reached"], pike["steps_ratio"]["n"]) == (3, 3)
    assert result["methods"]["uniform"]["steps_ratio"]["mean"] == pytest.approx(1.0)
    assert result["methods"]["uniform"]["relative"]["avg_val_loss"]["mean"] == 0.0
    bad = result["methods"]["bad"]["steps_ratio"]
    assert (bad["reached"], bad["n"], bad["mean"]) == (0, 3, None)
    json.dumps(result, allow_nan=False)  # JSON-clean: no NaN leaks out

    table = comparison_markdown(result)
    for method in FINALS:
        assert re.search(rf"^\| {method} \| 3 \|", table, flags=re.MULTILINE)
    assert "2.1000 ± 0.4303" in table
    assert "-4.44%" in table
    assert "never (0/3 reached)" in table


def test_compare_runs_single_seed_missing_baseline_and_optional_fields(tmp_path):
    eval_steps, losses = linear_losses(2.0)
    run = write_run(
        tmp_path / "pike-seed0", method="pike", seed=0, eval_steps=eval_steps, avg_losses=losses, accuracy=True
    )
    result = compare_runs([run])
    assert result["baseline"] is None and "relative" not in result["methods"]["pike"]
    assert result["metrics"] == ["avg_val_loss", "worst_val_loss", "avg_val_accuracy"]
    record = result["methods"]["pike"]["avg_val_accuracy"]
    assert (record["mean"], record["low"], record["high"]) == (pytest.approx(0.51), None, None)
    table = comparison_markdown(result)
    assert "not among the runs" in table and "avg val accuracy" in table


def test_compare_runs_diverged_seed_and_duplicates(tmp_path):
    eval_steps, losses = linear_losses(2.0)
    paths = [
        write_run(tmp_path / f"odm-seed{s}", method="odm", seed=s, eval_steps=eval_steps, avg_losses=losses)
        for s in (0, 1)
    ]
    summary = json.loads((paths[1] / "summary.json").read_text())
    summary["avg_val_loss"] = float("nan")
    (paths[1] / "summary.json").write_text(json.dumps(summary))
    result = compare_runs(paths, baseline=None)
    record = result["methods"]["odm"]["avg_val_loss"]
    assert record["mean"] is None and record["n_nonfinite"] == 1
    assert "diverged (1/2)" in comparison_markdown(result)

    duplicate = write_run(tmp_path / "again", method="odm", seed=0, eval_steps=eval_steps, avg_losses=losses)
    with pytest.raises(ValueError, match="two runs with seed 0"):
        compare_runs([paths[0], duplicate])


# -- reports ---------------------------------------------------------------------------------------------------


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"


def image_sources(html_text: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html_text)


def test_report_for_a_comparison_folder(tmp_path):
    pytest.importorskip("matplotlib")
    from gradmix_kit.report import write_report

    cmp_dir = comparison_folder(
        tmp_path / "cmp",
        {"uniform": [2.0, 2.2], "fair_pike": [1.9, 2.1], "dga": [2.1, 2.0]},
        accuracy=True,
        target=True,
    )
    out = tmp_path / "report"
    html_path = write_report([cmp_dir], out, title="Toy <comparison>")
    assert html_path == out / "report.html"
    text = html_path.read_text()
    assert "Toy &lt;comparison&gt;" in text and "<script" not in text
    for method in ("uniform", "fair_pike", "dga"):
        assert f"<td>{method}</td>" in text
    sources = image_sources(text)
    expected = {"comparison.png", "val_loss.png", "train_val_gap.png"}
    assert expected <= set(sources)
    assert sum(s.startswith("weights_") for s in sources) == 3  # one stacked-area plot per method
    for source in sources:
        assert not Path(source).is_absolute()
        assert_valid_png(out / source)
    assert "avg val accuracy" in text and "target val loss" in text
    assert (out / "comparison.md").read_text().count("| ") > 0
    assert json.loads((out / "comparison_stats.json").read_text())["baseline"] == "uniform"


def test_report_single_minimal_run_and_many_domains(tmp_path):
    pytest.importorskip("matplotlib")
    from gradmix_kit.report import write_report

    # No summary.json, no accuracy/target, and 14 domains (more than the per-domain panel limit).
    domains = [f"cluster{i}" for i in range(14)]
    run = write_run(
        tmp_path / "run",
        method="importance",
        seed=0,
        eval_steps=[0, 50, 100],
        avg_losses=[3.0, 2.8, 2.7],
        domains=domains,
        summary=False,
    )
    html_path = write_report([run], tmp_path / "out")
    text = html_path.read_text()
    assert "importance" in text and "per-domain panels are left out" in text
    for source in image_sources(text):
        assert_valid_png(tmp_path / "out" / source)
    assert "val_loss.png" in image_sources(text)

    # A run that never evaluated: only the weights plot, no error.
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    (quiet / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "weights": {"a": 0.25, "b": 0.75}, "train_loss": {"a": 1.0, "b": None}}) + "\n"
            for s in range(0, 40, 10)
        )
    )
    text = write_report([quiet], tmp_path / "out2").read_text()
    assert image_sources(text) == ["weights_00_quiet.png"]


def test_report_rejects_folder_without_metrics(tmp_path):
    from gradmix_kit.report import write_report

    folder = tmp_path / "not-a-run"
    folder.mkdir()
    with pytest.raises(RunFolderError, match="not-a-run"):
        write_report([folder], tmp_path / "out")


def test_report_without_matplotlib_says_how_to_install(tmp_path):
    # Run in a child interpreter where importing matplotlib fails, so this process is left untouched.
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from gradmix_kit.report import write_report\n"
        "try:\n    write_report([], 'unused')\nexcept ImportError as exc:\n    print(exc)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "gradmix[report]" in output.stdout, output.stderr
