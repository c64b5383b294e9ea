"""Do the domains' gradients conflict? The check to run before adopting PiKE.

PiKE (Li et al., arXiv 2502.06244) is built on a *low gradient conflict* assumption: for every pair of tasks
i != j, at the iterates training visits,

    -c ||grad L_i|| ||grad L_j||  <=  <grad L_i, grad L_j>  <=  c_bar ||grad L_i|| ||grad L_j||,

i.e. every pairwise cosine lies in [-c, c_bar]. c bounds the *conflict* (negative alignment) and enters the
one-step bound's first-order term through beta = min_k (1 + c (2 - K - b / b_k)); c_bar bounds the *positive*
interaction and enters the second-order term through gamma = 1 + c_bar (K - 1) (that is exactly the factor
sum_{i != j} c_bar a_i a_j <= c_bar (K - 1) sum_k a_k^2 gives, with a_k = w_k ||grad L_k||). The bound promises a
decrease only while beta > 0; at the uniform mix (b_k = b / K) beta = 1 - 2 c (K - 1), so the assumption is
useful for PiKE while c < 1 / (2 (K - 1)), and the paper's regime is c close to 0.

``diagnose`` estimates these constants from a series of Gramians G(t)_ij = <grad L_i, grad L_j> measured during
training (``GradientProbe(gram=True)``: unbiased estimates, off-diagonal from independent group means, diagonal the
unbiased ||grad L_k||^2):

- per step t, the cosines cos_ij(t) = G_ij(t) / sqrt(G_ii(t) G_jj(t)) (undefined, NaN, where an estimated squared
  norm is <= 0, which noise can cause), clipped to [-1, 1]: ``cosine_over_time``;
- the run's cosine matrix ``cosine``: per pair, the mean over the steps of cos_ij(t) where it is defined. Each step
  counts once: the assumption is about every iterate, and a gradient-size weighting would let the first steps
  (where every language-model domain shares the large "learn the token frequencies" direction) hide a conflict that
  appears once that shared part is learned. Steps where an estimated squared norm is <= 0 (noise larger than the
  signal, typical once the loss plateaus) carry no direction and are skipped. ``cosine_of_mean_gram`` is the
  alternative that weights steps by gradient size (the cosine of mean_t G(t));
- the assumption must hold at *every* iterate, and conflict is often a phase (in a language model the first steps
  share the "learn the token frequencies" direction; conflict shows once that is learned, and can fade when the
  model learns to tell the domains apart). Single-step cosines are too noisy to take a maximum over, so c and c_bar
  are taken over rolling means of ``window`` consecutive measurements (default max(5, ceil(T / 4))):
  ``cosine_min_window``_ij = the lowest rolling mean of cos_ij(t);
  ``c`` = max over pairs of max(0, -cosine_min_window_ij): the smallest c for which the assumption held throughout
  the run, up to the averaging; ``c_bar`` = max over pairs of the highest rolling mean, floored at 0;
  ``conflict_mean`` = mean over pairs of max(0, -cosine_min_window_ij);
- ``conflict_fraction``: the share of pairs whose lowest rolling mean is < 0 (the pairs that conflicted at some
  stretch of the run; c > 0 exactly when it is > 0); ``conflict_fraction_threshold``: the share below -threshold
  (default threshold 0.1: conflict too large to call noise); ``conflict_fraction_mean``: the share of pairs whose
  run-mean cosine is < 0; ``conflict_fraction_steps``: the share of (pair, step) measurements with cos_ij(t) < 0;
  ``conflicting_pairs``: those pairs, most negative first, with the steps of their worst stretch;
- ``beta_uniform`` = 1 - 2 c (K - 1) and ``gamma`` = 1 + c_bar (K - 1): the bound's constants at the uniform mix;
- a verdict (``low`` / ``moderate`` / ``strong``) and a ``recommendation`` in plain words.

Verdict: ``strong`` when c >= ``strong`` (default 0.3) or beta_uniform <= 0 (the bound no longer promises any
decrease); ``low`` when c < ``threshold``; ``moderate`` otherwise. These are estimates from a short run with a few
examples per domain per step: the per-step series and the number of measurements are in the result, and the
recommendation says when too few steps were usable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["Diagnosis", "diagnose", "gram_cosines"]


def gram_cosines(gram: Any) -> np.ndarray:
    """K x K cosines of a Gramian: G_ij / sqrt(G_ii G_jj), NaN where a diagonal entry is <= 0 or not finite,
    clipped to [-1, 1] (unbiased estimates can overshoot), 1 on the diagonal where defined."""
    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"a Gramian must be a square matrix, got shape {g.shape}")
    diag = np.diag(g).copy()
    ok = np.isfinite(diag) & (diag > 0)
    norms = np.where(ok, np.sqrt(np.where(ok, diag, 1.0)), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = g / np.outer(norms, norms)
    cos = np.where(np.isfinite(cos), np.clip(cos, -1.0, 1.0), np.nan)
    idx = np.flatnonzero(ok)
    cos[idx, idx] = 1.0
    return cos


def _as_gram(item: Any, k: int | None) -> np.ndarray:
    gram = getattr(item, "gram", item)  # a Measurement / DomainStats, or the matrix itself
    if gram is None:
        raise ValueError(
            "diagnose: a measurement has no Gramian; measure with GradientProbe(model, gram=True) on measuring steps"
        )
    arr = np.asarray(gram, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or (k is not None and arr.shape[0] != k):
        raise ValueError(f"diagnose: Gramian of shape {arr.shape}, expected ({k}, {k})")
    return arr


@dataclass
class Diagnosis:
    """What ``diagnose`` found (``to_dict()`` is what ``gradmix diagnose`` writes to ``diagnosis.json``)."""

    domains: list[str]
    cosine: list[list[float | None]]
    conflict_fraction: float | None
    conflict_fraction_threshold: float | None
    threshold: float
    c: float | None
    c_bar: float | None
    conflict_mean: float | None
    beta_uniform: float | None
    gamma: float | None
    verdict: str
    recommendation: str
    conflicting_pairs: list[dict[str, Any]]
    num_measurements: int
    usable_measurements: int
    steps: list[int]
    cosine_over_time: dict[str, list[float | None]]
    conflict_fraction_steps: float | None
    conflict_fraction_mean: float | None
    cosine_min_window: list[list[float | None]]
    window: int
    cosine_of_mean_gram: list[list[float | None]]
    grad_sq_norm: dict[str, float | None]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out

    def pair_cosine(self, a: str, b: str) -> float | None:
        i, j = self.domains.index(a), self.domains.index(b)
        return self.cosine[i][j]


def _clean(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _matrix(values: np.ndarray) -> list[list[float | None]]:
    return [[_clean(v) for v in row] for row in values]


def diagnose(
    grams: Sequence[Any],
    domains: Sequence[str],
    *,
    steps: Sequence[int] | None = None,
    threshold: float = 0.1,
    strong: float = 0.3,
    window: int | None = None,
    min_measurements: int = 3,
) -> Diagnosis:
    """Gradient-conflict diagnosis from a series of Gramians (see the module docstring for every estimator).

    Args:
        grams: K x K Gramians <grad L_i, grad L_j>, one per measuring step: arrays, or ``Measurement`` /
            ``DomainStats`` objects with a ``gram`` (``GradientProbe(gram=True)``).
        domains: the K domain names.
        steps: the step of each Gramian (default 1..T).
        threshold: cosine below ``-threshold`` counts as clear conflict (``conflict_fraction_threshold``), and
            c < threshold is the ``low`` verdict.
        strong: c at or above it (or beta_uniform <= 0) is the ``strong`` verdict.
        window: measurements per rolling window for c and c_bar (default max(5, ceil(T / 4)), at most T).
        min_measurements: fewer usable steps than this makes the recommendation say the estimate is unreliable.
    """
    names = [str(d) for d in domains]
    k = len(names)
    if k < 2:
        raise ValueError(f"diagnose needs at least 2 domains, got {names}")
    if not (math.isfinite(threshold) and 0 <= threshold < 1):
        raise ValueError(f"diagnose: threshold must be in [0, 1), got {threshold!r}")
    if not (math.isfinite(strong) and threshold <= strong <= 1):
        raise ValueError(f"diagnose: strong must be in [threshold, 1], got {strong!r}")
    matrices = [_as_gram(g, k) for g in grams]
    step_list = list(range(1, len(matrices) + 1)) if steps is None else [int(s) for s in steps]
    if len(step_list) != len(matrices):
        raise ValueError(f"diagnose: {len(step_list)} steps for {len(matrices)} Gramians")

    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    per_step = [gram_cosines(g) for g in matrices]
    over_time = {f"{names[i]}|{names[j]}": [_clean(c[i, j]) for c in per_step] for i, j in pairs}

    # the run's cosines: mean over the steps of the per-step cosines (each step counts once, wherever defined)
    finite = [g for g in matrices if np.all(np.isfinite(g))]
    stacked = np.stack(per_step) if per_step else np.full((1, k, k), np.nan)
    valid_counts = np.isfinite(stacked).sum(axis=0)
    with np.errstate(invalid="ignore"):
        cosine = np.where(valid_counts > 0, np.nansum(stacked, axis=0) / np.maximum(valid_counts, 1), np.nan)
    usable = int(np.sum([np.isfinite(c[np.triu_indices(k, 1)]).any() for c in per_step])) if per_step else 0
    mean_gram = np.mean(finite, axis=0) if finite else np.full((k, k), np.nan)
    gram_cosine = gram_cosines(mean_gram)
    mean_sq = np.diag(mean_gram)

    # rolling means of the per-step cosines: the most negative and most positive stretch of each pair
    t_count = len(per_step)
    w = max(5, math.ceil(t_count / 4)) if window is None else int(window)
    w = max(1, min(w, t_count)) if t_count else 1
    lowest = np.full((k, k), np.nan)
    highest = np.full((k, k), np.nan)
    worst_steps: dict[tuple[int, int], tuple[int, int]] = {}
    for i, j in pairs:
        series = stacked[:, i, j]
        for start in range(0, max(1, t_count - w + 1)):
            chunk = series[start : start + w]
            chunk = chunk[np.isfinite(chunk)]
            if chunk.size < max(1, w // 2):  # mostly undefined: no direction measured in this stretch
                continue
            mean = float(chunk.mean())
            if not mean >= lowest[i, j]:  # also when lowest is NaN
                lowest[i, j] = lowest[j, i] = mean
                worst_steps[(i, j)] = (step_list[start], step_list[min(start + w, t_count) - 1])
            if not mean <= highest[i, j]:
                highest[i, j] = highest[j, i] = mean
    pair_low = np.array([lowest[i, j] for i, j in pairs])
    pair_high = np.array([highest[i, j] for i, j in pairs])
    pair_cos = np.array([cosine[i, j] for i, j in pairs])
    defined = np.isfinite(pair_low)
    if defined.any():
        c = float(np.max(np.maximum(0.0, -pair_low[defined])))
        c_bar = float(np.max(np.maximum(0.0, pair_high[defined])))
        conflict_mean = float(np.mean(np.maximum(0.0, -pair_low[defined])))
        fraction = float(np.mean(pair_low[defined] < 0))
        fraction_threshold = float(np.mean(pair_low[defined] < -threshold))
        beta = 1.0 - 2.0 * c * (k - 1)
        gamma = 1.0 + c_bar * (k - 1)
    else:
        c = c_bar = conflict_mean = fraction = fraction_threshold = beta = gamma = math.nan
    mean_defined = np.isfinite(pair_cos)
    fraction_mean = float(np.mean(pair_cos[mean_defined] < 0)) if mean_defined.any() else math.nan
    step_values = np.array([c_[i, j] for c_ in per_step for i, j in pairs], dtype=np.float64)
    step_values = step_values[np.isfinite(step_values)]
    fraction_steps = float(np.mean(step_values < 0)) if step_values.size else math.nan

    negative = sorted((float(lowest[i, j]), i, j) for i, j in pairs if math.isfinite(lowest[i, j]) and lowest[i, j] < 0)
    conflicting: list[dict[str, Any]] = [
        {
            "domains": [names[i], names[j]],
            "cosine": v,
            "mean_cosine": _clean(float(cosine[i, j])),
            "steps": list(worst_steps[(i, j)]),
        }
        for v, i, j in negative
    ]
    if not defined.any():
        verdict = "unknown"
    elif c >= strong or beta <= 0:
        verdict = "strong"
    elif c < threshold:
        verdict = "low"
    else:
        verdict = "moderate"
    recommendation = _recommendation(
        verdict, names, conflicting, c, c_bar, beta, fraction, threshold, usable, min_measurements, cosine
    )
    return Diagnosis(
        domains=names,
        cosine=_matrix(cosine),
        conflict_fraction=_clean(fraction),
        conflict_fraction_threshold=_clean(fraction_threshold),
        threshold=float(threshold),
        c=_clean(c),
        c_bar=_clean(c_bar),
        conflict_mean=_clean(conflict_mean),
        beta_uniform=_clean(beta),
        gamma=_clean(gamma),
        verdict=verdict,
        recommendation=recommendation,
        conflicting_pairs=conflicting,
        num_measurements=len(matrices),
        usable_measurements=usable,
        steps=step_list,
        cosine_over_time=over_time,
        conflict_fraction_steps=_clean(fraction_steps),
        conflict_fraction_mean=_clean(fraction_mean),
        cosine_min_window=_matrix(np.where(np.eye(k, dtype=bool), np.nan, lowest)),
        window=w,
        cosine_of_mean_gram=_matrix(gram_cosine),
        grad_sq_norm=dict(zip(names, (_clean(v) for v in mean_sq))),
    )


def _pair_text(pairs: list[dict[str, Any]], limit: int = 5) -> str:
    shown = ", ".join(
        f"{p['domains'][0]} / {p['domains'][1]} (cosine {p['cosine']:+.2f} over steps {p['steps'][0]}-{p['steps'][1]})"
        for p in pairs[:limit]
    )
    more = f" and {len(pairs) - limit} more" if len(pairs) > limit else ""
    return shown + more


def _recommendation(
    verdict: str,
    names: list[str],
    conflicting: list[dict[str, Any]],
    c: float,
    c_bar: float,
    beta: float,
    fraction: float,
    threshold: float,
    usable: int,
    min_measurements: int,
    cosine: np.ndarray,
) -> str:
    k = len(names)
    if verdict == "unknown":
        return (
            "No usable measurement: every estimated squared gradient norm was <= 0 or missing (too few examples per "
            "domain per step?). Measure more steps or with a larger batch before deciding."
        )
    limit = 1.0 / (2.0 * (k - 1))
    lines = []
    if verdict == "low":
        lines.append(
            f"Low gradient conflict: every pair of domains kept a cosine >= {-c if c > 0 else 0.0:+.2f} throughout "
            f"(c = {c:.3f} < {threshold:g}); {fraction:.0%} of the pairs dipped below 0 at all. PiKE's low-conflict "
            "assumption holds here, so its "
            "one-step bound is meaningful and PiKE (or Fair-PiKE) is a sensible choice."
        )
        if c_bar > 0.5:
            lines.append(
                f"Gradients are strongly aligned (c_bar = {c_bar:.2f}): the domains teach much the same thing, so "
                "mixing weights may matter little; expect small differences from uniform."
            )
    elif verdict == "moderate":
        lines.append(
            f"Moderate gradient conflict: c = {c:.3f} (beta at the uniform mix = {beta:.2f}); conflicting pairs: "
            f"{_pair_text(conflicting) or 'none below 0'}. PiKE's assumption holds only loosely: its bound still "
            f"promises a decrease at the uniform mix (c < 1/(2(K-1)) = {limit:.3f}), but with less margin. Use PiKE "
            "with a weight floor (min_weight), compare it against uniform and a temperature mix, and watch the "
            "conflicting domains' validation loss."
        )
    else:
        lines.append(
            f"Strong gradient conflict: c = {c:.3f}"
            + (
                f" (beta at the uniform mix = {beta:.2f} <= 0: PiKE's one-step bound promises no decrease)"
                if beta <= 0
                else ""
            )
            + f". Conflicting pairs: {_pair_text(conflicting)}. Training on one of these domains works against the "
            "other, which PiKE's low-conflict assumption rules out: its weights then follow gradient size and noise "
            "while ignoring that the domains undo each other. Prefer a conflict-aware approach (a multi-objective "
            "method such as FAMO, or Fair-PiKE / temperature sampling to protect the worse domain), separate "
            "parameters for the conflicting domains, or check whether their data or labels disagree."
        )
    if usable < min_measurements:
        lines.append(f"Caution: only {usable} usable measurement(s); run more steps (--steps) before relying on this.")
    return " ".join(lines)
