"""DGA: Dynamic Gradient Alignment (Fan, Grangier, Ablin, "Dynamic Gradient Alignment for Online Data Mixing",
arXiv 2410.02498), with its EMA variant and distribution reweighting for thousands of fine clusters.

DGA picks the training mixture alpha whose gradient points where the *target* loss decreases fastest. One SGD step
on sum_i alpha_i L_i changes the target loss by about -lr * sum_i alpha_i <grad L_i, grad L_target>, so the
gradient of that change with respect to alpha_i is the alignment a_i = <grad L_i, grad L_target>; DGA takes one
mirror-descent (exponentiated-gradient) step on the simplex with it (the paper's Algorithm 1):

    alpha_hat = alpha * exp(eta_alpha * a) / Z                       (DGA step)
    alpha    <- beta * alpha + (1 - beta) * alpha_hat                 (EMA variant; beta = 0 is plain DGA)

Distribution reweighting (the paper's answer to k = thousands of clusters): alpha = P w, where the m columns of the
k x m matrix P are fixed distributions over the k clusters. The same step acts on w, with one alignment per base
distribution (the gradient of the mixture p_j is sum_i P_ij grad L_i), so the update costs O(m) plus the O(nnz(P))
product alpha = P w. Only disjoint column supports are supported (each cluster in exactly one base distribution):
then a training batch sampled from alpha = P w, grouped by base distribution, gives an unbiased gradient of each p_j
(within group j clusters are drawn in proportion to column j), which is what ``probe_groups`` asks the probe for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gradmix.methods.base import MixingMethod, WeightError, normalize_log_weights, validate_weights
from gradmix.stats import DomainStats

__all__ = [
    "ALIGNMENT_NORMALIZATIONS",
    "DGA",
    "base_distributions_from_clusters",
    "floor_weights",
    "scale_alignments",
    "usable_alignments",
]

ALIGNMENT_NORMALIZATIONS = ("none", "max_abs", "rms")

# Column sums of a user-given P may be off by float rounding (e.g. written to JSON); anything further is a bug.
_COLUMN_SUM_TOLERANCE = 1e-6


# -- alignment handling shared with DoGE ---------------------------------------------------------------------------
def usable_alignments(stats: DomainStats) -> tuple[np.ndarray, np.ndarray]:
    """Return (alignments with 0 where unusable, mask of usable entries).

    NaN/Inf alignments and domains with zero probed examples are unusable: the probe could not measure them this
    interval, so their exponent is 0 (their weight moves only through the renormalisation).
    """
    alignment = np.asarray(stats.target_alignment, dtype=np.float64)
    usable = np.isfinite(alignment)
    if stats.examples is not None:
        usable &= ~(np.asarray(stats.examples) <= 0)
    return np.where(usable, alignment, 0.0), usable


def scale_alignments(alignment: np.ndarray, usable: np.ndarray, normalize: str) -> np.ndarray | None:
    """Divide the alignments by a per-update scale (``normalize``), or None if that scale is 0.

    Raw inner products scale with model size, batch size and preconditioning by orders of magnitude, so a step size
    for raw alignments does not transfer between setups. "max_abs" divides by max_i |a_i| (every exponent lies in
    [-eta, eta]); "rms" by the root mean square over usable domains; "none" keeps the raw values (the paper's form).
    """
    if normalize == "none":
        return alignment
    values = alignment[usable]
    if normalize == "max_abs":
        scale = float(np.max(np.abs(values))) if values.size else 0.0
    elif normalize == "rms":
        # Computed as max * rms(values / max) so huge alignments cannot overflow the squares.
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        scale = peak * float(np.sqrt(np.mean((values / peak) ** 2))) if peak > 0 else 0.0
    else:
        raise ValueError(f"unknown alignment normalization {normalize!r}; choose one of {ALIGNMENT_NORMALIZATIONS}")
    if not (scale > 0 and np.isfinite(scale)):
        return None
    return alignment / scale


def _check_normalize(normalize: str, method: str) -> str:
    if normalize not in ALIGNMENT_NORMALIZATIONS:
        raise ValueError(f"{method}: normalize must be one of {ALIGNMENT_NORMALIZATIONS}, got {normalize!r}")
    return normalize


def _check_positive(value: float, name: str, method: str) -> float:
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{method}: {name} must be a finite number > 0, got {value}")
    return value


# -- the minimum-weight floor --------------------------------------------------------------------------------------
def floor_weights(weights: np.ndarray, floor: float) -> np.ndarray:
    """Lift every weight to at least ``floor`` and rescale the others to keep the sum 1.

    Returns max(floor, c * w) with c chosen so the result sums to 1: entries already above the floor keep their
    ratios, and a vector that already satisfies the floor is returned unchanged (unlike mixing with uniform, which
    would flatten the weights at every update). Needs floor * len(w) <= 1.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if floor <= 0:
        return weights
    n = weights.shape[0]
    if floor * n > 1 + 1e-12:
        raise WeightError(f"a weight floor of {floor} is infeasible for {n} entries (floor * n must be <= 1)")
    # Entries end up floored in increasing order of w: try "the j smallest are floored" for j = 0, 1, ...
    order = np.argsort(weights, kind="stable")
    sorted_w = weights[order]
    suffix_sums = np.cumsum(sorted_w[::-1])[::-1]  # suffix_sums[j] = sum of sorted_w[j:]
    for j in range(n):
        free_mass = 1.0 - j * floor
        if suffix_sums[j] <= 0:
            break
        scale = free_mass / suffix_sums[j]
        if sorted_w[j] * scale >= floor:
            return np.maximum(floor, weights * scale)
    return np.full(n, 1.0 / n)


# -- base distributions (distribution reweighting) -----------------------------------------------------------------
@dataclass(frozen=True)
class _DisjointBases:
    """A k x m matrix P with disjoint column supports, stored as (base of each cluster, its share in that base)."""

    base_of_cluster: np.ndarray  # (k,) int64: the one column whose support holds cluster i
    share_in_base: np.ndarray  # (k,) float64: P[i, base_of_cluster[i]]
    num_base: int

    def mix(self, base_weights: np.ndarray) -> np.ndarray:
        """alpha = P w in O(k) (one gather and one product per cluster)."""
        return self.share_in_base * base_weights[self.base_of_cluster]


def _matrix_entries(matrix: Any) -> tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray]:
    """(shape, rows, cols, values) of the non-zero entries of a dense array or a scipy.sparse matrix/array."""
    if hasattr(matrix, "tocoo"):  # scipy.sparse, duck-typed so scipy stays optional
        coo = matrix.tocoo()
        coo.sum_duplicates()
        shape = tuple(int(s) for s in coo.shape)
        rows, cols = np.asarray(coo.row, dtype=np.int64), np.asarray(coo.col, dtype=np.int64)
        values = np.asarray(coo.data, dtype=np.float64)
    else:
        dense = np.asarray(matrix, dtype=np.float64)
        shape = tuple(int(s) for s in dense.shape)
        if dense.ndim != 2:
            raise ValueError(
                f"base_distributions must be a 2-D (clusters x base distributions) matrix, got shape {shape}"
            )
        rows, cols = np.nonzero(dense)  # NaN counts as non-zero, so it reaches the finiteness check below
        values = dense[rows, cols]
        rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    if len(shape) != 2:
        raise ValueError(f"base_distributions must be a 2-D (clusters x base distributions) matrix, got shape {shape}")
    return shape, rows, cols, values


