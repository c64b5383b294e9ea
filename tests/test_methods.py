"""Every registered method: valid probability vectors under random statistics, state round trip, clear errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradmix
from gradmix import DomainStats, WeightError, available_methods, make_method


def build(name: str, k: int):
    by_name: dict[str, dict[str, Any]] = {
        "fixed": {"weights": list(range(1, k + 1))},
        "proportional": {"sizes": [10 * (i + 1) for i in range(k)]},
        "temperature": {"sizes": [10 ** (i % 4 + 1) for i in range(k)], "alpha": 0.3},
        "importance": {"target_counts": [i % 3 for i in range(k)] if k > 1 else [1]},
        "doremi": {"reference_loss": [2.0] * k},
        "schedule": {"schedule": [(1, [1.0] * k), (3, list(range(1, k + 1))), (7, [0.0] * (k - 1) + [1.0])]},
    }
    params = by_name.get(name, {})
    return make_method(name, k, **params)


value = st.one_of(st.floats(-1e6, 1e6), st.just(float("nan")), st.just(float("inf")), st.floats(0, 1e-12))


@st.composite
def stats_for(draw, k: int):
    def vec():
        return draw(st.lists(value, min_size=k, max_size=k))

    return DomainStats(
        step=1,
        num_domains=k,
        loss=np.abs(vec()),
        grad_sq_norm=vec(),
        grad_var=np.abs(vec()),
        target_alignment=vec(),
        examples=np.full(k, 4.0),
        batch_size=16,
    )


@pytest.mark.parametrize("name", available_methods())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), k=st.integers(1, 6))
def test_weights_always_a_valid_probability_vector(name, data, k):
    method = build(name, k)
    for _ in range(data.draw(st.integers(1, 5))):
        w = method.update(data.draw(stats_for(k)))
        assert w.shape == (k,)
        assert np.all(np.isfinite(w)) and np.all(w >= 0)
        assert abs(w.sum() - 1.0) < 1e-9
        assert np.array_equal(w, method.weights)


@pytest.mark.parametrize("name", available_methods())
def test_state_round_trip_continues_identically(name):
    rng = np.random.default_rng(0)
    k = 4
    a = build(name, k)
    stream = [
        DomainStats(
            step=t,
            num_domains=k,
            loss=rng.random(k) + 1,
            grad_sq_norm=rng.random(k),
            grad_var=rng.random(k),
            target_alignment=rng.normal(size=k),
            examples=np.full(k, 4.0),
            batch_size=16,
        )
        for t in range(12)
    ]
    for s in stream[:5]:
        a.update(s)
    b = build(name, k)
    b.load_state_dict(a.state_dict())
    for s in stream[5:]:
        assert np.array_equal(a.update(s), b.update(s))


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown mixing method 'pikee'.*available: .*pike"):
        make_method("pikee", 3)


def test_bad_fixed_and_size_parameters_name_the_fault():
    with pytest.raises(WeightError, match=r"negative value -1.0 for domain 1"):
        make_method("fixed", 3, weights=[1, -1, 1])
    with pytest.raises(WeightError, match="has 2 entries but there are 3 domains"):
        make_method("fixed", 3, weights=[1, 1])
    with pytest.raises(WeightError, match=r"domain 1 has size 0.0"):
        make_method("proportional", 2, sizes=[5, 0])
    with pytest.raises(ValueError, match="needs the domain sizes"):
        make_method("temperature", 2)


def test_static_methods_against_hand_values():
    np.testing.assert_allclose(make_method("proportional", 3, sizes=[1, 3, 6]).weights, [0.1, 0.3, 0.6])
    sq = np.sqrt([1, 4, 16])
    np.testing.assert_allclose(make_method("temperature", 3, sizes=[1, 4, 16], alpha=0.5).weights, sq / sq.sum())
    np.testing.assert_allclose(make_method("temperature", 3, sizes=[1, 4, 16], alpha=0.0).weights, [1 / 3] * 3)
    rr = make_method("round_robin", 3)
    seq = [int(np.argmax(rr.weights))] + [
        int(np.argmax(rr.update(DomainStats(step=i, num_domains=3)))) for i in range(5)
    ]
    assert seq == [0, 1, 2, 0, 1, 2]
    rnd = make_method("random", 4, seed=1)
    picks = [int(np.argmax(rnd.update(DomainStats(step=i, num_domains=4)))) for i in range(400)]
    assert set(picks) == {0, 1, 2, 3} and max(np.bincount(picks)) < 140


def test_checkpoint_of_another_method_or_size_is_refused():
    with pytest.raises(ValueError, match="state is for method 'uniform', not 'pike'"):
        make_method("pike", 3).load_state_dict(make_method("uniform", 3).state_dict())
    with pytest.raises(ValueError, match="state is for 4 domains"):
        make_method("pike", 3).load_state_dict(make_method("pike", 4).state_dict())


def test_stats_with_wrong_length_is_refused():
    with pytest.raises(ValueError, match=r"DomainStats.loss has 2 entries but there are 3 domains"):
        DomainStats(step=0, num_domains=3, loss=np.array([1.0, 2.0]))
    with pytest.raises(gradmix.StatsError, match=r"method 'pike' needs statistics \['grad_sq_norm', 'grad_var'\]"):
        make_method("pike", 3).update(DomainStats(step=0, num_domains=3, loss=np.array([1, 2, 3])))
