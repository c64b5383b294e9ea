"""PiKE's default (variant "gradmix") and its named variants, against the toy problem where the answer is known
(Example 2.1 of arXiv 2502.06244): eq. 4, Algorithm 1 literally, shrinkage, recovery from the floor."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from gradmix.methods import make_method
from gradmix.methods.pike import PiKE, shrink_to_mean, shrinkage_centre, water_filling
from gradmix.stats import DomainStats
from gradmix_kit.pike_toy import ToyProblem, ToySetting, example_2_1_weights, run_exact, run_mixer, suite


def record(grad_sq_norm, grad_var, examples, batch_size=16, step=0):
    return DomainStats(
        step=step,
        num_domains=len(grad_sq_norm),
        batch_size=batch_size,
        grad_sq_norm=np.asarray(grad_sq_norm, dtype=float),
        grad_var=np.asarray(grad_var, dtype=float),
        examples=np.asarray(examples, dtype=float),
    )


@pytest.mark.parametrize("seed", range(20))
def test_water_filling_is_eq_4_of_example_2_1(seed):
    """The bound's minimiser (lam, kappa of Thm 3.4 with L = 1, c = c_bar = 0, d = 2) equals the minimiser of the
    exact expected loss after one SGD step, derived independently in ``example_2_1_weights``."""
    rng = np.random.default_rng(seed)
    theta, noise = rng.normal(size=2) * rng.uniform(0.1, 3), rng.uniform(0.05, 3.0, size=2)
    lr, b = rng.uniform(0.05, 1.0), int(rng.integers(1, 64))
    grad_sq = theta**2
    lam = -lr * grad_sq + (lr**2 / (2 * b)) * 2 * noise**2
    kappa = lr**2 * grad_sq
    np.testing.assert_allclose(water_filling(lam, kappa), example_2_1_weights(theta, noise, lr, b), atol=1e-12)


def test_example_2_1_weights_minimise_the_simulated_expected_loss():
    """eq. 4 is the argmin of E[L(theta+)], checked against a Monte-Carlo average over a grid of mixes."""
    theta, noise, lr, b = np.array([1.0, 0.3]), np.array([0.5, 2.0]), 0.5, 8
    w_star = example_2_1_weights(theta, noise, lr, b)[0]
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200_000, 2))

    def expected(w):
        step = np.array([w, 1 - w]) * theta
        var = (w * noise[0] ** 2 + (1 - w) * noise[1] ** 2) / b
        after = theta - lr * (step + math.sqrt(var) * z)
        return float(np.mean(0.5 * np.sum(after**2, axis=1)))

    grid = np.linspace(0, 1, 21)
    values = [expected(w) for w in grid]
    assert abs(grid[int(np.argmin(values))] - w_star) <= 0.05 + 1e-12


def test_paper_variant_is_algorithm_1_literally():
    """Raw statistics, constant zeta, no normaliser, EMA, clip or floor."""
    method = make_method("pike", 3, variant="paper", zeta1=0.5, zeta2=2.0)
    assert isinstance(method, PiKE)
    g, v, b = np.array([1.0, 4.0, 0.25]), np.array([10.0, 80.0, 3.0]), 8
    w = method.update(record(g, v, [8, 8, 8], batch_size=b))
    expected = np.exp(0.5 * g - (2.0 / (2 * b)) * v)
    np.testing.assert_allclose(w, expected / expected.sum(), rtol=1e-12)
    w2 = method.update(record(g, v, [8, 8, 8], batch_size=b))
    expected2 = expected * np.exp(0.5 * g - (2.0 / (2 * b)) * v)
    np.testing.assert_allclose(w2, expected2 / expected2.sum(), rtol=1e-12)
    assert method.mode == "practical" and method.stats_ema == 0 and not method.shrinkage


def test_variants_and_old_mode_spelling():
    assert PiKE(3).variant == "gradmix" and PiKE(3).mode == "conceptual"
    assert PiKE(3, mode="practical").variant == "gradmix_v1"
    assert PiKE(3, mode="conceptual").variant == "conceptual"
    with pytest.raises(ValueError, match="variant"):
        PiKE(3, variant="nope")
    with pytest.raises(ValueError, match="uniform_mix"):
        PiKE(3, variant="paper", uniform_mix=0.5)
    with pytest.raises(ValueError, match="lr_smoothness"):
        PiKE(3, lr_smoothness=[1.0, -1.0])


def test_shrink_to_mean():
    values = np.array([1.0, 2.0, 9.0])
    np.testing.assert_allclose(shrink_to_mean(values, np.zeros(3)), values)  # no noise: unchanged
    np.testing.assert_allclose(shrink_to_mean(values, np.full(3, 1e6)), np.full(3, 4.0))  # all noise: the mean
    shrunk = shrink_to_mean(values, np.array([0.0, 0.0, 1.0]))
    assert shrunk[2] == pytest.approx(4.0 + (1 - 1 / 25) * 5.0)


def test_shrinkage_centres_of_a_noisy_entry():
    """One entry at -800 with standard error 1000 beside three precise ones near 35: the plain mean follows the
    noisy entry below 0, the precision-weighted centre stays with the precise ones, the median sits between."""
    values = np.array([40.0, 36.0, -800.0, 30.0])
    variances = np.array([4.0, 4.0, 1e6, 4.0])
    assert shrinkage_centre(values, variances, "mean") == pytest.approx(-173.5)
    assert 30.0 <= shrinkage_centre(values, variances, "precision") <= 40.0
    assert shrinkage_centre(values, variances, "median") == pytest.approx(33.0)
    assert 30.0 <= shrink_to_mean(values, variances, "precision")[2] <= 40.0
    assert shrink_to_mean(values, variances)[2] < 0  # the default's prior: the noisy entry pulls its centre along
    # equal noise: the weighted centre is the plain mean; exact entries: the mean of those
    assert shrinkage_centre(values, np.full(4, 9.0), "precision") == pytest.approx(float(np.mean(values)))
    assert shrinkage_centre(values, np.array([0.0, 4.0, 1e6, 0.0]), "precision") == pytest.approx(35.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        shrinkage_centre(values, variances, "mode")
    with pytest.raises(ValueError, match="pike: shrinkage_centre must be one of"):
        PiKE(4, shrinkage_centre="mode")


@pytest.mark.parametrize("centre, low, high", [("mean", 0.0, 0.0), ("precision", 25.0, 45.0)])
def test_shrinkage_centre_reaches_the_statistics_pike_compares(centre, low, high):
    """Domain 2's ||g||^2 is measured on 4 examples with a huge variance and reads -3000: under the mean centre it
    is shrunk to the (negative) mean and clipped to 0, under the precision centre to the precise domains' level."""
    method = PiKE(4, shrinkage_centre=centre, loss_tilt=0.0)
    method.update(record([40.0, 36.0, -3000.0, 30.0], [1.0, 1.0, 1e4, 1.0], [4, 4, 4, 4], batch_size=16, step=1))
    assert method.last_terms is not None
    assert low <= method.last_terms["grad_sq_norm"][2] <= high


