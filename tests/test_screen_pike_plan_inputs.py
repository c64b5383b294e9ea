"""The plan-inputs screen (benchmarks/screen_pike_plan_inputs.py) fits per-step rates to interval-mean losses with a
closed form; it must be the recursion it claims, and the fit must recover rates from noise-free losses, or its
numbers in BENCHMARKS.md say nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import screen_pike_plan_inputs as screen

RATES = np.array([0.02, 0.2, 0.6])
TRACE = np.array([1.0, 9.0, 0.25])
NOISE_SCALE, BATCH, EVERY = 3e-3, 12, 10


def _counts(intervals: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    shares = rng.dirichlet(np.ones(3), size=intervals)
    return BATCH * shares


def test_interval_means_are_the_stepwise_recursion():
    counts = _counts(7)
    loss, expected = np.full(3, 1.0), []
    for count in counts:
        path = []
        for _ in range(EVERY):
            path.append(loss.copy())
            loss = (1 - RATES * count / BATCH) ** 2 * loss + 0.5 * RATES * NOISE_SCALE * float(count @ TRACE) / BATCH**2
        expected.append(np.mean(path, axis=0))
    got = screen.interval_means(RATES, NOISE_SCALE, counts, TRACE, BATCH, EVERY, 1.0)
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-12)


def test_the_fit_recovers_the_rates_from_exact_losses():
    counts = _counts(40)
    means = screen.interval_means(RATES, NOISE_SCALE, counts, TRACE, BATCH, EVERY, 1.0)
    rates, scale = screen.fit_rates(means, np.full(means.shape, 50.0), counts, TRACE, BATCH, EVERY, 1.0)
    np.testing.assert_allclose(rates, RATES, rtol=1e-3)
    assert scale == pytest.approx(NOISE_SCALE, rel=1e-2)
