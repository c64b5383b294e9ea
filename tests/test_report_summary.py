"""The report decides: the summary at the top of ``comparison.md`` / ``report.html`` (best method per headline metric,
its paired difference to uniform with the 95% interval, "no difference beyond noise", a recommendation), honest
comparison plots, the run's configuration and warnings, the negative-gap note, and ``gradmix report --label``.

Run folders are written by hand (``write_run`` / ``comparison_folder`` of tests/test_report.py) with finals chosen
so that the answer is known; the expected intervals are computed here from scipy.stats.t directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from gradmix_kit.analysis import NO_DIFFERENCE, compare_runs, decide, load_runs, summary_lines
from gradmix_kit.cli import main
from test_report import comparison_folder, linear_losses, write_run

UNIFORM = [2.00, 2.10, 1.95, 2.05, 2.02]
# 10% lower on every seed (+/- a little): clearly better than uniform over 5 seeds.
GOOD = [u * f for u, f in zip(UNIFORM, [0.90, 0.91, 0.895, 0.905, 0.90])]
# A hair lower on average, but the paired differences straddle 0: within noise.
NOISY = [u + d for u, d in zip(UNIFORM, [0.012, -0.020, 0.009, -0.015, 0.004])]


def hand_interval(method: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the paired relative differences (m - b) / |b|, Student t 95% over the seeds."""
    diffs = np.array([(m - b) / abs(b) for m, b in zip(method, baseline)])
    half = stats.t.ppf(0.975, diffs.size - 1) * diffs.std(ddof=1) / math.sqrt(diffs.size)
    mean = float(diffs.mean())
    return mean, mean - half, mean + half


