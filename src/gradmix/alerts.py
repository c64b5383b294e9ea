"""Alerts: when the mix goes wrong, say so - in the metrics, as a Python warning, and to a callback of yours.

Four kinds, each with thresholds in ``AlertConfig`` (``None`` switches a check off):

- ``collapse``: the largest weight rises above ``max_weight`` or the entropy of the mix (nats) falls below
  ``min_entropy``. Checked at the start and after every scheduled update; raised once when the mix enters the
  collapsed state and again only after it has left it.
- ``starved``: a domain's weight stays under ``starved_weight`` (default 0.1 / K) for ``starved_updates``
  consecutive checks (the start and every scheduled update count as one check each). Raised once per episode.
- ``overfitting``: a domain's (or the target's) validation-minus-training loss gap is positive and grows by more
  than ``overfit_min_increase`` at each of ``overfit_evals`` consecutive evaluations. Raised once per streak. (A
  negative gap that shrinks is the usual early-training lag of the interval's mean training loss, not overfitting.)
- ``repetition``: a domain starts a pass over its examples beyond ``max_passes`` (it repeats its data more than
  ``max_passes`` times over). Raised once per domain.

``AlertMonitor`` holds the little state the checks need (counters, streaks, what was already raised); it is pure
(no IO, no warnings) and part of ``MixingCore.state_dict``, so a resumed run raises exactly what an uninterrupted one
would. The core turns every ``Alert`` into a record entry (``alerts``: ``[{kind, step, domain, message}]``), a
``MixingWarning`` (through the Mixer) and a call of the user's ``on_alert(alert)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

__all__ = ["ALERT_KINDS", "Alert", "AlertCallback", "AlertConfig", "AlertMonitor", "MixingWarning"]

ALERT_KINDS = ("collapse", "starved", "overfitting", "repetition")


class MixingWarning(UserWarning):
    """A skipped update, an exhausted domain, an alert, or another event worth a user's attention."""


@dataclass(frozen=True)
class Alert:
    """One alert: what (``kind``), when (``step``, the optimizer step it was found at), which domain (None for the
    whole mix; ``"target"`` for the target set's gap), a plain-words ``message``, and the ``value`` that crossed the
    ``threshold``."""

    kind: str
    step: int
    message: str
    domain: str | None = None
    value: float | None = None
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("value", "threshold"):
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None
        return out


AlertCallback = Callable[[Alert], Any]


def _optional_number(name: str, value: Any, low: float, high: float | None = None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"AlertConfig.{name} must be a number or None, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < low or (high is not None and number > high):
        bound = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"
        raise ValueError(f"AlertConfig.{name} must be a finite number {bound} (or None), got {value!r}")
    return number


def _count(name: str, value: Any, *, optional: bool = False, low: int = 1) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"AlertConfig.{name} must be {what}{' or None' if optional else ''}, got {value!r}")
    return int(value)


