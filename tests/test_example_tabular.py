"""The non-text example (issue 21 item 4): a digit classifier on four sources of differing quality, PiKE and uniform,
runs end to end, logs the Mixer's weights, reports the realised mix and learns far above chance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["clean", "pixel_noise", "label_noise", "digits_0_4"]


@pytest.mark.integration
def test_multitask_tabular_vision_example_runs_both_arms(tmp_path):
    pytest.importorskip("sklearn")  # the bundled digits data set
    steps, batch_size = 60, 32
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "multitask_tabular_vision.py"),
            *("--steps", str(steps), "--seed", "1", "--diagnose-steps", "20", "--out", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [arm["method"] for arm in summary["arms"]] == ["pike", "uniform"]
    for arm in summary["arms"]:
        rows = [json.loads(line) for line in (tmp_path / arm["method"] / "metrics.jsonl").read_text().splitlines()]
        weights = [row["weights"] for row in rows if "weights" in row]
        # a record every 10 steps (update_every), plus any written on an event (an alert)
        assert set(range(10, steps + 1, 10)) <= {row["step"] for row in rows if "weights" in row}
        assert all(sorted(w) == sorted(SOURCES) and sum(w.values()) == pytest.approx(1.0) for w in weights)
        drawn = arm["examples_drawn"]
        assert list(drawn) == SOURCES and all(n > 0 for n in drawn.values())
        assert sum(drawn.values()) == steps * batch_size
        assert f"[{arm['method']}] clean test accuracy" in done.stdout
        assert f"realised mix (examples drawn, {steps} steps x {batch_size}): {drawn}" in done.stdout
        assert arm["test_accuracy"] > 0.6  # chance is 0.1 (ten balanced classes)
        assert set(arm["held_out_accuracy_per_source"]) == set(SOURCES)
    uniform = summary["arms"][1]["examples_drawn"]
    assert max(uniform.values()) - min(uniform.values()) < 0.1 * steps * batch_size / len(SOURCES)
    assert summary["diagnosis"]["verdict"] in ("low", "moderate", "strong", "not enough evidence")
    assert "gradient conflict diagnosis" in done.stdout