def _parse_base_distributions(matrix: Any, num_clusters: int) -> _DisjointBases:
    """Validate P (k x m, columns = distributions over the k clusters) and store it in O(k) form."""
    shape, rows, cols, values = _matrix_entries(matrix)
    if shape[0] != num_clusters:
        raise ValueError(
            f"base_distributions has shape {shape} but there are {num_clusters} clusters: rows must be the clusters "
            "(the sampled domains) and columns the base distributions"
        )
    num_base = shape[1]
    if num_base < 1:
        raise ValueError("base_distributions has no columns: at least one base distribution is needed")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"base_distributions[{rows[i]}, {cols[i]}] is {values[i]}; entries must be finite")
    negative = np.flatnonzero(values < 0)
    if negative.size:
        i = int(negative[0])
        raise ValueError(
            f"base_distributions[{rows[i]}, {cols[i]}] = {values[i]} is negative; columns must be "
            "probability distributions over the clusters"
        )
    keep = values > 0
    rows, cols, values = rows[keep], cols[keep], values[keep]

    column_sums = np.bincount(cols, weights=values, minlength=num_base)
    empty = np.flatnonzero(column_sums <= 0)
    if empty.size:
        raise ValueError(
            f"base distribution (column) {int(empty[0])} is all zero"
            f"{f' ({empty.size} such columns)' if empty.size > 1 else ''}; every column must sum to 1"
        )
    off = np.flatnonzero(np.abs(column_sums - 1.0) > _COLUMN_SUM_TOLERANCE)
    if off.size:
        j = int(off[0])
        raise ValueError(
            f"base distribution (column) {j} sums to {column_sums[j]!r}, not 1; normalise each column "
            "(base_distributions_from_clusters builds a valid P from cluster sizes)"
        )

    covering = np.bincount(rows, minlength=num_clusters)
    uncovered = np.flatnonzero(covering == 0)
    if uncovered.size:
        raise ValueError(
            f"cluster {int(uncovered[0])} has zero probability in every base distribution"
            f"{f' ({uncovered.size} such clusters)' if uncovered.size > 1 else ''}: it could never be sampled; "
            "give every cluster a positive entry in some column"
        )
    shared = np.flatnonzero(covering > 1)
    if shared.size:
        i = int(shared[0])
        raise ValueError(
            f"cluster {i} belongs to base distributions {sorted(cols[rows == i].tolist())}: only disjoint column "
            "supports (each cluster in exactly one base distribution, e.g. fine clusters inside coarse clusters) are "
            "supported for now, because the probe measures one gradient per group of clusters"
        )
    base_of_cluster = np.empty(num_clusters, dtype=np.int64)
    share_in_base = np.empty(num_clusters, dtype=np.float64)
    base_of_cluster[rows] = cols
    share_in_base[rows] = values / column_sums[cols]  # exact renormalisation of sums within the tolerance
    return _DisjointBases(base_of_cluster, share_in_base, num_base)


