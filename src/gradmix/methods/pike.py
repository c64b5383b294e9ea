"""PiKE: adaptive data mixing under low gradient conflicts (Li et al., arXiv 2502.06244).

All forms are built on the paper's one-step bound (Thm 3.4): with per-task batch shares w_k = b_k / b, the expected
change of the average loss after one SGD step is bounded by ``sum_k (w_k lam_k + 0.5 w_k^2 kappa_k)`` with

    lam_k   = -eta beta ||grad L_k||^2 + (L eta^2 / 2b) sigma_k^2
    kappa_k =  L eta^2 gamma ||grad L_k||^2
    beta    = min_k (1 + c (2 - K - b / b_k)),   gamma = 1 + c_bar (K - 1)

Four named variants (``variant=``, listed in ``PiKE.variants``), each a set of defaults for the parameters below:

- ``"gradmix"`` (default): the bound itself, minimised on the simplex (``water_filling``, the conceptual form, so the
  self-limiting term kappa_k is kept), fed statistics pooled over updates and shrunk by their standard errors, with
  the unknown L*eta averaged over a range, the gain split between domains by their losses and tilted by them,
  mixed with uniform, and held still when the statistics or the batch have too few examples per domain. See
  ``PiKE`` for each piece.
- ``"paper"``: Algorithm 1 literally: ``w_k <- w_k exp(zeta1 ||grad L_k||^2 - (zeta2 / 2b) sigma_k^2)`` on the raw
  statistics, renormalised; no normaliser, EMA, clip, floor or shrinkage.
- ``"conceptual"``: the paper's conceptual PiKE: the bound minimised with known constants ``lr`` and ``smoothness``
  on the raw statistics (fed exact statistics every step, the greedy per-step optimum).
- ``"gradmix_v1"``: gradmix's default before 0.2 (kept for comparison): Algorithm 1's step on statistics divided by
  D_t = mean_k ||grad L_k||^2, smoothed by an EMA and clipped. As D_t shrinks the variance term grows without bound,
  and nothing but a floor stops the drift onto one task (BENCHMARKS.md, "PiKE on its own toy problem").

``mode=`` alone (no ``variant``) keeps its old meaning: ``"practical"`` = ``gradmix_v1``, ``"conceptual"`` =
``conceptual``. The controller calls ``update`` every T0
optimizer steps (``recommended_update_interval``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from gradmix.methods.base import MixingMethod, normalize_log_weights
from gradmix.stats import DomainStats, StatsError

__all__ = ["PiKE", "homogeneity_shrinkage", "shrink_to_mean", "shrinkage_centre", "water_filling"]

# kappa below this fraction of the problem's scale is treated as exactly 0 (its reciprocal would overflow).
_KAPPA_ZERO = 1e-280
# Numerical guard: no single update moves a log-weight by more than this (exp() underflows long before).
_HARD_LOG_STEP = 1e3

_NORMALIZERS = ("mean_sq_norm", "none")
_CENTRES = ("mean", "precision", "median")
_MODES = ("practical", "conceptual")
_GAINS = ("grad_norm", "loss")


def _as_vector(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise ValueError(f"water_filling: {what} must be a non-empty 1-D vector, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"water_filling: {what}[{int(bad[0])}] is {arr[bad[0]]}; all entries must be finite")
    return arr


def _water_level(lam: np.ndarray, kappa: np.ndarray) -> float:
    """Water level t = -mu for strictly positive kappa: sum_k max(0, (t - lam_k) / kappa_k) = 1.

    Exact: sort the breakpoints lam_k; with the m smallest active, t_m = (1 + sum lam_i/kappa_i) / sum 1/kappa_i,
    and m is the largest m with excess_m = sum_{i<=m} (lam_m - lam_i) / kappa_i < 1 (that sum grows with m, so the
    valid m form a prefix; m = 1 always qualifies). Both are evaluated without cancellation: t_m as
    lam_m + (1 - excess_m) / sum 1/kappa_i, excess_m from its non-negative increments.
    """
    order = np.argsort(lam, kind="stable")
    lam_sorted = lam[order]
    cum_inv = np.cumsum(1.0 / kappa[order])
    # excess_m = excess_{m-1} + (lam_m - lam_{m-1}) sum_{i<m} 1/kappa_i: a sum of non-negative terms. The closed form
    # lam_m sum 1/kappa_i - sum lam_i/kappa_i cancels when the kappa differ by many orders of magnitude.
    excess = np.concatenate(([0.0], np.cumsum(np.diff(lam_sorted) * cum_inv[:-1])))
    beyond = np.flatnonzero(excess >= 1.0)
    active = int(beyond[0]) if beyond.size else lam.shape[0]
    # t_m = lam_m + (1 - excess_m) / sum_{i<=m} 1/kappa_i, the same level without the cancellation
    return float(lam_sorted[active - 1] + (1.0 - excess[active - 1]) / cum_inv[active - 1])


def water_filling(lam: Any, kappa: Any) -> np.ndarray:
    """Exact minimiser over the probability simplex of ``sum_k (w_k lam_k + 0.5 w_k^2 kappa_k)``, kappa_k >= 0.

    This is conceptual PiKE's per-step problem (Thm 3.4). KKT gives ``w_k = max(0, -(mu + lam_k) / kappa_k)`` with
    mu chosen so the weights sum to 1; mu is found exactly by sorting the breakpoints (no bisection).

    ``kappa_k == 0`` (a domain whose cost is linear) is solved as the limit kappa_k -> 0+: such a domain only gets
    weight if its lam_k is below the water level the other domains would reach; then the level stops at the
    smallest such lam, the positive-kappa domains fill up to it and the rest of the mass is split evenly between
    the zero-kappa domains tied at that smallest lam (exact equality). All kappa zero: a vertex (or an even split of
    the tied minima). kappa below 1e-280 times the problem's scale counts as 0. Non-finite input or a negative
    kappa raises ``ValueError`` naming the entry.
    """
    lam = _as_vector(lam, "lam")
    kappa = _as_vector(kappa, "kappa")
    if lam.shape != kappa.shape:
        raise ValueError(f"water_filling: lam has {lam.shape[0]} entries but kappa has {kappa.shape[0]}")
    negative = np.flatnonzero(kappa < 0)
    if negative.size:
        raise ValueError(
            f"water_filling: kappa[{int(negative[0])}] = {kappa[negative[0]]} is negative; the problem must be convex"
        )
    # Shifting lam by a constant adds a constant to the objective on the simplex; scaling both by a positive
    # constant scales it. Neither moves the minimiser, and together they keep every number in [0, 1].
    lam = lam - lam.min()
    scale = max(float(lam.max()), float(kappa.max()))
    if scale > 0:
        lam = lam / scale
        kappa = kappa / scale
    positive = kappa > _KAPPA_ZERO
    weights = np.zeros_like(lam)
    level = _water_level(lam[positive], kappa[positive]) if positive.any() else math.inf
    zero = ~positive
    if zero.any():
        lowest = float(lam[zero].min())
        if level > lowest:
            level = lowest
            if positive.any():
                weights[positive] = np.maximum(0.0, (level - lam[positive]) / kappa[positive])
            remainder = max(0.0, 1.0 - float(weights.sum()))
            tied = zero & (lam == lowest)
            weights[tied] = remainder / int(tied.sum())
            total = weights.sum()
            return weights / total if total > 0 else np.where(tied, 1.0 / int(tied.sum()), 0.0)
    weights[positive] = np.maximum(0.0, (level - lam[positive]) / kappa[positive])
    return _relevel(weights, kappa)


def _relevel(weights: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    """Make the weights sum to 1 by moving the water level, not by rescaling.

    Rounding leaves ``sum(w) = 1 + eps``; with a tiny kappa_k that eps can be large (``(t - lam_k) / kappa_k``
    cancels). Dividing by the sum would move every active marginal ``lam_k + kappa_k w_k`` by ``kappa_k w_k eps``:
    unequal, so the KKT condition breaks at a large kappa. Moving the level by d instead adds ``d / kappa_k`` to each
    active weight, which shifts every active marginal by the same d; the residual lands where it costs least.
    """
    active = weights > 0
    relative = kappa[active].min() / kappa[active]  # 1/kappa_k up to a factor, in (0, 1]: no overflow at kappa ~ 1e-280
    residual = 1.0 - float(weights.sum())
    weights[active] = np.maximum(0.0, weights[active] + residual * relative / relative.sum())
    return weights / weights.sum()


def _positive_float(value: Any, name: str, *, allow_zero: bool = False) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"pike: {name} must be a finite number {bound}, got {value!r}")
    return number


def _log_mean_exp(log_weights: np.ndarray, steps: np.ndarray) -> float:
    """log(sum w_k e^{s_k} / sum w_k) over the given entries, computed stably (entries may be -inf)."""
    shifted = log_weights + steps
    top = float(np.max(shifted))
    top_w = float(np.max(log_weights))
    return (top + math.log(float(np.sum(np.exp(shifted - top))))) - (
        top_w + math.log(float(np.sum(np.exp(log_weights - top_w))))
    )


def _json_floats(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def _from_json_floats(
    values: Any, num_domains: int, what: str, missing: float, *, nonnegative: bool = False
) -> np.ndarray:
    """A saved vector (None = ``missing``), checked at load so a crafted state fails here, not at the next update."""
    if values is None:
        return np.full(num_domains, missing)
    try:
        arr = np.array([missing if v is None else float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"pike: checkpointed {what} must be a list of {num_domains} numbers, got {values!r}") from None
    if arr.shape != (num_domains,):
        raise ValueError(f"pike: checkpointed {what} has {arr.shape[0]} entries, expected {num_domains}")
    given = np.array([v is not None for v in values])
    bad = np.flatnonzero(given & ~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"pike: checkpointed {what}[{int(bad[0])}] is {arr[bad[0]]}; saved values must be finite")
    if nonnegative and np.any(given & (arr < 0)):
        i = int(np.flatnonzero(given & (arr < 0))[0])
        raise ValueError(f"pike: checkpointed {what}[{i}] is {arr[i]}; it must be >= 0")
    return arr


# Each variant is a set of defaults: the raw-statistics baseline below, with the variant's own changes on top.
_RAW_STATISTICS: dict[str, Any] = {
    "stats_ema": 0.0,
    "normalize": "none",
    "max_log_step": None,
    "shrinkage": False,
    "uniform_mix": 0.0,
    "lr_smoothness": None,
    "loss_tilt": 0.0,
    "min_examples_per_domain": 0.0,
    "min_batch_per_domain": 0.0,
    "reuse_pooled": False,
    "mix_evidence": 0.0,
    "gain": "grad_norm",
}
_VARIANTS: dict[str, dict[str, Any]] = {
    "gradmix": {
        **_RAW_STATISTICS,
        "mode": "conceptual",
        "stats_ema": 0.7,
        "shrinkage": True,
        "uniform_mix": 0.65,
        "lr_smoothness": (0.5, 1.0, 2.0),
        "loss_tilt": 1.0,
        "min_examples_per_domain": 4.0,
        "min_batch_per_domain": 2.0,
        "reuse_pooled": True,
        "mix_evidence": 0.5,
        "gain": "loss",
    },
    "paper": {**_RAW_STATISTICS, "mode": "practical"},
    "conceptual": {**_RAW_STATISTICS, "mode": "conceptual"},
    "gradmix_v1": {
        **_RAW_STATISTICS,
        "mode": "practical",
        "stats_ema": 0.5,
        "normalize": "mean_sq_norm",
        "max_log_step": 0.5,
    },
}
_UNSET: Any = object()


def shrinkage_centre(values: np.ndarray, variances: np.ndarray, kind: str = "mean") -> float:
    """The common value ``shrink_to_mean`` pulls the entries toward. It is a prior on how the domains differ, and
    the data cannot choose it when a few examples per domain are all there is (BENCHMARKS.md, the sixth round):

    - ``"mean"``: the plain mean. A noisy entry pulls the centre toward its own estimate: up where that domain's
      value really is large (a slow, noisy domain keeps some of its gain), below 0 where its noise is negative.
    - ``"precision"``: a random-effects mean, entry k weighted by ``1 / (v_k + tau^2)`` with the between-entry
      variance tau^2 from DerSimonian-Laird; entries with variance 0 or NaN count as exact (the centre is their
      mean when there are any). Noisy entries barely move it: right when they resemble the precise ones.
    - ``"median"``: robust to the extremes, between the two.
    """
    if kind == "mean":
        return float(np.mean(values))
    if kind == "median":
        return float(np.median(values))
    if kind != "precision":
        raise ValueError(f"shrinkage_centre: kind must be one of {_CENTRES}, got {kind!r}")
    with np.errstate(all="ignore"):
        noise = np.nan_to_num(variances, nan=0.0)
        exact = ~(noise > 0)
        if np.any(exact):
            return float(np.mean(values[exact]))
        weight = 1.0 / noise
        fixed = float(np.sum(weight * values) / np.sum(weight))
        heterogeneity = float(np.sum(weight * (values - fixed) ** 2))
        scale = float(np.sum(weight) - np.sum(weight * weight) / np.sum(weight))
        between = max(0.0, (heterogeneity - (values.size - 1)) / scale) if scale > 0 else 0.0
        weight = 1.0 / (noise + between)
        centre = float(np.sum(weight * values) / np.sum(weight))
    return centre if math.isfinite(centre) else float(np.mean(values))


def shrink_to_mean(values: np.ndarray, variances: np.ndarray, centre: str = "mean") -> np.ndarray:
    """Pull each entry toward the entries' common value (``shrinkage_centre``, the mean by default) by its sampling
    noise (a positive-part James-Stein rule per entry): ``m + max(0, 1 - v_k / (x_k - m)^2) (x_k - m)``. A deviation
    smaller than its standard error is noise and vanishes; a large one is kept almost whole. Equal estimates stay
    equal; NaN variances mean "no shrinkage"."""
    with np.errstate(all="ignore"):  # extreme statistics: overflow falls back to the unshrunk values below
        middle = shrinkage_centre(values, variances, centre)
        deviation = values - middle
        keep = np.maximum(0.0, 1.0 - np.nan_to_num(variances, nan=0.0) / (deviation * deviation))
        keep = np.where(deviation == 0, 0.0, np.nan_to_num(keep, nan=0.0))
        shrunk = middle + keep * deviation
    return np.where(np.isfinite(shrunk), shrunk, values)


def homogeneity_shrinkage(values: np.ndarray, variances: np.ndarray, evidence: float) -> float:
    """One factor in [0, 1] for all deviations from the mean: ``max(0, 1 - evidence (K - 1) / Q)`` with
    ``Q = sum_k (x_k - m)^2 / v_k``, a positive-part James-Stein factor. Q is about K - 1 when the entries differ by
    noise alone, so with ``evidence = 2`` equal entries measured with noise stay equal unless Q reaches twice that
    (per-entry shrinkage lets about a third of pure-noise deviations through in part). 0 = no test (factor 1)."""
    if evidence == 0.0:
        return 1.0
    deviation = values - float(np.mean(values))
    if not np.any(deviation != 0):
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        terms = np.where(deviation == 0, 0.0, deviation * deviation / np.nan_to_num(variances, nan=0.0))
        statistic = float(np.sum(terms))
    if not math.isfinite(statistic):  # a deviation with no noise at all: certain
        return 1.0
    return max(0.0, 1.0 - evidence * (values.size - 1) / statistic)


class PiKE(MixingMethod):
    """PiKE: per-domain sampling weights from squared gradient norms and gradient variances.

    ``variant="gradmix"`` (the default), per update:

    1. **Pooled statistics**: an EMA over updates (``stats_ema = 0.7``, ~6 measurements) of the probe's unbiased
       ||grad L_k||^2 and sigma_k^2, together with the EMA's sampling variance, from the examples each estimate used:
       Var ||g||^2-hat ~ 2 s^2 / (n (n-1)) + 4 ||g||^2 s / n and Var s-hat ~ 2 s^2 / (n - 1) (s = sigma^2; exact for
       Gaussian gradients of rank one, an upper bound otherwise, so the method errs toward uniform).
    2. **Shrinkage** (``shrinkage=True``): each statistic is pulled toward a common value over the domains (their
       mean by default) by its standard error (``shrink_to_mean``). A measuring batch with a few examples per
       domain gives estimates whose noise is larger than the differences between domains; without this, noise alone
       moved the mix (and a positive noise draw of a noisy domain's ||g||^2 gave it most of the batch). The centre
       is a prior the data cannot choose at a few examples per domain (``shrinkage_centre``: ``"mean"``, the
       default, or ``"precision"`` or ``"median"``); the mean keeps the toy family's worst case lowest
       (BENCHMARKS.md, the sixth round).
    3. **The bound, minimised** (``mode="conceptual"``): water-filling of Thm 3.4 with the self-limiting term
       kappa_k, which Algorithm 1 drops (without it, nothing but a floor stops the drift onto one task). Only the
       product L*eta matters; it is unknown in real training, so the solution is averaged over
       ``lr_smoothness = (0.5, 1, 2)`` (eta = 1/L and a factor 2 either way; a single value if you know it).
       No normaliser: the minimiser is invariant to scaling both statistics, so nothing grows as gradients shrink.
    4. **Only as far as the evidence goes** (``mix_evidence = 0.5``, gradmix's): the bound's mix is pulled toward
       the even split by a positive-part James-Stein factor ``1 - mix_evidence (K - 1) / Q``, Q the squared
       deviation from the even split over its sampling variance, which a parametric bootstrap of the statistics
       gives (``mix_draws = 64`` redraws, each minimised like the estimate; ``_evidence_shrunk``). Water-filling
       turns small differences of noisy statistics into large weight differences; pure noise gives Q ~ K - 1, so
       such a mix is halved. On the toy family it took the worst held-out setting from 1.17x to 0.99x uniform
       (BENCHMARKS.md); 0 switches it off.
    5. **Mixed with uniform** (``uniform_mix = 0.65``): w = 0.35 w_bound + 0.65 / K. Every domain keeps at least
       0.65 / K of the batch, so it is measured at every measuring step (>= 2 examples when b >= 3.1 K) and regains
       weight as soon as its statistics call for it; a starved domain cannot be forgotten. 0.65 is the share at which
       the held-out settings of the toy family stayed at parity with uniform while the suite kept its gains
       (BENCHMARKS.md, "PiKE on its own toy problem"); 0 gives the bound's mix alone.
    6. **Loss tilt** (``loss_tilt = 1``, gradmix's, not the paper's): the gain term ||grad L_k||^2 (and with it
       kappa_k) is scaled by L_k / mean_j L_j, losses (the interval's training losses, every step's, from
       ``MixingCore``) pooled like the statistics; differences count only beyond their noise (per-domain shrinkage
       and a joint test, ``homogeneity_shrinkage`` with ``loss_tilt_evidence = 2``: on identical tasks measured with
       noise the tilt stays 1). The bound is one step long and feeds the domain whose loss falls fastest now; a fast
       domain converges anyway while a slow one's loss is what is left at the end (on the toy problem the bound's own
       per-step optimum with exact statistics loses to uniform in 4 of 10 suite settings). The variance term is not
       tilted: a domain's noise lands on the shared parameters and costs every domain. 0 switches it off.
    7. **The gain split by the losses** (``gain = "loss"``, gradmix's, not the paper's): in the gain and in kappa_k
       each domain's measured ||grad L_k||^2 is replaced by ``r L_k``, its pooled loss (pooled and tested as for the
       tilt) times ``r = sum_j ||grad L_j||^2 / sum_j L_j``: the probe's total is kept, its split between domains
       comes from the losses. Near a minimum ||grad L_k||^2 ~ 2 mu_k L_k (Polyak-Lojasiewicz), so the measured split
       feeds the sharply curved domains, which converge fast anyway, while a flat domain's loss is what is left at
       the end; the losses' split reads every domain as equally curved, and a few examples' losses are far less
       noisy than their squared gradient norms. With the tilt the gain goes as L_k^2. On the toy family it took the
       worst unseen setting from 1.06x to 1.01x uniform (BENCHMARKS.md, the ninth round). Without losses in the
       statistics the measured split is used; ``"grad_norm"`` is the paper's.
    8. **Enough examples to compare** (``min_examples_per_domain = 4``, ``min_batch_per_domain = 2``): the
       statistics of one update are pooled from at least 4 examples per domain - when one batch has fewer, the
       core measures several steps of the interval (``examples_to_measure``; pooled estimates weighted by their
       precision, ``gradmix.stats.pool_measurements``) - and a batch with fewer than 2 examples per domain cannot
       realise a mix finely enough to gain from it (on the toy family moving it there cost up to 1.2x): with
       either short, the weights stay as they are and the method says so once.
    9. **No frozen domains** (``reuse_pooled = True``): a domain with too few examples in this measurement takes
       part with its pooled statistics; before, its weight was frozen, and a domain the noise had pushed low stayed
       low because it was rarely measured again.

    ``variant="paper"``: Algorithm 1 literally (``mode="practical"``, raw statistics, constant zeta, no EMA, clip,
    floor, shrinkage or normaliser). ``variant="conceptual"``: the bound with the given ``lr`` and ``smoothness`` on
    raw statistics. ``variant="gradmix_v1"``: the pre-0.2 default (practical step on statistics divided by the mean
    squared norm, ``stats_ema = 0.5``, ``max_log_step = 0.5``). Any parameter given explicitly overrides the
    variant's value.

    Practical mode (Algorithm 1), per update::

        G_k = ||grad L_k||^2 / D,  S_k = sigma_k^2 / D    (D = mean_j ||grad L_j||^2 with normalize="mean_sq_norm",
                                                           D = 1 with normalize="none")
        s_k = zeta1 G_k - (zeta2 / 2b) S_k,   log w_k <- log w_k + s_k,   renormalise

    with ``max_log_step`` clipping the centred steps and ``min_weight`` mixing with uniform after each update (fed
    back into the state). zeta1 = zeta2 = 0.1 (the paper's appendix leaves them to the user; with normalised G one
    update moves a log-ratio by ~0.1 x the spread of G).

    Conceptual mode minimises the bound exactly with b_k = b w_k from the current weights (b_k < 1 counts as 1 so
    beta stays finite); ``lr`` and ``smoothness`` give L*eta = lr * smoothness when ``lr_smoothness`` is not set.
    ``c`` (bound on negative cosine between task gradients) defaults to 0, the low-conflict regime the paper
    targets; ``c_bar`` (bound on positive cosine) to 0.1. beta <= 0 means the bound promises no decrease: skipped.

    Degenerate statistics: entries with NaN/Inf (a domain absent from the batch, or with fewer than 2 examples)
    make that domain *invalid* for this update: its weight is kept exactly and the valid domains share the rest.
    No valid domain, or all valid squared norms zero -> the update is skipped (``last_skip_reason``). Negative
    estimates (unbiased estimators can go below 0) are clipped at 0. One domain: the weight stays 1.
    """

    name: ClassVar[str] = "pike"
    required_stats: ClassVar[frozenset[str]] = frozenset({"grad_sq_norm", "grad_var"})
    recommended_update_interval: ClassVar[int] = 20
    variants: ClassVar[tuple[str, ...]] = tuple(_VARIANTS)  # the names ``variant=`` accepts

    def __init__(
        self,
        num_domains: int,
        *,
        variant: str = _UNSET,
        mode: str = _UNSET,
        zeta1: float = 0.1,
        zeta2: float = 0.1,
        normalize: str = _UNSET,
        stats_ema: float = _UNSET,
        min_weight: float = 0.0,
        max_log_step: float | None = _UNSET,
        shrinkage: bool = _UNSET,
        shrinkage_centre: str = "mean",
        uniform_mix: float = _UNSET,
        lr_smoothness: float | Sequence[float] | None = _UNSET,
        loss_tilt: float = _UNSET,
        min_examples_per_domain: float = _UNSET,
        min_batch_per_domain: float = _UNSET,
        reuse_pooled: bool = _UNSET,
        loss_tilt_evidence: float = 2.0,
        mix_evidence: float = _UNSET,
        mix_draws: int = 64,
        gain: str = _UNSET,
        lr: float = _UNSET,
        smoothness: float = _UNSET,
        c: float = 0.0,
        c_bar: float = 0.1,
        initial_weights: Any = None,
    ) -> None:
        super().__init__(num_domains, initial_weights=initial_weights)
        if variant is _UNSET:  # ``mode`` alone keeps its meaning from before variants existed
            variant = {"practical": "gradmix_v1", "conceptual": "conceptual"}.get(mode, "gradmix")
        if variant not in _VARIANTS:
            raise ValueError(f"pike: variant must be one of {self.variants}, got {variant!r}")
        defaults = _VARIANTS[variant]
        self.variant = variant

        def pick(name: str, value: Any) -> Any:
            return defaults[name] if value is _UNSET else value

        mode = pick("mode", mode)
        normalize = pick("normalize", normalize)
        if mode not in _MODES:
            raise ValueError(f"pike: mode must be one of {_MODES}, got {mode!r}")
        if normalize not in _NORMALIZERS:
            raise ValueError(f"pike: normalize must be one of {_NORMALIZERS}, got {normalize!r}")
        self.mode = mode
        self.normalize = normalize
        self.zeta1 = _positive_float(zeta1, "zeta1", allow_zero=True)
        self.zeta2 = _positive_float(zeta2, "zeta2", allow_zero=True)
        ema = float(pick("stats_ema", stats_ema))
        if not (0.0 <= ema < 1.0):
            raise ValueError(f"pike: stats_ema must be in [0, 1), got {stats_ema!r}")
        self.stats_ema = ema
        floor = _positive_float(min_weight, "min_weight", allow_zero=True)
        if floor * self.num_domains > 1.0 + 1e-12:
            raise ValueError(f"pike: min_weight={min_weight!r} times {self.num_domains} domains exceeds 1; use <= 1/K")
        self.min_weight = min(floor, 1.0 / self.num_domains)
        step_cap = pick("max_log_step", max_log_step)
        self.max_log_step = None if step_cap is None else _positive_float(step_cap, "max_log_step")
        self.shrinkage = bool(pick("shrinkage", shrinkage))
        if shrinkage_centre not in _CENTRES:
            raise ValueError(f"pike: shrinkage_centre must be one of {_CENTRES}, got {shrinkage_centre!r}")
        self.shrinkage_centre = shrinkage_centre
        mix = float(pick("uniform_mix", uniform_mix))
        if not (math.isfinite(mix) and 0.0 <= mix <= 1.0):
            raise ValueError(f"pike: uniform_mix must be in [0, 1], got {uniform_mix!r}")
        if mix > 0 and mode == "practical":
            raise ValueError("pike: uniform_mix applies to the bound's mix (mode='conceptual'); use min_weight")
        self.uniform_mix = mix
        explicit_constants = lr is not _UNSET or smoothness is not _UNSET
        self.lr = _positive_float(1.0 if lr is _UNSET else lr, "lr")
        self.smoothness = _positive_float(1.0 if smoothness is _UNSET else smoothness, "smoothness")
        products = pick("lr_smoothness", lr_smoothness)
        if products is None or (lr_smoothness is _UNSET and explicit_constants):
            products = (self.lr * self.smoothness,)
        values = np.atleast_1d(np.asarray(products, dtype=np.float64))
        if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(f"pike: lr_smoothness must be a positive number or a list of them, got {products!r}")
        self.lr_smoothness = tuple(float(v) for v in values)
        self.c = _positive_float(c, "c", allow_zero=True)
        self.c_bar = _positive_float(c_bar, "c_bar", allow_zero=True)
        self.loss_tilt = _positive_float(pick("loss_tilt", loss_tilt), "loss_tilt", allow_zero=True)
        self.min_examples_per_domain = _positive_float(
            pick("min_examples_per_domain", min_examples_per_domain), "min_examples_per_domain", allow_zero=True
        )
        self.min_batch_per_domain = _positive_float(
            pick("min_batch_per_domain", min_batch_per_domain), "min_batch_per_domain", allow_zero=True
        )
        self.reuse_pooled = bool(pick("reuse_pooled", reuse_pooled))
        self.loss_tilt_evidence = _positive_float(loss_tilt_evidence, "loss_tilt_evidence", allow_zero=True)
        self.mix_evidence = _positive_float(pick("mix_evidence", mix_evidence), "mix_evidence", allow_zero=True)
        if isinstance(mix_draws, bool) or not isinstance(mix_draws, int) or mix_draws < 2:
            raise ValueError(f"pike: mix_draws must be an integer >= 2, got {mix_draws!r}")
        self.mix_draws = mix_draws
        gain = pick("gain", gain)
        if gain not in _GAINS:
            raise ValueError(f"pike: gain must be one of {_GAINS}, got {gain!r}")
        self.gain = gain
        # sampling variances of the statistics of this update (after pooling) and of the bound's inputs built on them
        self._last_noise: tuple[np.ndarray, np.ndarray] | None = None
        self._stat_noise: tuple[np.ndarray, np.ndarray] | None = None
        self._said_too_few = False
        with np.errstate(divide="ignore"):
            self._log_weights = np.log(self._weights)
        self._ema_sq_norm = np.full(self.num_domains, np.nan)
        self._ema_var = np.full(self.num_domains, np.nan)
        # sampling variance of the EMAs above (sum of squared EMA weights x one estimate's variance)
        self._ema_sq_norm_noise = np.full(self.num_domains, np.nan)
        self._ema_var_noise = np.full(self.num_domains, np.nan)
        self._ema_loss = np.full(self.num_domains, np.nan)  # pooled per-domain loss behind ``loss_tilt``
        self._loss_spread = np.zeros(self.num_domains)  # noise variance of one loss record (successive differences)
        self._last_loss = np.full(self.num_domains, np.nan)
        self._loss_records = np.zeros(self.num_domains)
        # Diagnostics of the last applied update (not state): {term: per-domain values}, None after a skip.
        self.last_terms: dict[str, np.ndarray] | None = None
        self._last_tilt: np.ndarray = np.ones(self.num_domains)

    def examples_to_measure(self, batch_size: int) -> int:
        """Examples the statistics of one update should be pooled from: ``min_examples_per_domain`` per domain,
        when the batch can realise a mix at all (``min_batch_per_domain``); 0 otherwise (the weights stay)."""
        if self.num_domains == 1 or batch_size / self.num_domains < self.min_batch_per_domain:
            return 0
        return math.ceil(self.min_examples_per_domain * self.num_domains)

    # -- hooks for Fair-PiKE -------------------------------------------------------------------------------------
    def _valid_domains(self, stats: DomainStats) -> np.ndarray:
        """Domains whose statistics can be used this update."""
        # update() has already run stats.require(required_stats), so both fields are present.
        assert stats.grad_sq_norm is not None and stats.grad_var is not None
        return np.isfinite(stats.grad_sq_norm) & np.isfinite(stats.grad_var)

    def _can_reuse(self, stats: DomainStats) -> np.ndarray:
        """Domains whose pooled statistics may stand in for a missing measurement (all for PiKE)."""
        return np.ones(self.num_domains, dtype=bool)

    tilt_variance: bool = True  # whether _domain_tilt also scales the variance term (moot for PiKE: tilt is 1)

    def _domain_tilt(self, stats: DomainStats, valid: np.ndarray) -> np.ndarray:
        """Per-domain multiplier of the gradient terms (1 for PiKE; loss weights for Fair-PiKE)."""
        return np.ones(self.num_domains)

    def _pooled_losses(self, stats: DomainStats, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Fold this record's per-domain losses into the pooled state (an EMA like the gradient statistics) and
        return the pooled losses with their sampling variances, NaN where unknown. Differences between domains count
        only beyond their noise (per-domain shrinkage and a joint test, ``homogeneity_shrinkage`` with
        ``loss_tilt_evidence``; five records first); pooled losses below 0 count as 0. None: fewer than two domains
        known, or no losses in the statistics."""
        if stats.loss is None:
            return None
        loss = np.asarray(stats.loss, dtype=np.float64)
        seen = np.isfinite(self._ema_loss)
        fresh = valid & np.isfinite(loss)
        beta = self.stats_ema
        with np.errstate(invalid="ignore", over="ignore"):
            blended = np.where(seen, beta * self._ema_loss + (1.0 - beta) * loss, loss)
            # half the squared difference of successive records: their noise variance, a smooth drift cancelled
            jump = 0.5 * (loss - self._last_loss) ** 2
            first = self._loss_records < 2
            spread = np.where(first, jump, beta * self._loss_spread + (1.0 - beta) * jump)
        fresh &= np.isfinite(blended)  # extreme losses overflow the pooled values: such a record is left out
        self._ema_loss[fresh] = blended[fresh]
        has_last = fresh & np.isfinite(self._last_loss) & np.isfinite(spread)
        self._loss_spread[has_last] = spread[has_last]
        self._loss_records[fresh] += 1
        self._last_loss[fresh] = loss[fresh]
        known = valid & np.isfinite(self._ema_loss) & (self._loss_records >= 5)
        if int(known.sum()) < 2:
            return None
        losses = self._ema_loss[known]
        noise = self._loss_spread[known] * (1.0 - beta) / (1.0 + beta)
        centre = float(np.mean(losses))
        together = homogeneity_shrinkage(losses, noise, self.loss_tilt_evidence)
        pooled = np.full(self.num_domains, np.nan)
        pooled_noise = np.full(self.num_domains, np.nan)
        # a pooled loss below 0 is estimation noise around a converged one
        pooled[known] = np.maximum(centre + together * (shrink_to_mean(losses, noise) - centre), 0.0)
        pooled_noise[known] = noise
        return pooled, pooled_noise

    def _loss_tilt(self, pooled: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """(L_k / mean_j L_j) ** loss_tilt on the pooled losses (1 where unknown).

        The bound is one step long: it feeds the domain whose loss falls fastest *now*, which a fast domain keeps
        doing until it has converged anyway, while a slow domain's loss is what is left at the end of training.
        A domain can lose at most its loss, so its gain is scaled by its loss relative to the mean (a horizon
        correction; gradmix's, not the paper's). A mean <= 0 (an objective that is not a non-negative loss)
        switches the tilt off for the update. On text, where most of each loss is irreducible, the ratios stay
        near 1."""
        ones = np.ones(self.num_domains)
        if self.loss_tilt == 0.0 or pooled is None:
            return ones
        losses = pooled[0]
        known = np.isfinite(losses)
        mean = float(np.mean(losses[known]))
        if not mean > 0:
            return ones
        tilt = ones.copy()
        tilt[known] = (losses[known] / mean) ** self.loss_tilt
        return tilt

    def _gain_from_losses(
        self,
        sq_norm: np.ndarray,
        sq_noise: np.ndarray | None,
        pooled: tuple[np.ndarray, np.ndarray],
        valid: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``gain="loss"``: each domain's ||grad L_k||^2 replaced by ``r L_k``, its pooled loss times the common
        ratio ``r = sum_k ||grad L_k||^2 / sum_k L_k`` (the measured total kept), with the sampling variance
        ``L_k^2 Var(r) + r^2 Var(L_k)``. None (keep the measured split) when a compared domain's loss is unknown,
        the losses sum to 0 or the product overflows."""
        losses, loss_noise = pooled
        total = float(np.sum(losses[valid]))
        if not (np.all(np.isfinite(losses[valid])) and total > 0):
            return None
        with np.errstate(over="ignore", invalid="ignore"):  # extreme statistics fall back below, never warn
            ratio = float(np.sum(sq_norm[valid])) / total
            spread = ratio * losses[valid]
            if not np.all(np.isfinite(spread)):
                return None
            model = sq_norm.copy()
            model[valid] = spread
            if sq_noise is None:
                return model, None
            ratio_noise = float(np.nansum(sq_noise[valid])) / (total * total)
            spread_noise = losses[valid] ** 2 * ratio_noise + ratio * ratio * loss_noise[valid]
        noise = sq_noise.copy()
        noise[valid] = np.where(np.isnan(spread_noise), np.inf, spread_noise)  # unknown noise counts as unbounded
        return model, noise

    # -- update --------------------------------------------------------------------------------------------------
    def _batch_size(self, stats: DomainStats) -> float:
        if stats.batch_size is None:
            raise StatsError(f"method {self.name!r} needs DomainStats.batch_size (the global batch size b)")
        b = float(stats.batch_size)
        if not (math.isfinite(b) and b > 0):
            raise StatsError(f"method {self.name!r}: DomainStats.batch_size must be positive, got {stats.batch_size}")
        return b

    def _estimate_noise(
        self, sq_norm: np.ndarray, var: np.ndarray, examples: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sampling variances of one record's unbiased ||g||^2 and sigma^2 from n examples (see the class docstring);
        NaN where unknown (no example counts: no shrinkage)."""
        if examples is None:
            nan = np.full(self.num_domains, np.nan)
            return nan, nan.copy()
        n = np.asarray(examples, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            pairs = np.where(n >= 2, n * (n - 1.0), np.nan)
            sq_noise = 2.0 * var * var / pairs + 4.0 * np.maximum(sq_norm, 0.0) * var / np.where(n >= 2, n, np.nan)
            var_noise = 2.0 * var * var / np.where(n >= 2, n - 1.0, np.nan)
        return sq_noise, var_noise

    def _smoothed(
        self,
        sq_norm: np.ndarray,
        var: np.ndarray,
        valid: np.ndarray,
        examples: np.ndarray | None = None,
        *,
        usable: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fold this record into the EMA state (and the EMA's sampling variance) and return the statistics to use:
        EMA or raw, shrunk toward their mean over the compared domains when ``shrinkage`` is on. The compared
        domains are ``valid`` (measured now) or ``usable`` (also those measured before, at their pooled values)."""
        sq_noise, var_noise = self._estimate_noise(sq_norm, var, examples)
        beta = self.stats_ema
        pairs = (
            (self._ema_sq_norm, sq_norm, 1.0 - beta),
            (self._ema_var, var, 1.0 - beta),
            (self._ema_sq_norm_noise, sq_noise, (1.0 - beta) ** 2),
            (self._ema_var_noise, var_noise, (1.0 - beta) ** 2),
        )
        for index, (ema, new, new_share) in enumerate(pairs):
            old_share = beta if index < 2 else beta * beta
            seen = np.isfinite(ema)
            with np.errstate(invalid="ignore", over="ignore"):
                blended = np.where(seen, old_share * ema + new_share * new, new)
            ema[valid] = blended[valid]
        sq_out = self._ema_sq_norm.copy() if beta > 0 else sq_norm.copy()
        var_out = self._ema_var.copy() if beta > 0 else var.copy()
        compared = valid if usable is None else usable
        stale = compared & ~valid
        sq_out[stale] = self._ema_sq_norm[stale]
        var_out[stale] = self._ema_var[stale]
        sq_noise_out = self._ema_sq_norm_noise if beta > 0 else sq_noise
        var_noise_out = self._ema_var_noise if beta > 0 else var_noise
        self._last_noise = (sq_noise_out.copy(), var_noise_out.copy())
        if self.shrinkage and int(compared.sum()) > 1:
            centre = self.shrinkage_centre
            sq_out[compared] = np.maximum(shrink_to_mean(sq_out[compared], sq_noise_out[compared], centre), 0.0)
            var_out[compared] = np.maximum(shrink_to_mean(var_out[compared], var_noise_out[compared], centre), 0.0)
        return sq_out, var_out

    def _update(self, stats: DomainStats) -> np.ndarray | None:
        self.last_terms = None
        if self.num_domains == 1:
            return np.ones(1)
        b = self._batch_size(stats)
        # Examples the statistics were pooled from (all measurements of the interval; the core measures several
        # steps when one batch has too few, see ``examples_to_measure``).
        measured = b if stats.examples is None else max(b, float(np.nansum(stats.examples)))
        per_domain = measured / self.num_domains
        if per_domain < self.min_examples_per_domain or b / self.num_domains < self.min_batch_per_domain:
            # Said once: it is a property of the set-up, not of this update.
            if not self._said_too_few:
                self.last_skip_reason = (
                    f"{self.name}: {per_domain:.3g} measured examples per domain per update and "
                    f"{b / self.num_domains:.3g} per batch (b = {b:g}, K = {self.num_domains}; needed: "
                    f"min_examples_per_domain = {self.min_examples_per_domain:g}, min_batch_per_domain = "
                    f"{self.min_batch_per_domain:g}); the statistics cannot tell the domains apart or the batch "
                    "cannot realise a mix, so the weights stay as they are (raise the batch or probe_every, or set "
                    "both to 0 to act anyway)"
                )
                self._said_too_few = True
            return None
        valid = self._valid_domains(stats)
        if not valid.any():
            self.last_skip_reason = f"{self.name}: no domain has finite gradient statistics; update skipped"
            return None
        # Unbiased estimators can dip below 0; a squared norm or a variance cannot. The estimates are pooled as they
        # are and clipped afterwards (clipping first would bias a noisy domain's average upward); gradmix_v1 clipped
        # first and keeps doing so.
        assert stats.grad_sq_norm is not None and stats.grad_var is not None  # checked by update()'s require()
        clip_first = self.variant == "gradmix_v1"
        floor = 0.0 if clip_first else -np.inf
        sq_norm = np.where(valid, np.maximum(np.nan_to_num(stats.grad_sq_norm), floor), np.nan)
        var = np.where(valid, np.maximum(np.nan_to_num(stats.grad_var), 0.0), np.nan)
        if clip_first and not np.any(sq_norm[valid] > 0):
            self.last_skip_reason = (
                f"{self.name}: every measured squared gradient norm is zero; nothing to compare, update skipped"
            )
            return None
        examples = stats.examples if stats.grad_examples is None else stats.grad_examples
        if self.reuse_pooled:
            # A domain measured before but not this time (too few examples in this batch) takes part with its
            # pooled statistics instead of having its weight frozen: a domain the noise pushed low stays comparable.
            pooled = np.isfinite(self._ema_sq_norm) & np.isfinite(self._ema_var) & self._can_reuse(stats)
            sq_norm, var = self._smoothed(sq_norm, var, valid, examples, usable=valid | pooled)
            valid = valid | pooled
        else:
            sq_norm, var = self._smoothed(sq_norm, var, valid, examples)
        sq_norm = np.where(valid, np.maximum(sq_norm, 0.0), np.nan)
        if not np.any(sq_norm[valid] > 0):
            measured = np.asarray(stats.grad_sq_norm)[valid]
            why = "zero" if np.all(measured == 0) else "at or below 0 (the estimates are dominated by noise)"
            self.last_skip_reason = (
                f"{self.name}: every domain's pooled squared gradient norm is {why}; nothing to compare, update skipped"
            )
            return None
        pooled_losses = self._pooled_losses(stats, valid) if self.loss_tilt > 0 or self.gain == "loss" else None
        loss_tilt = self._loss_tilt(pooled_losses)
        sq_noise = None if self._last_noise is None else self._last_noise[0]
        measured_sq_norm = sq_norm
        split = (
            self._gain_from_losses(sq_norm, sq_noise, pooled_losses, valid)
            if self.gain == "loss" and pooled_losses is not None
            else None
        )
        if split is not None:
            sq_norm, sq_noise = split
        domain_tilt = self._domain_tilt(stats, valid)
        tilt = domain_tilt * loss_tilt
        divisor = float(np.mean(sq_norm[valid])) if self.normalize == "mean_sq_norm" else 1.0
        if not divisor > 0:  # the EMA of a domain may still be 0 while its current value is not
            self.last_skip_reason = f"{self.name}: mean squared gradient norm is zero; update skipped"
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            gain_stat = np.where(valid, tilt * sq_norm / divisor, 0.0)
            # The loss tilt weighs what a domain's examples *gain*; their noise lands on the shared parameters and
            # costs every domain, so it is not tilted (tilting it made a domain whose loss looked converged free to
            # sample, and the bound then gave it most of the batch).
            var_stat = np.where(valid, (domain_tilt if self.tilt_variance else 1.0) * var / divisor, 0.0)
            # the sampling variances of the two statistics as they enter the bound (for ``mix_evidence``)
            self._stat_noise = None
            if self._last_noise is not None and sq_noise is not None and self.mix_evidence > 0:
                var_scale = np.broadcast_to(
                    np.asarray(domain_tilt if self.tilt_variance else 1.0) / divisor, tilt.shape
                )
                self._stat_noise = (
                    np.where(valid, np.square(tilt / divisor) * sq_noise, 0.0),
                    np.where(valid, np.square(var_scale) * self._last_noise[1], 0.0),
                )
        new_log: np.ndarray | None
        if self.mode == "practical":
            new_log = self._practical_step(gain_stat, var_stat, valid, b)
        else:
            new_log = self._conceptual_step(gain_stat, var_stat, valid, b)
            if new_log is None:
                return None
        # The terms behind the change (diagnostics, recorded by the core as ``update_terms``): the normalised
        # ||grad L_k||^2 and sigma_k^2 / (2b) (both after the EMA and, for Fair-PiKE, the tilt) and the tilt itself.
        assert self.last_terms is not None
        self.last_terms["grad_sq_norm"] = np.where(valid, gain_stat, np.nan)
        self.last_terms["variance_2b"] = np.where(valid, var_stat / (2.0 * b), np.nan)
        if self.loss_tilt > 0:
            self.last_terms["loss_tilt"] = np.where(valid, loss_tilt, np.nan)
        if split is not None:
            self.last_terms["measured_grad_sq_norm"] = np.where(valid, measured_sq_norm / divisor, np.nan)
        self._last_tilt = np.where(valid, tilt, np.nan)
        return self._commit(new_log)

    def _practical_step(self, gain_stat: np.ndarray, var_stat: np.ndarray, valid: np.ndarray, b: float) -> np.ndarray:
        """Algorithm 1's exponentiated step in log space; invalid domains keep their weight exactly."""
        with np.errstate(over="ignore", invalid="ignore"):
            gain = self.zeta1 * gain_stat
            penalty = (self.zeta2 / (2.0 * b)) * var_stat
            step = gain - penalty
        step = np.clip(
            np.nan_to_num(step, nan=0.0, posinf=_HARD_LOG_STEP, neginf=-_HARD_LOG_STEP), -_HARD_LOG_STEP, _HARD_LOG_STEP
        )
        step = np.where(valid, step, 0.0)
        if self.max_log_step is not None:
            centre = float(np.mean(step[valid]))
            step = np.where(valid, np.clip(step - centre, -self.max_log_step, self.max_log_step), 0.0)
        self.last_terms = {
            "gain": np.where(valid, gain, np.nan),
            "variance_penalty": np.where(valid, penalty, np.nan),
            "log_step": step.copy(),
        }
        log_weights = self._log_weights
        live = valid & np.isfinite(log_weights)
        if not live.any():  # the measured domains hold no mass: nothing for the step to redistribute
            return log_weights.copy()
        # Shift the valid steps so sum_valid w_k e^{s_k} = sum_valid w_k: unmeasured domains keep their weight.
        step = np.where(valid, step - _log_mean_exp(log_weights[live], step[live]), 0.0)
        return log_weights + step

    def _conceptual_step(
        self, gain_stat: np.ndarray, var_stat: np.ndarray, valid: np.ndarray, b: float
    ) -> np.ndarray | None:
        """Exact minimiser of the one-step bound (Thm 3.4) over the valid domains' share of the mass."""
        num = self.num_domains
        shares = np.maximum(b * self._weights, 1.0)  # b_k; an absent domain counts as one example
        beta = float(np.min(1.0 + self.c * (2.0 - num - b / shares)))
        if not beta > 0:
            self.last_skip_reason = (
                f"{self.name}: beta = {beta:.3g} <= 0 (conflict bound c={self.c} too large for these batch shares); "
                "the one-step bound promises no decrease, update skipped"
            )
            return None
        gamma = 1.0 + self.c_bar * (num - 1)
        # Divided by eta, the bound reads lam_k = -beta G_k + (L eta / 2b) S_k, kappa_k = L eta gamma G_k: the same
        # minimiser, and only the product L*eta is left. Unknown, it is averaged over ``lr_smoothness``.
        mass = float(np.sum(self._weights[valid]))
        result = self._bound_mix(gain_stat, var_stat, valid, b, beta, gamma, mass)
        if result is None:
            return None
        bound_mix, lams, kappas = result
        evidence = 1.0
        if mass > 0 and self.mix_evidence > 0 and self._stat_noise is not None:
            bound_mix, evidence = self._evidence_shrunk(bound_mix, gain_stat, var_stat, valid, b, beta, gamma, mass)
        weights = self._weights.copy()
        if mass > 0:
            mixed = (1.0 - self.uniform_mix) * bound_mix + self.uniform_mix / bound_mix.size
            weights[valid] = mass * mixed / mixed.sum()
        self.last_terms = {
            "lam": np.where(valid, np.mean(lams, axis=0), np.nan),
            "kappa": np.where(valid, np.mean(kappas, axis=0), np.nan),
        }
        if mass > 0:
            self.last_terms["bound_weights"] = np.where(valid, 0.0, np.nan)
            self.last_terms["bound_weights"][valid] = bound_mix
            if self.mix_evidence > 0:
                self.last_terms["mix_evidence_factor"] = np.where(valid, evidence, np.nan)
        with np.errstate(divide="ignore"):
            return np.log(weights)

    def _bound_mix(
        self,
        gain_stat: np.ndarray,
        var_stat: np.ndarray,
        valid: np.ndarray,
        b: float,
        beta: float,
        gamma: float,
        mass: float,
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]] | None:
        """The bound's minimiser over the valid domains (summing to ``mass``), averaged over ``lr_smoothness``, with
        the per-product lam and kappa; None (and ``last_skip_reason``) when the statistics overflow the bound."""
        bound_mix = np.zeros(int(valid.sum()))
        lams, kappas = [], []
        for product in self.lr_smoothness:
            with np.errstate(over="ignore", invalid="ignore"):
                lam = -beta * gain_stat + (product / (2.0 * b)) * var_stat
                kappa = product * gamma * gain_stat
            if not (np.all(np.isfinite(lam[valid])) and np.all(np.isfinite(kappa[valid]))):
                self.last_skip_reason = f"{self.name}: statistics overflow the one-step bound; update skipped"
                return None
            lams.append(lam)
            kappas.append(kappa)
            if mass > 0:
                # min over w_valid summing to m  ==  m * water_filling(m lam, m^2 kappa)
                bound_mix += water_filling(mass * lam[valid], mass**2 * kappa[valid]) / len(self.lr_smoothness)
        return bound_mix, lams, kappas

    def _evidence_shrunk(
        self,
        bound_mix: np.ndarray,
        gain_stat: np.ndarray,
        var_stat: np.ndarray,
        valid: np.ndarray,
        b: float,
        beta: float,
        gamma: float,
        mass: float,
    ) -> tuple[np.ndarray, float]:
        """The bound's mix pulled toward the even split by how well its deviation stands out of its sampling noise:
        ``centre + max(0, 1 - mix_evidence (K - 1) / Q) (mix - centre)``, Q = sum_k (mix_k - centre)^2 / Var_k.

        Var_k comes from a parametric bootstrap: ``mix_draws`` redraws of the statistics from their sampling
        distributions (normal, the pooled standard errors), each minimised like the estimate. Water-filling turns
        small differences of noisy statistics into large weight differences; this keeps the mix where the
        statistics cannot tell it from the even split (gradmix's, not the paper's). The draws are seeded by the
        update count, so a resumed run repeats them. Returns the mix and the factor (1 = kept whole).

        The loss tilt enters every draw at its estimate, a fixed factor on the gain and on the gain's noise.
        Redrawing the losses behind it in each draw held the identical-task case better but gave up gains on the toy
        family (BENCHMARKS.md, the fourteenth round)."""
        assert self._stat_noise is not None
        gain_noise, var_noise = (np.sqrt(np.nan_to_num(noise)) for noise in self._stat_noise)
        rng = np.random.default_rng(self.num_updates)
        draws = []
        for _ in range(self.mix_draws):
            gain = np.maximum(gain_stat + rng.standard_normal(gain_stat.shape) * gain_noise, 0.0)
            var = np.maximum(var_stat + rng.standard_normal(var_stat.shape) * var_noise, 0.0)
            if not np.any(gain[valid] > 0):
                continue
            drawn = self._bound_mix(gain, var, valid, b, beta, gamma, mass)
            if drawn is not None:
                draws.append(drawn[0])
        self.last_skip_reason = None  # an overflowing draw is not a reason to skip this update
        if len(draws) < 2:
            return bound_mix, 1.0
        spread = np.var(np.array(draws), axis=0, ddof=1)
        centre = mass / bound_mix.size  # the mean of bound_mix, which sums to mass
        factor = homogeneity_shrinkage(bound_mix, spread, self.mix_evidence)
        return centre + factor * (bound_mix - centre), factor

    def _commit(self, new_log: np.ndarray) -> np.ndarray:
        """Renormalise, apply the uniform floor (to the state too) and return the new weights."""
        new_log, weights = normalize_log_weights(new_log)
        if self.min_weight > 0:
            weights = (1.0 - self.num_domains * self.min_weight) * weights + self.min_weight
            weights = weights / weights.sum()
            new_log = np.log(weights)
        self._log_weights = new_log
        return weights

    # -- state ---------------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        # JSON-safe: -inf log-weights (switched-off domains) and NaN EMA entries (never observed) become None.
        return {
            "log_weights": _json_floats(self._log_weights),
            "ema_grad_sq_norm": _json_floats(self._ema_sq_norm),
            "ema_grad_var": _json_floats(self._ema_var),
            "ema_grad_sq_norm_noise": _json_floats(self._ema_sq_norm_noise),
            "ema_grad_var_noise": _json_floats(self._ema_var_noise),
            "ema_loss": _json_floats(self._ema_loss),
            "loss_spread": self._loss_spread.tolist(),
            "loss_records": self._loss_records.tolist(),
            "last_loss": _json_floats(self._last_loss),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("log_weights") is None:
            with np.errstate(divide="ignore"):
                self._log_weights = np.log(self._weights)
        else:
            log_weights = _from_json_floats(state["log_weights"], self.num_domains, "log_weights", -np.inf)
            with np.errstate(over="ignore"):
                total = float(np.exp(log_weights).sum())
            if not np.isfinite(log_weights).any():
                raise ValueError("pike: checkpointed log_weights switch every domain off")
            if abs(total - 1.0) <= 1e-12:  # saved normalised: load as is (renormalising again moves the last bit)
                self._log_weights = log_weights
            else:  # a hand-made state: renormalise
                self._log_weights, _ = normalize_log_weights(log_weights)
        self._ema_sq_norm = _from_json_floats(
            state.get("ema_grad_sq_norm"), self.num_domains, "ema_grad_sq_norm", np.nan
        )
        self._ema_var = _from_json_floats(
            state.get("ema_grad_var"), self.num_domains, "ema_grad_var", np.nan, nonnegative=True
        )
        self._ema_sq_norm_noise = _from_json_floats(
            state.get("ema_grad_sq_norm_noise"), self.num_domains, "ema_grad_sq_norm_noise", np.nan, nonnegative=True
        )
        self._ema_var_noise = _from_json_floats(
            state.get("ema_grad_var_noise"), self.num_domains, "ema_grad_var_noise", np.nan, nonnegative=True
        )
        self._ema_loss = _from_json_floats(state.get("ema_loss"), self.num_domains, "ema_loss", np.nan)
        self._loss_spread = _from_json_floats(
            state.get("loss_spread"), self.num_domains, "loss_spread", 0.0, nonnegative=True
        )
        self._last_loss = _from_json_floats(state.get("last_loss"), self.num_domains, "last_loss", np.nan)
        self._loss_records = _from_json_floats(
            state.get("loss_records"), self.num_domains, "loss_records", 0.0, nonnegative=True
        )
