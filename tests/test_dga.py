"""Tests of DGA (plain, EMA, floor, distribution reweighting), importance sampling and online DoGE.

Hand computations use math.exp on the paper's formulas directly, never the methods' own log-space code; the
synthetic linear-regression mixture plays the probe with exact numpy gradients.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import sparse

from conftest import assert_probability_vector
from gradmix import DomainStats, StatsError, make_method
from gradmix.methods.base import WeightError
from gradmix.methods.dga import DGA, base_distributions_from_clusters, floor_weights
from gradmix.methods.doge import DoGE
from gradmix.methods.importance import Importance


def stats(alignment, examples=None, step=0):
    alignment = np.asarray(alignment, dtype=np.float64)
    return DomainStats(step=step, num_domains=alignment.shape[0], target_alignment=alignment, examples=examples)


def hand_step(alpha, exponents):
    """alpha_i * exp(e_i) / Z with plain floats."""
    raw = [a * math.exp(e) for a, e in zip(alpha, exponents)]
    total = sum(raw)
    return np.array([r / total for r in raw])


# -- DGA step: hand computations ------------------------------------------------------------------------------------
def test_registry_builds_the_three_methods():
    assert isinstance(make_method("dga", 4), DGA)
    assert isinstance(make_method("doge", 4), DoGE)
    assert isinstance(make_method("importance", 3, target_counts=[1, 2, 3]), Importance)
    assert DGA.needs_target and DoGE.needs_target
    assert DGA.required_stats == {"target_alignment"} == DoGE.required_stats


def test_plain_dga_step_matches_hand_computation():
    method = DGA(3, step_size=0.5, ema=0.0, normalize="none", initial_weights=[0.5, 0.25, 0.25])
    new = method.update(stats([1.0, 0.0, -1.0]))
    e = math.exp(0.5)
    z = 0.5 * e + 0.25 + 0.25 / e
    np.testing.assert_allclose(new, [0.5 * e / z, 0.25 / z, 0.25 / e / z], rtol=1e-12)
    assert method.num_updates == 1 and method.last_skip_reason is None


def test_ema_step_matches_hand_computation():
    alpha = [0.5, 0.25, 0.25]
    method = DGA(3, step_size=0.5, ema=0.3, normalize="none", initial_weights=alpha)
    new = method.update(stats([1.0, 0.0, -1.0]))
    expected = 0.3 * np.array(alpha) + 0.7 * hand_step(alpha, [0.5, 0.0, -0.5])
    np.testing.assert_allclose(new, expected, rtol=1e-12)
    # Second update starts from the EMA'd weights.
    second = method.update(stats([0.0, 2.0, 0.0]))
    np.testing.assert_allclose(second, 0.3 * expected + 0.7 * hand_step(expected, [0.0, 1.0, 0.0]), rtol=1e-12)


@pytest.mark.parametrize(
    "normalize, scale",
    [("max_abs", 4.0), ("rms", math.sqrt((4 + 16 + 1) / 3)), ("none", 1.0)],
)
def test_alignment_normalizations(normalize, scale):
    method = DGA(3, step_size=0.7, ema=0.0, normalize=normalize)
    alignment = [2.0, -4.0, 1.0]
    new = method.update(stats(alignment))
    expected = hand_step([1 / 3] * 3, [0.7 * a / scale for a in alignment])
    np.testing.assert_allclose(new, expected, rtol=1e-12)


def test_normalized_step_is_scale_free():
    small, large = DGA(4, ema=0.0), DGA(4, ema=0.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.normal(size=4)
        small.update(stats(a * 1e-9))
        large.update(stats(a * 1e9))
    np.testing.assert_allclose(small.weights, large.weights, rtol=1e-10)


def test_nan_alignment_gets_exponent_zero():
    method = DGA(3, step_size=1.0, ema=0.0, normalize="max_abs")
    new = method.update(stats([3.0, np.nan, -1.5]))
    # max |a| over usable domains = 3 -> exponents [1, 0, -0.5].
    np.testing.assert_allclose(new, hand_step([1 / 3] * 3, [1.0, 0.0, -0.5]), rtol=1e-12)
    assert method.last_skip_reason is None


def test_domain_with_no_probed_examples_is_ignored():
    method = DGA(3, step_size=1.0, ema=0.0, normalize="none")
    new = method.update(stats([1.0, 50.0, 0.0], examples=[8, 0, 8]))
    np.testing.assert_allclose(new, hand_step([1 / 3] * 3, [1.0, 0.0, 0.0]), rtol=1e-12)


@pytest.mark.parametrize(
    "alignment, reason",
    [([np.nan, np.nan, np.nan], "no usable"), ([np.inf, -np.inf, np.nan], "no usable"), ([0.0, 0.0, np.nan], "is 0")],
)
def test_degenerate_alignments_skip_the_update(alignment, reason):
    method = DGA(3, initial_weights=[0.2, 0.3, 0.5])
    new = method.update(stats(alignment))
    np.testing.assert_allclose(new, [0.2, 0.3, 0.5], rtol=1e-12)
    assert method.last_skip_reason is not None
    assert reason in method.last_skip_reason
    assert method.num_updates == 0


def test_overflowing_raw_step_is_skipped_not_nan():
    method = DGA(2, step_size=10.0, ema=0.0, normalize="none")
    new = method.update(stats([1e308, -1e308]))
    assert_probability_vector(new, 2)
    assert method.last_skip_reason is not None
    assert "not finite" in method.last_skip_reason


def test_missing_alignment_field_is_a_clear_error():
    with pytest.raises(StatsError, match="target_alignment"):
        DGA(2).update(DomainStats(step=0, num_domains=2, loss=np.ones(2)))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"step_size": 0}, "step_size"),
        ({"step_size": np.nan}, "step_size"),
        ({"ema": 1.0}, "ema"),
        ({"ema": -0.1}, "ema"),
        ({"normalize": "l2"}, "normalize"),
        ({"min_weight": 0.5}, "min_weight"),
        ({"min_weight": -1e-3}, "min_weight"),
        ({"initial_weights": [1, 2]}, "initial_weights"),
    ],
)
def test_bad_parameters_raise(params, match):
    with pytest.raises((ValueError, WeightError), match=match):
        DGA(3, **params)


def test_log_space_state_survives_extreme_runs_and_reverses_exactly():
    # ema = 0: 3000 steps down then 3000 up must return to uniform; raw weights would have underflowed to 0.
    method = DGA(3, step_size=1.0, ema=0.0, normalize="max_abs")
    for _ in range(3000):
        method.update(stats([-1.0, 1.0, 1.0]))
    assert method.weights[0] < 1e-300
    for _ in range(3000):
        method.update(stats([1.0, -1.0, -1.0]))
    np.testing.assert_allclose(method.weights, [1 / 3] * 3, rtol=1e-9)


# -- the floor ------------------------------------------------------------------------------------------------------
def brute_force_floor(weights, floor):
    """Bisection on c for sum(max(floor, c * w)) = 1."""
    lo, hi = 0.0, 1.0 / max(weights.max(), 1e-300) * 2 + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(floor, mid * weights).sum() > 1:
            hi = mid
        else:
            lo = mid
    return np.maximum(floor, lo * weights)


@pytest.mark.parametrize("seed", range(5))
def test_floor_matches_bisection(seed):
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(10, 0.3))
    floored = floor_weights(weights, 0.04)
    np.testing.assert_allclose(floored, brute_force_floor(weights, 0.04), atol=1e-12)
    assert floored.min() >= 0.04 - 1e-15 and abs(floored.sum() - 1) < 1e-12


def test_floor_keeps_weights_that_already_satisfy_it():
    weights = np.array([0.5, 0.3, 0.2])
    np.testing.assert_array_equal(floor_weights(weights, 0.1), weights)


def test_min_weight_holds_over_a_run():
    method = DGA(4, step_size=1.0, ema=0.0, min_weight=0.05)
    for _ in range(200):
        new = method.update(stats([5.0, -1.0, -2.0, -3.0]))
    assert new.min() >= 0.05 - 1e-12
    np.testing.assert_allclose(new, [0.85, 0.05, 0.05, 0.05], atol=1e-9)


# -- distribution reweighting ---------------------------------------------------------------------------------------
def test_base_distributions_from_clusters_matches_hand_matrix():
    matrix = base_distributions_from_clusters([0, 0, 1, 1, 2], [1, 3, 2, 2, 5])
    assert sparse.issparse(matrix)
    expected = np.array([[0.25, 0, 0], [0.75, 0, 0], [0, 0.5, 0], [0, 0.5, 0], [0, 0, 1.0]])
    np.testing.assert_allclose(matrix.toarray(), expected, rtol=1e-15)


@pytest.mark.parametrize(
    "fine_to_coarse, sizes, kwargs, match",
    [
        ([0, 1], [1, 2, 3], {}, "entries"),
        ([0, -1], [1, 1], {}, ">= 0"),
        ([0, 1], [1, 0], {}, "size"),
        ([0, 2], [1, 1], {}, "coarse cluster 1 holds no fine"),
        ([0, 3], [1, 1], {"num_base": 2}, "num_base"),
        ([0, 0.5], [1, 1], {}, "not an integer"),
        ([], [], {}, "empty"),
    ],
)
def test_base_distributions_from_clusters_errors(fine_to_coarse, sizes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        base_distributions_from_clusters(fine_to_coarse, sizes, **kwargs)


@pytest.mark.parametrize(
    "matrix, match",
    [
        (np.ones((3, 1)) / 3, "shape"),
        (np.array([[1.0, 0.5], [0.0, -0.5], [0.0, 1.0], [0.0, 0.0]]), "negative"),
        (np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), "column\\) 1 is all zero"),
        (np.array([[0.5, 0.0], [0.5, 0.0], [0.0, 1.0], [0.0, 0.0]]), "cluster 3 has zero probability"),
        (np.array([[0.5, 0.0], [0.5, 0.5], [0.0, 0.5], [0.0, 0.0]]), "cluster 3 has zero probability"),
        (np.array([[0.5, 0.0], [0.5, 0.5], [0.0, 0.25], [0.0, 0.25]]), "disjoint"),
        (np.array([[0.5, 0.0], [0.4, 0.0], [0.0, 0.5], [0.0, 0.5]]), "sums to"),
        (np.array([[np.nan, 0.0], [0.5, 0.0], [0.0, 0.5], [0.0, 0.5]]), "finite"),
        (np.ones(4), "2-D"),
    ],
)
def test_base_distribution_validation(matrix, match):
    with pytest.raises(ValueError, match=match):
        DGA(4, base_distributions=matrix)


def test_overlap_error_names_the_cluster_and_columns():
    matrix = sparse.csr_array(np.array([[0.5, 0.0], [0.5, 0.5], [0.0, 0.5]]))
    with pytest.raises(ValueError, match=r"cluster 1 belongs to base distributions \[0, 1\]"):
        DGA(3, base_distributions=matrix)


@pytest.mark.parametrize("as_sparse", [False, True])
def test_identity_base_distributions_reduce_to_plain_dga(as_sparse):
    k = 7
    identity = sparse.identity(k, format="csr") if as_sparse else np.eye(k)
    params: dict[str, Any] = dict(step_size=0.3, ema=0.4, min_weight=0.01, normalize="rms")
    plain, reweighted = DGA(k, **params), DGA(k, base_distributions=identity, **params)
    np.testing.assert_array_equal(reweighted.probe_groups(), np.arange(k))
    assert plain.probe_groups() is None
    rng = np.random.default_rng(3)
    for step in range(300):
        alignment = rng.normal(size=k) * 10.0 ** rng.integers(-5, 5)
        alignment[rng.random(k) < 0.2] = np.nan
        np.testing.assert_allclose(
            reweighted.update(stats(alignment, step=step)),
            plain.update(stats(alignment, step=step)),
            rtol=1e-12,
            atol=1e-300,
        )
    assert plain.num_updates == reweighted.num_updates


def test_reweighting_optimises_w_like_plain_dga_on_the_bases_and_samples_p_w():
    fine_to_coarse = np.array([2, 0, 1, 0, 2, 2, 1])
    sizes = np.array([5.0, 1.0, 2.0, 3.0, 1.0, 4.0, 6.0])
    matrix = base_distributions_from_clusters(fine_to_coarse, sizes)
    reweighted = DGA(7, base_distributions=matrix, step_size=0.5, ema=0.2)
    on_bases = DGA(3, step_size=0.5, ema=0.2)  # the same math, run directly on the 3 base weights
    np.testing.assert_array_equal(reweighted.probe_groups(), fine_to_coarse)
    assert reweighted.num_stat_groups == 3 and reweighted.num_base == 3
    rng = np.random.default_rng(1)
    for step in range(50):
        alignment = rng.normal(size=3)
        alpha = reweighted.update(stats(alignment, step=step))
        w = on_bases.update(stats(alignment, step=step))
        np.testing.assert_allclose(reweighted.base_weights, w, rtol=1e-12)
        np.testing.assert_allclose(alpha, matrix @ w, rtol=1e-12)
    with pytest.raises(ValueError, match="expects 3"):
        reweighted.update(stats(np.zeros(7)))


def test_initial_weights_of_reweighting_are_base_weights():
    matrix = base_distributions_from_clusters([0, 0, 1], [1.0, 1.0, 1.0])
    method = DGA(3, base_distributions=matrix, initial_weights=[0.8, 0.2])
    np.testing.assert_allclose(method.weights, [0.4, 0.4, 0.2], rtol=1e-12)


def test_65536_clusters():
    k, m = 65536, 64
    rng = np.random.default_rng(0)
    fine_to_coarse = rng.permutation(np.arange(k) % m)
    sizes = rng.integers(1, 1000, size=k).astype(float)
    matrix = base_distributions_from_clusters(fine_to_coarse, sizes)
    method = make_method("dga", k, base_distributions=matrix)
    assert isinstance(method, DGA)
    assert method.num_stat_groups == m
    for step in range(20):
        alignment = rng.normal(size=m)
        alignment[rng.random(m) < 0.1] = np.nan
        alpha = method.update(stats(alignment, step=step))
    assert_probability_vector(alpha, k)
    np.testing.assert_allclose(alpha, matrix @ method.base_weights, rtol=1e-10)
    # Inside a coarse cluster the fine clusters keep size-proportional shares.
    members = np.flatnonzero(fine_to_coarse == 5)
    np.testing.assert_allclose(alpha[members] / alpha[members].sum(), sizes[members] / sizes[members].sum(), rtol=1e-10)
    restored = make_method("dga", k, base_distributions=matrix)
    restored.load_state_dict(json.loads(json.dumps(method.state_dict())))
    np.testing.assert_array_equal(restored.weights, method.weights)


# -- state ----------------------------------------------------------------------------------------------------------
def test_state_roundtrip_resumes_exactly():
    matrix = base_distributions_from_clusters([0, 1, 1, 2, 0], [1, 2, 3, 4, 5])
    rng = np.random.default_rng(5)
    alignments = rng.normal(size=(30, 3))
    straight = DGA(5, base_distributions=matrix, ema=0.5, initial_weights=[1.0, 0.0, 1.0])
    for a in alignments:
        straight.update(stats(a))
    first = DGA(5, base_distributions=matrix, ema=0.5, initial_weights=[1.0, 0.0, 1.0])
    for a in alignments[:12]:
        first.update(stats(a))
    state = json.loads(json.dumps(first.state_dict()))  # -inf log-weight of the switched-off base survives JSON
    resumed = DGA(5, base_distributions=matrix, ema=0.5)
    resumed.load_state_dict(state)
    for a in alignments[12:]:
        resumed.update(stats(a))
    np.testing.assert_array_equal(resumed.weights, straight.weights)
    assert resumed.num_updates == straight.num_updates == 30
    assert resumed.base_weights[1] == 0.0


def test_load_rejects_mismatched_state():
    matrix = base_distributions_from_clusters([0, 1, 1, 2], [1, 2, 3, 4])
    method = DGA(4, base_distributions=matrix)
    method.update(stats([1.0, 0.0, -1.0]))
    state = method.state_dict()
    with pytest.raises(ValueError, match="3 base weights"):
        DGA(4).load_state_dict(state)
    other = base_distributions_from_clusters([0, 1, 2, 2], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="inconsistent"):
        DGA(4, base_distributions=other).load_state_dict(state)
    broken = dict(state, base_log_weights=state["base_log_weights"][:2])
    with pytest.raises(ValueError, match="expected 3"):
        DGA(4, base_distributions=matrix).load_state_dict(broken)
    with pytest.raises(ValueError, match="not 'dga'"):
        DGA(4, base_distributions=matrix).load_state_dict(dict(state, name="doge"))


# -- importance sampling ---------------------------------------------------------------------------------------------
def test_importance_weights_by_hand():
    np.testing.assert_allclose(Importance(3, target_counts=[3, 0, 1]).weights, [0.75, 0.0, 0.25], rtol=1e-15)
    np.testing.assert_allclose(
        Importance(3, target_counts=[3, 0, 1], pseudo_count=1.0).weights, [4 / 7, 1 / 7, 2 / 7], rtol=1e-15
    )
    mixed = Importance(4, target_counts=[2, 2, 0, 0], uniform_mix=0.2).weights
    np.testing.assert_allclose(mixed, [0.45, 0.45, 0.05, 0.05], rtol=1e-15)


def test_importance_is_static():
    method = make_method("importance", 3, target_counts=[1, 1, 2])
    new = method.update(stats([100.0, -100.0, 0.0]))
    np.testing.assert_allclose(new, [0.25, 0.25, 0.5], rtol=1e-15)


@pytest.mark.parametrize(
    "counts, params, match",
    [
        ([0, 0, 0], {}, "all zero"),
        ([0, 0, 0], {"pseudo_count": 1.0}, "all zero"),
        ([1, -1, 2], {}, r"\[1\] = -1"),
        ([1, np.nan, 2], {}, "finite"),
        ([1, 2], {}, "2 entries"),
        (None, {}, "needs target_counts"),
        ([1, 1, 1], {"pseudo_count": -1}, "pseudo_count"),
        ([1, 1, 1], {"uniform_mix": 1.5}, "uniform_mix"),
    ],
)
def test_importance_errors(counts, params, match):
    with pytest.raises(ValueError, match=match):
        Importance(3, target_counts=counts, **params)


# -- DoGE ------------------------------------------------------------------------------------------------------------
def test_doge_clipped_step_and_average_by_hand():
    method = DoGE(3, step_size=2.0, clip=1.0)
    first = method.update(stats([5.0, 0.1, -0.25]))  # mu * a = [10, 0.2, -0.5] -> clipped to [1, 0.2, -0.5]
    w1 = hand_step([1 / 3] * 3, [1.0, 0.2, -0.5])
    np.testing.assert_allclose(first, w1, rtol=1e-12)
    np.testing.assert_allclose(method.average_weights, w1, rtol=1e-12)
    second = method.update(stats([-100.0, np.nan, 0.0]))  # domain 1 missing: exponent 0
    w2 = hand_step(w1, [-1.0, 0.0, 0.0])
    np.testing.assert_allclose(second, w2, rtol=1e-12)
    np.testing.assert_allclose(method.average_weights, (w1 + w2) / 2, rtol=1e-12)
    np.testing.assert_allclose(method.current_weights, w2, rtol=1e-12)


def test_doge_can_sample_with_the_average():
    method = DoGE(2, step_size=1.0, clip=None, sample_with_average=True)
    method.update(stats([1.0, 0.0]))
    out = method.update(stats([1.0, 0.0]))
    w1, w2 = hand_step([0.5, 0.5], [1.0, 0.0]), hand_step([0.5, 0.5], [2.0, 0.0])
    np.testing.assert_allclose(out, (w1 + w2) / 2, rtol=1e-12)
    np.testing.assert_allclose(method.current_weights, w2, rtol=1e-12)


def test_doge_without_clip_equals_plain_dga_without_ema():
    doge, dga = DoGE(5, step_size=0.3, clip=None), DGA(5, step_size=0.3, ema=0.0, normalize="none")
    rng = np.random.default_rng(2)
    for _ in range(100):
        a = rng.normal(size=5)
        np.testing.assert_allclose(doge.update(stats(a)), dga.update(stats(a)), rtol=1e-12)


def test_doge_skips_degenerate_and_keeps_the_average():
    method = DoGE(3)
    method.update(stats([1.0, 0.0, 0.0]))
    before = method.average_weights
    method.update(stats([np.nan, np.nan, np.nan]))
    assert method.last_skip_reason is not None
    assert "no usable" in method.last_skip_reason
    np.testing.assert_array_equal(method.average_weights, before)
    method.update(stats([1e308, -1e308, 0.0]))  # clip tames the overflow of mu * a
    assert method.last_skip_reason is None
    assert_probability_vector(method.weights, 3)


def test_doge_state_roundtrip():
    rng = np.random.default_rng(4)
    alignments = rng.normal(size=(20, 4))
    straight = DoGE(4, sample_with_average=True)
    for a in alignments:
        straight.update(stats(a))
    first = DoGE(4, sample_with_average=True)
    for a in alignments[:7]:
        first.update(stats(a))
    resumed = DoGE(4, sample_with_average=True)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for a in alignments[7:]:
        resumed.update(stats(a))
    np.testing.assert_allclose(resumed.weights, straight.weights, rtol=1e-14)
    np.testing.assert_allclose(resumed.current_weights, straight.current_weights, rtol=1e-14)
    state = first.state_dict()
    with pytest.raises(ValueError, match="expected 4"):
        DoGE(4).load_state_dict(dict(state, current_log_weights=state["current_log_weights"][:3]))
    with pytest.raises(ValueError, match="average_weights has 2 entries"):
        DoGE(4).load_state_dict(dict(state, average_weights=[0.5, 0.5]))


@pytest.mark.parametrize(
    "params, match", [({"clip": 0}, "clip"), ({"step_size": -1}, "step_size"), ({"normalize": "x"}, "normalize")]
)
def test_doge_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        DoGE(3, **params)


# -- synthetic linear-regression mixture (we play the probe) ---------------------------------------------------------
def regression_problem(seed, dim=8, num_domains=6, num_aligned=2, n=200):
    """Domains y = X theta_k + noise; the first ``num_aligned`` have theta_k close to the target's theta_t."""
    rng = np.random.default_rng(seed)
    theta_target = rng.normal(size=dim)
    thetas = [theta_target + 0.1 * rng.normal(size=dim) for _ in range(num_aligned)]
    thetas += [rng.normal(size=dim) for _ in range(num_domains - num_aligned)]
    domains = []
    for theta in thetas:
        x = rng.normal(size=(n, dim))
        domains.append((x, x @ theta + 0.1 * rng.normal(size=n)))
    x_target = rng.normal(size=(50, dim))
    return domains, (x_target, x_target @ theta_target + 0.1 * rng.normal(size=50))