def base_distributions_from_clusters(fine_to_coarse: Any, fine_sizes: Any, num_base: int | None = None) -> Any:
    """Build P for distribution reweighting from a two-level clustering, as a scipy.sparse CSC array (k x m).

    Column j is the size-proportional distribution over the fine clusters of coarse cluster j:
    P[i, j] = n_i / sum_{i' in j} n_{i'} if fine cluster i lies in coarse cluster j, else 0. So w_j is the probability
    of sampling coarse cluster j and, inside it, examples are drawn uniformly (no fine cluster is over-repeated).

    Args:
        fine_to_coarse: length k, the coarse cluster (0..m-1) of each fine cluster.
        fine_sizes: length k, examples (or tokens) per fine cluster; all > 0.
        num_base: m; defaults to max(fine_to_coarse) + 1. Every coarse cluster must hold a fine cluster.
    """
    try:
        from scipy import sparse
    except ModuleNotFoundError as exc:  # pragma: no cover - scipy ships with scikit-learn
        raise ModuleNotFoundError("base_distributions_from_clusters needs scipy (pip install scipy)") from exc
    raw_groups = np.asarray(fine_to_coarse).reshape(-1)
    sizes = np.asarray(fine_sizes, dtype=np.float64).reshape(-1)
    if raw_groups.shape[0] == 0:
        raise ValueError("fine_to_coarse is empty")
    if raw_groups.shape != sizes.shape:
        raise ValueError(
            f"fine_to_coarse has {raw_groups.shape[0]} entries but fine_sizes has {sizes.shape[0]}; "
            "both need one entry per fine cluster"
        )
    if not np.issubdtype(raw_groups.dtype, np.integer):
        as_float = raw_groups.astype(np.float64)
        if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
            bad = int(np.flatnonzero(~np.isfinite(as_float) | (as_float != np.round(as_float)))[0])
            raise ValueError(f"fine_to_coarse[{bad}] = {raw_groups[bad]!r} is not an integer cluster id")
    groups = raw_groups.astype(np.int64)
    negative = np.flatnonzero(groups < 0)
    if negative.size:
        raise ValueError(
            f"fine cluster {int(negative[0])} maps to coarse cluster {groups[negative[0]]}; ids must be >= 0"
        )
    bad_size = np.flatnonzero(~np.isfinite(sizes) | (sizes <= 0))
    if bad_size.size:
        i = int(bad_size[0])
        raise ValueError(f"fine cluster {i} has size {sizes[i]}; sizes must be finite and > 0 (drop empty clusters)")
    m = int(groups.max()) + 1 if num_base is None else int(num_base)
    if groups.max() >= m:
        raise ValueError(
            f"fine cluster {int(np.argmax(groups))} maps to coarse cluster {int(groups.max())} but num_base is {m}"
        )
    totals = np.bincount(groups, weights=sizes, minlength=m)
    empty = np.flatnonzero(totals <= 0)
    if empty.size:
        raise ValueError(
            f"coarse cluster {int(empty[0])} holds no fine cluster"
            f"{f' ({empty.size} such)' if empty.size > 1 else ''}: its base distribution would be empty"
        )
    k = groups.shape[0]
    return sparse.csc_array((sizes / totals[groups], (np.arange(k), groups)), shape=(k, m))