def test_default_stays_uniform_when_differences_are_within_noise():
    """Two domains measured on 4 examples each, true statistics equal: the estimates differ by noise only, and the
    default must not move (gradmix_v1 and the paper's step move on noise)."""
    rng = np.random.default_rng(0)
    default, v1 = make_method("pike", 2), make_method("pike", 2, variant="gradmix_v1")
    for step in range(30):
        g = 1.0 + rng.normal(scale=3.0, size=2)  # ||g||^2 estimates with standard error ~3
        v = 10.0 * rng.chisquare(6, size=2) / 6
        w_default = default.update(record(g, v, [4, 4], batch_size=8, step=step))
        w_v1 = v1.update(record(g, v, [4, 4], batch_size=8, step=step))
    assert abs(w_default[0] - 0.5) < 0.05
    assert abs(w_v1[0] - 0.5) > abs(w_default[0] - 0.5)


def test_a_starved_domain_is_measured_again_and_recovers():
    """Domain 2's gradient is tiny and noisy: the bound gives it its floor, 0.65/K of the batch, which at b = 16,
    K = 3 is >= 2 examples, so it is measured at every measuring step; when its loss grows (a large ||g||^2), it
    regains more than its uniform share within a few updates."""
    # mix_evidence off: from ~4 examples the default rightly cannot tell ||g||^2 = 0 from 4 and stays nearer the
    # even split (0.25); this test is about the floor itself (the Mixer test below runs the full default)
    method = make_method("pike", 3, mix_evidence=0.0)
    b = 16
    for step in range(20):
        w = method.update(record([4.0, 4.0, 0.0], [1.0, 1.0, 400.0], b * method.weights, batch_size=b, step=step))
    floor = 0.65 / 3
    assert w[2] == pytest.approx(floor, abs=1e-9)
    assert b * w[2] >= 2  # measurable: the probe needs 2 examples for its U-statistics
    for step in range(20, 40):
        w = method.update(record([4.0, 4.0, 60.0], [1.0, 1.0, 400.0], b * method.weights, batch_size=b, step=step))
        if w[2] > 1 / 3:
            break
    assert w[2] > 1 / 3, w
    assert step - 20 <= 6


