"""Replay a step schedule of weights exactly: ``make_method("schedule", K, schedule=[(1, w1), (11, w2), ...])``.

Entry ``(start, weights)`` gives the weights of the optimizer steps ``start`` .. (next entry's start - 1), steps
counted from 1 as ``step`` in ``metrics.jsonl``; the first entry starts at step 1 and the last one holds to the end of
training. ``gradmix export RUN --format gradmix --weights schedule`` writes one from a finished run: a run that
replays it (same domains, batch size, seed and sampler mode, batches drawn as the original drew them, e.g. with
``Mixer.batches``) draws exactly the batches the original drew, row for row.

How it stays exact: the method is an ``every_step`` method, so the core asks it after every optimizer step ``s``
(``DomainStats.step == s``, the number of finished steps), whatever ``update_every`` or ``warmup_steps`` say, and
its answer is the mix of step ``s + 1``, returned bit for bit as given (after the one normalisation at construction,
which leaves a vector that already sums to 1 unchanged): no renormalisation on the way, so the sampler sees the
original run's floats. It reads no statistics (``required_stats`` is empty): no probe, no gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from gradmix.methods.base import MixingMethod, validate_weights
from gradmix.stats import DomainStats

__all__ = ["StepSchedule", "parse_schedule"]

_ENTRY_KEYS = ("start", "weights", "end")


def _step_number(value: Any, where: str) -> int:
    integral = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()
    )
    if isinstance(value, (bool, np.bool_)) or not integral:
        raise ValueError(f"{where} must be an integer step (1-based), got {value!r}")
    return int(value)


def _entry(entry: Any, i: int) -> tuple[Any, Any, Any]:
    """(start, weights, end) of one schedule entry: a ``(start, weights)`` pair or a ``{start, weights[, end]}``
    mapping (the form ``gradmix export`` writes)."""
    if isinstance(entry, Mapping):
        unknown = [str(key) for key in entry if key not in _ENTRY_KEYS]
        if unknown:
            raise ValueError(
                f"schedule[{i}] has an unknown field {unknown[0]!r}; an entry is {{start, weights}} (end optional)"
            )
        missing = [key for key in ("start", "weights") if key not in entry]
        if missing:
            raise ValueError(f"schedule[{i}] has no {missing[0]!r}; an entry is {{start, weights}} (end optional)")
        return entry["start"], entry["weights"], entry.get("end")
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return entry[0], entry[1], None
    raise ValueError(f"schedule[{i}] must be a (start_step, weights) pair or a {{start, weights}} table, got {entry!r}")


def parse_schedule(schedule: Any, num_domains: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Check a schedule and return (starts, weights): starts strictly increasing from 1, each weight vector K
    non-negative finite entries with a positive sum (normalised to sum to 1). Every fault is a one-line
    ``ValueError`` (``WeightError`` for a weight vector) naming the entry."""
    if isinstance(schedule, (str, bytes, Mapping)) or not isinstance(schedule, Sequence) or not len(schedule):
        raise ValueError(
            f"schedule must be a non-empty list of (start_step, weights) entries, got {type(schedule).__name__}"
        )
    starts: list[int] = []
    table: list[np.ndarray] = []
    ends: list[tuple[int, Any]] = []
    for i, item in enumerate(schedule):
        raw_start, raw_weights, raw_end = _entry(item, i)
        start = _step_number(raw_start, f"schedule[{i}] start")
        if i == 0 and start != 1:
            raise ValueError(
                f"schedule[0] starts at step {start}; the first entry must start at step 1 (steps are 1-based)"
            )
        if i and start <= starts[-1]:
            raise ValueError(
                f"schedule[{i}] starts at step {start}, not after schedule[{i - 1}]'s step {starts[-1]}: "
                "starts must increase"
            )
        if isinstance(raw_weights, Mapping):
            raise ValueError(
                f"schedule[{i}] weights are given by domain name; the method takes one list per entry in the "
                "domains' order (`gradmix export RUN --format gradmix --weights schedule` writes that form)"
            )
        starts.append(start)
        table.append(validate_weights(raw_weights, num_domains, what=f"schedule[{i}] weights"))
        if raw_end is not None:
            ends.append((i, _step_number(raw_end, f"schedule[{i}] end")))
    for i, end in ends:
        if end < starts[i] or (i + 1 < len(starts) and end != starts[i + 1] - 1):
            wanted = (
                f"{starts[i + 1] - 1} (the step before schedule[{i + 1}]'s start)"
                if i + 1 < len(starts)
                else (f">= its start {starts[i]}")
            )
            raise ValueError(f"schedule[{i}] ends at step {end}; it must end at {wanted}")
    return np.asarray(starts, dtype=np.int64), table


class StepSchedule(MixingMethod):
    """Replays a step schedule of weights exactly (e.g. one exported from a finished run by ``gradmix export``).

    Args:
        schedule: ``[(start_step, weights), ...]`` or ``[{"start": s, "weights": [...]}, ...]``: the weights of
            steps ``start`` .. next start - 1 (1-based; the first entry starts at 1, the last holds to the end).
            Weights are positional (one per domain, in the domains' order), non-negative with a positive sum.
    """

    name = "schedule"
    every_step = True  # asked after every optimizer step: the schedule's change points are hit exactly
    required_stats: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, num_domains: int, schedule: Any = None) -> None:
        if schedule is None:
            raise ValueError("method 'schedule' needs schedule=[(start_step, weights), ...] (the first at step 1)")
        if not isinstance(num_domains, (int, np.integer)) or num_domains < 1:
            raise ValueError(f"num_domains must be a positive integer, got {num_domains!r}")
        self._starts, self._table = parse_schedule(schedule, int(num_domains))
        super().__init__(num_domains, initial_weights=self._table[0])

    @property
    def schedule(self) -> list[tuple[int, list[float]]]:
        """The schedule as ``[(start_step, weights), ...]`` (normalised weights)."""
        return [(int(s), w.tolist()) for s, w in zip(self._starts, self._table)]

    def weights_at(self, step: int) -> np.ndarray:
        """The weights of optimizer step ``step`` (1-based; steps before 1 get the first entry's)."""
        index = int(np.searchsorted(self._starts, int(step), side="right")) - 1
        return self._table[max(index, 0)].copy()

    def update(self, stats: DomainStats) -> np.ndarray:
        """After optimizer step ``stats.step``: the weights of step ``stats.step + 1``, exactly as scheduled (the
        base class's renormalisation is skipped so the floats reach the sampler unchanged)."""
        if stats.num_domains != self.num_domains:
            raise ValueError(
                f"{self.name}: statistics for {stats.num_domains} domains, method expects {self.num_domains}"
            )
        self.last_skip_reason = None
        self.last_held = []
        self._weights = self._update(stats)
        self.num_updates += 1
        return self.weights

    def _update(self, stats: DomainStats) -> np.ndarray:
        return self.weights_at(_step_number(stats.step, f"{self.name}: DomainStats.step") + 1)

    def _extra_state(self) -> dict[str, Any]:
        return {"schedule": [[int(s), w.tolist()] for s, w in zip(self._starts, self._table)]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "schedule" not in state:
            raise ValueError(f"{self.name}: checkpointed state has no field 'schedule'")
        try:
            self._starts, self._table = parse_schedule(state["schedule"], self.num_domains)
        except ValueError as exc:
            raise ValueError(f"{self.name}: checkpointed {exc}") from None
