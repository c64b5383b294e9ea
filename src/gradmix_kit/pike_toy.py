"""PiKE's toy problem (Li et al., arXiv 2502.06244, Example 2.1, eqs. 3-4), generalised: where the answer is known.

Task k has the loss ``l_k(theta; x) = 1/2 a_k (u_k^T theta)^2 + x^T theta`` with ``x ~ N(0, sigma_k^2 I_d)``: its
expected loss is ``L_k = 1/2 a_k (u_k^T theta)^2``, its mean gradient ``a_k (u_k^T theta) u_k`` and its per-example
gradient covariance ``sigma_k^2 I_d`` (trace ``d sigma_k^2``). With ``u_k = e_k`` (``cosine = 0``) this is the paper's
example with curvatures ``a_k``: task gradients are orthogonal and PiKE's one-step bound (Thm 3.4) is exact with
``L = max a_k``, ``c = c_bar = 0``. ``cosine > 0`` tilts the ``u_k`` toward each other (pairwise cosine ``cosine``),
the mild positive interaction the paper's ``c_bar`` covers. Training is plain SGD with step ``eta`` on the batch mean
of per-example gradients; the quantity compared is the average expected loss ``(1/K) sum_k L_k(theta)``.

Three ways to run it, all sharing the problem definition here:
- ``run_exact``: numpy dynamics, batches drawn by ``gradmix.MixtureSampler``, the method fed the exact statistics
  (true ``||grad L_k||^2``, ``sigma_k^2``, ``L_k``), or estimates simulated as the probe forms them (``estimates=True``:
  unbiased U-statistics from the examples of each domain in the measuring batch, NaN below 2 examples).
- ``run_mixer``: the default Mixer path: a ``Linear(d, 1)`` model, the Mixer's own probe and schedule, SGD.
- ``best_static``: a grid search over static mixes (the best fixed mix in hindsight, per setting).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradmix import MixtureSampler
from gradmix.methods import make_method
from gradmix.methods.base import MixingMethod
from gradmix.stats import DomainStats

__all__ = [
    "ToyProblem",
    "ToySetting",
    "best_static",
    "example_2_1_weights",
    "mixer_model",
    "oracle_method",
    "probe_estimates",
    "random_settings",
    "run_exact",
    "run_mixer",
    "static_mixes",
    "suite",
]


@dataclass(frozen=True)
class ToySetting:
    """One member of the Example-2.1 family.

    curvature: a_k per task; noise: sigma_k per task (std of each coordinate of x); batch_size: b;
    lr_fraction: eta as a fraction of 2 / max_k a_k (the stability limit of a step that is all one task; 1 = the
    limit); steps: SGD steps; cosine: pairwise cosine of the task directions u_k (0 = the paper's orthogonal tasks);
    initial_loss: every task starts at this expected loss (theta_0 along the u_k).
    """

    name: str
    curvature: tuple[float, ...]
    noise: tuple[float, ...]
    batch_size: int = 16
    lr_fraction: float = 0.5
    steps: int = 400
    cosine: float = 0.0
    initial_loss: float = 1.0

    def __post_init__(self) -> None:
        if len(self.curvature) != len(self.noise) or len(self.curvature) < 2:
            raise ValueError(f"setting {self.name!r}: curvature and noise need one entry per task (>= 2 tasks)")
        if min(self.curvature) <= 0 or min(self.noise) < 0:
            raise ValueError(f"setting {self.name!r}: curvatures must be > 0 and noise levels >= 0")
        if not 0 < self.lr_fraction < 1:
            raise ValueError(f"setting {self.name!r}: lr_fraction must be in (0, 1), got {self.lr_fraction}")
        if not 0 <= self.cosine < 1:
            raise ValueError(f"setting {self.name!r}: cosine must be in [0, 1), got {self.cosine}")

    @property
    def num_tasks(self) -> int:
        return len(self.curvature)


@dataclass
class ToyProblem:
    """The derived quantities of a setting: directions, step size, starting point, exact statistics."""

    setting: ToySetting
    directions: np.ndarray = field(init=False)  # (K, d) unit rows u_k
    curvature: np.ndarray = field(init=False)
    noise_var: np.ndarray = field(init=False)  # sigma_k^2 per coordinate
    lr: float = field(init=False)
    theta0: np.ndarray = field(init=False)
    outer: np.ndarray = field(init=False)  # (K, d, d) a_k u_k u_k^T: task k's Hessian

    def __post_init__(self) -> None:
        s = self.setting
        k = s.num_tasks
        # u_k = (e_k + t 1) / norm with pairwise cosine c: (2t + K t^2) / (1 + 2t + K t^2) = c
        if s.cosine > 0:
            # solve K t^2 (1 - c) + 2 t (1 - c) - c = 0 for t > 0
            qa, qb, qc = k * (1 - s.cosine), 2 * (1 - s.cosine), -s.cosine
            t = (-qb + math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)
        else:
            t = 0.0
        u = np.eye(k) + t
        self.directions = u / np.linalg.norm(u, axis=1, keepdims=True)
        self.curvature = np.asarray(s.curvature, dtype=np.float64)
        self.noise_var = np.asarray(s.noise, dtype=np.float64) ** 2
        self.lr = s.lr_fraction * 2.0 / float(self.curvature.max())
        # theta_0 with u_k^T theta_0 = sqrt(2 L0 / a_k) for every k (directions are linearly independent)
        projections = np.sqrt(2.0 * s.initial_loss / self.curvature)
        self.theta0 = np.linalg.solve(self.directions, projections)
        self.outer = self.curvature[:, None, None] * self.directions[:, :, None] * self.directions[:, None, :]

    @property
    def dim(self) -> int:
        return int(self.directions.shape[1])

    @property
    def smoothness(self) -> float:
        """L of the bound: the largest per-task curvature."""
        return float(self.curvature.max())

    def task_losses(self, theta: np.ndarray) -> np.ndarray:
        return 0.5 * self.curvature * (self.directions @ theta) ** 2

    def grad_sq_norms(self, theta: np.ndarray) -> np.ndarray:
        return (self.curvature * (self.directions @ theta)) ** 2

    def second_moments(self, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
        """E[(u_k^T theta)^2] per task for theta with this mean and covariance (task k's loss is 1/2 a_k times it)."""
        proj = self.directions @ mean
        return proj**2 + np.einsum("kd,de,ke->k", self.directions, cov, self.directions)

    def moment_step(self, mean: np.ndarray, cov: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One SGD step in expectation with ``counts`` examples per task (fractional counts allowed): ``m <- A m``,
        ``P <- A P A^T + (eta/b)^2 sum_k n_k sigma_k^2 I``."""
        scale = self.lr / self.setting.batch_size
        step = np.eye(self.dim) - scale * np.tensordot(counts, self.outer, axes=1)
        return step @ mean, step @ cov @ step.T + scale**2 * float(counts @ self.noise_var) * np.eye(self.dim)

    def expected_losses(self, counts: np.ndarray) -> np.ndarray:
        """E[(1/K) sum_k L_k(theta_t)] for t = 0..T given per-step counts (T, K): the mean and covariance of theta
        propagate exactly (``moment_step``), so the data noise is averaged out and only the mix the method chose is
        scored."""
        mean, cov = self.theta0.copy(), np.zeros((self.dim, self.dim))
        out = np.empty(len(counts) + 1)
        out[0] = float(np.mean(0.5 * self.curvature * self.second_moments(mean, cov)))
        for t, n in enumerate(counts, start=1):
            mean, cov = self.moment_step(mean, cov, n)
            out[t] = float(np.mean(0.5 * self.curvature * self.second_moments(mean, cov)))
        return out

    def grad_vars(self) -> np.ndarray:
        """Trace of each task's per-example gradient covariance: d sigma_k^2."""
        return self.dim * self.noise_var


def example_2_1_weights(theta: Iterable[float], noise: Iterable[float], lr: float, batch_size: int) -> np.ndarray:
    """The paper's eq. 4 for Example 2.1 (two tasks, a_1 = a_2 = 1, d = 2), derived here from the exact expected loss.

    After one SGD step with b_1 = b w examples of task 1, ``E[L(theta+)] = sum_k 1/2 (1 - eta w_k)^2 theta_k^2
    + eta^2 (w sigma_1^2 + (1 - w) sigma_2^2) d / (2 b)`` (the noise reaches every coordinate). It is a convex
    quadratic in w; its minimiser over [0, 1] is returned as (w, 1 - w).
    """
    t1, t2 = (float(v) ** 2 for v in theta)
    s1, s2 = (float(v) ** 2 for v in noise)
    d = 2
    # d/dw: -eta (1 - eta w) t1 + eta (1 - eta (1 - w)) t2 + eta^2 d (s1 - s2) / (2b) = 0
    numerator = t1 - t2 + lr * t2 - lr * d * (s1 - s2) / (2 * batch_size)
    w = float(np.clip(numerator / (lr * (t1 + t2)), 0.0, 1.0))
    return np.array([w, 1.0 - w])


# -- running methods on the problem ------------------------------------------------------------------------------


def oracle_method(problem: ToyProblem) -> MixingMethod:
    """Conceptual PiKE with the true constants (L = max a_k, eta, c_bar = cosine), to be fed exact statistics
    every step: the greedy per-step optimum of the bound."""
    return make_method(
        "pike",
        problem.setting.num_tasks,
        mode="conceptual",
        stats_ema=0.0,
        normalize="none",
        lr=problem.lr,
        smoothness=problem.smoothness,
        c=0.0,
        c_bar=problem.setting.cosine,
    )


MethodFactory = Callable[[ToyProblem], MixingMethod]


@dataclass
class ToyRun:
    """One run: the expected average loss after every step, the examples drawn per task, the method's weights, and
    the average population loss of the parameters the run ended with.

    ``expected`` averages the data noise out as if it were independent of the counts. A method that reacts to the
    state the noise left (more weight to a task whose parameter drifted) makes the counts depend on it, and that
    benefit is invisible to ``expected``; ``final`` keeps it (unbiased, but noisy: compare means over many seeds)."""

    expected: np.ndarray  # (steps + 1,) E[L(theta_t)] given the per-step counts this run drew (noise averaged out)
    counts: np.ndarray  # (K,) examples drawn per task
    weights: np.ndarray  # (updates + 1, K) the method's weights after each update (row 0 = initial)
    final: float  # (1/K) sum_k L_k(theta_T) at the realised theta_T (the population loss: x has mean 0)


def probe_estimates(
    rng: np.random.Generator, problem: ToyProblem, theta: np.ndarray, counts: np.ndarray, mean_noise: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Simulated probe on one batch: unbiased estimates of ||grad L_k||^2 and sigma_k^2 from the n_k examples of
    each task (NaN below 2, as the probe); ``mean_noise[k]`` is the mean noise of task k's examples in the batch."""
    k, d = problem.setting.num_tasks, problem.dim
    mean_grad = problem.curvature[:, None] * (problem.directions @ theta)[:, None] * problem.directions
    sq = np.full(k, np.nan)
    var = np.full(k, np.nan)
    for task in range(k):
        n = int(counts[task])
        if n >= 2:
            var[task] = problem.noise_var[task] * rng.chisquare(d * (n - 1)) / (n - 1)
            g = mean_grad[task] + mean_noise[task]
            sq[task] = float(g @ g) - var[task] / n
    return sq, var


def run_exact(
    problem: ToyProblem,
    method: MixingMethod,
    *,
    seed: int,
    update_every: int = 10,
    estimates: bool = False,
) -> ToyRun:
    """SGD on the toy problem with batches from ``MixtureSampler`` (quota mode) and ``method`` updated every
    ``update_every`` steps from the exact statistics at that step (or simulated probe estimates)."""
    s = problem.setting
    k, b = s.num_tasks, s.batch_size
    rng = np.random.default_rng(seed)  # the data: the same draws for every method (common random numbers)
    probe_rng = np.random.default_rng([seed, 1])
    sampler = MixtureSampler([2**40] * k, b, method.weights, seed=seed)
    theta = problem.theta0.copy()
    per_step = np.zeros((s.steps, k))
    history = [method.weights]
    for step in range(1, s.steps + 1):
        domains, _ = sampler.next_arrays()
        counts = np.bincount(domains, minlength=k).astype(np.float64)
        per_step[step - 1] = counts
        due = step % update_every == 0
        # mean noise of each task's examples in this batch: sigma_k z_k / sqrt(n_k)
        z = rng.normal(size=(k, problem.dim))
        scale = np.sqrt(problem.noise_var / np.maximum(counts, 1.0))
        mean_noise = z * scale[:, None]
        noise_sum = counts @ mean_noise
        if due and estimates:
            sq, var = probe_estimates(probe_rng, problem, theta, counts, mean_noise)
        if due:
            if not estimates:
                sq, var = problem.grad_sq_norms(theta), problem.grad_vars()
            stats = DomainStats(
                step=step,
                num_domains=k,
                loss=problem.task_losses(theta),
                examples=counts,
                batch_size=b,
                grad_sq_norm=sq,
                grad_var=var,
            )
        projections = problem.directions @ theta
        drift = (counts * problem.curvature * projections) @ problem.directions
        theta = theta - problem.lr / b * (drift + noise_sum)
        if due:
            sampler.set_weights(method.update(stats))
            history.append(method.weights)
    final = float(np.mean(problem.task_losses(theta)))
    return ToyRun(problem.expected_losses(per_step), per_step.sum(axis=0), np.asarray(history), final)


def run_static(problem: ToyProblem, weights: np.ndarray, *, seed: int) -> ToyRun:
    return run_exact(problem, make_method("fixed", problem.setting.num_tasks, weights=weights), seed=seed)


def static_mixes(problem: ToyProblem, grid: int = 7) -> list[np.ndarray]:
    """The static mixes ``best_static`` chooses from: uniform, w_k proportional to a_k^p sigma_k^q (p, q on a
    ``grid`` x ``grid`` lattice of [-1.5, 1.5]) and, for K <= 3, the simplex itself in steps of 0.1."""
    k = problem.setting.num_tasks
    candidates = [np.full(k, 1.0 / k)]
    sigma = np.sqrt(np.maximum(problem.noise_var, 1e-12))
    for p in np.linspace(-1.5, 1.5, grid):
        for q in np.linspace(-1.5, 1.5, grid):
            w = problem.curvature**p * sigma**q
            candidates.append(w / w.sum())
    if k <= 3:
        ticks = np.arange(1, 10) / 10
        for w1 in ticks:
            for w2 in ticks:
                if k == 2 and w2 == ticks[0]:
                    candidates.append(np.array([w1, 1 - w1]))
                elif k == 3 and w1 + w2 < 1:
                    candidates.append(np.array([w1, w2, 1 - w1 - w2]))
    return candidates


def best_static(problem: ToyProblem, seeds: Sequence[int], grid: int = 7) -> tuple[np.ndarray, float]:
    """The best static mix in hindsight: the best of ``static_mixes``, scored by the mean final loss over ``seeds``."""
    candidates = static_mixes(problem, grid)
    best_w, best = candidates[0], math.inf
    for w in candidates:
        score = float(np.mean([run_static(problem, w, seed=seed).expected[-1] for seed in seeds]))
        if score < best:
            best_w, best = w, score
    return best_w, best


# -- the default Mixer path --------------------------------------------------------------------------------------


def mixer_model(
    problem: ToyProblem, *, seed: int, size: int
) -> tuple[Any, torch.nn.Module, Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]]:
    """The Mixer path's pieces for ``problem`` (what ``run_mixer`` trains and ``diagnose_known.measure_toy``
    probes): a ``DomainSet`` of ``size`` example ids per task, a ``Linear(d, 1)`` float64 model whose weight is
    theta_0, and the per-example loss ``1/2 a_k lin(u_k)^2 + lin(x)``. Example i of task k carries noise drawn from
    a generator seeded by (seed, k, i), so the data do not depend on the mix."""
    from gradmix.sources import Domain, DomainSet

    k, d = problem.setting.num_tasks, problem.dim
    domains = DomainSet([Domain(f"task{i}", torch.arange(size).unsqueeze(1).repeat(1, 2)) for i in range(k)])
    noise = torch.from_numpy(
        np.stack(
            [
                np.random.default_rng([seed, i]).normal(size=(size, d)) * math.sqrt(problem.noise_var[i])
                for i in range(k)
            ]
        )
    ).to(torch.float64)
    directions = torch.from_numpy(problem.directions)
    root_curv = torch.from_numpy(np.sqrt(problem.curvature))
    model = torch.nn.Linear(d, 1, bias=False).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(problem.theta0).unsqueeze(0))

    def per_example_loss(net: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        task = batch["domain"].long()
        ids = batch["input_ids"][:, 0].long()
        signal = net(directions[task] * root_curv[task, None]).squeeze(1)
        return 0.5 * signal**2 + net(noise[task, ids]).squeeze(1)

    return domains, model, per_example_loss


def run_mixer(
    problem: ToyProblem,
    method: str | MixingMethod,
    *,
    seed: int,
    update_every: int = 10,
    method_params: Mapping[str, Any] | None = None,
    probe_every: int | None = None,
) -> ToyRun:
    """The toy problem through ``gradmix.Mixer`` as a user runs it: a ``Linear(d, 1)`` model (its weight is theta),
    per-example loss ``1/2 a_k lin(u_k)^2 + lin(x)``, the Mixer's own probe and schedule, plain SGD with step eta.

    Each domain is a stream of example ids; example i of task k carries noise drawn from a generator seeded by
    (seed, k, i), so the data do not depend on the mix."""
    from gradmix import Mixer

    s = problem.setting
    k, b = s.num_tasks, s.batch_size
    domains, model, per_example_loss = mixer_model(problem, seed=seed, size=b * s.steps + b)

    mixer = Mixer(
        domains,
        method,
        b,
        model=model,
        update_every=update_every,
        probe_every=probe_every,
        seed=seed,
        method_params=method_params,
        log_every=10**9,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=problem.lr)
    per_step = np.zeros((s.steps, k))
    history = [mixer.weights]
    for step, batch in enumerate(mixer.batches(s.steps), start=1):
        per_step[step - 1] = np.bincount(batch["domain"].numpy(), minlength=k)
        mixer.backward(model, batch, per_example_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        before = mixer.weights
        mixer.step()
        if not np.array_equal(before, mixer.weights) or step % update_every == 0:
            history.append(mixer.weights)
    theta = model.get_parameter("weight").detach().numpy()[0]
    final = float(np.mean(problem.task_losses(theta)))
    return ToyRun(problem.expected_losses(per_step), per_step.sum(axis=0), np.asarray(history), final)


def suite() -> list[ToySetting]:
    """The settings of ``benchmarks/bench_pike_toy.py``: K = 2 ... 8, curvatures and noise levels 10-100x apart,
    b = 4 ... 64, eta from small to near the stability limit, and mild positive cosines."""
    base = [
        ToySetting("ex2.1 noise 1:10", (1.0, 1.0), (0.3, 3.0), batch_size=8, lr_fraction=0.25),
        ToySetting("K2 curv 1:100", (1.0, 100.0), (1.0, 1.0), batch_size=16, lr_fraction=0.5),
        ToySetting("K3 noise 1:100", (1.0, 1.0, 1.0), (0.1, 1.0, 10.0), batch_size=16, lr_fraction=0.25),
        ToySetting("K4 mixed", (1.0, 10.0, 1.0, 10.0), (1.0, 1.0, 10.0, 10.0), batch_size=32, lr_fraction=0.5),
        ToySetting(
            "K4 small lr", (1.0, 3.0, 10.0, 30.0), (1.0, 2.0, 4.0, 8.0), batch_size=16, lr_fraction=0.05, steps=800
        ),
        ToySetting("K4 near limit", (1.0, 2.0, 5.0, 10.0), (2.0, 1.0, 1.0, 0.5), batch_size=16, lr_fraction=0.9),
        ToySetting(
            "K8 spread",
            tuple(float(x) for x in np.geomspace(1, 100, 8)),
            tuple(float(x) for x in np.geomspace(0.3, 3, 8)[::-1]),
            batch_size=64,
            lr_fraction=0.5,
        ),
        ToySetting(
            "K8 b=4",
            tuple(float(x) for x in np.geomspace(1, 10, 8)),
            (1.0,) * 4 + (10.0,) * 4,
            batch_size=4,
            lr_fraction=0.3,
        ),
        ToySetting("K3 cos 0.2", (1.0, 10.0, 100.0), (1.0, 3.0, 1.0), batch_size=16, lr_fraction=0.5, cosine=0.2),
        ToySetting(
            "K4 cos 0.3", (1.0, 1.0, 10.0, 10.0), (0.5, 5.0, 0.5, 5.0), batch_size=32, lr_fraction=0.3, cosine=0.3
        ),
    ]
    return base


def random_settings(count: int, seed: int = 123) -> list[ToySetting]:
    """Settings drawn from the same family as ``suite()``, for checking a method on settings it was not chosen on:
    K in 2..8; curvatures and noise levels log-uniform over a spread of 1x, 10x or 100x (each equally likely, so a
    third of the settings have near-identical tasks, where nothing can be gained and nothing must be lost);
    b in {4, 8, 16, 32, 64}; eta log-uniform in [0.05, 0.9] of the limit; cosine 0 (half) or 0.1-0.3; 200-800 steps."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        k = int(rng.integers(2, 9))
        curvature = np.exp(rng.uniform(0, np.log(float(rng.choice([1.0, 10.0, 100.0]))), k))
        noise = 0.3 * np.exp(rng.uniform(0, np.log(float(rng.choice([1.0, 10.0, 100.0]))), k))
        out.append(
            ToySetting(
                f"random {seed}-{i}",
                tuple(float(x) for x in curvature),
                tuple(float(x) for x in noise),
                batch_size=int(rng.choice([4, 8, 16, 32, 64])),
                lr_fraction=float(np.exp(rng.uniform(np.log(0.05), np.log(0.9)))),
                steps=int(rng.choice([200, 400, 800])),
                cosine=float(rng.choice([0.0, 0.0, 0.1, 0.2, 0.3])),
            )
        )
    return out