def test_toy_problem_exact_statistics_match_the_dynamics():
    problem = ToyProblem(ToySetting("t", (1.0, 4.0, 9.0), (0.5, 1.0, 2.0), batch_size=8, cosine=0.2))
    theta = np.array([0.3, -0.7, 1.1])
    u = problem.directions
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0)
    np.testing.assert_allclose(u @ u.T - np.eye(3), 0.2 * (1 - np.eye(3)), atol=1e-12)
    np.testing.assert_allclose(problem.task_losses(problem.theta0), 1.0)
    grads = problem.curvature[:, None] * (u @ theta)[:, None] * u
    np.testing.assert_allclose(problem.grad_sq_norms(theta), np.sum(grads**2, axis=1))


def test_expected_loss_propagation_matches_monte_carlo():
    problem = ToyProblem(ToySetting("t", (1.0, 10.0), (1.0, 3.0), batch_size=4, lr_fraction=0.5, steps=30))
    counts = np.tile([3.0, 1.0], (30, 1))
    exact = problem.expected_losses(counts)
    rng = np.random.default_rng(0)
    thetas = np.tile(problem.theta0, (20_000, 1))
    for n in counts:
        drift = (n * problem.curvature * (thetas @ problem.directions.T)) @ problem.directions
        noise = rng.normal(size=thetas.shape) * math.sqrt(float(n @ problem.noise_var))
        thetas = thetas - problem.lr / 4 * (drift + noise)
    mc = np.mean([problem.task_losses(t).mean() for t in thetas[:5000]])
    assert mc == pytest.approx(exact[-1], rel=0.05)


@pytest.mark.integration
def test_default_beats_uniform_through_the_mixer_where_the_bound_is_informative():
    """'K4 small lr' of the suite (noise 8x apart, curvatures 30x): the default through the Mixer, with nothing but
    update_every set, ends below uniform on every seed; Algorithm 1 literally does not."""
    warnings.simplefilter("ignore")
    problem = ToyProblem(next(s for s in suite() if s.name == "K4 small lr"))
    for seed in range(3):
        uniform = run_mixer(problem, "uniform", seed=seed).expected[-1]
        default = run_mixer(problem, "pike", seed=seed).expected[-1]
        assert default < 0.9 * uniform, (seed, default / uniform)


def test_realised_final_loss_is_the_expected_one_without_noise():
    """``ToyRun.final`` is the population loss at the parameters the run ended with: with no data noise the
    dynamics are deterministic, so it must equal the propagated expectation, on both paths."""
    warnings.simplefilter("ignore")
    problem = ToyProblem(ToySetting("quiet", (1.0, 5.0), (0.0, 0.0), batch_size=8, steps=60))
    exact = run_exact(problem, make_method("uniform", 2), seed=0, update_every=10)
    mixer = run_mixer(problem, "uniform", seed=0)
    assert exact.final == pytest.approx(exact.expected[-1], rel=1e-9)
    assert mixer.final == pytest.approx(mixer.expected[-1], rel=1e-9)
    assert exact.final < 0.5 * exact.expected[0]  # it trained: the check compares a moved theta


def test_run_exact_counts_follow_the_method():
    problem = ToyProblem(ToySetting("t", (1.0, 1.0), (0.1, 10.0), batch_size=16, steps=200))
    run = run_exact(problem, make_method("pike", 2), seed=0, update_every=10)
    assert run.counts.sum() == 16 * 200
    assert run.counts[0] > run.counts[1]  # the noisy task gets less
    assert run.weights[-1][1] >= 0.65 / 2 - 1e-12  # never below the floor