def by_metric(decisions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metric"]: d for d in decisions}


def test_summary_picks_the_clearly_better_method_with_the_hand_computed_interval(tmp_path):
    pytest.importorskip("matplotlib")
    from gradmix_kit.report import write_report

    folder = comparison_folder(tmp_path / "cmp", {"uniform": UNIFORM, "good": GOOD, "noisy": NOISY}, target=True)
    result = compare_runs(load_runs([folder]))
    decisions = by_metric(decide(result))
    assert list(decisions) == ["avg_val_loss", "worst_val_loss", "target_val_loss"]

    mean, low, high = hand_interval(GOOD, UNIFORM)
    assert high < 0  # the fixture: beyond noise
    avg = decisions["avg_val_loss"]
    assert (avg["best"], avg["verdict"], avg["baseline"]) == ("good", "better", "uniform")
    assert avg["delta"]["mean"] == pytest.approx(mean, rel=1e-12)
    assert avg["delta"]["low"] == pytest.approx(low, rel=1e-12)
    assert avg["delta"]["high"] == pytest.approx(high, rel=1e-12)
    delta_text = f"{mean * 100:+.2f}% ± {(high - mean) * 100:.2f}%"
    assert avg["recommendation"] == f"Pick good for avg val loss ({delta_text})."

    # worst = final + spread (0.1): its own hand interval
    worst_mean, _, worst_high = hand_interval([g + 0.1 for g in GOOD], [u + 0.1 for u in UNIFORM])
    worst = decisions["worst_val_loss"]
    assert worst["best"] == "good" and worst["delta"]["mean"] == pytest.approx(worst_mean, rel=1e-12)
    assert worst["delta"]["high"] == pytest.approx(worst_high, rel=1e-12)

    # the target loss names the target set (config.json "target": "en") wherever it appears
    target = decisions["target_val_loss"]
    assert target["label"] == "target val loss (target: en)" and target["best"] == "good"

    out = tmp_path / "report"
    html_path = write_report([folder], out)
    markdown = (out / "comparison.md").read_text()
    first = markdown.splitlines()[0]
    assert first == "## Summary: which method to pick"  # the decision comes first
    bounds = f"(95% CI {low * 100:+.2f}% to {high * 100:+.2f}%)"
    assert (
        f"- **avg val loss** (lower is better): best good, Δ vs uniform {delta_text} {bounds}: beyond noise."
        in markdown
    )
    assert f"**Recommendation:** Pick good for avg val loss ({delta_text})." in markdown
    assert markdown.index("## Summary") < markdown.index("## Comparison") < markdown.index("## Run configuration")
    assert "Δ target val loss (target: en) vs uniform" in markdown  # the table names the target too
    page = html_path.read_text()
    assert page.index("Summary: which method to pick") < page.index("<h2>Comparison</h2>")
    assert f"Pick good for avg val loss ({delta_text})" in page
    assert "target: en" in page
    stats_json = json.loads((out / "comparison_stats.json").read_text())
    assert stats_json["target"] == "en"
    assert stats_json["decision"][0]["best"] == "good"


def test_a_method_within_noise_is_no_difference_beyond_noise(tmp_path):
    folder = comparison_folder(tmp_path / "cmp", {"uniform": UNIFORM, "noisy": NOISY})
    result = compare_runs(load_runs([folder]))
    decisions = by_metric(decide(result))
    mean, low, high = hand_interval(NOISY, UNIFORM)
    assert mean < 0 < high and low < 0  # the fixture: lower on average, the interval includes 0
    avg = decisions["avg_val_loss"]
    assert (avg["best"], avg["verdict"]) == ("noisy", "noise")
    assert (avg["delta"]["mean"], avg["delta"]["low"], avg["delta"]["high"]) == (
        pytest.approx(mean, rel=1e-12),
        pytest.approx(low, rel=1e-12),
        pytest.approx(high, rel=1e-12),
    )
    assert avg["recommendation"] == "No method beats uniform beyond noise on avg val loss."
    lines = summary_lines(result)
    delta_text = f"{mean * 100:+.2f}% ± {(high - mean) * 100:.2f}%"
    bounds = f"(95% CI {low * 100:+.2f}% to {high * 100:+.2f}%)"
    assert (
        f"- **avg val loss** (lower is better): best noisy, Δ vs uniform {delta_text} {bounds}: {NO_DIFFERENCE}."
        in lines
    )
    assert NO_DIFFERENCE == "no difference beyond noise"


def test_the_baseline_wins_when_nothing_is_lower_and_worse_methods_are_named(tmp_path):
    worse = [u * 1.05 for u in UNIFORM]
    folder = comparison_folder(tmp_path / "cmp", {"uniform": UNIFORM, "same": list(UNIFORM), "worse": worse})
    result = compare_runs(load_runs([folder]))
    avg = by_metric(decide(result))["avg_val_loss"]
    assert (avg["best"], avg["verdict"], avg["closest"], avg["closest_verdict"]) == (
        "uniform",
        "baseline",
        "same",
        "identical",
    )
    assert avg["worse"] and avg["worse"][0][0] == "worse"
    text = "\n".join(summary_lines(result))
    assert "best uniform (the baseline)" in text and NO_DIFFERENCE in text
    assert "Worse than uniform beyond noise: worse on avg val loss (+5.00% ± 0.00%)" in text
    assert "No method beats uniform beyond noise on avg val loss." in text


def test_one_seed_and_no_baseline_are_said_not_judged(tmp_path):
    folder = comparison_folder(tmp_path / "cmp", {"uniform": [2.0], "pike": [1.9]})
    avg = by_metric(decide(compare_runs(load_runs([folder]))))["avg_val_loss"]
    assert avg["best"] == "pike" and avg["verdict"] == "no interval"
    assert avg["recommendation"] == "No method beats uniform beyond noise on avg val loss."
    solo = comparison_folder(tmp_path / "solo", {"pike": [1.9, 2.0], "odm": [2.0, 2.1]})
    result = compare_runs(load_runs([solo]))
    avg = by_metric(decide(result))["avg_val_loss"]
    assert (avg["best"], avg["verdict"]) == ("pike", "no baseline")
    assert "not among the runs" in "\n".join(summary_lines(result))


def test_comparison_plot_shows_deltas_around_a_line_at_zero(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import gradmix_kit.report as report

    saved: dict[str, Any] = {}
    original = report._save

    def keep(figure, path):
        saved[Path(path).name] = figure
        return original(figure, path)

    monkeypatch.setattr(report, "_save", keep)
    # far from zero and close together: the old chart zoomed in on these and made 1% look like 5x
    finals = {"uniform": [5.00, 5.02, 4.98], "pike": [5.05, 5.06, 5.04]}
    report.write_report([comparison_folder(tmp_path / "cmp", finals)], tmp_path / "out")
    figure = saved["comparison.png"]
    assert figure.axes
    for axes in figure.axes:
        low, high = axes.get_ylim()
        assert low < 0.0 < high  # 0 (the baseline) is always in view
        assert any(list(line.get_ydata()) == [0, 0] for line in axes.get_lines())  # the line at 0
        assert "%" in axes.get_ylabel()

    # without a baseline: the values themselves, as bars from 0
    saved.clear()
    solo = comparison_folder(tmp_path / "solo", {"pike": [5.05, 5.06], "odm": [5.0, 5.1]})
    report.write_report([solo], tmp_path / "out2")
    for axes in saved["comparison.png"].axes:
        assert axes.get_ylim()[0] == 0.0


def test_configuration_warnings_and_negative_gap_note(tmp_path):
    pytest.importorskip("matplotlib")
    from gradmix_kit.report import write_report

    folder = comparison_folder(tmp_path / "cmp", {"uniform": [2.0, 2.1], "dga": [2.2, 2.3]}, target=True)
    run = folder / "dga-seed1"
    config = json.loads((run / "config.json").read_text())
    config.update(
        threads=2,
        device="cpu",
        model={"d_model": 96, "n_layers": 2, "n_heads": 4, "dropout": 0.0},
        model_parameters=426624,
        train={"batch_size": 8, "eval_every": 100},
    )
    (run / "config.json").write_text(json.dumps(config))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[2])
    record["events"] = ["domain 'fr' has a non-finite training loss (said once)"]
    record["alerts"] = [{"kind": "collapse", "step": record["step"], "domain": "en", "message": "weight 0.9 > 0.8"}]
    lines[2] = json.dumps(record)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = json.loads((run / "summary.json").read_text())
    summary["stopped_early"] = "step 700: every domain used its max_repeats passes"
    (run / "summary.json").write_text(json.dumps(summary))
    listing = json.loads((folder / "comparison.json").read_text())
    listing["corpus_warnings"] = ["torch: 2.14.0, recorded 2.13.0 (float rounding may differ)"]
    (folder / "comparison.json").write_text(json.dumps(listing))

    out = tmp_path / "report"
    page = write_report([folder], out).read_text()
    markdown = (out / "comparison.md").read_text()
    for text in (markdown, page):
        assert "non-finite training loss (said once)" in text
        assert "every domain used its max_repeats passes" in text
        assert "torch: 2.14.0, recorded 2.13.0" in text
        assert "1 collapse" in text
        assert "426,624 (0.43M)" in text  # model parameters
        assert "d_model=96" in text and "2 thread(s), device cpu" in text
        assert "uniform: seeds 0, 1; dga: seeds 0, 1" in text
        assert "synthetic" in text  # the corpus
    # write_run's training loss (~2.5 at the end) is above the final validation losses (2.0-2.3): negative gaps
    assert "Some gaps are negative" in markdown and "before its update" in markdown
    assert "Dropout is 0 in these runs" in markdown
    assert "Some gaps are negative" in page


def test_report_label_tells_apart_runs_of_the_same_method_and_seed(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    eval_steps, losses = linear_losses(2.0)
    first = write_run(
        tmp_path / "a" / "uniform-seed0", method="uniform", seed=0, eval_steps=eval_steps, avg_losses=losses
    )
    eval_steps, losses = linear_losses(1.9)
    second = write_run(
        tmp_path / "b" / "uniform-seed0", method="uniform", seed=0, eval_steps=eval_steps, avg_losses=losses
    )

    out = tmp_path / "rep"
    assert main(["report", str(first), str(second), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "--label" in error and "pass label=" not in error  # the hint names the flag

    assert main(["report", str(first), str(second), "--label", "old,new", "--out", str(out)]) == 0
    stats_json = json.loads((out / "comparison_stats.json").read_text())
    assert list(stats_json["methods"]) == ["old", "new"]
    assert "| old | 1 |" in (out / "comparison.md").read_text()

    # repeated flags, and --baseline naming a label: the paired difference of new vs old
    out3 = tmp_path / "rep3"
    args = ["report", str(first), str(second), "--labels", "old", "--label", "new", "--baseline", "old"]
    assert main([*args, "--out", str(out3)]) == 0
    stats_json = json.loads((out3 / "comparison_stats.json").read_text())
    assert stats_json["baseline"] == "old"
    assert stats_json["methods"]["new"]["relative"]["avg_val_loss"]["mean"] == pytest.approx((1.9 - 2.0) / 2.0)

    # comparison folders: their runs become NAME:method
    left = comparison_folder(tmp_path / "left", {"uniform": [2.0, 2.1]})
    right = comparison_folder(tmp_path / "right", {"uniform": [1.9, 2.0]})
    out4 = tmp_path / "rep4"
    args = ["report", str(left), str(right), "--label", "v1,v2", "--baseline", "v1:uniform", "--out", str(out4)]
    assert main(args) == 0
    assert set(json.loads((out4 / "comparison_stats.json").read_text())["methods"]) == {"v1:uniform", "v2:uniform"}

    # one name per folder, or a clear error
    capsys.readouterr()
    assert main(["report", str(first), str(second), "--label", "only-one", "--out", str(out)]) == 2
    assert "2 folder(s)" in capsys.readouterr().err


def test_compare_prints_the_summary_at_the_end(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import gradmix_kit.experiment.runner as runner
    from gradmix_kit.report import write_report

    def fake_comparison(cfg, methods, seeds, out_dir, **kwargs):
        folder = comparison_folder(Path(out_dir), {"uniform": UNIFORM, "good": GOOD})
        return write_report([folder], out_dir)

    monkeypatch.setattr(runner, "run_comparison", fake_comparison)
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
    out = tmp_path / "cmp"
    assert main(["compare", str(smoke), "--methods", "uniform,good", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "## Summary: which method to pick" in printed
    mean, _, high = hand_interval(GOOD, UNIFORM)
    recommendation = f"Recommendation: Pick good for avg val loss ({mean * 100:+.2f}% ± {(high - mean) * 100:.2f}%)."
    assert recommendation in printed
    assert printed.rstrip().splitlines()[-2].startswith("Recommendation: Pick good")
    assert printed.rstrip().splitlines()[-1].startswith("report: ")
