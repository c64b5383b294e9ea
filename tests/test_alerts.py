"""Alerts: each one fires in a run built to trigger it and stays quiet in one built not to (issue 12)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gradmix
from gradmix.alerts import Alert, AlertConfig, AlertMonitor, MixingWarning
from gradmix.core import MixingCore
from gradmix.methods.base import MixingMethod
from gradmix.stats import Measurement


class Scripted(MixingMethod):
    """Loss-based method whose weights follow a script, one entry per update."""

    name = "scripted"
    required_stats = frozenset({"loss"})
    script: list[np.ndarray]

    def __init__(self, num_domains, script=(), **kw):
        super().__init__(num_domains, **kw)
        self.script = [np.asarray(w, dtype=float) for w in script]
        self.calls = 0

    def _update(self, stats):
        w = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return w


NAMES = ["a", "b", "c"]


def run_core(script, steps, *, alerts=None, losses=None, passes=None, evals=None, on_alert=None):
    """Drive a core: update every step; ``evals`` {step: {domain: val}}; ``losses`` per step (K,)."""
    core = MixingCore(
        Scripted(3, script=script), NAMES, batch_size=12, update_every=1, log_every=1, alerts=alerts, on_alert=on_alert
    )
    records = []
    for step in range(1, steps + 1):
        loss = np.ones(3) if losses is None else np.asarray(losses[step - 1], dtype=float)
        core.observe(Measurement.from_sums(loss * 4, np.full(3, 4.0)))
        if evals and step in evals:
            core.add_metrics({"val_loss": evals[step]})
        outcome = core.end_step(counts=[4, 4, 4], passes=None if passes is None else np.asarray(passes[step - 1]))
        records.append(outcome.record)
    return core, records


def alerts_of(records, kind=None):
    return [a for r in records for a in (r.get("alerts") or []) if kind is None or a["kind"] == kind]


def test_collapse_fires_on_a_dominant_weight_and_not_on_a_balanced_mix():
    _, records = run_core([[0.5, 0.3, 0.2], [0.95, 0.03, 0.02]], 4)
    found = alerts_of(records, "collapse")
    assert len(found) == 1  # once while collapsed, not at every update
    assert found[0]["step"] == 2 and found[0]["domain"] == "a" and "collapsed" in found[0]["message"]
    _, quiet = run_core([[0.5, 0.3, 0.2], [0.6, 0.25, 0.15]], 6)
    assert alerts_of(quiet) == []


def test_collapse_by_entropy_bound():
    cfg = AlertConfig(max_weight=None, min_entropy=0.8)
    _, records = run_core([[0.34, 0.33, 0.33], [0.6, 0.38, 0.02]], 3, alerts=cfg)  # entropy 0.75 nats
    found = alerts_of(records, "collapse")
    assert len(found) == 1 and found[0]["domain"] is None and "entropy" in found[0]["message"]
    _, quiet = run_core([[0.34, 0.33, 0.33]], 3, alerts=cfg)
    assert alerts_of(quiet) == []


def test_starved_needs_n_consecutive_updates_under_the_floor():
    cfg = AlertConfig(starved_weight=0.05, starved_updates=3)
    # under the floor at updates 2 and 3 only (with the start: not 3 in a row) -> quiet
    _, quiet = run_core([[0.5, 0.48, 0.02], [0.5, 0.48, 0.02], [0.4, 0.4, 0.2]] + [[0.4, 0.4, 0.2]] * 3, 6, alerts=cfg)
    assert alerts_of(quiet, "starved") == []
    _, records = run_core([[0.4, 0.4, 0.2], [0.5, 0.48, 0.02]], 6, alerts=cfg)
    found = alerts_of(records, "starved")
    assert len(found) == 1 and found[0]["domain"] == "c" and found[0]["step"] == 4  # updates 2, 3, 4
    assert "3 consecutive updates" in found[0]["message"]


def test_overfitting_fires_when_the_gap_grows_for_n_evaluations():
    cfg = AlertConfig(overfit_evals=3, overfit_min_increase=0.01)
    evals = {s: {"a": 1.0 + 0.1 * s, "b": 1.0, "c": 1.0} for s in (2, 4, 6, 8)}  # a's gap: .2 .4 .6 .8 (train 1)
    _, records = run_core([[1 / 3] * 3], 8, alerts=cfg, evals=evals)
    found = alerts_of(records, "overfitting")
    assert [(a["domain"], a["step"]) for a in found] == [("a", 8)]
    gaps = [r["train_val_gap"] for r in records if "train_val_gap" in r]
    assert gaps[0] == pytest.approx({"a": 0.2, "b": 0.0, "c": 0.0})
    # a gap that wobbles (or shrinks) stays quiet
    wobble = {s: {"a": 1.2 + (0.1 if s % 4 else 0.0), "b": 1.0, "c": 1.0} for s in (2, 4, 6, 8, 10, 12)}
    _, quiet = run_core([[1 / 3] * 3], 12, alerts=cfg, evals=wobble)
    assert alerts_of(quiet) == []


def test_overfitting_of_the_target_gap():
    monitor = AlertMonitor(NAMES, AlertConfig(overfit_evals=2, overfit_min_increase=0.0))
    assert monitor.check_gaps(1, {"target": 0.1}) == []
    assert monitor.check_gaps(2, {"target": 0.2}) == []
    (alert,) = monitor.check_gaps(3, {"target": 0.3})
    assert alert.kind == "overfitting" and alert.domain == "target" and "target set" in alert.message


def test_repetition_fires_past_the_cap_once_per_domain():
    passes = [[1, 1, 1], [2, 1, 1], [3, 1, 1], [4, 1, 1], [5, 2, 1]]
    _, records = run_core([[1 / 3] * 3], 5, alerts=AlertConfig(max_passes=3), passes=passes)
    found = alerts_of(records, "repetition")
    assert [(a["domain"], a["step"]) for a in found] == [("a", 4)]
    _, quiet = run_core([[1 / 3] * 3], 5, alerts=AlertConfig(max_passes=5), passes=passes)
    assert alerts_of(quiet) == []


def test_alerts_reach_the_callback_the_record_and_the_warnings():
    seen: list[Alert] = []
    _core, records = run_core([[0.5, 0.3, 0.2], [0.95, 0.03, 0.02]], 2, on_alert=seen.append)
    assert [a.kind for a in seen] == ["collapse"]
    assert records[1]["alerts"][0] == {
        "kind": "collapse",
        "step": 2,
        "domain": "a",
        "message": seen[0].message,
        "value": 0.95,
        "threshold": 0.9,
    }
    # through the Mixer: a MixingWarning and the user's callback
    import torch

    from gradmix import Mixer
    from gradmix.sources import DomainSet

    domains = DomainSet.from_arrays({n: np.zeros((20, 4), dtype=np.int64) for n in NAMES})
    got: list[Alert] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixer = Mixer(
            domains, Scripted(3, script=[[0.96, 0.02, 0.02]]), 12, update_every=1, on_alert=got.append, log_every=1
        )
        for batch in mixer.batches(2):
            mixer.observe(batch["domain"], torch.ones(len(batch["domain"])))
            mixer.step()
    assert [a.kind for a in got] == ["collapse"]
    assert any(issubclass(w.category, MixingWarning) and "collapsed" in str(w.message) for w in caught)
    assert gradmix.controller.MixingWarning is MixingWarning


def test_alert_state_round_trips_through_the_core_state():
    cfg = AlertConfig(starved_weight=0.05, starved_updates=3)
    script = [[0.4, 0.4, 0.2], [0.5, 0.48, 0.02]]
    _full, _records = run_core(script, 6, alerts=cfg)
    # interrupted after step 3 (streak 2), resumed into a fresh core: the alert still comes at step 4, once
    first, _ = run_core(script, 3, alerts=cfg)
    state = first.state_dict()
    assert state["alerts"]["starved_streak"] == [0, 0, 2]
    method = Scripted(3, script=script)
    method.calls = first.method.calls
    second = MixingCore(method, NAMES, batch_size=12, update_every=1, log_every=1, alerts=cfg)
    second.take_messages()
    second.load_state_dict(state)
    found = []
    for _ in range(3):
        second.observe(Measurement.from_sums(np.full(3, 4.0), np.full(3, 4.0)))
        found += second.end_step(counts=[4, 4, 4]).alerts
    assert [(a.kind, a.step) for a in found] == [("starved", 4)]


def test_alert_config_validation():
    with pytest.raises(ValueError, match="max_weight"):
        AlertConfig(max_weight=1.5)
    with pytest.raises(ValueError, match="unknown alert setting"):
        AlertConfig.from_mapping({"maxweight": 0.5})
    with pytest.raises(ValueError, match="starved_updates"):
        AlertConfig(starved_updates=0)
    assert AlertConfig.from_mapping({"max_passes": None}).max_passes is None