def mse_gradient(theta, x, y):
    return x.T @ (x @ theta - y) / len(y)


def mse_loss(theta, x, y):
    return 0.5 * float(np.mean((x @ theta - y) ** 2))


def train_on_mixture(
    method, domains, target, *, seed, steps=200, lr=0.05, batch=32, probe_every=5, probe_examples=None
):
    """SGD on batches sampled from the method's weights; every ``probe_every`` steps, alignments -> update.

    probe_examples=None: exact full-domain gradients; an int: gradients of that many random examples (noisy).
    """
    rng = np.random.default_rng(seed)
    k, dim = len(domains), domains[0][0].shape[1]
    theta, history = np.zeros(dim), []
    for step in range(steps):
        weights = method.weights if method is not None else np.full(k, 1.0 / k)
        grad = np.zeros(dim)
        for domain, count in enumerate(rng.multinomial(batch, weights)):
            if count:
                x, y = domains[domain]
                idx = rng.integers(len(y), size=count)
                grad += x[idx].T @ (x[idx] @ theta - y[idx])
        theta -= lr * grad / batch
        if method is not None and step % probe_every == 0:
            target_grad = mse_gradient(theta, *target)
            alignment = []
            for x, y in domains:
                idx = slice(None) if probe_examples is None else rng.integers(len(y), size=probe_examples)
                alignment.append(mse_gradient(theta, x[idx], y[idx]) @ target_grad)
            method.update(stats(alignment, step=step))
            history.append(method.weights)
    return theta, np.array(history)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_dga_moves_weight_to_aligned_domains_and_lowers_target_loss(seed, ema):
    domains, target = regression_problem(seed)
    theta_uniform, _ = train_on_mixture(None, domains, target, seed=seed)
    theta_dga, history = train_on_mixture(DGA(6, ema=ema), domains, target, seed=seed)
    assert history[-1][:2].sum() > 0.8, history[-1]
    assert mse_loss(theta_dga, *target) < 0.2 * mse_loss(theta_uniform, *target)


