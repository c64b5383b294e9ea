"""Peer baselines DoReMi (online), ODM (EXP3) and FAMO: hand-computed steps, stability, resume, validity."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_probability_vector
from gradmix import DomainStats, StatsError, make_method
from gradmix.methods.doremi import DoReMi
from gradmix.methods.famo import FAMO, softmax_jacobian_transpose_product
from gradmix.methods.odm import ODM, exploration_rate

NAN = float("nan")


def record(loss, step=0, **extra):
    loss = np.asarray(loss, dtype=np.float64)
    return DomainStats(step=step, num_domains=loss.shape[0], loss=loss, extra=dict(extra))


# --------------------------------------------------------------------------------------------------- DoReMi
def test_doremi_single_step_matches_hand_computation():
    # lambda = max(L - ref, 0) = (1, 0, 2); from uniform, alpha' ~ (e, 1, e^2).
    method = DoReMi(3, reference_loss=[2.0, 2.5, 3.0], step_size=1.0, smoothing=0.1)
    w = method.update(record([3.0, 2.0, 5.0]))
    tilted = np.array([math.e, 1.0, math.e**2]) / (math.e + 1.0 + math.e**2)
    np.testing.assert_allclose(w, 0.9 * tilted + 0.1 / 3, rtol=0, atol=1e-15)


def test_doremi_two_steps_without_smoothing_multiply_exponentials():
    method = DoReMi(2, reference_loss=[1.0, 1.0], step_size=0.5, smoothing=0.0)
    method.update(record([3.0, 1.5]))  # lambda (2, 0.5)
    w = method.update(record([1.0, 2.0]))  # lambda (0, 1)
    # alpha_2 ~ exp(0.5 * (2 + 0)), exp(0.5 * (0.5 + 1))
    a, b = math.exp(1.0), math.exp(0.75)
    np.testing.assert_allclose(w, [a / (a + b), b / (a + b)], rtol=0, atol=1e-15)


def test_doremi_excess_loss_is_clipped_at_zero():
    method = DoReMi(2, reference_loss=[5.0, 1.0], smoothing=0.0)
    np.testing.assert_array_equal(method.excess_loss(record([3.0, 4.0])), [0.0, 3.0])


def test_doremi_per_batch_reference_from_stats_overrides_parameter():
    method = DoReMi(2, reference_loss=[0.0, 0.0], step_size=1.0, smoothing=0.0)
    w = method.update(record([2.0, 2.0], reference_loss=[2.0, 1.0]))  # lambda (0, 1)
    np.testing.assert_allclose(w, [1 / (1 + math.e), math.e / (1 + math.e)], atol=1e-15)


def test_doremi_missing_domain_keeps_its_weight_others_share_the_rest():
    method = DoReMi(3, reference_loss=[1.0, 1.0, 1.0], step_size=1.0, smoothing=0.0)
    w = method.update(record([NAN, 2.0, 4.0]))  # lambda (-, 1, 3)
    assert w[0] == pytest.approx(1 / 3, abs=1e-15)
    share = np.array([math.e, math.e**3]) / (math.e + math.e**3)
    np.testing.assert_allclose(w[1:], (2 / 3) * share, atol=1e-15)
    assert method.last_skip_reason is None


def test_doremi_smoothing_floor_holds_with_missing_domains():
    rng = np.random.default_rng(0)
    c, k = 0.05, 4
    method = DoReMi(k, reference_loss=np.zeros(k), step_size=3.0, smoothing=c)
    for _ in range(300):
        loss = rng.uniform(0, 5, size=k)
        loss[rng.random(k) < 0.3] = NAN
        w = method.update(record(loss))
        assert_probability_vector(w, k)
        assert w.min() >= c / k - 1e-15


def test_doremi_average_weights_is_the_mean_over_updates():
    rng = np.random.default_rng(1)
    method = DoReMi(3, reference_loss=[1.0, 2.0, 3.0], step_size=0.3)
    np.testing.assert_array_equal(method.average_weights, method.weights)  # before any update: alpha_0
    history = [method.update(record(rng.uniform(0, 6, size=3))) for _ in range(25)]
    np.testing.assert_allclose(method.average_weights, np.mean(history, axis=0), atol=1e-14)


def test_doremi_all_missing_skips_with_reason():
    method = DoReMi(2, reference_loss=[1.0, 1.0])
    before = method.weights
    w = method.update(record([NAN, float("inf")]))
    np.testing.assert_array_equal(w, before)
    assert method.last_skip_reason and "doremi" in method.last_skip_reason
    assert method.num_updates == 0


def test_doremi_bad_parameters_raise_clear_errors():
    with pytest.raises(ValueError, match="reference_loss has 2 entries but there are 3 domains"):
        DoReMi(3, reference_loss=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite value nan for domain 1"):
        DoReMi(2, reference_loss=[1.0, NAN])
    with pytest.raises(ValueError, match="step_size"):
        DoReMi(2, reference_loss=[1.0, 1.0], step_size=-0.1)
    with pytest.raises(ValueError, match="smoothing"):
        DoReMi(2, reference_loss=[1.0, 1.0], smoothing=1.5)
    with pytest.raises(StatsError, match="needs reference losses"):
        DoReMi(2).update(record([1.0, 2.0]))
    with pytest.raises(StatsError, match=r"extra\['reference_loss'\] has 3 entries"):
        DoReMi(2).update(record([1.0, 2.0], reference_loss=[1.0, 1.0, 1.0]))


# --------------------------------------------------------------------------------------------------- ODM
def test_odm_exploration_rate_schedule():
    assert exploration_rate(4, 0) == 0.25
    assert exploration_rate(4, 1) == 0.25  # sqrt(ln 4 / 4) = 0.59 > 1/4
    assert exploration_rate(4, 100) == pytest.approx(math.sqrt(math.log(4) / 400), rel=1e-15)
    assert exploration_rate(1, 5) == 0.0


def test_odm_two_rounds_by_hand():
    method = ODM(2)
    w1 = method.update(record([1.0, 3.0]))
    # round 1: eps_1 = min(1/2, sqrt(ln2/2)) = 1/2 -> uniform; R_hat = (1/0.5, 3/0.5) = (2, 6), stored as (-4, 0)
    np.testing.assert_allclose(w1, [0.5, 0.5], atol=1e-15)
    np.testing.assert_allclose(method.estimated_reward, [-4.0, 0.0], atol=1e-15)
    w2 = method.update(record([1.0, NAN]))
    # round 2: only domain 0 sampled: R_hat = (4, 6); exponent uses eps_1 = 1/2; eps_2 = sqrt(ln2/4)
    eps2 = math.sqrt(math.log(2) / 4)
    gibbs0 = math.exp(0.5 * 4) / (math.exp(0.5 * 4) + math.exp(0.5 * 6))
    expected0 = (1 - 2 * eps2) * gibbs0 + eps2
    np.testing.assert_allclose(w2, [expected0, 1 - expected0], atol=1e-15)


def naive_odm(losses, k, scale=1.0):
    """The textbook EXP3 loop with raw exponentials (fine for small rewards): an independent reference."""
    cumulative = [0.0] * k
    probs = [1.0 / k] * k
    out = []
    for t, loss in enumerate(losses, start=1):
        for i in range(k):
            if math.isfinite(loss[i]):
                cumulative[i] += scale * loss[i] / probs[i]
        eps = min(1 / k, math.sqrt(math.log(k) / (k * t)))
        eps_prev = 1 / k if t == 1 else min(1 / k, math.sqrt(math.log(k) / (k * (t - 1))))
        total = sum(math.exp(eps_prev * r) for r in cumulative)
        probs = [(1 - k * eps) * math.exp(eps_prev * r) / total + eps for r in cumulative]
        out.append(probs)
    return np.array(out)


def test_odm_matches_naive_exp3_on_small_rewards():
    rng = np.random.default_rng(2)
    k = 4
    losses = rng.uniform(0.0, 0.5, size=(60, k)) + np.array([1.5, 0.0, 0.0, 0.0])
    losses[rng.random(losses.shape) < 0.25] = NAN
    method = ODM(k, reward_scale=0.5)
    ours = np.array([method.update(record(loss)) for loss in losses])
    np.testing.assert_allclose(ours, naive_odm(losses, k, scale=0.5), rtol=1e-10, atol=1e-13)
    assert ours[-1].max() > 0.5  # the policy did move: the comparison is not uniform vs uniform


def test_odm_reward_smoothing_is_a_moving_average():
    method = ODM(2, reward_smoothing=0.5)
    method.update(record([1.0, 3.0]))  # r = (2, 6) -> R_hat = (1, 3)
    method.update(record([NAN, 1.0]))  # pi uniform still; r_1 = 2 -> R_hat_1 = 0.5*3 + 0.5*2
    np.testing.assert_allclose(method.estimated_reward, [1.0, 2.5], atol=1e-15)


def test_odm_100k_updates_with_large_rewards_stay_finite():
    k = 3
    rng = np.random.default_rng(3)
    method = ODM(k)
    naive_cumulative = np.zeros(k)
    losses = np.array([3e4, 1e4, 2e4]) * rng.uniform(0.5, 1.5, size=(100_000, k))
    w = method.weights
    for loss in losses:
        naive_cumulative += loss / w
        w = method.update(DomainStats(step=0, num_domains=k, loss=loss))
    assert_probability_vector(w, k)
    t = method.rounds
    assert t == 100_000
    # A raw exp(eps * R_hat) would have overflowed long ago: this test can fail on a naive mixer.
    assert exploration_rate(k, t - 1) * naive_cumulative.max() > 709.8
    # Same policy as a stable evaluation of the raw cumulative rewards.
    z = exploration_rate(k, t - 1) * (naive_cumulative - naive_cumulative.max())
    gibbs = np.exp(z) / np.exp(z).sum()
    eps = exploration_rate(k, t)
    np.testing.assert_allclose(w, (1 - k * eps) * gibbs + eps, atol=1e-9)


def test_odm_all_missing_skips_and_does_not_advance_the_round():
    method = ODM(3)
    w = method.update(record([NAN, NAN, NAN]))
    np.testing.assert_array_equal(w, np.full(3, 1 / 3))
    assert method.last_skip_reason is not None
    assert method.rounds == 0 and "odm" in method.last_skip_reason


def test_odm_bad_parameters_raise_clear_errors():
    with pytest.raises(ValueError, match="reward_scale"):
        ODM(2, reward_scale=-1.0)
    with pytest.raises(ValueError, match="reward_scale"):
        ODM(2, reward_scale=0.0)
    with pytest.raises(ValueError, match="reward_smoothing"):
        ODM(2, reward_smoothing=1.0)


# --------------------------------------------------------------------------------------------------- FAMO
def test_famo_softmax_jacobian_product_matches_finite_differences():
    rng = np.random.default_rng(4)
    xi, v = rng.normal(size=5), rng.normal(size=5)

    def objective(x):
        z = np.exp(x - x.max())
        return float(v @ (z / z.sum()))

    h = 1e-6
    numeric = np.array([(objective(xi + h * e) - objective(xi - h * e)) / (2 * h) for e in np.eye(5)])
    np.testing.assert_allclose(softmax_jacobian_transpose_product(xi, v), numeric, atol=1e-9)


def test_famo_first_record_is_only_stored():
    method = FAMO(3)
    w = method.update(record([2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(w, np.full(3, 1 / 3))
    np.testing.assert_array_equal(method.logits, np.zeros(3))
    assert method.last_skip_reason is None


def test_famo_sgd_step_by_hand():
    method = FAMO(2, optimizer="sgd", step_size=1.0, weight_decay=0.0)
    method.update(record([2.0, 4.0]))
    w = method.update(record([1.0, 3.6]))
    d0, d1 = math.log(2.0), math.log(4.0 / 3.6)
    mean = 0.5 * (d0 + d1)
    g = np.array([0.5 * (d0 - mean), 0.5 * (d1 - mean)])  # z_k (delta_k - z.delta), z uniform
    np.testing.assert_allclose(method.logits, -g, atol=1e-15)
    np.testing.assert_allclose(w, np.exp(-g) / np.exp(-g).sum(), atol=1e-15)
    assert w[0] < w[1]  # domain 0's loss fell faster, so it loses weight


def test_famo_weight_decay_pulls_logits_towards_zero():
    method = FAMO(2, optimizer="sgd", step_size=0.5, weight_decay=0.2)
    method.update(record([2.0, 2.0]))
    method.update(record([1.0, 2.0]))
    xi = method.logits
    method.update(record([1.0, 2.0]))  # delta = 0: only decay acts
    np.testing.assert_allclose(method.logits, xi * (1 - 0.5 * 0.2), atol=1e-15)


def test_famo_adam_matches_torch_adam():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    losses = rng.uniform(0.5, 3.0, size=(12, 4))
    method = FAMO(4, step_size=0.025, weight_decay=0.01, min_loss=0.2)
    logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.025, weight_decay=0.01)
    method.update(record(losses[0]))
    for prev, now in itertools.pairwise(losses):
        w = method.update(record(now))
        delta = torch.tensor(np.log(prev - 0.2) - np.log(now - 0.2))
        opt.zero_grad()
        (torch.softmax(logits, 0) * delta).sum().backward()  # gradient J^T delta, as in the released code
        opt.step()
        np.testing.assert_allclose(method.logits, logits.detach().numpy(), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(w, torch.softmax(logits, 0).detach().numpy(), atol=1e-12)


def test_famo_missing_domain_keeps_its_logit_and_needs_consecutive_records():
    method = FAMO(3, optimizer="sgd", step_size=1.0, weight_decay=0.0)
    method.update(record([2.0, 2.0, 2.0]))
    method.update(record([NAN, 1.0, 1.5]))
    d1, d2 = math.log(2.0), math.log(2.0 / 1.5)
    mean = 0.5 * (d1 + d2)  # z-weighted mean over the observed domains (z uniform)
    np.testing.assert_allclose(method.logits, [0.0, -(d1 - mean) / 3, -(d2 - mean) / 3], atol=1e-15)
    # Domain 0 is back but was missing last time: no delta for it yet, its logit stays 0.
    method.update(record([1.0, 1.0, 1.5]))
    assert method.logits[0] == 0.0


def test_famo_losses_at_or_below_min_loss_count_as_missing():
    method = FAMO(2, optimizer="sgd", step_size=1.0, weight_decay=0.0, min_loss=[0.0, 1.0])
    method.update(record([2.0, 2.0]))
    method.update(record([1.0, 0.5]))  # domain 1 below its floor
    assert method.logits[1] == 0.0 and method.logits[0] == 0.0  # a lone observed domain has J^T delta = 0
    assert method.last_skip_reason is None


def test_famo_upweights_the_domain_whose_loss_falls_slowest():
    method = FAMO(3)
    for t in range(200):
        w = method.update(record([3.0 * 0.99**t, 3.0 * 0.995**t, 3.0 * 0.999**t]))
    assert w[0] < w[1] < w[2]


def test_famo_record_without_any_valid_loss_skips_even_first():
    method = FAMO(2)
    method.update(record([NAN, 0.0]))
    assert method.last_skip_reason and method.num_updates == 0


def test_famo_all_missing_after_baseline_skips():
    method = FAMO(2)
    method.update(record([1.0, 2.0]))
    method.update(record([NAN, -1.0]))
    assert method.last_skip_reason and "famo" in method.last_skip_reason


def test_famo_bad_parameters_raise_clear_errors():
    with pytest.raises(ValueError, match="step_size"):
        FAMO(2, step_size=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        FAMO(2, weight_decay=-0.1)
    with pytest.raises(ValueError, match="optimizer"):
        FAMO(2, optimizer="rmsprop")
    with pytest.raises(ValueError, match="min_loss has 3 entries"):
        FAMO(2, min_loss=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="adam_betas"):
        FAMO(2, adam_betas=(0.9, 1.0))


# --------------------------------------------------------------------------------------------------- shared
FACTORIES = {
    "doremi": lambda k: make_method("doremi", k, reference_loss=np.linspace(1.0, 2.0, k), step_size=0.7),
    "odm": lambda k: make_method("odm", k, reward_scale=0.3),
    "odm_smoothed": lambda k: make_method("odm", k, reward_smoothing=0.5),
    "famo": lambda k: make_method("famo", k, step_size=0.1),
    "famo_sgd": lambda k: make_method("famo", k, optimizer="sgd", step_size=2.0),
}


def test_make_method_by_name_builds_the_peer_classes():
    assert type(make_method("doremi", 3, reference_loss=[1, 1, 1])) is DoReMi
    assert type(make_method("ODM", 3)) is ODM
    assert type(make_method("famo", 3)) is FAMO
    with pytest.raises(ValueError, match="bad parameters for mixing method 'odm'"):
        make_method("odm", 3, eta=1.0)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_state_dict_round_trip_continues_identically(kind):
    k = 4
    rng = np.random.default_rng(6)
    losses = rng.uniform(0.5, 4.0, size=(20, k))
    losses[rng.random(losses.shape) < 0.2] = NAN
    original = FACTORIES[kind](k)
    for loss in losses[:10]:
        original.update(record(loss))
    state = json.loads(json.dumps(original.state_dict(), allow_nan=False))  # JSON-safe, exact floats
    resumed = FACTORIES[kind](k)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.weights, original.weights)
    for loss in losses[10:]:
        np.testing.assert_array_equal(resumed.update(record(loss)), original.update(record(loss)))
    assert resumed.state_dict() == original.state_dict()


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_load_state_dict_rejects_another_method(kind):
    other = "famo" if not kind.startswith("famo") else "odm"
    with pytest.raises(ValueError, match="state is for method"):
        FACTORIES[kind](3).load_state_dict(make_method(other, 3).state_dict())


loss_values = st.one_of(
    st.floats(min_value=-1e3, max_value=1e300, allow_nan=False, allow_infinity=False),
    st.sampled_from([NAN, float("inf"), -float("inf"), 0.0, 1e-300, 5e-324, 1e308]),
)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(FACTORIES)), k=st.integers(1, 5), data=st.data())
def test_weights_are_always_a_probability_vector(kind, k, data):
    method = FACTORIES[kind](k)
    steps = data.draw(st.integers(1, 25))
    for _ in range(steps):
        loss = data.draw(st.lists(loss_values, min_size=k, max_size=k))
        w = method.update(record(loss))
        assert_probability_vector(w, k)
        assert_probability_vector(method.weights, k)
    if kind == "doremi":
        assert isinstance(method, DoReMi)
        assert_probability_vector(method.average_weights, k)
