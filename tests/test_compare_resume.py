"""`gradmix compare --resume` and `gradmix report` on killed runs (issue 22, item 6), as real processes.

Before: a comparison killed during its second run and started again retrained every run; `gradmix report` refused a
run folder whose last metrics line a kill had left half-written, although the library's reader skips it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"
CLI = [sys.executable, "-m", "gradmix_kit.cli"]


def _rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.integration
def test_compare_resume_keeps_finished_runs_and_continues_the_cut_one(tmp_path):
    out = tmp_path / "cmp"
    args = [
        *CLI,
        "compare",
        str(SMOKE),
        "--methods",
        "uniform,round_robin",
        "--seeds",
        "0",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "steps=150",
        "--set",
        "train.checkpoint_every=0",
    ]
    err = tmp_path / "first.err"
    with err.open("w") as fh:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=fh, cwd=ROOT)
    second = out / "round_robin-seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (second.exists() and len(_rows(second)) >= 3):  # steps 0, 5, 10 of the second run
        assert proc.poll() is None, err.read_text()
        assert time.monotonic() < deadline, "the second run did not start in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, err.read_text()
    assert "interrupted by SIGTERM at step" in err.read_text()
    first = out / "uniform-seed0"
    finished = {name: (first / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "checkpoint.pt")}
    cut_rows = _rows(second)  # timing fields (update_seconds) differ in every run: equal rows = not retrained
    assert not (out / "round_robin-seed0" / "summary.json").exists()

    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    kept = [line for line in done.stdout.splitlines() if "(finished earlier, kept)" in line]
    assert len(kept) == 1 and kept[0].startswith("uniform-seed0"), done.stdout
    for name, content in finished.items():  # the finished run is untouched, byte for byte
        assert (first / name).read_bytes() == content, name
    rows = _rows(second)
    assert rows[: len(cut_rows)] == cut_rows  # the cut run continued from its checkpoint
    steps = [json.loads(r)["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 150
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["runs"] == ["uniform-seed0", "round_robin-seed0"]
    assert (out / "report.html").is_file()


@pytest.mark.integration
def test_report_reads_a_killed_run_with_a_half_written_last_line(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(
        [*CLI, "run", str(SMOKE), "--out", str(run), "--no-progress", "--method", "uniform", "--set", "steps=10"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (run / "summary.json").unlink()  # killed before its summary ...
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 11, "weights": {"co')  # ... during an append
    report = subprocess.run(
        [*CLI, "report", str(run), "--out", str(tmp_path / "rep")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "rep" / "report.html").is_file()


def test_the_report_reader_skips_only_a_half_written_last_line(tmp_path):
    """The rule of ``gradmix.writers.JsonlWriter.read``: an unfinished last line is skipped, a bad complete line is
    an error naming the file and line."""
    from gradmix.writers import JsonlWriter
    from gradmix_kit.analysis import RunFolderError, load_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 0, "weights": {"a": 1.0}}\n{"step": 5, "weights": {"a": 1.0}}\n{"step": 10, "wei'
    )
    assert [r["step"] for r in load_run(run).metrics] == [r["step"] for r in JsonlWriter(run / "metrics.jsonl").read()]
    assert [r["step"] for r in load_run(run).metrics] == [0, 5]
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 5, "wei\n{"step": 10}\n')
    with pytest.raises(RunFolderError, match="line 2 is not valid JSON"):
        load_run(run)
