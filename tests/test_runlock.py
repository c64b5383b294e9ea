"""One owner per run folder and one rule for a used one (gradmix.runlock, ``Mixer(run_dir=...)``), with real
processes: a second process is refused while the owner lives, a dead owner's lock is taken over with a message, and
a folder holding a run needs ``resume`` or ``overwrite`` (issue 22, items 1 and 2)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import make_toy_domains
from gradmix import Mixer
from gradmix.runlock import LOCK_NAME, RunDirError, RunLock, StaleLockWarning, check_run_dir

TESTS = Path(__file__).resolve().parent

HOLDER = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import make_toy_domains
from gradmix import Mixer

mixer = Mixer(make_toy_domains(), "uniform", 6, run_dir=sys.argv[1], log_every=1)
for batch in mixer.batches(2):
    mixer.observe(batch["domain"], batch["domain"].float())
    mixer.step()
print("locked", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def holder(run_dir: Path) -> Iterator[subprocess.Popen]:
    """Another process training a Mixer on ``run_dir`` (2 steps logged), alive until the block ends or it is
    killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(tests=str(TESTS)), str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "locked", proc.stderr.read() if proc.stderr else line
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


def _wait_until_zombie(pid: int, timeout: float = 30.0) -> None:
    """Wait (without reaping it) until the killed process ``pid`` is a zombie, state Z in /proc/PID/stat."""
    deadline = time.monotonic() + timeout
    stat = Path(f"/proc/{pid}/stat")
    while time.monotonic() < deadline:
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not die within {timeout} s")


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(mixer: Mixer, steps: int) -> None:
    for batch in mixer.batches(steps):
        mixer.observe(batch["domain"], batch["domain"].float())
        mixer.step()