def test_through_the_mixer_a_floored_task_stays_measured_and_recovers_when_its_loss_grows():
    """Two tasks, the second already at its optimum and 10x noisier, the first slow and far from it: the default
    sends the second to its floor (0.65/K of the batch), where the Mixer's own probe still measures it at every update
    (>= 2 examples); once it has sat there for two updates its loss is made to grow (its coordinate of theta pushed
    far from the optimum), and it regains more than half the batch within a few updates."""
    import torch

    from gradmix import Mixer
    from gradmix.sources import Domain, DomainSet

    warnings.simplefilter("ignore")
    problem = ToyProblem(ToySetting("t", (1.0, 1.0), (0.1, 1.0), batch_size=16, lr_fraction=0.05, steps=400))
    size = 16 * 400
    domains = DomainSet([Domain(f"task{i}", torch.arange(size).unsqueeze(1).repeat(1, 2)) for i in range(2)])
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(np.stack([rng.normal(size=(size, 2)) * s for s in (0.1, 1.0)]))
    model = torch.nn.Linear(2, 1, bias=False).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(problem.theta0).unsqueeze(0))
        model.weight[0, 1] = 0.0  # task 1 starts at its optimum

    def per_example_loss(net, batch):
        task, ids = batch["domain"].long(), batch["input_ids"][:, 0].long()
        signal = net(torch.eye(2, dtype=torch.float64)[task]).squeeze(1)
        return 0.5 * signal**2 + net(noise[task, ids]).squeeze(1)

    floor = 0.65 / 2
    mixer = Mixer(domains, "pike", 16, model=model, update_every=10, log_every=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=problem.lr)
    weights: list[float] = []
    pushed_at: int | None = None
    for step, batch in enumerate(mixer.batches(400), start=1):
        at_floor = len(weights) >= 11 and all(abs(w - floor) < 0.01 for w in (weights[-1], weights[-11]))
        if pushed_at is None and at_floor:  # two updates at the floor: its loss now grows
            pushed_at = step
            with torch.no_grad():
                model.weight[0, 1] = 5.0
        mixer.backward(model, batch, per_example_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mixer.step()
        weights.append(float(mixer.weights[1]))
        if pushed_at is not None and step >= pushed_at + 60:
            break
    assert pushed_at is not None, f"task 1 never sat at its floor: {weights[9::10]}"
    updates = [r for r in mixer.history if "update_terms" in r]
    measured = [r["update_terms"]["grad_sq_norm"]["task1"] for r in updates]
    assert all(value is not None for value in measured)  # measured at every update, floor or not
    after = weights[pushed_at : pushed_at + 60]
    assert max(after) > 0.5, max(after)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("log_weights", [0.0, float("nan"), -1.0], "log_weights\\[1\\] is nan"),
        ("log_weights", [None, None, None], "switch every domain off"),
        ("ema_grad_var", [1.0, -2.0, 1.0], "ema_grad_var\\[1\\] is -2.0; it must be >= 0"),
        ("ema_grad_sq_norm_noise", [1.0, 1.0, float("inf")], "ema_grad_sq_norm_noise\\[2\\] is inf"),
        ("ema_grad_sq_norm", ["a", 1.0, 1.0], "must be a list of 3 numbers"),
    ],
)
def test_a_crafted_state_is_refused_at_load_and_changes_nothing(field, value, match):
    method = make_method("pike", 3)
    method.update(record([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [8, 8, 8]))
    before = json.dumps(method.state_dict())
    state = json.loads(before)
    state[field] = value
    with pytest.raises(ValueError, match=match):
        method.load_state_dict(state)
    assert json.dumps(method.state_dict()) == before


def _with_loss(stats: DomainStats, loss) -> DomainStats:
    stats.loss = np.asarray(loss, dtype=float)
    return stats


def test_too_few_examples_per_domain_keeps_the_weights_and_says_so_once():
    method = PiKE(4)
    first = method.update(record([1.0, 5.0, 1.0, 1.0], [0.1] * 4, [2] * 4, batch_size=8))
    np.testing.assert_array_equal(first, np.full(4, 0.25))
    assert method.last_skip_reason is not None and "min_examples_per_domain = 4" in method.last_skip_reason
    assert "b = 8" in method.last_skip_reason and "\n" not in method.last_skip_reason
    method.update(record([1.0, 5.0, 1.0, 1.0], [0.1] * 4, [2] * 4, batch_size=8))
    assert method.last_skip_reason is None  # said once
    acting = PiKE(4, min_examples_per_domain=0)
    assert acting.update(record([1.0, 5.0, 1.0, 1.0], [0.1] * 4, [2] * 4, batch_size=8))[1] > 0.3


def test_loss_tilt_favours_the_domain_whose_loss_stays_high_and_shows_it():
    """Equal gradient statistics, one domain's loss 4x the others' in every record: the tilt (after five records)
    gives it more than uniform; the same records with equal losses stay uniform."""
    tilted, flat = PiKE(3), PiKE(3)
    for step in range(8):
        g, v, n = [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [32, 32, 32]
        w_tilted = tilted.update(_with_loss(record(g, v, n, batch_size=96, step=step), [4.0, 1.0, 1.0]))
        w_flat = flat.update(_with_loss(record(g, v, n, batch_size=96, step=step), [1.0, 1.0, 1.0]))
    assert w_tilted[0] > 0.4 and w_tilted[1] == pytest.approx(w_tilted[2])
    np.testing.assert_allclose(w_flat, np.full(3, 1 / 3), atol=1e-12)
    assert tilted.last_terms is not None
    assert tilted.last_terms["loss_tilt"][0] == pytest.approx(2.0)  # 4 / mean(4, 1, 1)


def test_loss_differences_within_their_noise_do_not_move_the_mix():
    """Losses that differ between domains only by noise from record to record: shrunk to their mean, tilt ~1."""
    rng = np.random.default_rng(0)
    method = PiKE(4)
    for step in range(30):
        loss = 2.0 + 0.3 * rng.normal(size=4)
        method.update(_with_loss(record([1.0] * 4, [0.5] * 4, [16] * 4, batch_size=64, step=step), loss))
    assert method.last_terms is not None
    assert np.max(np.abs(method.last_terms["loss_tilt"] - 1.0)) < 0.05
    np.testing.assert_allclose(method.weights, np.full(4, 0.25), atol=0.02)


def test_loss_tilt_state_round_trips_and_a_crafted_spread_is_refused():
    method = PiKE(3)
    for step in range(6):
        method.update(_with_loss(record([1.0, 2.0, 3.0], [0.5] * 3, [16] * 3, batch_size=48, step=step), [3, 2, 1]))
    clone = PiKE(3)
    clone.load_state_dict(json.loads(json.dumps(method.state_dict())))
    nxt = _with_loss(record([1.0, 2.0, 3.0], [0.5] * 3, [16] * 3, batch_size=48, step=6), [3, 2, 1])
    np.testing.assert_array_equal(clone.update(nxt), method.update(nxt))
    state = json.loads(json.dumps(method.state_dict()))
    state["loss_spread"] = [0.1, -1.0, 0.1]
    with pytest.raises(ValueError, match=r"loss_spread\[1\] is -1.0; it must be >= 0"):
        PiKE(3).load_state_dict(state)


def test_pooled_measurements_weigh_each_estimate_by_its_precision():
    """Two measurements of one interval, 2 and 10 examples: ||g||^2-hat weighted by pairs (2 vs 90), sigma^2-hat by
    n - 1 (1 vs 9); grad_examples is the n of one batch with the same pairs (n (n - 1) = 92)."""
    from gradmix.stats import Measurement, pool_measurements

    def measured(n: float, sq: float, var: float) -> Measurement:
        return Measurement(
            loss=np.array([1.0]), examples=np.array([n]), mean_loss=1.0, grad_sq_norm=np.array([sq]),
            grad_var=np.array([var]),
        )  # fmt: skip

    pooled = pool_measurements([measured(2, 10.0, 4.0), measured(10, 1.0, 2.0)], step=20, batch_size=12)
    assert pooled.grad_sq_norm is not None and pooled.grad_var is not None and pooled.grad_examples is not None
    assert pooled.grad_sq_norm[0] == pytest.approx((2 * 10.0 + 90 * 1.0) / 92)
    assert pooled.grad_var[0] == pytest.approx((1 * 4.0 + 9 * 2.0) / 10)
    n_eff = pooled.grad_examples[0]
    assert n_eff * (n_eff - 1) == pytest.approx(92.0)
    assert pooled.examples is not None and pooled.examples[0] == 12  # counts stay counts


def test_core_measures_several_steps_when_one_batch_is_too_small_for_pike():
    from gradmix.core import MixingCore

    def probe_every(batch_size: int, k: int, **given) -> int | None:
        core = MixingCore(make_method("pike", k), [f"d{i}" for i in range(k)], batch_size=batch_size,
                          update_every=10, **given)  # fmt: skip
        return core.schedule.probe_every

    assert probe_every(64, 4) == 10  # 16 per domain in one batch: one measuring step
    assert probe_every(12, 5) == 5  # 20 wanted, 12 per batch: 2 measurements
    assert probe_every(10, 5) == 5  # exactly 2 batches
    assert probe_every(8, 4) == 5  # 16 wanted: 2 batches of 8
    assert probe_every(10, 4, probe_every=10) == 10  # the user's choice stays
    assert probe_every(4, 4) == 10  # 1 per batch: the mix cannot be realised, nothing to measure for
    assert probe_every(16, 3) == 10
    assert MixingCore(make_method("uniform", 8), [f"d{i}" for i in range(8)], batch_size=8).schedule.probe_every is None


def test_identical_domains_with_noisy_losses_near_zero_keep_the_tilt_at_one():
    """Losses around 0 with noise (a converged objective measured per batch): the joint test sees no difference
    between the domains, so the tilt stays 1 and the weights stay uniform; one domain clearly higher moves it."""
    rng = np.random.default_rng(0)
    method = PiKE(5)
    for step in range(30):
        g, v, n = [1.0] * 5, [0.5] * 5, [16] * 5
        weights = method.update(_with_loss(record(g, v, n, batch_size=80, step=step), rng.normal(0.0, 0.05, 5)))
    np.testing.assert_allclose(weights, np.full(5, 0.2), atol=1e-12)
    high = PiKE(5)
    for step in range(30):
        losses = rng.normal(0.0, 0.05, 5) + np.array([1.0, 0, 0, 0, 0])
        weights = high.update(_with_loss(record([1.0] * 5, [0.5] * 5, [16] * 5, batch_size=80, step=step), losses))
    assert weights[0] > 0.3


def _sampled_record(rng, grad_sq_norm, grad_var, n, batch_size, step):
    """One measurement of K domains with n examples each, estimates drawn with the sampling noise PiKE assumes."""
    g, s = np.asarray(grad_sq_norm, dtype=float), np.asarray(grad_var, dtype=float)
    sd = np.sqrt(2 * s * s / (n * (n - 1)) + 4 * g * s / n)
    return record(
        g + sd * rng.standard_normal(g.size),
        s * rng.chisquare(n - 1, g.size) / (n - 1),
        [n] * g.size,
        batch_size=batch_size,
        step=step,
    )


def test_mix_evidence_keeps_noise_out_of_the_mix_and_lets_a_real_difference_through():
    """Equal domains measured with noise: the bound's mix deviates from the even split by noise alone, and the
    evidence factor pulls part of that back (pure noise gives Q ~ K - 1, so a factor of about 1/2 at
    mix_evidence = 0.5); one domain with a clearly larger gradient keeps (nearly) all of its lead."""
    spread = {}
    for evidence in (0.0, 0.5):
        rng = np.random.default_rng(1)
        method = PiKE(4, mix_evidence=evidence, loss_tilt=0.0)
        deviations = []
        for step in range(40):
            weights = method.update(_sampled_record(rng, [1.0] * 4, [4.0] * 4, 8, 32, step))
            deviations.append(np.abs(weights - 0.25).max())
        spread[evidence] = float(np.mean(deviations[10:]))
        assert method.last_terms is not None
        if evidence:
            assert "mix_evidence_factor" in method.last_terms
    assert spread[0.5] < 0.75 * spread[0.0], spread
    clear = {}
    for evidence in (0.0, 0.5):
        rng = np.random.default_rng(2)
        method = PiKE(4, mix_evidence=evidence, loss_tilt=0.0)
        for step in range(40):
            weights = method.update(_sampled_record(rng, [8.0, 1.0, 1.0, 1.0], [4.0] * 4, 8, 32, step))
        clear[evidence] = weights[0]
    assert clear[0.5] > 0.25 + 0.8 * (clear[0.0] - 0.25), clear


def test_mix_evidence_draws_repeat_on_resume():
    """The bootstrap draws are seeded by the update count: a run resumed from its state gives bit-identical weights."""
    rng = np.random.default_rng(3)
    records = [_sampled_record(rng, [2.0, 1.0, 1.0], [4.0] * 3, 8, 24, step) for step in range(12)]
    original = PiKE(3, mix_evidence=0.5)
    for rec in records[:6]:
        original.update(rec)
    resumed = PiKE(3, mix_evidence=0.5)
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    for rec in records[6:]:
        np.testing.assert_array_equal(resumed.update(rec), original.update(rec))


def test_gain_from_losses_spreads_the_measured_total_by_the_pooled_losses():
    """``gain="loss"``: equal measured ||grad L_k||^2, losses 4 : 2 : 2 in every record (precise, so nothing is
    shrunk) - the bound's gain follows the losses, keeps the measured total, and the measured values stay visible."""
    by_loss = PiKE(3, loss_tilt=0.0, mix_evidence=0.0)  # gain="loss" is the default
    for step in range(8):
        by_loss.update(_with_loss(record([1.0, 1.0, 1.0], [0.5] * 3, [32] * 3, batch_size=96, step=step), [4, 2, 2]))
    terms = by_loss.last_terms
    assert terms is not None
    np.testing.assert_allclose(terms["grad_sq_norm"], [1.5, 0.75, 0.75], rtol=1e-9)  # 3 * L_k / sum L
    np.testing.assert_allclose(terms["measured_grad_sq_norm"], [1.0, 1.0, 1.0], rtol=1e-9)
    assert by_loss.weights[0] > by_loss.weights[1] == pytest.approx(by_loss.weights[2])


def test_gain_from_losses_without_losses_is_the_measured_gain():
    """No losses in the statistics (a caller that does not report them): the default ``gain="loss"`` has nothing to
    spread the total by and gives the measured gain's weights exactly."""
    rng = np.random.default_rng(1)
    by_loss, measured = PiKE(3, mix_evidence=0.0), PiKE(3, gain="grad_norm", mix_evidence=0.0)
    for step in range(8):
        stats = record(rng.uniform(0.5, 3.0, 3), rng.uniform(0.1, 1.0, 3), [32] * 3, batch_size=96, step=step)
        np.testing.assert_array_equal(by_loss.update(stats), measured.update(stats))
    assert np.ptp(by_loss.weights) > 0.01  # the mix moved, so the comparison was not uniform against uniform
    assert by_loss.last_terms is not None and "measured_grad_sq_norm" not in by_loss.last_terms


def test_gain_is_checked_and_fair_pike_keeps_the_measured_gain():
    with pytest.raises(ValueError, match=r"pike: gain must be one of \('grad_norm', 'loss'\), got 'norm'"):
        PiKE(3, gain="norm")
    fair = make_method("fair_pike", 3)
    assert isinstance(fair, PiKE) and fair.gain == "grad_norm"


def test_core_passes_gradient_methods_the_losses_of_every_step_of_the_interval():
    """Losses cost nothing on steps that do not measure gradients, so the method sees the interval's mean training
    loss per domain (here steps 1-4, one measuring step), not only the measuring step's; non-finite losses are left
    out of the mean."""
    from dataclasses import replace

    from gradmix.core import MixingCore
    from gradmix.stats import Measurement

    seen: list[DomainStats] = []

    class Recording(PiKE):
        def _update(self, stats: DomainStats) -> np.ndarray | None:
            seen.append(stats)
            return super()._update(stats)

    core = MixingCore(Recording(3), ["a", "b", "c"], batch_size=24, update_every=4)
    assert [core.schedule.measure_due(step) for step in range(1, 5)] == [False, False, False, True]
    for step in range(1, 5):
        losses = Measurement.from_sums(np.array([8.0 * step, 80.0 * step, np.nan]), np.array([8.0, 8.0, 8.0]))
        if core.plan().measure:
            ones = np.ones(3)
            losses = replace(losses, loss=np.array([step, 10.0 * step, 7.0]), grad_sq_norm=ones, grad_var=ones)
        core.observe(losses)
        core.end_step(counts=[8, 8, 8])
    assert len(seen) == 1 and seen[0].loss is not None
    np.testing.assert_allclose(seen[0].loss, [2.5, 25.0, 7.0])  # the mean of steps 1-4; c: its one finite loss
