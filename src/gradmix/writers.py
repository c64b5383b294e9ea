"""Where metrics records go. One record = one JSON object per logged step (see DESIGN: ``metrics.jsonl``).

``JsonlWriter`` is the default. A record is written as one line with one ``write`` call and flushed, so a kill can
only leave the *last* line half-written; ``truncate_after`` (the explicit resume step) drops it along with every
record after the resumed step. Non-finite numbers (a diverging run) are written as ``null``, never as invalid JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gradmix.checkpoint import atomic_write

__all__ = ["JsonlWriter", "json_safe"]


def json_safe(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, NaN/inf to None, tuples to lists (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """Appends records to ``path`` (created with its folder on first write)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(json_safe(record), allow_nan=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()

    def read(self) -> list[dict[str, Any]]:
        """All complete records (a half-written last line is skipped)."""
        if not self.path.exists():
            return []
        records = []
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # a kill during the last append
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{self.path}: line {len(records) + 1} is not JSON ({exc.msg})") from None
        return records

    def truncate_after(self, step: int) -> int:
        """Keep the records with ``step`` <= the given step (a resumed run logs the rest again); returns how many
        were dropped. Atomic: the file is the old one or the new one, never a mix."""
        if not self.path.exists():
            return 0
        records = self.read()
        kept = [r for r in records if int(r.get("step", 0)) <= step]
        with self.path.open("rb") as fh:
            raw = fh.read()
        if (len(kept) == len(records) and raw.endswith(b"\n")) or not raw:
            return 0
        atomic_write(self.path, lambda fh: fh.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept), mode="w")
        return len(records) - len(kept)

    def close(self) -> None:
        """Nothing to release (each write opens and closes the file)."""
