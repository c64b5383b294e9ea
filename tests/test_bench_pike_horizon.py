"""The horizon analysis (benchmarks/bench_pike_horizon.py) plans with a closed-form prediction; it must be the toy's
own dynamics, or its numbers in BENCHMARKS.md say nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_pike_horizon as horizon

from gradmix_kit.pike_toy import ToyProblem, ToySetting

SETTING = ToySetting("t", (1.0, 10.0, 40.0), (0.3, 3.0, 1.0), batch_size=8, lr_fraction=0.6, steps=60)


@pytest.mark.parametrize("weights", [(1 / 3, 1 / 3, 1 / 3), (0.7, 0.2, 0.1), (0.05, 0.05, 0.9)])
def test_the_prediction_is_the_propagated_dynamics(weights):
    """Held fixed for the whole run, a mix's predicted loss equals the exact moment propagation's final loss."""
    problem = ToyProblem(SETTING)
    w = np.array(weights)
    start = np.einsum("kd,d->k", problem.directions, problem.theta0) ** 2
    predicted = horizon.predicted_loss(problem, w, start, problem.lr, SETTING.steps) / (2 * SETTING.num_tasks)
    simulated = horizon.final_loss(problem, horizon.static_policy(w), every=SETTING.steps)
    assert predicted == pytest.approx(simulated, rel=1e-9)


def test_the_plan_beats_every_mix_it_was_offered():
    """The planner's mix predicts no more loss than uniform or a corner-leaning mix (it minimises the prediction)."""
    problem = ToyProblem(SETTING)
    start = np.einsum("kd,d->k", problem.directions, problem.theta0) ** 2
    chosen = horizon.plan(problem, start, problem.lr, 40, np.full(3, 1 / 3))
    assert chosen.sum() == pytest.approx(1.0) and np.all(chosen >= 0)
    best = horizon.predicted_loss(problem, chosen, start, problem.lr, 40)
    for other in ([1 / 3] * 3, [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]):
        assert best <= horizon.predicted_loss(problem, np.array(other), start, problem.lr, 40) + 1e-12


@pytest.mark.parametrize("bound_noise", [False, True])
def test_the_prediction_gradient_matches_finite_differences(bound_noise):
    problem = ToyProblem(SETTING)
    start = np.einsum("kd,d->k", problem.directions, problem.theta0) ** 2
    w = np.array([0.5, 0.3, 0.2])
    _, grad = horizon.predicted_loss_and_grad(problem, w, start, problem.lr, 40, bound_noise)
    step = 1e-6
    numeric = [
        (
            horizon.predicted_loss(problem, w + step * e, start, problem.lr, 40, bound_noise)
            - horizon.predicted_loss(problem, w - step * e, start, problem.lr, 40, bound_noise)
        )
        / (2 * step)
        for e in np.eye(3)
    ]
    assert grad == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_the_static_grid_is_the_kits_and_covers_the_simplex_for_few_tasks():
    """Both benches search the same static mixes: uniform first, the a^p sigma^q lattice, and the simplex at K <= 3."""
    from gradmix_kit.pike_toy import static_mixes

    three = static_mixes(ToyProblem(SETTING), grid=7)
    four = static_mixes(ToyProblem(ToySetting("k4", (1.0, 2.0, 3.0, 4.0), (1.0,) * 4)), grid=7)
    assert len(three) == 1 + 49 + 36 and len(four) == 1 + 49  # 36 simplex points w1 + w2 < 1 on a 0.1 grid
    for w in three + four:
        assert w.sum() == pytest.approx(1.0) and np.all(w > 0)
    assert np.allclose(three[0], 1 / 3) and any(np.allclose(w, [0.1, 0.1, 0.8]) for w in three)


def test_the_sampled_plan_reads_the_realised_state_and_plans_from_it():
    """``RealisedStatePlan`` recovers (u_k^T theta)^2 from the exact losses and returns the plan for that state, the
    horizon the steps so far."""
    problem = ToyProblem(SETTING)
    theta = problem.theta0 * np.array([0.2, 1.5, 0.7])
    method = horizon.RealisedStatePlan(problem, every=10)
    stats = horizon.DomainStats(
        step=30, num_domains=3, loss=problem.task_losses(theta), examples=np.full(3, 8.0), batch_size=8
    )
    got = method.update(stats)
    moment = (problem.directions @ theta) ** 2
    np.testing.assert_allclose(got, horizon.plan(problem, moment, problem.lr, 30, np.full(3, 1 / 3)), atol=1e-12)


def test_the_sampled_plan_gains_where_the_mean_field_plan_does():
    """On sampled trajectories (integer counts, data noise) the plan still beats uniform in a setting with room."""
    ratios = horizon.sampled_ratios(SETTING, every=10, seeds=3)
    assert ratios[horizon.SAMPLED] < 0.9


def test_the_stationary_loss_is_where_the_dynamics_settle():
    """A static mix held for many steps reaches the closed-form floor (orthogonal tasks)."""
    setting = ToySetting("settle", (1.0, 4.0, 9.0), (0.3, 3.0, 1.0), batch_size=8, lr_fraction=0.5, steps=3000)
    problem = ToyProblem(setting)
    w = np.array([0.5, 0.2, 0.3])
    simulated = horizon.final_loss(problem, horizon.static_policy(w), every=setting.steps)
    assert horizon.stationary_loss(problem, w) == pytest.approx(simulated, rel=1e-6)
    assert horizon.stationary_loss(problem, np.array([1.0, 0.0, 0.0])) == float("inf")


def test_inverse_noise_mix_has_the_lowest_floor_at_small_steps():
    """At a small step size no other mix settles lower than w ~ 1/sigma (the derivation in its docstring)."""
    setting = ToySetting("floor", (1.0, 30.0, 5.0, 2.0), (0.2, 4.0, 1.0, 9.0), batch_size=16, lr_fraction=1e-4)
    problem = ToyProblem(setting)
    chosen = horizon.inverse_noise_mix(problem)
    assert chosen == pytest.approx([0.5, 0.025, 0.1, 1 / 90] / np.sum([0.5, 0.025, 0.1, 1 / 90]))
    best = horizon.stationary_loss(problem, chosen)
    rng = np.random.default_rng(0)
    for other in rng.dirichlet(np.ones(4), size=200):
        assert best <= horizon.stationary_loss(problem, other) * (1 + 1e-9)
    for k in range(4):  # and it is a local minimum: moving mass toward any one task costs
        nudged = 0.99 * chosen + 0.01 * np.eye(4)[k]
        assert best < horizon.stationary_loss(problem, nudged)


def test_floor_balance_is_the_inverse_noise_mix_at_the_floor_and_leans_toward_a_task_above_it():
    """Where every task sits at the floor of the held mix (L_k w_k equal) the policy returns w ~ 1/sigma; a task
    whose loss is above that gets more than 1/sigma gives it."""
    problem = ToyProblem(SETTING)
    current = np.array([0.5, 0.3, 0.2])
    at_floor = 2.0 * (0.1 / current) / problem.curvature  # m_k with L_k w_k = 0.05 for every k
    state = horizon.State(step=100, steps=200, second_moment=at_floor)
    assert horizon.floor_balance_policy(problem, state, current) == pytest.approx(horizon.inverse_noise_mix(problem))
    above = at_floor * np.array([1.0, 4.0, 1.0])
    leaned = horizon.floor_balance_policy(problem, horizon.State(100, 200, above), current)
    assert leaned[1] > horizon.inverse_noise_mix(problem)[1]
    assert leaned.sum() == pytest.approx(1.0)
