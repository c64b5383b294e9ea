"""`diagnose` where the answer is known (issue 24, item 4): real models, the real probe (`make_probe(gram=True)`,
the micro-batch probe `gradmix diagnose` uses), true cosines computed from the population gradients.

(a) domains built to conflict -> a conflict verdict; (b) built to agree -> low; (c) PiKE's toy suite -> low conflict
(never a conflict verdict), and PiKE then moves the weights and beats uniform where diagnose says low, and stays
uniform where diagnose could measure nothing; (d) too few steps -> "not enough evidence". Plus the estimator's
pieces: the t quantile, the excluded steps, the interval logic."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from gradmix.diagnostics import NOT_ENOUGH, diagnose, t_quantile
from gradmix.stats import Measurement
from gradmix_kit.diagnose_known import LinearSetting, measure_linear, measure_toy
from gradmix_kit.pike_toy import ToyProblem, run_mixer, suite

SUITE = {s.name: s for s in suite()}


# -- (a) built to conflict ---------------------------------------------------------------------------------------


def test_opposite_targets_are_strong_conflict():
    run = measure_linear(LinearSetting("opposite", cosine=-1.0, lr=0.01), 30)
    d = run.diagnose()
    assert run.true_c > 0.95
    assert d.verdict == "strong" and d.c is not None and d.c > 0.6
    assert d.c_interval is not None and d.c_interval[0] > 0.3  # the whole interval is in the strong band
    assert d.conflicting_pairs[0]["domains"] == ["d0", "d1"]
    assert "Strong gradient conflict" in d.recommendation and "FAMO" in d.recommendation


def test_a_conflicting_pair_among_three_domains_is_named():
    targets = ((1.0, 0.0, 0.0, 0.0), (-1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0))
    d = measure_linear(LinearSetting("K3", targets=targets, lr=0.01), 30).diagnose()
    assert d.verdict == "strong"
    assert d.conflicting_pairs[0]["domains"] == ["d0", "d1"] and d.conflicting_pairs[0]["cosine"] < -0.6


def test_a_mild_conflict_is_moderate_once_measured_well():
    run = measure_linear(LinearSetting("cos -0.2", cosine=-0.2, train=False, batch_size=64), 200)
    d = run.diagnose()
    assert run.true_c == pytest.approx(0.2)
    assert d.verdict == "moderate" and d.c == pytest.approx(0.2, abs=0.06)
    assert d.c_interval is not None and d.c_interval[0] >= 0.1 and d.c_interval[1] < 0.3


# -- (b) built to agree ------------------------------------------------------------------------------------------


def test_one_distribution_split_in_two_is_low_conflict():
    run = measure_linear(LinearSetting("same", cosine=1.0, lr=0.01), 30)
    d = run.diagnose()
    assert run.true_c == 0.0 and run.true_c_bar == pytest.approx(1.0)
    assert d.verdict == "low" and d.c == 0.0 and d.c_interval == [0.0, 0.0]
    assert d.c_bar is not None and d.c_bar > 0.8
    assert "PiKE's low-conflict assumption holds" in d.recommendation


def test_positively_aligned_targets_are_low_conflict_with_c_bar_near_the_truth():
    d = measure_linear(LinearSetting("cos +0.5", cosine=0.5, train=False), 60).diagnose()
    assert d.verdict == "low"
    assert d.c_bar is not None and d.c_bar == pytest.approx(0.5, abs=0.2)
    assert d.c_bar_interval is not None and d.c_bar_interval[0] > 0.2


# -- (c) PiKE's toy problem --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["K2 curv 1:100", "K3 cos 0.2", "K4 cos 0.3"])
def test_toy_settings_are_low_conflict_and_pike_then_helps(name):
    setting = SUITE[name]
    d = measure_toy(setting, 200).diagnose()  # the setting's own batch: what PiKE measures with
    assert d.verdict == "low", d.recommendation
    assert d.c_bar is not None and d.c_bar == pytest.approx(setting.cosine, abs=0.1)
    # what PiKE then does, through the default Mixer path: moves the weights and beats uniform
    problem = ToyProblem(setting)
    ratios, moved = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(2):
            pike = run_mixer(problem, "pike", seed=seed)
            uniform = run_mixer(problem, "uniform", seed=seed)
            ratios.append(pike.expected[-1] / uniform.expected[-1])
            moved.append(float(np.abs(pike.weights - 1.0 / setting.num_tasks).max()))
    assert np.mean(ratios) < 0.95 and max(moved) > 0.05


def test_toy_with_nothing_measurable_is_unknown_and_pike_stays_uniform():
    setting = SUITE["K8 b=4"]  # 4 examples for 8 tasks: no task ever has the 2 examples an estimate needs
    d = measure_toy(setting, 30).diagnose()
    assert d.verdict == "unknown" and d.usable_measurements == 0 and d.excluded["absent"] > 0
    assert d.excluded["too_few_examples"] > 0 and "No usable measurement" in d.recommendation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pike = run_mixer(ToyProblem(setting), "pike", seed=0)
    assert np.allclose(pike.weights, 1.0 / setting.num_tasks)


def test_no_toy_setting_gets_a_conflict_verdict():
    """Orthogonal or positively tilted tasks: whatever the noise, never "moderate" / "strong" (the point estimate
    alone, a max over noisy pairs, often would be)."""
    point_conflict = 0
    for setting in suite():
        d = measure_toy(setting, 60).diagnose()
        assert d.verdict in ("low", NOT_ENOUGH, "unknown"), (setting.name, d.recommendation)
        point_conflict += d.point_verdict in ("moderate", "strong")
    assert point_conflict > 0  # the intervals are what keeps those from being verdicts


# -- (d) too few steps -------------------------------------------------------------------------------------------


def test_too_few_steps_is_not_enough_evidence():
    agree = measure_linear(LinearSetting("same", cosine=1.0, lr=0.01), 5).diagnose()
    assert agree.verdict == NOT_ENOUGH and agree.point_verdict == "low"
    assert agree.recommendation.startswith("Not enough evidence yet (5 usable steps; need at least 20)")
    orthogonal = measure_linear(LinearSetting("orthogonal", cosine=0.0, train=False), 5).diagnose()
    assert orthogonal.verdict == NOT_ENOUGH
    assert orthogonal.c_interval is not None and orthogonal.c_interval[0] < 0.1 <= orthogonal.c_interval[1]
    assert "straddles the low-conflict threshold 0.1" in orthogonal.recommendation
    assert "--steps" in orthogonal.recommendation
    toy = measure_toy(SUITE["ex2.1 noise 1:10"], 10).diagnose()
    assert toy.verdict in (NOT_ENOUGH, "unknown")


# -- the estimator's pieces --------------------------------------------------------------------------------------


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for p in (0.6, 0.95, 0.975, 0.999, 0.99999):
        for df in (1, 2, 4, 9, 30, 500):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-7)
            assert t_quantile(1 - p, df) == pytest.approx(-stats.t.ppf(p, df), rel=1e-7)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_one_example_steps_are_excluded_and_counted():
    """b = 3 over 2 domains: every step one domain has a single example (no unbiased norm; the old per-step cosine
    had a gap there). Such steps are left out of that domain's pairs and counted."""
    run = measure_linear(LinearSetting("b3", cosine=1.0, lr=0.01, batch_size=3), 40)
    d = run.diagnose()
    assert d.excluded["too_few_examples"] == 40 and d.usable_measurements == 0
    assert d.verdict == "unknown"
    counts = [m.examples for m in run.measurements]
    assert all(sorted(c.tolist()) == [1, 2] for c in counts)


