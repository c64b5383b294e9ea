"""SIGTERM / SIGINT during ``gradmix run`` and ``gradmix compare``: finish the step, checkpoint, exit with one line.

Preemption (a scheduler's SIGTERM, ``docker stop``, ``timeout``) and Ctrl-C used to kill a run at once: exit 143 with
nothing saved since the last periodic checkpoint, or a KeyboardInterrupt traceback. Under ``StopSignals`` a signal
that arrives while training (``deferring``) is only recorded; the training loop sees it at the next step boundary,
saves the checkpoint and raises ``RunInterrupted``, which the CLI prints as one line and turns into exit code
128 + signal number (143 for SIGTERM, 130 for SIGINT), the codes a shell and a scheduler expect. A signal outside
training (corpus preparation, evaluation at the end) has nothing to save and raises ``RunInterrupted`` at once, and
so does a second signal while the first is being honoured (the user insists).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = ["RunInterrupted", "StopSignals", "signal_name"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class RunInterrupted(BaseException):
    """A run stopped by a signal. A ``BaseException`` (like ``KeyboardInterrupt``), so that no ``except Exception``
    on the way swallows it; the message says what was saved. ``exit_code`` is 128 + the signal number, as a shell
    reports a process killed by it."""

    def __init__(self, signum: int, message: str, checkpoint: Path | None = None) -> None:
        self.signum = int(signum)
        self.checkpoint = checkpoint
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager that turns SIGTERM and SIGINT into a request to stop at the next step boundary.

    While ``deferring`` is True a signal only sets ``received`` (the loop checks it after each step and calls
    ``interrupted``); otherwise, or when a signal is already pending, it raises ``RunInterrupted`` at once, saying
    ``where`` the run was (set by the runner as it goes). The previous handlers come back on exit. Outside the main
    thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring = False
        self.where = "before training started; nothing to save"
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.deferring and self.received is None:
            self.received = signum
            return
        if self.received is not None:
            raise RunInterrupted(
                signum,
                f"interrupted again by {signal_name(signum)} before the step ended; the last checkpoint written stands",
            )
        raise RunInterrupted(signum, f"interrupted by {signal_name(signum)} {self.where}")

    def interrupted(self, step: int, steps: int, checkpoint: Path) -> RunInterrupted:
        """The exception to raise once the checkpoint of ``step`` is saved after a deferred signal."""
        assert self.received is not None
        return RunInterrupted(
            self.received,
            f"interrupted by {signal_name(self.received)} at step {step} of {steps}; checkpoint saved to {checkpoint}",
            checkpoint,
        )
