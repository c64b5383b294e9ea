"""Atomic checkpoint files: write to a temporary file in the same folder, fsync, then rename over the target.

A crash (even SIGKILL) mid-write leaves either the old checkpoint or the new one, never a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["atomic_write", "save_checkpoint_file", "load_checkpoint_file", "write_json_atomic"]


def atomic_write(path: str | Path, write: Callable[[Any], None], *, mode: str = "wb") -> Path:
    """Call ``write(file_object)`` on a temp file next to ``path`` and atomically move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def save_checkpoint_file(state: dict[str, Any], path: str | Path) -> Path:
    return atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "gradmix" not in state:
        raise ValueError(f"{str(path)!r} is not a gradmix checkpoint (no 'gradmix' section)")
    return state


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"), mode="w")
