"""Where metrics records go. One record = one JSON object per logged step (``metrics.jsonl``; the fields are listed
in docs/howto/monitoring.md).

Four writers, one set of metric names. A record's nested mappings are flattened with ``/``
(``weights/en``, ``train_loss/en``, ``val_loss/en``, ``train_val_gap/en``, ``update_terms/gain/en``,
``eval_metrics/accuracy``) by ``flatten_record``; that is the column name in CSV, the scalar tag in TensorBoard and the
key in Weights & Biases. Lists (``alerts``, ``events``) are not scalars: CSV holds them as a JSON text column,
TensorBoard as text (``alerts``, ``events``) and W&B as a count (``alerts_count``, ``events_count``) plus the messages
in the run's summary; every writer also gets ``alerts_count``.

- ``JsonlWriter`` (default, ``metrics.jsonl``): a record is one line written with one ``write`` call and flushed, so
  a kill can only leave the *last* line half-written; ``truncate_after`` (the explicit resume step) drops it along
  with every record after the resumed step. Non-finite numbers are written as ``null``, never as invalid JSON.
- ``CsvWriter`` (``metrics.csv``): one row per record, one column per flattened name. When a record brings a new
  name (the first evaluation, the first update, an alert), the file is rewritten atomically with the grown header
  and the earlier rows padded with empty cells, so the file is always one valid CSV with a single header (the
  rewrite costs O(file) but happens a handful of times per run). Non-finite numbers are empty cells.
- ``TensorBoardWriter`` (``tensorboard/``): ``torch.utils.tensorboard.SummaryWriter`` scalars (extra
  ``gradmix[tensorboard]``).
- ``WandbWriter``: ``wandb.log`` (extra ``gradmix[wandb]``); ``mode="offline"`` (or ``WANDB_MODE=offline``) writes a
  local run under ``dir`` that ``wandb sync`` can upload later.

The integrations (HF Trainer, Lightning) hand a record's KPIs to the framework's own loggers under the same names
with a ``gradmix/`` prefix (``kpi_scalars``: ``gradmix/weights/en``; the HF Trainer adds its ``train/``), and not at
all when the Mixer has a TensorBoard or W&B writer of its own (``writes_scalars``): one tag per number.

The optional packages are imported when such a writer is built, never by ``import gradmix``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradmix.checkpoint import atomic_write

__all__ = [
    "LOGGER_KPIS",
    "WRITER_NAMES",
    "CsvWriter",
    "JsonlWriter",
    "TensorBoardWriter",
    "WandbWriter",
    "flatten_record",
    "json_safe",
    "kpi_scalars",
    "make_writers",
    "scalar_metrics",
    "writes_scalars",
]

WRITER_NAMES = ("jsonl", "csv", "tensorboard", "wandb")
_LIST_FIELDS = ("alerts", "events")
# what the integrations hand to a training framework's loggers (HF Trainer, Lightning): these fields of a record,
# under the writers' names (``kpi_scalars``)
LOGGER_KPIS = (
    "weights",
    "train_loss",
    "weight_entropy",
    "effective_domains",
    "max_weight",
    "val_loss",
    "target_val_loss",
    "alerts_count",
    "events_count",
)


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


# -- flattening ---------------------------------------------------------------------------------------------------
def flatten_record(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"weights": {"en": 0.5}}`` -> ``{"weights/en": 0.5}`` (recursively); lists and scalars are kept as they
    are (after ``json_safe``). The one naming scheme of every writer."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_record(value, name + "/"))
        else:
            out[name] = json_safe(value)
    return out


def scalar_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric leaves of a flattened record (without ``step``), plus ``alerts_count`` and ``events_count``:
    what TensorBoard and W&B plot. Non-finite values and None are left out."""
    out: dict[str, float] = {}
    for name, value in flatten_record(record).items():
        if name == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[name] = float(value)
    for field in _LIST_FIELDS:
        out[f"{field}_count"] = float(len(record.get(field) or []))
    return out


def kpi_scalars(record: Mapping[str, Any], prefix: str = "gradmix/") -> dict[str, float]:
    """The KPIs of a record for a training framework's loggers: the ``scalar_metrics`` of the fields in
    ``LOGGER_KPIS`` under the writers' own names with ``prefix`` (``gradmix/weights/en``, ``gradmix/train_loss/en``,
    ``gradmix/weight_entropy``, ...); the alert and event counts only when not 0."""
    out: dict[str, float] = {}
    for name, value in scalar_metrics(record).items():
        if name.split("/", 1)[0] not in LOGGER_KPIS or (name in ("alerts_count", "events_count") and not value):
            continue
        out[f"{prefix}{name}"] = value
    return out


