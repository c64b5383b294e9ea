"""One owner per run folder, and one rule for starting over a folder that already holds a run.

Two processes writing one run folder corrupt it without an error: both append to ``metrics.jsonl`` (steps
0, 5, 5, 10, 10, ... from two seeds) and one ``summary.json`` describes one of them. So every entry point that
writes a run folder (``gradmix run``, ``Mixer(run_dir=...)``, the HF and Lightning integrations) takes a
``RunLock`` on it (rank 0 only) before it writes anything:

- the lock is the file ``<run_dir>/.gradmix.lock`` (JSON: the owner's pid, host, process start time, a token);
- while its owner lives, a second owner is refused with a one-line ``RunDirError`` naming the folder, pid and host;
- a stale lock (its pid is dead on this host, a zombie, or now another process) is taken over with a
  ``StaleLockWarning`` naming the dead owner; a lock held from another host cannot be checked and is refused (the
  message says which file to delete once that run is gone);
- within one process the newest holder owns the lock (a notebook cell run twice, a test that builds a second
  trainer): the older holder's release then leaves the file alone;
- ``release()``, the end of the process or the holder being garbage collected removes the file.

``check_run_dir`` is the one rule for a used folder: a folder holding a started or finished run (any of the given
markers, e.g. a non-empty ``metrics.jsonl``) is refused unless the caller says ``resume`` (keep the records and
continue the run) or ``overwrite`` (delete the run's files and start over).

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_NAME",
    "RUN_MARKERS",
    "RunDirError",
    "RunLock",
    "StaleLockWarning",
    "check_run_dir",
    "used_markers",
]

LOCK_NAME = ".gradmix.lock"
RUN_MARKERS: tuple[str, ...] = ("metrics.jsonl", "metrics.csv", "tensorboard")
"""What a Mixer's writers leave in a run folder: any of them, non-empty, means the folder holds a run."""


class RunDirError(ValueError):
    """A run folder that cannot be used as asked: locked by a live process, or holding a run nobody said to
    resume or overwrite."""


class StaleLockWarning(UserWarning):
    """The lock of a process that no longer runs was taken over."""


