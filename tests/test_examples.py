"""The plain-loop example runs, and a resumed run writes the same weights rows as an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "plain_loop.py"), *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def weights_rows(folder: Path) -> list[tuple[int, dict]]:
    return [(r["step"], r["weights"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.integration
def test_plain_loop_example_with_accumulation_resumes_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run("--steps", "40", "--accumulation", "2", "--out", str(full))
    run("--steps", "30", "--accumulation", "2", "--out", str(part))  # final checkpoint at 30 ...
    run("--steps", "40", "--accumulation", "2", "--out", str(part), "--resume")  # ... continue to 40
    assert weights_rows(part) == weights_rows(full)
    assert [s for s, _ in weights_rows(full)] == [10, 20, 30, 40]


@pytest.mark.integration
def test_plain_loop_twice_on_one_folder_is_refused_unless_resume_or_overwrite(tmp_path):
    """Issue 22 item 2: running the example twice used to append to the first run's metrics (steps 10, 20, 10, 20)."""
    out = tmp_path / "run"
    run("--steps", "20", "--out", str(out))
    before = (out / "metrics.jsonl").read_text()
    again = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "plain_loop.py"), "--steps", "20", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert again.returncode != 0
    assert "holds a started or finished run (metrics.jsonl): pass resume=True" in again.stderr.splitlines()[-1]
    assert (out / "metrics.jsonl").read_text() == before
    run("--steps", "10", "--out", str(out), "--overwrite")
    assert [s for s, _ in weights_rows(out)] == [10]