def writes_scalars(writers: Sequence[Any]) -> bool:
    """Whether these writers plot scalars themselves (TensorBoard, W&B): a framework's loggers handed the same
    KPIs would show every number a second time, under another tag."""
    return any(isinstance(w, (TensorBoardWriter, WandbWriter)) for w in writers)


def _step(record: Mapping[str, Any]) -> int:
    try:
        return int(record.get("step", 0))
    except (TypeError, ValueError):
        return 0


# -- CSV ----------------------------------------------------------------------------------------------------------
def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, allow_nan=False)
    if isinstance(value, float):
        return repr(value)
    return str(value)


class CsvWriter:
    """One CSV row per record, columns = flattened names (see the module docstring: the header grows by an atomic
    rewrite, so the file is always one valid CSV). ``read()`` returns the rows as dicts of strings."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._columns: list[str] | None = None

    def _load_columns(self) -> list[str]:
        if self._columns is None:
            self._columns = []
            if self.path.exists():
                with self.path.open(newline="", encoding="utf-8") as fh:
                    header = next(csv.reader(fh), None)
                self._columns = list(header or [])
        return self._columns

    def write(self, record: Mapping[str, Any]) -> None:
        flat = flatten_record(record)
        columns = self._load_columns()
        new = [name for name in flat if name not in columns]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if new or not self.path.exists() or not columns:
            rows = self.read() if self.path.exists() else []
            columns = self._columns = columns + new
            rows.append({name: _csv_cell(value) for name, value in flat.items()})
            self._rewrite(columns, rows)
            return
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([_csv_cell(flat.get(name)) for name in columns])
        with self.path.open("a", encoding="utf-8", newline="") as fh:
            fh.write(buffer.getvalue())
            fh.flush()

    def _rewrite(self, columns: list[str], rows: Sequence[Mapping[str, str]]) -> None:
        def dump(fh: Any) -> None:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(columns)
            for row in rows:
                writer.writerow([row.get(name, "") for name in columns])

        atomic_write(self.path, dump, mode="w")

    def read(self) -> list[dict[str, str]]:
        """All complete rows (a half-written last line is skipped) as {column: text}."""
        if not self.path.exists():
            return []
        with self.path.open(newline="", encoding="utf-8") as fh:
            text = fh.read()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # a kill during the last append
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if not header:
            return []
        return [dict(zip(header, row)) for row in reader if row]

    def truncate_after(self, step: int) -> int:
        """Keep the rows with ``step`` <= the given step; returns how many were dropped (atomic)."""
        if not self.path.exists():
            return 0
        rows = self.read()
        kept = [r for r in rows if int(float(r.get("step") or 0)) <= step]
        with self.path.open("rb") as fh:
            raw = fh.read()
        if (len(kept) == len(rows) and raw.endswith(b"\n")) or not raw:
            return 0
        self._columns = None
        self._rewrite(self._load_columns(), kept)
        return len(rows) - len(kept)

    def close(self) -> None:
        """Nothing to release (each write opens and closes the file)."""


# -- TensorBoard --------------------------------------------------------------------------------------------------
class TensorBoardWriter:
    """TensorBoard event files in ``log_dir``: every numeric leaf of a record as a scalar under its flattened name
    (``weights/en``, ``val_loss/en``, ``weight_entropy``, ...) at the record's step; alerts and events as text.

    The event file is created with the first record, not when the writer is built: a Mixer (or an HF / Lightning
    integration, which builds its Mixer before it checks the run folder) does not make its own folder look used."""

    def __init__(self, log_dir: str | Path, *, flush_every: int = 1, **summary_writer_kwargs: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "the TensorBoard writer needs the tensorboard package: pip install 'gradmix[tensorboard]'"
            ) from exc
        self.log_dir = Path(log_dir)
        self.flush_every = max(1, int(flush_every))
        self._writes = 0
        self._make = lambda: SummaryWriter(log_dir=str(self.log_dir), **summary_writer_kwargs)
        self._writer: Any = None
        self._closed = False

    def write(self, record: Mapping[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("TensorBoardWriter.write after close()")
        if self._writer is None:
            self._writer = self._make()
        step = _step(record)
        for name, value in scalar_metrics(record).items():
            self._writer.add_scalar(name, value, global_step=step)
        for field in _LIST_FIELDS:
            entries = record.get(field) or []
            if entries:
                lines = [e.get("message", str(e)) if isinstance(e, Mapping) else str(e) for e in entries]
                self._writer.add_text(field, "\n\n".join(lines), global_step=step)
        self._writes += 1
        if self._writes % self.flush_every == 0:
            self._writer.flush()

    def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


# -- Weights & Biases ---------------------------------------------------------------------------------------------
class WandbWriter:
    """A Weights & Biases run: ``wandb.log(scalars, step=record's step)`` with the flattened names; alert messages
    go to the run summary (``alerts``: the list so far). ``mode``: "online", "offline" (local files only, ``wandb
    sync`` later) or "disabled"; default: ``WANDB_MODE`` or wandb's own default. Extra keyword arguments go to
    ``wandb.init`` (``project``, ``name``, ``config``, ``tags``, ...). Pass ``run=`` to log into a run you started."""

    def __init__(
        self,
        dir: str | Path | None = None,
        *,
        project: str | None = None,
        mode: str | None = None,
        run: Any = None,
        **init_kwargs: Any,
    ) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("the W&B writer needs the wandb package: pip install 'gradmix[wandb]'") from exc
        self._own = run is None
        if run is None:
            if dir is not None:
                Path(dir).mkdir(parents=True, exist_ok=True)
            kwargs: dict[str, Any] = {"project": project or "gradmix", **init_kwargs}
            if dir is not None:
                kwargs["dir"] = str(dir)
            if mode is not None or os.environ.get("WANDB_MODE"):
                kwargs["mode"] = mode or os.environ["WANDB_MODE"]
            run = wandb.init(**kwargs)
        self.run: Any = run
        self._alerts: list[dict[str, Any]] = []

    def write(self, record: Mapping[str, Any]) -> None:
        if self.run is None:
            raise RuntimeError("WandbWriter.write after close()")
        self.run.log(scalar_metrics(record), step=_step(record))
        alerts = record.get("alerts") or []
        if alerts:
            self._alerts.extend(json_safe(list(alerts)))
            self.run.summary["alerts"] = [a.get("message") if isinstance(a, Mapping) else str(a) for a in self._alerts]

    @property
    def run_dir(self) -> Path | None:
        """The local folder of the run (``.../wandb/offline-run-*`` in offline mode)."""
        directory = getattr(self.run, "dir", None)
        return Path(directory).parent if directory else None

    def close(self) -> None:
        if self.run is not None:
            if self._own:
                self.run.finish()
            self.run = None


# -- by name ------------------------------------------------------------------------------------------------------
def make_writers(
    writers: Sequence[Any], run_dir: str | Path | None, options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Any]:
    """Writer objects from names and/or objects: ``"jsonl"`` -> ``run_dir/metrics.jsonl``, ``"csv"`` ->
    ``run_dir/metrics.csv``, ``"tensorboard"`` -> ``run_dir/tensorboard``, ``"wandb"`` -> a W&B run with files
    under ``run_dir``. ``options[name]`` are extra keyword arguments of that writer (e.g. ``{"wandb": {"project":
    "x", "mode": "offline"}}``). Objects (anything with ``write``) are kept as they are."""
    if isinstance(writers, (str, bytes)):
        writers = [writers]
    out: list[Any] = []
    options = options or {}
    for writer in writers:
        if not isinstance(writer, str):
            if not callable(getattr(writer, "write", None)):
                raise TypeError(f"a writer must be a name in {WRITER_NAMES} or have write(record); got {writer!r}")
            out.append(writer)
            continue
        name = writer.lower()
        if name not in WRITER_NAMES:
            raise ValueError(f"unknown metrics writer {writer!r}; known: {', '.join(WRITER_NAMES)}")
        if run_dir is None and name != "wandb":
            raise ValueError(f"the {name!r} writer needs a run_dir to write into")
        extra = dict(options.get(name) or {})
        if name == "jsonl":
            out.append(JsonlWriter(Path(run_dir) / "metrics.jsonl", **extra))  # type: ignore[arg-type]
        elif name == "csv":
            out.append(CsvWriter(Path(run_dir) / "metrics.csv", **extra))  # type: ignore[arg-type]
        elif name == "tensorboard":
            out.append(TensorBoardWriter(Path(run_dir) / "tensorboard", **extra))  # type: ignore[arg-type]
        else:
            extra.setdefault("dir", None if run_dir is None else str(run_dir))
            out.append(WandbWriter(**extra))
    return out