def test_per_step_overshoot_is_counted_but_not_used():
    """Agreeing domains (true cosine +1) with noisy unbiased norms: many per-step ratios overshoot 1 (the old +-1.00
    after clipping); the ratio-of-sums estimate stays <= 1 and near the truth."""
    d = measure_linear(LinearSetting("same", cosine=1.0, lr=0.01), 30).diagnose()
    assert d.step_cosines_clipped > 3
    assert d.cosine[0][1] is not None and 0.8 < d.cosine[0][1] <= 1.0


def test_min_examples_excludes_small_groups():
    g = np.array([[1.0, 0.5], [0.5, 1.0]])
    items = [Measurement(loss=np.zeros(2), examples=np.array([3, 16]), mean_loss=0.0, gram=g) for _ in range(25)]
    assert diagnose(items, ["a", "b"]).verdict == "low"
    d = diagnose(items, ["a", "b"], min_examples=4)
    assert d.verdict == "unknown" and d.excluded["too_few_examples"] == 25


def _noisy(cos: float, steps: int, noise: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        g = np.array([[1.0, cos], [cos, 1.0]]) + rng.normal(0, noise, (2, 2))
        out.append((g + g.T) / 2)
    return out


def test_interval_straddling_a_band_edge_is_not_enough_evidence():
    d = diagnose(_noisy(-0.1, 30, 0.3), ["a", "b"])
    assert d.c_interval is not None and d.c_interval[0] < 0.1 <= d.c_interval[1]
    assert d.verdict == NOT_ENOUGH and "30 usable steps" in d.recommendation
    # clearly conflicting, unclear whether strongly: said so
    d = diagnose(_noisy(-0.3, 40, 0.15, seed=3), ["a", "b"], window=40)
    assert d.c_interval is not None and 0.1 <= d.c_interval[0] < 0.3 <= d.c_interval[1]
    assert d.verdict == NOT_ENOUGH and "do conflict" in d.recommendation
    # more evidence settles it
    d = diagnose(_noisy(-0.2, 2000, 0.3), ["a", "b"], window=2000)
    assert d.verdict == "moderate" and d.c_interval is not None and 0.1 <= d.c_interval[0] < d.c_interval[1] < 0.3
