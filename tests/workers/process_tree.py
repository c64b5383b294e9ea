"""Test helpers for multi-process runs: start a launcher, wait for a metrics row, SIGKILL it and all its descendants.

torchrun puts its workers in sessions of their own, so killing the launcher's process group is not enough: the tree
is walked through /proc (Linux) and every process in it is killed by its id.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process it started (children first collected, then all killed)."""
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def last_step(metrics: Path) -> int:
    """The step of the last complete line of a metrics.jsonl (0 if none)."""
    try:
        text = metrics.read_text()
    except FileNotFoundError:
        return 0
    lines = [line for line in text.split("\n")[:-1] if line.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def run_until_step_then_kill(cmd: list[str], metrics: Path, step: int, env: dict, timeout: float = 240) -> int:
    """Start ``cmd``; once ``metrics`` has a row for ``step`` (or later), SIGKILL the whole tree. Returns the last
    step logged before the kill."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while last_step(metrics) < step:
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before logging step {step}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no metrics row for step {step} within {timeout} s")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    return last_step(metrics)
