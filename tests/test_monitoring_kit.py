"""`gradmix run` / `compare` / `report` with the monitoring of issue 12: writers chosen in the config, alerts with
configured thresholds, your own metric from `[eval] metrics`, and the report's KPI, alert and diagnosis sections."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from gradmix_kit.cli import main
from gradmix_kit.experiment.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


@pytest.fixture
def metric_module(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        textwrap.dedent("""
        import torch

        def first_token_accuracy(model, context):
            # a downstream-style metric: how often the model's top guess for token 2 is right, per domain
            out = {}
            for name, windows in context.val_windows.items():
                logits = model(windows[:, :1])
                out[name] = float((logits[:, -1].argmax(-1) == windows[:, 1]).float().mean())
            return out

        def defect_rate(model, context):
            return 1.0 / (1 + context.step)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_metrics"


def _config(tmp_path: Path, module: str, writers: str = '["jsonl", "csv", "tensorboard"]') -> Path:
    text = SMOKE.read_text().replace("steps = 60", "steps = 20")
    text += textwrap.dedent(f"""
        metrics = ["{module}:first_token_accuracy", "{module}:defect_rate"]
        lower_is_better = ["defect_rate"]

        [logging]
        writers = {writers}
        alerts = {{ max_weight = 0.2, max_passes = 1 }}
    """)
    path = tmp_path / "monitor.toml"
    path.write_text(text)
    return path


def test_run_writes_every_chosen_writer_alerts_and_own_metrics(tmp_path, metric_module):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["run", str(_config(tmp_path, metric_module)), "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    alerts = [a for r in records for a in r.get("alerts") or []]
    kinds = {a["kind"] for a in alerts}
    assert "collapse" in kinds  # max_weight 0.2 is below the uniform share of the tiny corpus' domains
    assert all({"kind", "step", "domain", "message"} <= set(a) for a in alerts)
    evals = [r for r in records if "val_loss" in r and r["step"] > 0]
    assert evals and all("train_val_gap" in r for r in evals)
    assert all(set(r["eval_metrics"]) == {"first_token_accuracy", "defect_rate"} for r in evals)
    assert records[0]["step"] == 0 and "eval_metrics" in records[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["alerts"] == len(alerts) and summary["eval_metrics"]["defect_rate"] == pytest.approx(1 / 21)
    assert summary["eval_metrics_lower_is_better"] == ["defect_rate"]
    assert (out / "metrics.csv").is_file() and list((out / "tensorboard").glob("events.out.tfevents.*"))
    page = (out / "report.html").read_text()
    assert "<h2>Warnings and alerts</h2>" in page and "collapse" in page
    assert (out / "eval_metrics.png").is_file() and (out / "kpis.png").is_file()

    # a diagnosis next to the run shows up in its report
    shutil.copy(_fake_diagnosis(tmp_path), out / "diagnosis.json")
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Gradient conflict diagnosis" in page and "Recommendation" in page


def _fake_diagnosis(tmp_path: Path) -> Path:
    import numpy as np

    from gradmix.diagnostics import diagnose

    d = diagnose([np.array([[1.0, -0.5], [-0.5, 1.0]])] * 5, ["a", "b"])
    path = tmp_path / "diagnosis.json"
    path.write_text(json.dumps(d.to_dict()))
    return path


def test_own_metric_is_a_column_of_the_comparison(tmp_path, metric_module):
    out = tmp_path / "cmp"
    config = _config(tmp_path, metric_module, writers='["jsonl"]')
    assert (
        main(
            [
                "compare",
                str(config),
                "--methods",
                "uniform,round_robin",
                "--seeds",
                "0",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    table = (out / "comparison.md").read_text()
    assert "first_token_accuracy" in table and "defect_rate" in table
    stats = json.loads((out / "comparison_stats.json").read_text())
    assert stats["labels"]["eval_metrics/defect_rate"] == ["defect_rate", True]
    assert stats["labels"]["eval_metrics/first_token_accuracy"] == ["first_token_accuracy", False]
    assert stats["methods"]["uniform"]["eval_metrics/defect_rate"]["mean"] == pytest.approx(1 / 21)


def test_logging_and_metric_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"logging.writers"):
        load_config(SMOKE, {"logging": {"writers": ["parquet"]}})
    with pytest.raises(ConfigError, match=r"logging.alerts"):
        load_config(SMOKE, {"logging": {"alerts": {"max_weigth": 0.5}}})
    with pytest.raises(ConfigError, match=r"eval.metrics"):
        load_config(SMOKE, {"eval": {"metrics": ["no_colon"]}})
    cfg = load_config(SMOKE, {"eval": {"metrics": ["not_a_module_xyz:f"]}, "steps": 2})
    from gradmix_kit.experiment.runner import load_eval_metrics

    with pytest.raises(ConfigError, match="cannot import"):
        load_eval_metrics(cfg)
