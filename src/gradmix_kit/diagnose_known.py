"""Settings where the answer of ``gradmix.diagnostics.diagnose`` is known, measured with the real probe.

Each setting is a small real model trained (or held fixed) on a uniform mix while ``make_probe(model, gram=True)``
measures the Gramian of the domains' gradients on every step, exactly as ``gradmix diagnose`` does. What makes the
answer known: the population gradient of every domain at every iterate has a closed form, so the *true* cosines
along the run are computed alongside the measurements (``KnownRun.true_cosine``), and with them the true c and c_bar
of the visited iterates.

- Linear regression (``LinearSetting``): domain k has targets ``y = x^T w_k + noise``, ``x ~ N(0, I_d)``; with loss
  ``1/2 (x^T theta - y)^2`` its population gradient is ``theta - w_k``. Opposite targets (``w_b = -w_a``) conflict
  (cosine -1 at theta = 0, and training on the uniform mix keeps theta near 0); the same targets split in two agree
  (cosine +1); a chosen angle between w_a and w_b gives that cosine at theta = 0 (``train=False`` keeps it there).
- PiKE's toy problem (``gradmix_kit.pike_toy``, the Mixer-path model of ``run_mixer``): task k's population
  gradient is ``a_k (u_k^T theta) u_k``, so the pairwise cosine is ``sign(u_i^T theta u_j^T theta) u_i^T u_j``:
  0 for the orthogonal settings, +cosine for the tilted ones while every task is still on its starting side.

``linear_settings()`` and ``toy_settings()`` list what ``benchmarks/bench_diagnose.py`` reports and
tests/test_diagnose_known.py checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradmix import MixtureSampler
from gradmix.diagnostics import Diagnosis, diagnose
from gradmix.probe import make_probe
from gradmix.stats import Measurement
from gradmix_kit.pike_toy import ToyProblem, ToySetting, mixer_model, suite

__all__ = [
    "KnownRun",
    "LinearSetting",
    "linear_settings",
    "measure_linear",
    "measure_toy",
    "toy_settings",
    "true_cosines",
]


@dataclass
class KnownRun:
    """Measurements of one run with the true pairwise cosines at the iterates they were taken at."""

    name: str
    domains: list[str]
    measurements: list[Measurement]
    true_cosine: np.ndarray  # (T, K, K) cosines of the population gradients at the measured iterates
    trained: bool = True  # False: every measurement probed the same iterate

    def diagnose(self, **params: Any) -> Diagnosis:
        """``diagnose`` of the measurements; without training one block (``window`` = T), as ``gradmix diagnose
        --checkpoint`` does: there is one iterate, so no phases to keep apart."""
        if not self.trained:
            params.setdefault("window", max(1, len(self.measurements)))
        return diagnose(self.measurements, self.domains, **params)

    def head(self, steps: int) -> KnownRun:
        """The first ``steps`` measurements (what a shorter diagnosis would have seen)."""
        return KnownRun(self.name, self.domains, self.measurements[:steps], self.true_cosine[:steps], self.trained)

    @property
    def true_c(self) -> float:
        """max over iterates and pairs of max(0, -cosine): the smallest c for which the assumption held."""
        off = self.true_cosine[:, ~np.eye(len(self.domains), dtype=bool)]
        return float(max(0.0, -np.nanmin(off))) if off.size else math.nan

    @property
    def true_c_bar(self) -> float:
        off = self.true_cosine[:, ~np.eye(len(self.domains), dtype=bool)]
        return float(max(0.0, np.nanmax(off))) if off.size else math.nan


def true_cosines(gradients: np.ndarray) -> np.ndarray:
    """(K, K) cosines of K population gradients (rows), NaN where a gradient is zero."""
    norms = np.linalg.norm(gradients, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (gradients @ gradients.T) / np.outer(norms, norms)


def _measure(
    name: str,
    domain_names: list[str],
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor],
    next_batch: Callable[[], dict[str, torch.Tensor]],
    population_gradients: Callable[[np.ndarray], np.ndarray],
    *,
    steps: int,
    lr: float,
    train: bool,
    fused: bool,
) -> KnownRun:
    """The loop of ``gradmix diagnose``: one probed backward per step (``make_probe(gram=True)``), SGD if ``train``."""
    k = len(domain_names)
    probe = make_probe(model, fused="auto" if fused else False, gram=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    measurements: list[Measurement] = []
    truth = []
    for _ in range(steps):
        theta = next(model.parameters()).detach().reshape(-1).to(torch.float64).numpy().copy()
        batch = next_batch()
        result = probe.backward(batch, batch["domain"].long(), k, loss_fn, measure=True)
        if train:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if result is not None and result.gram is not None:
            measurements.append(result)
            truth.append(true_cosines(population_gradients(theta)))
    return KnownRun(name, domain_names, measurements, np.asarray(truth).reshape(-1, k, k), train)


# -- linear regression -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSetting:
    """Two or more regression domains on one linear model. ``cosine``: the cosine between w_a and w_b (2 domains:
    -1 opposite targets, +1 the same targets; in between a fixed angle), or ``targets`` given outright (K x d).
    ``train``: SGD with ``lr`` on the uniform mix from theta = 0 (False: every step probes theta = 0)."""

    name: str
    cosine: float = 0.0
    dim: int = 8
    noise: float = 0.5
    batch_size: int = 32
    lr: float = 0.05
    train: bool = True
    targets: tuple[tuple[float, ...], ...] | None = None

    def target_matrix(self) -> np.ndarray:
        if self.targets is not None:
            return np.asarray(self.targets, dtype=np.float64)
        if not -1.0 <= self.cosine <= 1.0:
            raise ValueError(f"setting {self.name!r}: cosine must be in [-1, 1], got {self.cosine}")
        e1, e2 = np.eye(self.dim)[0], np.eye(self.dim)[1]
        angle = math.acos(self.cosine)
        return np.stack([e1, math.cos(angle) * e1 + math.sin(angle) * e2])


def linear_settings() -> list[LinearSetting]:
    """Built to conflict (opposite targets: cosine -1; an angle of cosine -0.5 at theta = 0), built to agree (the
    same targets split in two: +1; cosine 0.5 at theta = 0)."""
    return [
        LinearSetting("opposite targets (trained)", cosine=-1.0),
        LinearSetting("cosine -0.5 (theta = 0)", cosine=-0.5, train=False),
        LinearSetting("same targets split in two (trained)", cosine=1.0),
        LinearSetting("cosine +0.5 (theta = 0)", cosine=0.5, train=False),
    ]


def measure_linear(setting: LinearSetting, steps: int, *, seed: int = 0, fused: bool = False) -> KnownRun:
    """``steps`` probed steps of ``setting`` (uniform mix, quota sampler); ``fused``: the fused probe instead of the
    micro-batch one ``gradmix diagnose`` uses."""
    targets = torch.from_numpy(setting.target_matrix())
    k, d = targets.shape
    names = [f"d{i}" for i in range(k)]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, 1, bias=False).to(torch.float64)
    with torch.no_grad():
        model.weight.zero_()
    sampler = MixtureSampler([2**40] * k, setting.batch_size, np.full(k, 1.0 / k), seed=seed)

    def next_batch() -> dict[str, torch.Tensor]:
        domains, _ = sampler.next_arrays()
        dom = torch.from_numpy(np.asarray(domains, dtype=np.int64))
        x = torch.randn(dom.numel(), d, generator=generator, dtype=torch.float64)
        eps = torch.randn(dom.numel(), generator=generator, dtype=torch.float64) * setting.noise
        return {"x": x, "y": (x * targets[dom]).sum(dim=1) + eps, "domain": dom}

    def loss_fn(net: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * (net(batch["x"]).squeeze(1) - batch["y"]) ** 2

    target_np = targets.numpy()
    return _measure(
        setting.name,
        names,
        model,
        loss_fn,
        next_batch,
        lambda theta: theta[None, :] - target_np,
        steps=steps,
        lr=setting.lr,
        train=setting.train,
        fused=fused,
    )


# -- PiKE's toy problem ------------------------------------------------------------------------------------------


def toy_settings() -> list[ToySetting]:
    """``pike_toy.suite()``: the settings of "PiKE on its own toy problem" in BENCHMARKS.md."""
    return suite()


def measure_toy(
    setting: ToySetting,
    steps: int,
    *,
    seed: int = 0,
    batch_size: int | None = None,
    train: bool = False,
    fused: bool = False,
) -> KnownRun:
    """``steps`` probed steps of the toy problem's Mixer-path model (``pike_toy.mixer_model``) on the uniform mix.

    ``batch_size``: examples per measuring step (default the setting's b: what PiKE itself measures with);
    ``train``: plain SGD with the setting's eta between measurements (default False: every step probes theta_0,
    where every task is at its starting loss and the cosines are exactly the setting's)."""
    problem = ToyProblem(setting)
    k = setting.num_tasks
    b = setting.batch_size if batch_size is None else int(batch_size)
    domains, model, loss_fn = mixer_model(problem, seed=seed, size=b * steps + b)
    sampler = MixtureSampler(domains.sizes, b, np.full(k, 1.0 / k), seed=seed)

    def next_batch() -> dict[str, torch.Tensor]:
        dom, examples = sampler.next_arrays()
        return domains.gather(dom, examples)

    def gradients(theta: np.ndarray) -> np.ndarray:
        return (problem.curvature * (problem.directions @ theta))[:, None] * problem.directions

    return _measure(
        setting.name,
        [f"task{i}" for i in range(k)],
        model,
        loss_fn,
        next_batch,
        gradients,
        steps=steps,
        lr=problem.lr,
        train=train,
        fused=fused,
    )