def _host() -> str:
    return socket.gethostname()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process from /proc (Linux), or None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int, start_ticks: Any) -> bool:
    """Whether ``pid`` still is the process that wrote the lock. Unsure (no way to probe) counts as alive."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: never probe, assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    except OSError:
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, ticks = stat
    if state == "Z":  # killed, not yet reaped by its parent: it writes nothing any more
        return False
    return not (isinstance(start_ticks, int) and start_ticks != ticks)  # a different start time: the pid was reused


def _owner_text(info: dict[str, Any]) -> str:
    since = f", since {info['since']}" if info.get("since") else ""
    return f"pid {info.get('pid')} on host {info.get('host')!r}{since}"


def _release_file(path: Path, token: str, pid: int) -> None:
    """Remove the lock file if it is still ours (not taken over, not in a forked child)."""
    if os.getpid() != pid:
        return
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(info, dict) and info.get("token") == token:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class RunLock:
    """The lock on one run folder (see the module docstring). ``acquire()`` returns the lock or raises
    ``RunDirError``; ``release()`` is idempotent; also a context manager."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.token: str | None = None
        self.took_over: dict[str, Any] | None = None  # the stale owner this lock replaced, if any
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self.token is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _content(self, token: str) -> str:
        stat = _proc_stat(os.getpid())
        info = {
            "pid": os.getpid(),
            "host": _host(),
            "token": token,
            "start_ticks": None if stat is None else stat[1],
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        }
        return json.dumps(info) + "\n"

    def _create(self, token: str) -> bool:
        """Create the lock file atomically (O_EXCL); False if it exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(self._content(token))
        return True

    def _read(self) -> tuple[str, dict[str, Any] | None] | None:
        """(raw text, parsed owner or None if unreadable) of the lock file, or None if there is none. A file being
        written right now (empty for a few microseconds) is read again for up to a second."""
        text = ""
        for _ in range(20):
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                text = ""
            try:
                info = json.loads(text)
            except ValueError:
                time.sleep(0.05)
                continue
            return text, info if isinstance(info, dict) else None
        return text, None

    def _remove_stale(self, raw: str) -> bool:
        """Remove the stale lock whose text is ``raw``, atomically against a racing process: rename it aside, and
        put it back if what was renamed is not the stale lock (another process's fresh one). True if removed."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = aside.read_text(encoding="utf-8")
        except OSError:
            moved = None
        if moved != raw:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # fails if a third process locked meanwhile: that lock wins
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()
        return moved == raw

    def acquire(self) -> RunLock:
        """Take the lock (creating the folder); ``RunDirError`` if a live process on this host, or any process on
        another host, holds it."""
        if self.held:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot use run folder {str(self.run_dir)!r}: {exc.strerror or exc}") from None
        token = uuid.uuid4().hex
        host = _host()
        for _ in range(10):
            try:
                if self._create(token):
                    break
            except OSError as exc:
                raise RunDirError(f"cannot write the lock {str(self.path)!r}: {exc.strerror or exc}") from None
            found = self._read()
            if found is None:
                continue  # released meanwhile: try again
            raw, info = found
            if info is not None and info.get("host") == host and info.get("pid") == os.getpid():
                tmp = self.path.with_name(f"{LOCK_NAME}.{token}")  # this process holds it: the newest holder owns it
                tmp.write_text(self._content(token), encoding="utf-8")
                os.replace(tmp, self.path)
                break
            if info is None or (
                info.get("host") == host and not _pid_alive(int(info.get("pid") or 0), info.get("start_ticks"))
            ):
                if self._remove_stale(raw):
                    self.took_over = info or {"pid": None, "host": None}
                    owner = "an unreadable lock" if info is None else f"the lock of {_owner_text(info)}"
                    warnings.warn(
                        f"run folder {str(self.run_dir)!r}: took over {owner}, a process that no longer runs",
                        StaleLockWarning,
                        stacklevel=3,
                    )
                continue
            where = (
                "" if info.get("host") == host else (f" (another host: if that run is gone, delete {str(self.path)!r})")
            )
            raise RunDirError(
                f"run folder {str(self.run_dir)!r} is in use by {_owner_text(info)}{where}: wait for that run to "
                "end or choose another folder"
            )
        else:
            raise RunDirError(f"run folder {str(self.run_dir)!r}: could not take its lock {str(self.path)!r}")
        self.token = token
        self._finalizer = weakref.finalize(self, _release_file, self.path, token, os.getpid())
        return self

    def release(self) -> None:
        """Remove the lock file if this lock still owns it. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()  # runs _release_file once and detaches
            self._finalizer = None
        self.token = None


def _is_used(path: Path) -> bool:
    try:
        if path.is_symlink() or path.is_file():
            return path.is_symlink() or path.stat().st_size > 0
        if path.is_dir():
            return any(path.iterdir())
    except OSError:
        return True  # unreadable: treat as holding something
    return False


def _expand(run_dir: Path, patterns: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            paths.extend(sorted(run_dir.glob(pattern)))
        else:
            paths.append(run_dir / pattern)
    return paths


def used_markers(run_dir: str | os.PathLike[str], markers: Sequence[str] = RUN_MARKERS) -> list[str]:
    """The names among ``markers`` (file or folder names, glob patterns allowed) that show a started or finished
    run in ``run_dir``: non-empty files, non-empty folders, links."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    return [path.name for path in _expand(folder, markers) if _is_used(path)]


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path)


def check_run_dir(
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    markers: Sequence[str] = RUN_MARKERS,
    also_remove: Sequence[str] = (),
    flags: tuple[str, str] = ("resume=True", "overwrite=True"),
) -> list[str]:
    """The one rule for a used run folder. Returns the markers found.

    A folder holding a started or finished run (``used_markers``) is refused with ``RunDirError`` unless ``resume``
    (nothing is removed: the caller continues the run) or ``overwrite`` (the markers and ``also_remove`` are
    deleted: the run starts over). ``flags`` are how the caller spells the two options in the message (the CLI:
    ``("--resume", "--overwrite")``). Take the folder's ``RunLock`` first.
    """
    if resume and overwrite:
        raise RunDirError(f"{flags[0]} and {flags[1]} exclude each other: continue the run or replace it")
    folder = Path(run_dir)
    found = used_markers(folder, markers)
    if not found or resume:
        return found
    if not overwrite:
        shown = ", ".join(found[:6]) + (f", ... ({len(found)} in all)" if len(found) > 6 else "")
        raise RunDirError(
            f"run folder {str(folder)!r} holds a started or finished run ({shown}): pass {flags[0]} to continue it "
            f"or {flags[1]} to replace it"
        )
    for path in _expand(folder, [*markers, *also_remove]):
        if path.exists() or path.is_symlink():
            try:
                _remove(path)
            except OSError as exc:
                raise RunDirError(f"cannot remove {str(path)!r} to overwrite the run: {exc.strerror or exc}") from None
    return found
