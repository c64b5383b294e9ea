"""SIGTERM / SIGINT during `gradmix run` (issue 22, item 5): a real process, a real signal.

Before: SIGTERM killed the run at once (exit 143, nothing saved since the last periodic checkpoint, and by default
there was none, so `--resume` restarted at step 0); SIGINT printed a KeyboardInterrupt traceback. Now the step in
flight finishes, the checkpoint is written at that step boundary, and the process exits with one line and the
shell's code for the signal (128 + signum); `--resume` continues from that step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradmix.checkpoint import load_checkpoint_file
from gradmix_kit.experiment.config import DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"
RUN = [sys.executable, "-m", "gradmix_kit.cli", "run", str(SMOKE), "--no-progress", "--method", "uniform"]


def _start(out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    err = out.with_suffix(".err")
    with err.open("w") as fh:
        proc = subprocess.Popen(
            [*RUN, "--out", str(out), *extra],
            stdout=subprocess.DEVNULL,
            stderr=fh,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return proc, err


def _steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")]


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}")
        if any(s >= step for s in _steps(metrics)):
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no metrics row for step {step} within {timeout}s")


def _checkpoint_step(path: Path) -> int:
    return int(load_checkpoint_file(path)["gradmix"]["core"]["step"])


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_at_the_step_boundary_and_exits_with_one_line(tmp_path, signum):
    out = tmp_path / "run"
    proc, err = _start(out, "--set", "steps=100000", "--set", "train.checkpoint_every=0")
    _wait_for_step(proc, out / "metrics.jsonl", 5)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 128 + signum  # 143 for SIGTERM, 130 for SIGINT: what a shell reports
    text = err.read_text()
    assert "Traceback" not in text, text
    last = text.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"gradmix: interrupted by {name} at step "), last
    assert f"checkpoint saved to {out / 'checkpoint.pt'}" in last and "--resume" in last
    step = int(last.split(" at step ")[1].split()[0])
    assert step >= 5 and _checkpoint_step(out / "checkpoint.pt") == step  # checkpoint_every=0: only the signal's
    assert not list(out.glob(".*.tmp"))  # no half-written file left

    # --resume continues from that step (a few more steps, to keep the test short) and finishes the run
    done = subprocess.run(
        [*RUN, "--out", str(out), "--resume", "--set", f"steps={step + 3}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == step + 3
    steps = _steps(out / "metrics.jsonl")
    assert steps == sorted(set(steps)) and steps[0] == 0  # nothing trained twice, nothing logged twice


@pytest.mark.integration
def test_the_default_checkpoint_every_saves_work_a_sigkill_would_lose(tmp_path):
    """SIGKILL cannot be caught: what survives is the periodic checkpoint, which the default now writes."""
    every = DEFAULTS["train"]["checkpoint_every"]
    assert every == 50
    out = tmp_path / "run"
    proc, _ = _start(out, "--set", "steps=100000")
    _wait_for_step(proc, out / "metrics.jsonl", every + 5)
    proc.kill()
    proc.wait(timeout=60)
    assert _checkpoint_step(out / "checkpoint.pt") >= every  # a --resume starts there, not at step 0


def test_interrupted_before_training_says_nothing_was_saved():
    """The handler outside training: one message, no checkpoint claimed (the exception the CLI prints)."""
    from gradmix_kit.signals import RunInterrupted, StopSignals

    with StopSignals() as stop, pytest.raises(RunInterrupted) as caught:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs at the next bytecode boundary
    assert caught.value.exit_code == 143 and caught.value.checkpoint is None
    assert str(caught.value) == "interrupted by SIGTERM before training started; nothing to save"
    assert stop.received is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back