def test_a_second_process_is_refused_while_the_owner_lives_then_takes_over_its_stale_lock(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with holder(run_dir) as proc:
        owner = json.loads((run_dir / LOCK_NAME).read_text())
        assert owner["pid"] == proc.pid and owner["host"] == socket.gethostname()
        pattern = rf"run folder '{run_dir}' is in use by pid {proc.pid} on host '{socket.gethostname()}'"
        with pytest.raises(RunDirError, match=pattern):
            Mixer(make_toy_domains(), "uniform", 6, run_dir=run_dir, resume=True)
        with pytest.raises(RunDirError, match=pattern):
            Mixer(make_toy_domains(), "uniform", 6, run_dir=run_dir, overwrite=True)  # not even with overwrite
        assert _steps(run_dir) == [1, 2]  # the refused owners changed nothing
        proc.kill()  # killed and not yet reaped (a zombie): it writes nothing any more
        _wait_until_zombie(proc.pid)  # SIGKILL takes effect asynchronously: until then the owner is alive
        with pytest.warns(StaleLockWarning, match=rf"took over the lock of pid {proc.pid} .* no longer runs"):
            mixer = Mixer(make_toy_domains(), "uniform", 6, run_dir=run_dir, resume=True, log_every=1)
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    _train(mixer, 1)  # resume=True without a checkpoint: the run starts over, the dead run's rows go
    assert _steps(run_dir) == [1]
    mixer.close()
    assert not (run_dir / LOCK_NAME).exists()


def test_a_used_folder_needs_resume_or_overwrite(tmp_path: Path) -> None:
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt.pt"
    mixer = Mixer(make_toy_domains(), "uniform", 6, run_dir=run_dir, log_every=1)
    _train(mixer, 2)
    mixer.save_checkpoint(ckpt)
    _train(mixer, 1)
    mixer.close()
    before = (run_dir / "metrics.jsonl").read_bytes()

    # a second plain run on the folder used to append to the old file (steps 1, 2, 3, 1, 2, ...)
    with pytest.raises(
        RunDirError,
        match=r"holds a started or finished run \(metrics.jsonl\): pass resume=True to "
        r"continue it or overwrite=True to replace it",
    ):
        Mixer(make_toy_domains(), "uniform", 6, run_dir=run_dir)
    with pytest.raises(RunDirError, match="exclude each other"):
        Mixer(make_toy_domains(), "uniform", 6, run_dir=run_dir, resume=True, overwrite=True)
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert not (run_dir / LOCK_NAME).exists()  # a refused Mixer does not keep the lock

    resumed = Mixer(make_toy_domains(), "uniform", 6, run_dir=run_dir, resume=True, log_every=1)
    resumed.resume(ckpt)  # records after the checkpoint's step are dropped, then logged again
    _train(resumed, 2)
    resumed.close()
    assert _steps(run_dir) == [1, 2, 3, 4]

    fresh = Mixer(
        make_toy_domains(), "uniform", 6, run_dir=run_dir, overwrite=True, log_every=1, writers=["jsonl", "csv"]
    )
    assert not (run_dir / "metrics.jsonl").exists()  # deleted at construction
    _train(fresh, 2)
    fresh.close()
    assert _steps(run_dir) == [1, 2]
    with pytest.raises(RunDirError, match=r"\(metrics.jsonl, metrics.csv\)"):
        Mixer(make_toy_domains(), "uniform", 6, run_dir=run_dir)


def test_lock_file_rules(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    path = run_dir / LOCK_NAME
    # within one process the newest holder owns the lock; the older one's release leaves it alone
    first = RunLock(run_dir).acquire()
    second = RunLock(run_dir).acquire()
    first.release()
    assert path.exists() and json.loads(path.read_text())["token"] == second.token
    second.release()
    assert not path.exists()
    second.release()  # idempotent

    # a lock held from another host cannot be checked: refused, the message says which file to delete
    path.write_text(json.dumps({"pid": 12345, "host": "elsewhere.example", "token": "t"}))
    with pytest.raises(RunDirError, match=rf"in use by pid 12345 on host 'elsewhere.example'.*delete '{path}'"):
        RunLock(run_dir).acquire()

    # an unreadable lock (a writer killed between create and write) is taken over
    path.write_text("")
    with pytest.warns(StaleLockWarning, match="unreadable lock"):
        lock = RunLock(run_dir).acquire()
    lock.release()

    # a live pid that is another process than the one that wrote the lock (start time differs): the pid was reused
    if Path(f"/proc/{os.getppid()}/stat").exists():
        path.write_text(
            json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "token": "t", "start_ticks": -1})
        )
        with pytest.warns(StaleLockWarning, match=f"pid {os.getppid()}"):
            RunLock(run_dir).acquire().release()

    # a run folder that is a file: one line naming it
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match=f"cannot use run folder '{blocker}'"):
        RunLock(blocker).acquire()


def test_check_run_dir_counts_non_empty_markers_and_overwrite_removes_them(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")  # empty: nothing was logged
    (tmp_path / "tensorboard").mkdir()  # empty folder
    assert check_run_dir(tmp_path) == []
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "x").write_text("1")
    (tmp_path / "keep.txt").write_text("mine")
    markers = ("metrics.jsonl", "checkpoint-*")
    with pytest.raises(RunDirError, match=r"\(checkpoint-10\): pass --resume .* or --overwrite"):
        check_run_dir(tmp_path, markers=markers, flags=("--resume", "--overwrite"))
    assert check_run_dir(tmp_path, resume=True, markers=markers) == ["checkpoint-10"]
    assert (tmp_path / "checkpoint-10").exists()
    check_run_dir(tmp_path, overwrite=True, markers=markers)
    assert not (tmp_path / "checkpoint-10").exists() and (tmp_path / "keep.txt").exists()


def test_gradmix_run_releases_its_lock_when_the_run_fails(tmp_path: Path) -> None:
    """A run that fails after taking the lock (here: a corpus folder that does not exist) leaves no lock behind, so a
    library caller in the same process, or the next process, is not refused."""
    from gradmix_kit.experiment.config import load_config
    from gradmix_kit.experiment.runner import run_experiment

    cfg = load_config(TESTS.parent / "configs" / "smoke.toml")
    cfg["data"]["corpus"] = str(tmp_path / "no-such-corpus")
    run_dir = tmp_path / "run"
    with pytest.raises(Exception, match="no-such-corpus"):
        run_experiment(cfg, run_dir, progress=False)
    assert not (run_dir / LOCK_NAME).exists()