# -- the method ----------------------------------------------------------------------------------------------------
class DGA(MixingMethod):
    """Dynamic Gradient Alignment with optional EMA, weight floor and distribution reweighting.

    Every update (paper's Algorithm 1, step in log space, then its EMA variant):
        w_hat = w * exp(step_size * a / s) / Z,   w <- ema * w + (1 - ema) * w_hat,   then the ``min_weight`` floor,
    where a = stats.target_alignment (one entry per domain, or per base distribution with ``base_distributions``)
    and s the ``normalize`` scale. Without ``base_distributions`` the sampling weights are alpha = w; with them,
    alpha = P w. A NaN/Inf alignment (domain absent from the probed batch) gets exponent 0 for this update; if no
    alignment is usable, or all are exactly 0 (zero gradient), the update is skipped (``last_skip_reason``).

    Args:
        num_domains: k, the sampled domains (clusters).
        step_size: eta_alpha. Default 0.2: with "max_abs" no weight moves by more than e^{+-0.2} (~22%) per update,
            so tens of probes, not one noisy one, decide the mixture.
        ema: beta in [0, 1). Default 0.5 (the paper's EMA variant, which it finds steadier than plain DGA when data
            is limited; 0.5 halves each step while still following a drift within a few updates). 0 = plain DGA.
        min_weight: floor on every entry of w (0 = none); floor * m must be <= 1.
        normalize: "max_abs" (default: a fixed bound on every step whatever the raw scale, i.e. a trust region),
            "rms" or "none" (raw alignments, as in the paper; then step_size must match their scale).
        base_distributions: optional k x m matrix P (numpy or scipy.sparse); columns = distributions over the k
            clusters with disjoint supports. See ``base_distributions_from_clusters``.
        initial_weights: initial w (length m with P, else k); default uniform.
    """

    name = "dga"
    required_stats = frozenset({"target_alignment"})
    needs_target = True

    def __init__(
        self,
        num_domains: int,
        step_size: float = 0.2,
        ema: float = 0.5,
        min_weight: float = 0.0,
        normalize: str = "max_abs",
        base_distributions: Any = None,
        initial_weights: Any = None,
    ) -> None:
        if not isinstance(num_domains, (int, np.integer)) or num_domains < 1:
            raise ValueError(f"num_domains must be a positive integer, got {num_domains!r}")
        self.step_size = _check_positive(step_size, "step_size", self.name)
        self.ema = float(ema)
        if not (0.0 <= self.ema < 1.0):
            raise ValueError(f"dga: ema (beta) must be in [0, 1), got {ema}")
        self.normalize = _check_normalize(normalize, self.name)
        self._bases = (
            None if base_distributions is None else _parse_base_distributions(base_distributions, int(num_domains))
        )
        m = int(num_domains) if self._bases is None else self._bases.num_base
        self.min_weight = float(min_weight)
        if not (np.isfinite(self.min_weight) and self.min_weight >= 0.0):
            raise ValueError(f"dga: min_weight must be a finite number >= 0, got {min_weight}")
        if self.min_weight * m > 1 + 1e-12:
            raise ValueError(f"dga: min_weight={min_weight} is infeasible for {m} weights (min_weight * {m} > 1)")
        what = "initial_weights (one per base distribution)" if self._bases is not None else "initial_weights"
        w0 = np.full(m, 1.0 / m) if initial_weights is None else validate_weights(initial_weights, m, what=what)
        w0 = floor_weights(w0, self.min_weight)
        with np.errstate(divide="ignore"):
            self._log_base, w0 = normalize_log_weights(np.log(w0))
        super().__init__(num_domains, initial_weights=self._alpha(w0))
        # Diagnostics of the last applied update (not state): {term: one value per weight}, None after a skip.
        self.last_terms: dict[str, np.ndarray] | None = None

    # -- views -----------------------------------------------------------------------------------------------------
    @property
    def num_base(self) -> int:
        """m: the number of weights DGA optimises (k without base distributions)."""
        return self.num_domains if self._bases is None else self._bases.num_base

    @property
    def base_weights(self) -> np.ndarray:
        """w, the optimised weights (equal to ``weights`` without base distributions)."""
        return normalize_log_weights(self._log_base)[1]

    def probe_groups(self) -> np.ndarray | None:
        """With base distributions: the base distribution of each cluster (one probed gradient per base)."""
        return None if self._bases is None else self._bases.base_of_cluster.copy()

    def _alpha(self, base_weights: np.ndarray) -> np.ndarray:
        return base_weights if self._bases is None else self._bases.mix(base_weights)

    # -- the update ------------------------------------------------------------------------------------------------
    def _update(self, stats: DomainStats) -> np.ndarray | None:
        self.last_terms = None
        alignment, usable = usable_alignments(stats)
        if not usable.any():
            self.last_skip_reason = "dga: no usable target alignment (all NaN/Inf or no probed examples)"
            return None
        if not np.any(alignment[usable] != 0):
            self.last_skip_reason = "dga: every target alignment is 0 (zero gradient): nothing to align with"
            return None
        scaled = scale_alignments(alignment, usable, self.normalize)
        with np.errstate(over="ignore", invalid="ignore"):
            exponent = None if scaled is None else self.step_size * scaled
        if exponent is None or not np.all(np.isfinite(exponent)):
            self.last_skip_reason = (
                f"dga: step_size * alignment is not finite (max |a| = "
                f"{np.max(np.abs(alignment[usable])):.3g}); lower step_size or normalize"
            )
            return None
        log_hat, _ = normalize_log_weights(self._log_base + exponent)
        if self.ema > 0:
            # beta * w + (1 - beta) * w_hat, kept in log space so long-unfavoured entries never underflow to 0.
            log_new = np.logaddexp(np.log(self.ema) + self._log_base, np.log1p(-self.ema) + log_hat)
        else:
            log_new = log_hat
        log_new, weights = normalize_log_weights(log_new)
        if self.min_weight > 0:
            weights = floor_weights(weights, self.min_weight)
            log_new, weights = normalize_log_weights(np.log(weights))
        self._log_base = log_new
        # per weight (domain, or base distribution): raw alignment <g_i, g_target>, scaled alignment, log step
        assert scaled is not None  # exponent is finite, so scaled was not None
        self.last_terms = {
            "alignment": np.where(usable, alignment, np.nan),
            "scaled_alignment": np.where(usable, scaled, np.nan),
            "log_step": np.asarray(exponent, dtype=np.float64).copy(),
        }
        return self._alpha(weights)

    # -- state -----------------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {
            "num_base": self.num_base,
            # -inf (an entry switched off by a zero initial weight) is stored as None to stay JSON-friendly.
            "base_log_weights": [None if not np.isfinite(v) else float(v) for v in self._log_base],
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "base_log_weights" not in state:
            raise ValueError("dga state has no 'base_log_weights' (not a DGA checkpoint?)")
        if int(state.get("num_base", -1)) != self.num_base:
            raise ValueError(
                f"dga state optimises {state.get('num_base')} base weights, this DGA has {self.num_base} "
                "(different base_distributions?)"
            )
        raw = state["base_log_weights"]
        if len(raw) != self.num_base:
            raise ValueError(f"dga state has {len(raw)} base log-weights, expected {self.num_base}")
        log_base = np.array([-np.inf if v is None else float(v) for v in raw], dtype=np.float64)
        if np.isnan(log_base).any() or np.isposinf(log_base).any():
            bad = int(np.flatnonzero(~(log_base < np.inf))[0])
            raise ValueError(f"dga state has a NaN/+inf base log-weight at index {bad}")
        _, base_weights = normalize_log_weights(log_base)  # only to check consistency: the state is kept bit-exact
        alpha = self._alpha(base_weights)
        alpha = alpha / alpha.sum()
        if not np.allclose(alpha, self._weights, rtol=0, atol=1e-9):
            i = int(np.argmax(np.abs(alpha - self._weights)))
            raise ValueError(
                f"dga state is inconsistent: its base weights give {alpha[i]:.6g} for domain {i} but its "
                f"weights say {self._weights[i]:.6g} (checkpoint made with other base_distributions?)"
            )
        self._log_base = log_base  # as saved (already normalised), so a round trip changes nothing
