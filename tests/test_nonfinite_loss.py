"""A domain whose loss is NaN/inf (issue 22, item 4): one warning naming it, a per-record count, its weight kept.

The policy lives in two places only: the core (count, warning, sums without the bad steps) and
``MixingMethod.update`` (the weight of a trained-on domain without a finite loss is kept), so every method that reads
the loss behaves alike. Before, ODM drove such a domain to its exploration floor without a word.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from conftest import make_toy_domains
from gradmix import Mixer, make_method
from gradmix.controller import MixingWarning
from gradmix.core import MixingCore
from gradmix.stats import DomainStats

LOSS_METHODS = [("odm", {}), ("famo", {}), ("doremi", {"reference_loss": [0.5, 0.5, 0.5]})]


def _run(method: str, params: dict, bad: float, steps: int, run_dir=None) -> tuple[Mixer, list[str]]:
    """Domain d1's loss is ``bad`` at every step; d0's falls, d2's stays: the method has something to react to."""
    mixer = Mixer(
        make_toy_domains(),
        method,
        12,
        update_every=2,
        log_every=10,
        method_params=params,
        run_dir=run_dir,
        alert_repeats=10**6,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, batch in enumerate(mixer.batches(steps)):
            d = batch["domain"]
            base = torch.where(d == 0, torch.tensor(3.0 * 0.98**step), torch.tensor(1.0))
            mixer.observe(d, torch.where(d == 1, torch.tensor(bad), base))
            mixer.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, MixingWarning)]
    return mixer, messages


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("method, params", LOSS_METHODS)
def test_a_domain_without_a_finite_loss_is_named_counted_and_keeps_its_weight(tmp_path, method, params, bad):
    mixer, messages = _run(method, params, bad, 200, run_dir=tmp_path)
    said = [m for m in messages if "non-finite training loss" in m]
    assert len(said) == 1 and "'d1'" in said[0] and said[0].startswith("step 1:")
    assert mixer.weights[1] == pytest.approx(1 / 3, abs=1e-12)  # never starved (ODM put it at ~0.06 before)
    assert abs(mixer.weights.sum() - 1) < 1e-9
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["step"] % 10 == 0] == list(range(10, 201, 10))
    for record in records:  # every step of d1 is counted in the record of its span; the others never
        assert set(record["nonfinite_loss"]) == {"d0", "d1", "d2"} and record["nonfinite_loss"]["d1"] > 0
        assert record["train_loss"]["d1"] is None
    assert sum(r["nonfinite_loss"]["d1"] for r in records) == 200
    assert sum(r["nonfinite_loss"]["d0"] + r["nonfinite_loss"]["d2"] for r in records) == 0
    assert any("non-finite training loss" in e for e in records[0]["events"])
    if method != "doremi":  # the other domains still move (DoReMi's excess loss is clipped at its reference)
        assert mixer.weights[0] != pytest.approx(mixer.weights[2], abs=1e-3)


def test_one_bad_step_does_not_poison_the_interval_mean():
    """The bad step is left out of the sums: the domain's mean over the interval is that of its finite steps."""
    core = MixingCore(make_method("odm", 2), ["a", "b"], batch_size=4, update_every=3, log_every=3)
    from gradmix.stats import Measurement

    for loss_b in (2.0, math.nan, 4.0):
        core.observe(Measurement.from_sums(np.array([2.0, 2 * loss_b]), np.array([2.0, 2.0])))
        outcome = core.end_step()
    assert outcome.record is not None
    assert outcome.record["train_loss"] == {"a": 1.0, "b": 3.0}
    assert outcome.record["nonfinite_loss"] == {"a": 0, "b": 1}


def test_the_method_policy_keeps_a_trained_domain_but_not_an_unsampled_one():
    odm = make_method("odm", 3)
    for step in range(1, 7):  # (ODM's first rounds are uniform at K = 3: eps_t = 1/K until t = 4)
        odm.update(
            DomainStats(step=step, num_domains=3, loss=np.array([1.0, math.nan, 2.0]), examples=np.array([4, 4, 4]))
        )
    assert odm.weights[1] == pytest.approx(1 / 3, abs=1e-15) and odm.last_held == [1]
    # a domain with no examples was not played: ODM's bandit rule (no reward) applies, nothing is held
    odm = make_method("odm", 3)
    for step in range(1, 7):
        odm.update(
            DomainStats(step=step, num_domains=3, loss=np.array([1.0, math.nan, 2.0]), examples=np.array([4, 0, 4]))
        )
    assert odm.weights[1] < 0.26 and odm.last_held == []


def test_the_counts_survive_a_checkpoint_and_a_crafted_count_is_refused():
    core = MixingCore(make_method("famo", 2), ["a", "b"], batch_size=4, update_every=2, log_every=5)
    from gradmix.stats import Measurement

    core.observe(Measurement.from_sums(np.array([1.0, math.inf]), np.array([2.0, 2.0])))
    core.end_step()
    state = core.state_dict()
    assert state["nonfinite_loss"] == [0, 1] and state["nonfinite_warned"] == [False, True]
    twin = MixingCore(make_method("famo", 2), ["a", "b"], batch_size=4, update_every=2, log_every=5)
    twin.load_state_dict(state)
    assert twin.state_dict() == state
    state["nonfinite_loss"] = [0, -1]
    with pytest.raises(ValueError, match="nonfinite_loss"):
        twin.load_state_dict(state)


def test_odm_does_not_starve_the_domain_once_its_loss_comes_back():
    """ODM's estimate for a held domain keeps its gap to the best of the others (it earned no reward while its loss
    was NaN): when the loss returns, the domain is where it was, not at the exploration floor (~0.06 before)."""
    odm = make_method("odm", 3)
    for step in range(1, 101):
        odm.update(
            DomainStats(step=step, num_domains=3, loss=np.array([1.0, math.nan, 1.0]), examples=np.array([4, 4, 4]))
        )
    for step in range(101, 106):
        odm.update(DomainStats(step=step, num_domains=3, loss=np.array([1.0, 1.0, 1.0]), examples=np.array([4, 4, 4])))
    np.testing.assert_allclose(odm.weights, [1 / 3] * 3, atol=0.02)