@dataclass
class AlertConfig:
    """Thresholds of the four alerts (``None`` switches that check off).

    max_weight: ``collapse`` when the largest weight exceeds it (default 0.9).
    min_entropy: ``collapse`` when the entropy of the mix, in nats, falls below it (default None; log(2) ~ 0.69 means
        "fewer than two effective domains").
    starved_weight: ``starved`` floor on a domain's weight (default None = 0.1 / K, a tenth of the uniform share).
    starved_updates: consecutive checks (start + scheduled updates) under the floor before ``starved`` (default 3).
    overfit_evals: consecutive evaluations with a growing train/validation gap before ``overfitting`` (default 3).
    overfit_min_increase: how much the gap must grow at each of them (loss units, default 0.005).
    max_passes: ``repetition`` when a domain starts pass ``max_passes + 1`` (default 3: data seen 3 times is fine).
    """

    max_weight: float | None = 0.9
    min_entropy: float | None = None
    starved_weight: float | None = None
    starved_updates: int = 3
    overfit_evals: int = 3
    overfit_min_increase: float = 0.005
    max_passes: int | None = 3

    def __post_init__(self) -> None:
        self.max_weight = _optional_number("max_weight", self.max_weight, 0.0, 1.0)
        self.min_entropy = _optional_number("min_entropy", self.min_entropy, 0.0)
        self.starved_weight = _optional_number("starved_weight", self.starved_weight, 0.0, 1.0)
        self.starved_updates = int(_count("starved_updates", self.starved_updates) or 1)
        self.overfit_evals = int(_count("overfit_evals", self.overfit_evals) or 1)
        increase = _optional_number("overfit_min_increase", self.overfit_min_increase, 0.0)
        self.overfit_min_increase = 0.0 if increase is None else increase
        self.max_passes = _count("max_passes", self.max_passes, optional=True, low=0)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> AlertConfig:
        """From a config table (``[logging.alerts]``); unknown keys are a ``ValueError`` naming them."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown alert setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AlertMonitor:
    """The four checks with their state. Every ``check_*`` returns the alerts it raises now (possibly none)."""

    def __init__(self, names: Sequence[str], config: AlertConfig | None = None) -> None:
        self.names = [str(n) for n in names]
        self.config = config if config is not None else AlertConfig()
        k = len(self.names)
        self._collapsed = False
        self._starved_streak = np.zeros(k, dtype=np.int64)
        self._starved_alerted = np.zeros(k, dtype=bool)
        self._repeat_alerted = np.zeros(k, dtype=bool)
        self._last_gap: dict[str, float] = {}
        self._gap_streak: dict[str, int] = {}

    @property
    def starved_floor(self) -> float:
        floor = self.config.starved_weight
        return 0.1 / len(self.names) if floor is None else floor

    # -- checks ---------------------------------------------------------------------------------------------------
    def check_weights(self, step: int, weights: np.ndarray) -> list[Alert]:
        """``collapse`` and ``starved``: call at the start and after every scheduled update (changed or not)."""
        w = np.asarray(weights, dtype=np.float64)
        alerts: list[Alert] = []
        cfg = self.config
        top = int(np.argmax(w))
        nz = w[w > 0]
        entropy = float(-(nz * np.log(nz)).sum())
        too_heavy = cfg.max_weight is not None and float(w[top]) > cfg.max_weight
        too_narrow = cfg.min_entropy is not None and entropy < cfg.min_entropy
        if (too_heavy or too_narrow) and not self._collapsed:
            if too_heavy:
                assert cfg.max_weight is not None
                message = (
                    f"step {step}: the mix collapsed onto domain {self.names[top]!r} (weight {w[top]:.3f} > "
                    f"{cfg.max_weight:.3f}); the other domains are barely trained"
                )
                alerts.append(Alert("collapse", step, message, self.names[top], float(w[top]), cfg.max_weight))
            else:
                assert cfg.min_entropy is not None
                message = (
                    f"step {step}: the mix collapsed: entropy {entropy:.3f} nats < {cfg.min_entropy:.3f} "
                    f"({math.exp(entropy):.2f} effective domains; largest {self.names[top]!r} at {w[top]:.3f})"
                )
                alerts.append(Alert("collapse", step, message, None, entropy, cfg.min_entropy))
        self._collapsed = bool(too_heavy or too_narrow)

        floor = self.starved_floor
        low = w < floor
        self._starved_streak = np.where(low, self._starved_streak + 1, 0)
        self._starved_alerted &= low  # a domain that recovered may be reported again
        due = low & (self._starved_streak >= cfg.starved_updates) & ~self._starved_alerted
        for i in np.flatnonzero(due):
            self._starved_alerted[i] = True
            streak = int(self._starved_streak[i])
            message = (
                f"step {step}: domain {self.names[i]!r} is starved: weight {w[i]:.4f} has been below {floor:.4f} for "
                f"{streak} consecutive update{'s' if streak != 1 else ''}; it is barely sampled"
            )
            alerts.append(Alert("starved", step, message, self.names[i], float(w[i]), floor))
        return alerts

    def check_passes(self, step: int, passes: np.ndarray) -> list[Alert]:
        """``repetition``: ``passes`` = passes started per domain (1 while a domain is on its first pass)."""
        cap = self.config.max_passes
        if cap is None:
            return []
        p = np.asarray(passes)
        alerts = []
        for i in np.flatnonzero((p > cap) & ~self._repeat_alerted):
            self._repeat_alerted[i] = True
            message = (
                f"step {step}: domain {self.names[i]!r} started pass {int(p[i])} over its examples (more than "
                f"{cap}); its data is being repeated: consider max_repeats to cap repetition"
            )
            alerts.append(Alert("repetition", step, message, self.names[i], float(p[i]), float(cap)))
        return alerts

    def check_gaps(self, step: int, gaps: Mapping[str, float | None]) -> list[Alert]:
        """``overfitting``: one call per evaluation with {domain (or "target"): validation - training loss}."""
        cfg = self.config
        alerts = []
        for name, gap in gaps.items():
            if gap is None or not math.isfinite(gap):
                continue
            previous = self._last_gap.get(name)
            self._last_gap[name] = float(gap)
            if previous is None:
                continue
            if gap > 0 and gap > previous + cfg.overfit_min_increase:
                streak = self._gap_streak.get(name, 0) + 1
            else:
                streak = 0
            self._gap_streak[name] = streak
            if streak == cfg.overfit_evals:
                what = "the target set" if name == "target" else f"domain {name!r}"
                message = (
                    f"step {step}: {what} may be overfitting: its validation - training loss gap grew at "
                    f"{streak} consecutive evaluations, to {gap:.4f}"
                )
                alerts.append(Alert("overfitting", step, message, name, float(gap), cfg.overfit_min_increase))
        return alerts

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "collapsed": self._collapsed,
            "starved_streak": self._starved_streak.tolist(),
            "starved_alerted": self._starved_alerted.tolist(),
            "repeat_alerted": self._repeat_alerted.tolist(),
            "last_gap": dict(self._last_gap),
            "gap_streak": dict(self._gap_streak),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        k = len(self.names)
        streak = np.asarray(state.get("starved_streak", [0] * k), dtype=np.int64)
        starved = np.asarray(state.get("starved_alerted", [False] * k), dtype=bool)
        repeated = np.asarray(state.get("repeat_alerted", [False] * k), dtype=bool)
        for what, arr in (("starved_streak", streak), ("starved_alerted", starved), ("repeat_alerted", repeated)):
            if arr.shape != (k,):
                raise ValueError(f"alert state field {what!r} has shape {arr.shape}, expected ({k},)")
        self._collapsed = bool(state.get("collapsed", False))
        self._starved_streak, self._starved_alerted, self._repeat_alerted = streak, starved, repeated
        self._last_gap = {str(key): float(v) for key, v in dict(state.get("last_gap", {})).items()}
        self._gap_streak = {str(key): int(v) for key, v in dict(state.get("gap_streak", {})).items()}