def test_reweighted_dga_on_coarse_groups_lowers_target_loss():
    # 12 fine clusters = the 6 regression domains split in two halves; coarse group j = domain j.
    domains, target = regression_problem(7)
    fine = [(x[half], y[half]) for x, y in domains for half in (slice(0, 100), slice(100, 200))]
    fine_to_coarse = np.repeat(np.arange(6), 2)
    method = DGA(12, base_distributions=base_distributions_from_clusters(fine_to_coarse, np.full(12, 100.0)))
    rng = np.random.default_rng(0)
    theta = np.zeros(8)
    for step in range(200):
        grad = np.zeros(8)
        for cluster, count in enumerate(rng.multinomial(32, method.weights)):
            if count:
                x, y = fine[cluster]
                idx = rng.integers(len(y), size=count)
                grad += x[idx].T @ (x[idx] @ theta - y[idx])
        theta -= 0.05 * grad / 32
        if step % 5 == 0:
            target_grad = mse_gradient(theta, *target)
            # One gradient per base distribution: the mean gradient of its clusters (equal sizes).
            alignment = [
                np.mean([mse_gradient(theta, *fine[c]) for c in np.flatnonzero(fine_to_coarse == j)], axis=0)
                @ target_grad
                for j in range(6)
            ]
            method.update(stats(alignment, step=step))
    assert method.base_weights[:2].sum() > 0.8
    assert method.weights[:4].sum() > 0.8
    theta_uniform, _ = train_on_mixture(None, domains, target, seed=0)
    assert mse_loss(theta, *target) < 0.2 * mse_loss(theta_uniform, *target)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ema_lowers_weight_variance_under_noisy_alignments(seed):
    domains, target = regression_problem(seed)
    jitter = {}
    for ema in (0.0, 0.8):
        _, history = train_on_mixture(DGA(6, ema=ema), domains, target, seed=seed, probe_examples=2)
        jitter[ema] = np.mean(np.sum(np.diff(history, axis=0) ** 2, axis=1))  # variance of the weight increments
    assert jitter[0.8] < 0.5 * jitter[0.0]
    # Pure-noise alignments (no signal at all): the weights wander much less with the EMA.
    spread = {}
    for ema in (0.0, 0.8):
        rng, method, history = np.random.default_rng(seed), DGA(6, ema=ema), []
        for step in range(100):
            history.append(method.update(stats(rng.normal(size=6), step=step)))
        spread[ema] = np.var(np.array(history), axis=0).sum()
    assert spread[0.8] < 0.5 * spread[0.0]


