"""Crash sweep: SIGKILL `gradmix run` at random points (also inside checkpoint and metrics writes), resume each time,
and check that nothing is lost.

Run: python scripts/crash_sweep.py [--kills 100] [--config configs/smoke.toml] [--steps 40] [--seed 0]

A reference run goes uninterrupted. The swept run is started with ``--resume`` again and again and killed after a
random delay (spread over start-up, training steps, evaluations and the writes of a checkpoint every step), until
``--kills`` kills have landed; then it runs to the end. Checks, after every kill and at the end:
- the checkpoint, if any, loads and verifies (never half-written); a kill inside a write may leave that write's temp
  file, which the next save removes: a finished run's folder holds no temp files;
- every resume succeeds (exit code 0 for the final one; a killed one has -9);
- the finished run's metrics (every record's step, weights, train loss and validation losses) equal the reference's,
  with no step missing or logged twice.
Exit code 0 when all hold; prints a summary line per kill with --verbose.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPARED = ("step", "weights", "requested_weights", "train_loss", "val_loss", "target_val_loss")


def gradmix_cmd(config: str, out: Path, steps: int, resume: bool) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "gradmix_kit.cli",
        "run",
        config,
        "--out",
        str(out),
        "--no-progress",
        "--set",
        f"steps={steps}",
        "--set",
        "train.checkpoint_every=1",
        "--set",
        "train.eval_every=5",
        "--set",
        "mixing.log_every=1",
        "--set",
        "threads=1",  # compared bit for bit: "auto" may pick another count for a run killed before a checkpoint
    ]  # a checkpoint and a metrics append on every step: kills land in writes
    return cmd + (["--resume"] if resume else [])


def comparable(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        rows.append({k: record[k] for k in COMPARED if k in record})
    return rows


def check_folder(out: Path, *, finished: bool) -> None:
    """The checkpoint, if any, is complete. A kill inside a write can leave that write's temp file (a killed process
    cannot clean up); the next save removes it, so temp files are an error only once a run has finished."""
    leftovers = sorted({p.name for p in out.glob("*.tmp")} | {p.name for p in out.glob(".*.tmp")})
    if finished and leftovers:
        raise AssertionError(f"temp files left in {out}: {leftovers}")
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        from gradmix.checkpoint import load_checkpoint_file

        load_checkpoint_file(ckpt)  # raises ValueError on a partial or corrupt file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--config", default="configs/smoke.toml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-delay",
        type=float,
        default=None,
        help="longest wait before a kill, s (default: the reference run's wall time)",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="gradmix-crash-"))
    try:
        reference = work / "reference"
        started = time.perf_counter()
        subprocess.run(
            gradmix_cmd(args.config, reference, args.steps, False),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        ref_seconds = time.perf_counter() - started
        max_delay = args.max_delay or ref_seconds
        expected = comparable(reference / "metrics.jsonl")
        swept = work / "swept"
        kills = attempts = 0
        while kills < args.kills:
            attempts += 1
            proc = subprocess.Popen(
                gradmix_cmd(args.config, swept, args.steps, True),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            delay = rng.uniform(0.3 * max_delay, max_delay)  # start-up (imports) takes ~a third of a run
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if proc.returncode not in (0, -signal.SIGKILL):
                raise AssertionError(f"resume #{attempts} failed with exit code {proc.returncode}:\n{err[-2000:]}")
            check_folder(swept, finished=proc.returncode == 0)
            if args.verbose:
                done = (
                    len((swept / "metrics.jsonl").read_text().splitlines()) if (swept / "metrics.jsonl").exists() else 0
                )
                print(f"attempt {attempts}: delay {delay:5.2f} s, exit {proc.returncode}, {done} records", flush=True)
            if proc.returncode == 0:  # it finished before the kill: start the run over to keep killing
                shutil.rmtree(swept)
        final = subprocess.run(gradmix_cmd(args.config, swept, args.steps, True), capture_output=True, text=True)
        if final.returncode != 0:
            raise AssertionError(f"final resume failed:\n{final.stderr[-2000:]}")
        check_folder(swept, finished=True)
        got = comparable(swept / "metrics.jsonl")
        if got != expected:
            steps_got, steps_want = [r["step"] for r in got], [r["step"] for r in expected]
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise AssertionError(
                f"resumed metrics differ from the reference at record {first}: steps "
                f"{steps_got[: first + 3]} vs {steps_want[: first + 3]}"
            )
        print(
            f"crash sweep: {kills} SIGKILLs over {attempts} attempts (reference run {ref_seconds:.1f} s): every "
            f"resume succeeded, no temp or partial files, {len(got)} metrics records identical to the reference"
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
