"""Progress bars of the kit (training, corpus builds, embedding, k-means): tqdm on standard error, or nothing.

A bar is shown only when all of these hold: the caller did not ask for quiet (``--no-progress``, ``--quiet``,
``progress=False``), ``GRADMIX_NO_PROGRESS`` is unset (or 0 / false / no), tqdm is installed (extras
``experiments``, ``cluster``, ``progress``), and standard error is a terminal (or a Jupyter kernel, where
``tqdm.auto`` draws a widget). So a log file, a pipe or CI output never gets bar updates, and a bar never writes
into a metrics file: it goes to standard error only.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["QUIET_ENV", "NullBar", "progress_bar", "progress_enabled"]

QUIET_ENV = "GRADMIX_NO_PROGRESS"


class NullBar:
    """What ``progress_bar`` returns when no bar is shown: the calls a bar takes, doing nothing."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def progress_enabled(progress: bool | None = True) -> bool:
    """Whether a bar may be shown: ``progress`` is not False, ``GRADMIX_NO_PROGRESS`` does not say quiet, and
    standard error is a terminal or a Jupyter kernel."""
    if progress is False:
        return False
    if os.environ.get(QUIET_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return False
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress_bar(total: int | None, desc: str, *, progress: bool | None = True, **kwargs: Any) -> Any:
    """A tqdm bar on standard error (``leave=False``, ``dynamic_ncols=True`` unless given), or a ``NullBar`` when
    no bar may be shown (``progress_enabled``) or tqdm is not installed."""
    if not progress_enabled(progress):
        return NullBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar, same result
        return NullBar()
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, file=sys.stderr, **kwargs)