def test_doge_also_finds_the_aligned_domains():
    domains, target = regression_problem(0)
    method = DoGE(6, step_size=1.0, clip=0.2, normalize="max_abs")
    _, history = train_on_mixture(method, domains, target, seed=0)
    assert history[-1][:2].sum() > 0.8
    assert method.average_weights[:2].sum() > 0.5


# -- property: weights always a probability vector ------------------------------------------------------------------
alignment_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e3, max_value=1e3),
    st.sampled_from([0.0, -0.0, 1e-300, -1e300, 1e300]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    alignments=st.lists(st.lists(alignment_values, min_size=3, max_size=3), min_size=1, max_size=15),
    step_size=st.floats(min_value=1e-3, max_value=50.0),
    ema=st.floats(min_value=0.0, max_value=0.99),
    min_weight=st.sampled_from([0.0, 0.01, 0.3]),
    normalize=st.sampled_from(["none", "max_abs", "rms"]),
    reweight=st.booleans(),
)
def test_dga_weights_always_valid(alignments, step_size, ema, min_weight, normalize, reweight):
    matrix = base_distributions_from_clusters([0, 1, 2, 2, 0], [1, 2, 3, 4, 5]) if reweight else None
    k = 5 if reweight else 3
    method = DGA(k, step_size=step_size, ema=ema, min_weight=min_weight, normalize=normalize, base_distributions=matrix)
    for a in alignments:
        assert_probability_vector(method.update(stats(a)), k)
        assert_probability_vector(method.base_weights, 3)
        assert method.base_weights.min() >= min_weight - 1e-12


@settings(max_examples=40, deadline=None)
@given(
    alignments=st.lists(st.lists(alignment_values, min_size=3, max_size=3), min_size=1, max_size=15),
    step_size=st.floats(min_value=1e-3, max_value=1e6),
    clip=st.one_of(st.none(), st.floats(min_value=1e-3, max_value=100.0)),
    normalize=st.sampled_from(["none", "max_abs", "rms"]),
    average=st.booleans(),
)
def test_doge_weights_always_valid(alignments, step_size, clip, normalize, average):
    method = DoGE(3, step_size=step_size, clip=clip, normalize=normalize, sample_with_average=average)
    for a in alignments:
        assert_probability_vector(method.update(stats(a)), 3)
        assert_probability_vector(method.average_weights, 3)
