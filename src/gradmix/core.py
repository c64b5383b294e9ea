"""The loop-agnostic core: method, schedule, accumulation, events, KPIs and state - driven from outside.

Any training loop (a plain loop through ``Mixer``, an HF Trainer callback, a Lightning callback) drives it the same
way, once per optimizer step::

    plan = core.plan()                 # StepPlan: measure gradients this step? a target batch?
    ... the loop runs its forward/backward (through a probe when plan.measure) ...
    core.observe(measurement)          # the step's losses (and statistics), one Measurement per call
    outcome = core.end_step(counts=examples_per_domain, sampled_weights=..., passes=...)
    if outcome.weights_changed: sampler.set_weights(outcome.weights)
    if outcome.record: writer.write(outcome.record)

It owns no data, sampler, model or file: ``state_dict`` / ``load_state_dict`` are pure (no IO, no RNG changes),
and everything it wants the user to know comes back in ``StepOutcome`` (a metrics record, warning messages).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gradmix.alerts import Alert, AlertCallback, AlertConfig, AlertMonitor
from gradmix.methods.base import MixingMethod
from gradmix.stats import DomainStats, Measurement, pool_measurements

__all__ = ["GRADIENT_STATS", "MixingCore", "Schedule", "StepOutcome", "StepPlan", "weight_kpis"]

GRADIENT_STATS = frozenset({"grad_sq_norm", "grad_var", "target_alignment", "gram"})
STATE_FORMAT = "gradmix.MixingCore/1"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass
class Schedule:
    """When the method updates and when the probe measures.

    update_every: optimizer steps between method updates (PiKE's T0, DGA's T_r).
    warmup_steps: steps before the first update (weights stay at the method's initial weights).
    probe_every: steps between gradient measurements; None = update_every here (measure on the step that ends each
        interval; ``MixingCore`` replaces None by ``auto_probe_every``). Smaller values average several
        measurements into one update (less estimator noise, more cost).
    log_every: steps between metrics records.
    accumulation_steps: micro-batches per optimizer step (the loop's gradient accumulation).
    """

    update_every: int = 50
    warmup_steps: int = 0
    probe_every: int | None = None
    log_every: int = 10
    accumulation_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("update_every", "log_every", "accumulation_steps"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, (int, np.integer))
            or self.warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.probe_every is not None:
            self.probe_every = _positive_int("probe_every", self.probe_every)
            if self.update_every % self.probe_every:
                raise ValueError(
                    f"probe_every ({self.probe_every}) must be a positive divisor of update_every ({self.update_every})"
                )

    def update_due(self, step: int) -> bool:
        """Whether the method updates after optimizer step ``step`` (1-based count of finished steps)."""
        return step >= max(self.warmup_steps, 1) and step % self.update_every == 0

    def measure_due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) must measure gradient statistics."""
        if step % (self.probe_every or self.update_every):
            return False
        next_update = math.ceil(step / self.update_every) * self.update_every
        return self.update_due(next_update)


def auto_probe_every(schedule: Schedule, method: MixingMethod, batch_size: int) -> int:
    """The default ``probe_every``: the largest divisor of ``update_every`` whose measurements of one interval add
    up to the examples the method wants per update (``examples_to_measure``); ``update_every`` (one measuring step)
    when one batch is enough, 1 (every step) when even that falls short. Small batches are cheap to measure."""
    wanted = int(method.examples_to_measure(batch_size))
    every = schedule.update_every
    if wanted <= batch_size:
        return every
    divisors = [d for d in range(every, 0, -1) if every % d == 0]
    return next((d for d in divisors if (every // d) * batch_size >= wanted), 1)


@dataclass(frozen=True)
class StepPlan:
    """What the coming optimizer step must do."""

    step: int  # 1-based number of the step about to run
    measure: bool  # run the backward through the probe and measure gradient statistics
    needs_target: bool  # ... with a target batch (DGA-style methods)
    micro_batches: int  # backward calls expected before end_step


@dataclass
class StepOutcome:
    """What ``end_step`` decided: new weights (if the method updated), a metrics record (on log steps), messages."""

    step: int
    weights: np.ndarray
    weights_changed: bool
    record: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)


def weight_kpis(weights: np.ndarray) -> dict[str, float]:
    """Entropy of the mix (nats), its exponential (the effective number of domains) and the largest weight."""
    w = np.asarray(weights, dtype=np.float64)
    nz = w[w > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    return {"weight_entropy": entropy, "effective_domains": float(math.exp(entropy)), "max_weight": float(w.max())}


class _Sums:
    """Per-domain loss sums and example counts over a span of steps.

    A step whose loss for a domain is NaN/inf adds its examples to ``missing``, not to the sums: one bad step does not
    poison the domain's mean over the span, and a domain trained on with no finite loss at all (``count`` 0,
    ``missing`` > 0) is told apart from one that was not sampled."""

    def __init__(self, k: int) -> None:
        self.loss_sum = np.zeros(k)
        self.count = np.zeros(k)
        self.missing = np.zeros(k)

    def add(self, loss_sum: np.ndarray, counts: np.ndarray) -> None:
        finite = (counts > 0) & np.isfinite(loss_sum)
        self.loss_sum += np.where(finite, loss_sum, 0.0)
        self.count += np.where(finite, counts, 0.0)
        self.missing += np.where((counts > 0) & ~finite, counts, 0.0)

    def examples(self) -> np.ndarray:
        """Examples trained on, with or without a finite loss."""
        return self.count + self.missing

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.loss_sum / np.maximum(self.count, 1), np.nan)

    def to_dict(self) -> dict[str, list[float]]:
        return {"loss_sum": self.loss_sum.tolist(), "count": self.count.tolist(), "missing": self.missing.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], k: int, what: str) -> _Sums:
        out = cls(k)
        out.loss_sum = np.asarray(data["loss_sum"], dtype=np.float64)
        out.count = np.asarray(data["count"], dtype=np.float64)
        out.missing = np.asarray(data.get("missing", np.zeros(k)), dtype=np.float64)
        if out.loss_sum.shape != (k,) or out.count.shape != (k,) or out.missing.shape != (k,):
            raise ValueError(f"core state field {what!r} has {out.loss_sum.shape} entries, expected ({k},)")
        if "missing" not in data:  # written before NaN/inf losses were kept apart: a NaN sum means all missing
            bad = ~np.isfinite(out.loss_sum)
            out.missing = np.where(bad, out.count, 0.0)
            out.count = np.where(bad, 0.0, out.count)
            out.loss_sum = np.where(bad, 0.0, out.loss_sum)
        if not (np.all(out.count >= 0) and np.all(out.missing >= 0)):  # (a sum of huge losses may overflow: kept)
            raise ValueError(f"core state field {what!r} holds negative or NaN example counts")
        return out


class MixingCore:
    """Method + schedule + accumulation + events + KPIs, with a pure state.

    Args:
        method: the mixing method (its ``num_stat_groups`` is what measurements describe).
        names: domain names (K).
        batch_size: global examples per optimizer step (PiKE's b).
        schedule: a ``Schedule`` (or pass its fields as keyword arguments).
        tokens_per_example: for the ``tokens`` KPI (None: not reported).
        alerts: thresholds of the ``collapse`` / ``starved`` / ``overfitting`` / ``repetition`` alerts
            (``gradmix.alerts.AlertConfig`` or a mapping of its fields; default ``AlertConfig()``).
        on_alert: called with each ``gradmix.alerts.Alert`` when it is raised (after the core's state is updated).
        alert_min_weight: shortcut for ``alerts.starved_weight`` (None: keep the config's).
        alert_repeats: shortcut: a ``repetition`` alert when a domain starts this many passes, i.e.
            ``alerts.max_passes = alert_repeats - 1`` (None: keep the config's).
        history_size: records kept in memory (``history``); older ones are dropped (the writers have them all).

    KPIs in every record: ``weights`` (what was sampled), ``requested_weights``, ``train_loss`` (mean per domain since
    the last record), ``weight_entropy``, ``effective_domains``, ``max_weight``, ``tokens`` and ``repeats`` (when
    the loop reports counts/passes), ``update_seconds`` (time in the method's updates since the last record),
    ``probe_seconds`` (time the loop reported with ``add_probe_seconds``), ``update_terms`` (after an update: the
    method's ``last_terms``, {term: {domain: value}}, with ``update_step``), ``alerts`` and ``events`` when any. On
    evaluation steps (``add_metrics`` with a ``val_loss`` mapping) also ``train_val_gap`` {domain: validation loss -
    mean training loss since the previous evaluation}, and ``target_train_val_gap`` with a ``target_val_loss`` when
    the measurements carried target losses.
    """

    def __init__(
        self,
        method: MixingMethod,
        names: Sequence[str],
        *,
        batch_size: int,
        schedule: Schedule | None = None,
        tokens_per_example: int | None = None,
        alerts: AlertConfig | Mapping[str, Any] | None = None,
        on_alert: AlertCallback | None = None,
        alert_min_weight: float | None = None,
        alert_repeats: int | None = None,
        history_size: int = 1000,
        **schedule_fields: Any,
    ) -> None:
        if not isinstance(method, MixingMethod):
            raise TypeError(f"method must be a MixingMethod, got {type(method).__name__}")
        self.names = [str(n) for n in names]
        if method.num_domains != len(self.names):
            raise ValueError(
                f"method {method.name!r} was built for {method.num_domains} domains, "
                f"the Mixer has {len(self.names)}: {self.names}"
            )
        if schedule is not None and schedule_fields:
            raise ValueError("pass either schedule=Schedule(...) or its fields, not both")
        self.schedule = schedule if schedule is not None else Schedule(**schedule_fields)
        self.method = method
        self.batch_size = _positive_int("batch_size", batch_size)
        if self.batch_size % self.schedule.accumulation_steps:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by accumulation_steps "
                f"{self.schedule.accumulation_steps}"
            )
        if alert_min_weight is not None and not (math.isfinite(alert_min_weight) and 0 <= alert_min_weight < 1):
            raise ValueError(f"alert_min_weight must be in [0, 1), got {alert_min_weight!r}")
        if alert_repeats is not None:
            _positive_int("alert_repeats", alert_repeats)
        config = alerts if isinstance(alerts, AlertConfig) else AlertConfig.from_mapping(alerts)
        if alert_min_weight is not None or alert_repeats is not None:
            config = AlertConfig(**config.to_dict())  # a copy: the caller's object is left as it was
            if alert_min_weight is not None:
                config.starved_weight = float(alert_min_weight)
            if alert_repeats is not None:
                config.max_passes = int(alert_repeats) - 1
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"on_alert must be callable, got {type(on_alert).__name__}")
        self.alert_config = config
        self.on_alert = on_alert
        self.tokens_per_example = tokens_per_example
        self.needs_gradients = bool(method.required_stats & GRADIENT_STATS)
        if self.needs_gradients and self.schedule.probe_every is None:
            self.schedule = replace(self.schedule, probe_every=auto_probe_every(self.schedule, method, self.batch_size))
        self.step_count = 0
        k = len(self.names)
        self._per_domain = method.num_stat_groups == k and method.probe_groups() is None
        self._log_losses = _Sums(k)  # since the last record (train_loss)
        self._update_losses = _Sums(k)  # since the last update (what a loss-based method sees)
        self._measurements: list[Measurement] = []  # gradient measurements of the current update interval
        self._examples = np.zeros(k)
        self._tokens: np.ndarray | None = None  # real tokens per domain, when the loop reports them (end_step)
        self._observed_this_step = False
        self._pending_metrics: dict[str, Any] = {}
        self._messages: list[str] = []  # new since the last outcome
        self._events: list[str] = []  # since the last record
        self._monitor = AlertMonitor(self.names, config)
        self._alerts: list[Alert] = []  # raised since the last record
        self._new_alerts: list[Alert] = []  # raised since the last outcome
        self._eval_losses = _Sums(k)  # since the last evaluation (train_val_gap)
        self._target_train = np.zeros(2)  # target-batch loss sum and count since the last evaluation
        self._update_seconds = 0.0
        self._probe_seconds: float | None = None  # None until the loop reports probe time
        self._update_terms: dict[str, Any] | None = None  # the last update's terms, for the next record
        groups = method.num_stat_groups
        self._nonfinite = np.zeros(groups, dtype=np.int64)  # steps with a NaN/inf loss per group, since the record
        self._nonfinite_warned = np.zeros(groups, dtype=bool)  # said once per domain (the counts go on in records)
        self.history: deque[dict[str, Any]] = deque(maxlen=history_size)
        self._raise(self._monitor.check_weights(0, method.weights))  # a starting mix can already be collapsed

    # -- driving ------------------------------------------------------------------------------------------------
    @property
    def weights(self) -> np.ndarray:
        return self.method.weights

    def plan(self) -> StepPlan:
        """What the next optimizer step must do (pure: call it as often as you like)."""
        step = self.step_count + 1
        measure = self.needs_gradients and self.schedule.measure_due(step)
        return StepPlan(step, measure, measure and self.method.needs_target, self.schedule.accumulation_steps)

    def observe(self, measurement: Measurement) -> None:
        """Record one measurement of the current step (losses; gradient statistics on measuring steps)."""
        if not isinstance(measurement, Measurement):
            raise TypeError(f"observe() takes a gradmix.stats.Measurement, got {type(measurement).__name__}")
        if measurement.num_groups != self.method.num_stat_groups:
            raise ValueError(
                f"measurement has {measurement.num_groups} groups, method {self.method.name!r} "
                f"expects {self.method.num_stat_groups}"
            )
        self._check_losses(measurement)
        if self._per_domain:
            loss_sum, counts = measurement.loss_sums()
            self._log_losses.add(loss_sum, counts)
            self._update_losses.add(loss_sum, counts)
            self._eval_losses.add(loss_sum, counts)
        if measurement.target_loss is not None and math.isfinite(measurement.target_loss):
            self._target_train += (float(measurement.target_loss), 1.0)
        if measurement.has_gradients:
            self._measurements.append(measurement)
        self._observed_this_step = True

    def _group_names(self) -> list[str]:
        return self.names if self._per_domain else [f"group{i}" for i in range(self.method.num_stat_groups)]

    def _check_losses(self, measurement: Measurement) -> None:
        """The NaN/inf-loss policy, the same for every method: count it per domain (``nonfinite_loss`` in the next
        record), say it once per domain, leave that loss out of the sums; the method keeps the domain's weight
        (``MixingMethod.update``), so a domain is never starved because its loss could not be computed."""
        loss = np.asarray(measurement.loss, dtype=np.float64)
        bad = (np.asarray(measurement.examples) > 0) & ~np.isfinite(loss)
        if not bad.any():
            return
        self._nonfinite += bad
        names = self._group_names()
        for i in np.flatnonzero(bad & ~self._nonfinite_warned):
            self.warn(
                f"step {self.step_count + 1}: domain {names[i]!r} has a non-finite training loss ({loss[i]}); it is "
                "left out of the loss statistics and its weight is kept while its loss cannot be computed "
                "(steps counted per record in 'nonfinite_loss'; this is said once per domain)"
            )
        self._nonfinite_warned |= bad

    def warn(self, message: str) -> None:
        """Queue a message for the next outcome (and the next metrics record's ``events``)."""
        self._messages.append(message)
        self._events.append(message)

    def take_messages(self) -> list[str]:
        """Messages queued since the last outcome (they stay queued for the next record's ``events``)."""
        messages, self._messages = self._messages, []
        return messages

    def add_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Fields (e.g. ``val_loss``) for the record of the current step; forces a record on this step.

        A ``val_loss`` mapping {domain: loss} marks an evaluation: the record also gets ``train_val_gap`` (validation
        minus the mean training loss since the previous evaluation, this step included) and the ``overfitting``
        alert is checked; with ``target_val_loss`` and target losses in the measurements, ``target_train_val_gap``."""
        self._pending_metrics.update(metrics)

    def add_probe_seconds(self, seconds: float) -> None:
        """Report time spent in the gradient probe (the loop times its measuring backward passes); the sum since
        the last record is its ``probe_seconds``."""
        self._probe_seconds = (self._probe_seconds or 0.0) + float(seconds)

    @property
    def alert_monitor(self) -> AlertMonitor:
        return self._monitor

    def _raise(self, alerts: list[Alert]) -> None:
        """Record alerts for the next record and outcome, then tell the user's callback."""
        for alert in alerts:
            self._alerts.append(alert)
            self._new_alerts.append(alert)
            self._messages.append(alert.message)
        if self.on_alert is not None:
            for alert in alerts:
                self.on_alert(alert)

    def end_step(
        self,
        *,
        counts: Sequence[float] | np.ndarray | None = None,
        sampled_weights: np.ndarray | None = None,
        passes: np.ndarray | None = None,
        tokens: Sequence[float] | np.ndarray | None = None,
    ) -> StepOutcome:
        """Finish optimizer step ``step_count + 1``: update the method when due, raise alerts, build the record.

        counts: global examples per domain this step (tokens and repeats KPIs); sampled_weights: the mix the step's
        batch was actually drawn from (default: the method's weights); passes: passes started per domain; tokens:
        global real tokens per domain this step (the ``tokens`` KPI then counts these instead of
        ``tokens_per_example`` x examples: variable-length, padded or masked examples).
        """
        self.step_count += 1
        step = self.step_count
        k = len(self.names)
        if counts is not None:
            arr = np.asarray(counts, dtype=np.float64)
            if arr.shape != (k,):
                raise ValueError(f"counts has shape {arr.shape}, expected ({k},)")
            self._examples += arr
        if tokens is not None:
            arr = np.asarray(tokens, dtype=np.float64)
            if arr.shape != (k,):
                raise ValueError(f"tokens has shape {arr.shape}, expected ({k},)")
            self._tokens = arr if self._tokens is None else self._tokens + arr
        old = self.method.weights
        changed = False
        updated = False
        started = time.perf_counter()
        if self.method.every_step:
            new = self.method.update(
                DomainStats(step=step, num_domains=self.method.num_stat_groups, batch_size=self.batch_size)
            )
            changed = not np.array_equal(new, old)
            updated = True
        elif self.schedule.update_due(step):
            stats = self._interval_stats(step)
            if stats is not None:
                new = self.method.update(stats)
                if self.method.last_skip_reason:
                    self.warn(f"step {step}: {self.method.last_skip_reason}")
                else:
                    self._take_update_terms(step)
                changed = not np.array_equal(new, old)
            self._measurements = []
            self._update_losses = _Sums(k)
            updated = True
        self._update_seconds += time.perf_counter() - started
        if updated:
            self._raise(self._monitor.check_weights(step, self.method.weights))
        if passes is not None:
            self._raise(self._monitor.check_passes(step, np.asarray(passes)))
        self._observed_this_step = False

        record = None
        if step % self.schedule.log_every == 0 or self._pending_metrics or self._alerts:
            record = self._record(step, sampled_weights, passes)
            self.history.append(record)
        messages, self._messages = self._messages, []
        alerts, self._new_alerts = self._new_alerts, []
        return StepOutcome(step, self.method.weights, changed, record, messages, alerts)

    # -- internals ----------------------------------------------------------------------------------------------
    def _interval_stats(self, step: int) -> DomainStats | None:
        g = self.method.num_stat_groups
        if not self.needs_gradients:
            if not self._per_domain:
                return DomainStats(step=step, num_domains=g, batch_size=self.batch_size)
            return DomainStats(
                step=step,
                num_domains=g,
                loss=self._update_losses.mean(),
                examples=self._update_losses.examples(),
                batch_size=self.batch_size,
            )
        if not self._measurements:
            self.warn(
                f"step {step}: no gradient measurement in this interval (drive the probe on the steps "
                "plan() marks measure=True); update skipped"
            )
            return None
        stats = pool_measurements(self._measurements, step, self.batch_size)
        if self._per_domain and stats.loss is not None:
            # Every step's training losses, not only the measuring steps': they cost nothing (the loop computes
            # them anyway) and are ~update_every / measuring steps times as many, so a loss-based method (PiKE's
            # gain split and tilt) compares domains on far less noise. The measuring steps' losses are among them.
            stats.loss = self._update_losses.mean()
        return stats

    def _take_update_terms(self, step: int) -> None:
        """The method's ``last_terms`` ({term: per-domain values}) as {term: {domain: value}} for the next record."""
        terms = getattr(self.method, "last_terms", None)
        if not isinstance(terms, Mapping) or not terms:
            return
        out: dict[str, Any] = {}
        for term, values in terms.items():
            arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
            keys = self.names if arr.shape == (len(self.names),) else [f"group{i}" for i in range(arr.size)]
            out[str(term)] = {key: (float(v) if math.isfinite(v) else None) for key, v in zip(keys, arr.ravel())}
        self._update_terms = {"step": step, "terms": out}

    def _evaluation(self, step: int) -> dict[str, Any]:
        """train_val_gap (and the target's) for an evaluation record; checks the overfitting alert."""
        out: dict[str, Any] = {}
        val = self._pending_metrics.get("val_loss")
        if not isinstance(val, Mapping):
            return out
        train = self._eval_losses.mean()
        gaps: dict[str, float | None] = {}
        for name, mean in zip(self.names, train):
            value = val.get(name)
            try:
                number = float(value) if value is not None else math.nan
            except (TypeError, ValueError):
                number = math.nan
            gap = number - float(mean)
            gaps[name] = gap if math.isfinite(gap) else None
        out["train_val_gap"] = gaps
        check = dict(gaps)
        target_val = self._pending_metrics.get("target_val_loss")
        if target_val is not None and self._target_train[1] > 0:
            try:
                gap = float(target_val) - float(self._target_train[0] / self._target_train[1])
            except (TypeError, ValueError):
                gap = math.nan
            out["target_train_val_gap"] = gap if math.isfinite(gap) else None
            check["target"] = out["target_train_val_gap"]
        self._eval_losses = _Sums(len(self.names))
        self._target_train = np.zeros(2)
        self._raise(self._monitor.check_gaps(step, check))
        return out

    def _record(self, step: int, sampled: np.ndarray | None, passes: np.ndarray | None) -> dict[str, Any]:
        mix = self.method.weights if sampled is None else np.asarray(sampled, dtype=np.float64)
        train_loss = {}
        means = self._log_losses.mean()
        for name, value in zip(self.names, means):
            train_loss[name] = float(value) if math.isfinite(value) else None
        record: dict[str, Any] = {
            "step": step,
            "weights": dict(zip(self.names, map(float, mix))),
            "requested_weights": dict(zip(self.names, map(float, self.method.weights))),
            "train_loss": train_loss,
            **weight_kpis(mix),
            "update_seconds": self._update_seconds,
        }
        if self._nonfinite.any():
            record["nonfinite_loss"] = dict(zip(self._group_names(), map(int, self._nonfinite)))
            self._nonfinite = np.zeros_like(self._nonfinite)
        if self._probe_seconds is not None:
            record["probe_seconds"] = self._probe_seconds
            self._probe_seconds = 0.0
        if self._update_terms is not None:
            record["update_step"] = self._update_terms["step"]
            record["update_terms"] = self._update_terms["terms"]
            self._update_terms = None
        if self._tokens is not None:
            record["tokens"] = dict(zip(self.names, (int(x) for x in self._tokens)))
        elif self.tokens_per_example is not None:
            record["tokens"] = dict(zip(self.names, (int(x) * self.tokens_per_example for x in self._examples)))
        if passes is not None:
            record["repeats"] = dict(zip(self.names, (int(p) - 1 for p in passes)))
        evaluation = self._evaluation(step)  # may raise overfitting alerts: before the alerts are attached
        if self._events:
            record["events"] = self._events
            self._events = []
        record.update(self._pending_metrics)
        record.update(evaluation)
        if self._alerts:
            record["alerts"] = [a.to_dict() for a in self._alerts]
            self._alerts = []
        self._pending_metrics = {}
        self._log_losses = _Sums(len(self.names))
        self._update_seconds = 0.0
        return record

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (plain Python types and numbers; no IO)."""
        return {
            "format": STATE_FORMAT,
            "domain_names": list(self.names),
            "method_name": self.method.name,
            "step": self.step_count,
            "method": self.method.state_dict(),
            "examples": self._examples.tolist(),
            "tokens": None if self._tokens is None else self._tokens.tolist(),
            "log_losses": self._log_losses.to_dict(),
            "update_losses": self._update_losses.to_dict(),
            "measurements": [m.to_dict() for m in self._measurements],
            "alerts": self._monitor.state_dict(),
            "eval_losses": self._eval_losses.to_dict(),
            "target_train": self._target_train.tolist(),
            "nonfinite_loss": self._nonfinite.tolist(),
            "nonfinite_warned": self._nonfinite_warned.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state; refuses one from another run (domains, method). All-or-nothing and pure."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not a {STATE_FORMAT} state (format={found!r})")
        if list(state["domain_names"]) != self.names:
            raise ValueError(
                f"state is from a run with other domains: it has {list(state['domain_names'])}, "
                f"this run has {self.names}"
            )
        if state.get("method_name") != self.method.name:
            raise ValueError(
                f"state is from a run with method {state.get('method_name')!r}, this run uses {self.method.name!r}"
            )
        k = len(self.names)
        examples = np.asarray(state["examples"], dtype=np.float64)
        if examples.shape != (k,):
            raise ValueError(f"core state field 'examples' has shape {examples.shape}, expected ({k},)")
        tokens = None if state.get("tokens") is None else np.asarray(state["tokens"], dtype=np.float64)
        if tokens is not None and (tokens.shape != (k,) or not np.all(tokens >= 0)):
            raise ValueError(f"core state field 'tokens' must be {k} counts >= 0, got {state.get('tokens')!r}")
        log_losses = _Sums.from_dict(state["log_losses"], k, "log_losses")
        update_losses = _Sums.from_dict(state["update_losses"], k, "update_losses")
        measurements = [Measurement.from_dict(m) for m in state["measurements"]]
        step = int(state["step"])
        eval_losses = _Sums.from_dict(state["eval_losses"], k, "eval_losses") if "eval_losses" in state else _Sums(k)
        target_train = np.asarray(state.get("target_train", [0.0, 0.0]), dtype=np.float64)
        if target_train.shape != (2,):
            raise ValueError(f"core state field 'target_train' has shape {target_train.shape}, expected (2,)")
        groups = self.method.num_stat_groups
        nonfinite = np.asarray(state.get("nonfinite_loss", [0] * groups), dtype=np.float64)
        warned = np.asarray(state.get("nonfinite_warned", [False] * groups))
        if nonfinite.shape != (groups,) or not np.all(nonfinite >= 0) or np.any(nonfinite != np.round(nonfinite)):
            raise ValueError(
                f"core state field 'nonfinite_loss' must be {groups} counts >= 0, got {state.get('nonfinite_loss')!r}"
            )
        if warned.shape != (groups,) or warned.dtype != np.bool_:
            raise ValueError(
                f"core state field 'nonfinite_warned' must be {groups} booleans, got {state.get('nonfinite_warned')!r}"
            )
        monitor = AlertMonitor(self.names, self.alert_config)
        if "alerts" in state:
            monitor.load_state_dict(state["alerts"])
        else:  # a state written before alerts had their own state: what was already reported
            flags = np.zeros(k, dtype=bool)
            flags[[int(i) for i in state.get("repeat_alerted", [])]] = True
            legacy = monitor.state_dict()
            legacy["repeat_alerted"] = flags.tolist()
            monitor.load_state_dict(legacy)
        # the method last: its own checks run before anything here changes, and it changes nothing if they fail
        method_state = state["method"]
        backup = self.method.state_dict()
        try:
            self.method.load_state_dict(method_state)
        except Exception:
            self.method.load_state_dict(backup)
            raise
        self.step_count = step
        self._examples, self._log_losses, self._update_losses = examples, log_losses, update_losses
        self._tokens = tokens
        self._measurements = measurements
        self._monitor, self._eval_losses, self._target_train = monitor, eval_losses, target_train
        self._nonfinite, self._nonfinite_warned = nonfinite.astype(np.int64), warned.astype(bool)
        self._pending_metrics, self._messages, self._events = {}, [], []
        self._alerts, self._new_alerts, self._update_terms = [], [], None
