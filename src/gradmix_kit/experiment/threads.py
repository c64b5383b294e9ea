"""How many torch threads a run uses: the config's ``threads`` (``"auto"`` by default, a count, or 0).

``"auto"`` takes the physical cores this process may use and subtracts the ones other processes keep busy, at
least 1: busy = the larger of the 1-minute load average and the processes running right now (``/proc/loadavg``,
the least of three looks 50 ms apart, without this one), so a run started beside another one a second ago sees it
too. Measured on 2 busy cores (BENCHMARKS.md, "Threads under load"): with one CPU-bound process beside it, the
smoke run took 2-3x the wall time and 3x the CPU time with 2 threads as with 1 (torch's OpenMP threads wait for a
core that is not free), and 200 steps of the main job's model 7x the wall time.

The count changes the numbers (torch's parallel reductions sum in another order): the last digits at first, the
5th significant digit after 200 training steps, and an adaptive mix can amplify that into another batch sequence;
runs of one count are bit-identical. So the count in use is recorded (``config.json`` / ``summary.json``
``threads``, the corpus record's ``torch_threads``), every run of a ``gradmix compare`` uses the one count chosen at
its start, and a resumed run keeps the count it started with.
Set a number to reproduce a recorded table exactly (the benchmark configs do), or pin what ``"auto"`` means for a
shell or a CI job with the environment variable ``GRADMIX_THREADS`` (a positive count; the tests set 1).

psutil, when installed, tells physical from logical cores; without it every logical core counts (``os.cpu_count``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["THREADS_ENV", "ThreadChoice", "busy_cores", "choose_threads", "physical_cores"]

THREADS_ENV = "GRADMIX_THREADS"  # a positive count: what "auto" means here (explicit counts in a config still win)


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count a run uses and how it was chosen (``note``, for the run's record)."""

    requested: Any  # the config's value: "auto", a count, or 0 (torch's default)
    threads: int  # the count in use (torch.get_num_threads() after ``apply``)
    note: str

    def apply(self) -> None:
        """Set torch's intra-op thread count (nothing for 0: torch's default)."""
        import torch

        if self.threads > 0 and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)


def _allowed_cpus() -> int:
    """Logical CPUs this process may run on (affinity mask, cgroup v2 quota), else ``os.cpu_count()``."""
    count = os.cpu_count() or 1
    with contextlib.suppress(AttributeError, OSError):  # no affinity on this platform
        count = len(os.sched_getaffinity(0)) or count
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def physical_cores() -> int:
    """Physical cores this process may use: psutil's physical count when psutil is installed (an optional
    dependency), else the logical count; never more than the CPUs the process is allowed (affinity, cgroup)."""
    allowed = _allowed_cpus()
    physical: int | None = None
    try:
        import psutil  # optional: not a dependency of gradmix

        physical = psutil.cpu_count(logical=False)
    except Exception:  # not installed, or it cannot tell on this platform
        physical = None
    return max(1, min(allowed, physical or allowed))


def _running_now() -> int | None:
    """Processes (threads) running or ready to run right now, without this one: the 4th field of /proc/loadavg
    ("running/total"), least of three looks 50 ms apart (a short burst of another process is not a load)."""
    seen = []
    for attempt in range(3):
        try:
            with open("/proc/loadavg", encoding="ascii") as fh:
                seen.append(int(fh.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return None
        if attempt < 2:
            time.sleep(0.05)
    return max(0, min(seen))


def busy_cores() -> tuple[float, str]:
    """How many cores other processes keep busy, and what that was read from."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        load = 0.0
    now = _running_now()
    busy = max(load, float(now or 0))
    seen = f"load average {load:.2f}" + ("" if now is None else f", {now} running now")
    return busy, seen


def choose_threads(requested: Any, *, previous: int | None = None) -> ThreadChoice:
    """The thread count for ``requested`` (the config's ``threads``): a positive count as it is, 0 for torch's
    default, ``"auto"`` for the physical cores not already busy (at least 1). ``previous``: the count a run being
    resumed started with; ``"auto"`` keeps it, so a resumed run continues with the numbers it started with.
    ``GRADMIX_THREADS`` (a positive count), when set, is what ``"auto"`` means."""
    if isinstance(requested, bool) or not (requested == "auto" or (isinstance(requested, int) and requested >= 0)):
        raise ValueError(f'threads must be "auto" or an integer >= 0, got {requested!r}')
    if requested == "auto":
        if previous is not None and previous > 0:
            return ThreadChoice(requested, int(previous), f"auto: {previous}, kept from the run being resumed")
        pinned = os.environ.get(THREADS_ENV, "").strip()
        if pinned:
            if not pinned.isdigit() or int(pinned) < 1:
                raise ValueError(f"{THREADS_ENV}={pinned!r}: expected a positive number of threads")
            return ThreadChoice(requested, int(pinned), f"auto: {int(pinned)}, from {THREADS_ENV}")
        cores = physical_cores()
        busy, seen = busy_cores()
        threads = max(1, min(cores, math.floor(cores - busy + 0.5)))
        note = f"auto: {threads} of {cores} physical core(s) ({seen})"
        return ThreadChoice(requested, threads, note)
    if requested == 0:
        import torch

        return ThreadChoice(requested, torch.get_num_threads(), "torch's default (threads = 0)")
    return ThreadChoice(requested, int(requested), f"{requested}, set in the config")
