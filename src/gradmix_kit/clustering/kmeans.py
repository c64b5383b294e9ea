"""k-means at a fine and a coarse level (``cluster_corpus``), and nearest-centroid assignment.

DGA (Fan, Grangier, Ablin, arXiv 2410.02498) mixes a generic corpus that has no natural domains, so the domains are
made: each document is embedded (``gradmix_kit.clustering.embed``), the embeddings are clustered with k-means into
k fine clusters, and the fine clusters are grouped into coarse ones (the base distributions of DGA's distribution
reweighting).

Empty clusters (k-means can leave some, e.g. with duplicate documents or mini-batch k-means) are never kept as
empty domains: ``cluster_corpus`` drops them, renumbers the rest contiguously and records a warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradmix_kit.clustering.embed import EmbedFn, embed_texts, load_embedder, model_identity
from gradmix_kit.clustering.errors import INSTALL_HINT as _INSTALL_HINT
from gradmix_kit.clustering.errors import ClusterError, ModelUnavailableError
from gradmix_kit.progress import progress_bar

__all__ = [
    "COARSE_METHODS",
    "KMEANS_METHODS",
    "ClusterResult",
    "Clustering",
    "assign_to_clusters",
    "check_embeddings",
    "check_k",
    "cluster_corpus",
    "cluster_embeddings",
]

KMEANS_METHODS = ("kmeans", "minibatch")
COARSE_METHODS = ("centroids", "nearest")


@dataclass
class Clustering:
    """One k-means solution. ``centroids`` are the exact means of the final clusters (rows of empty clusters are
    NaN), ``inertia`` the sum of squared distances to them."""

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float
    sizes: np.ndarray

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def empty_clusters(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.sizes == 0)]


def check_embeddings(emb: Any, what: str = "embeddings") -> np.ndarray:
    arr = np.asarray(emb, dtype=np.float64)
    if arr.ndim != 2:
        raise ClusterError(f"{what} must be a 2-D array (n, dim), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ClusterError(f"{what} is empty: nothing to cluster")
    bad = np.flatnonzero(~np.all(np.isfinite(arr), axis=1))
    if bad.size:
        raise ClusterError(f"{what} row {int(bad[0])} has NaN/Inf values")
    return arr


def check_k(k: Any, num_points: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ClusterError(f"{what} must be a positive integer, got {k!r}")
    if k > num_points:
        raise ClusterError(f"{what}={k} is larger than the number of items to cluster ({num_points})")
    return int(k)


def _means(
    points: np.ndarray, labels: np.ndarray, k: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(weighted) cluster means and total weight per cluster; empty clusters get NaN rows."""
    w = np.ones(points.shape[0]) if weights is None else weights
    totals = np.bincount(labels, weights=w, minlength=k)
    sums = np.zeros((k, points.shape[1]))
    np.add.at(sums, labels, points * w[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / totals[:, None]
    means[totals == 0] = np.nan
    return means, totals


def cluster_embeddings(
    emb: Any,
    k: int,
    seed: int = 0,
    method: str = "kmeans",
    *,
    n_init: int = 3,
    sample_weight: Any = None,
    minibatch_size: int = 1024,
    max_iter: int = 300,
) -> Clustering:
    """k-means (``"kmeans"``: Lloyd, or ``"minibatch"``: MiniBatchKMeans for large n) with seeded k-means++ init.

    ``n_init=3`` seeded restarts, keeping the lowest inertia: with one start (scikit-learn's default for k-means++)
    MiniLM embeddings of 50 sentences on 3 topics landed in visibly worse local optima for some seeds (up to 10
    of 50 misplaced), and restarts cost little next to embedding. Empty clusters are kept (size 0, NaN
    centroid) and reported via ``Clustering.empty_clusters``; ``cluster_corpus`` decides what to do with them.
    """
    points = check_embeddings(emb)
    k = check_k(k, points.shape[0], "k")
    if method not in KMEANS_METHODS:
        raise ClusterError(f"unknown clustering method {method!r}; use one of {KMEANS_METHODS}")
    weights = None
    if sample_weight is not None:
        weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if weights.shape[0] != points.shape[0] or not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ClusterError("sample_weight must be finite, >= 0 and have one entry per point")
    try:
        from sklearn.cluster import KMeans, MiniBatchKMeans
        from sklearn.exceptions import ConvergenceWarning
    except ImportError as exc:
        raise ModelUnavailableError(f"clustering needs scikit-learn ({exc}): {_INSTALL_HINT}") from exc
    if method == "kmeans":
        estimator = KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=seed)
    else:
        estimator = MiniBatchKMeans(
            n_clusters=k,
            init="k-means++",
            n_init=n_init,
            max_iter=max_iter,
            batch_size=minibatch_size,
            random_state=seed,
        )
    with warnings.catch_warnings():
        # "fewer distinct clusters than k" (duplicate points) surfaces below as empty clusters, with a clear message.
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(points, sample_weight=weights)
    # Predict with the final centres, then recompute exact means: scikit-learn's labels come from the last
    # assignment step, its centres from the one before, and coarse clustering relies on centroid == member mean.
    labels = estimator.predict(points).astype(np.int64)
    centroids, _sizes = _means(points, labels, k, weights)
    counts = np.bincount(labels, minlength=k)
    diffs = points - np.nan_to_num(centroids)[labels]
    w = np.ones(points.shape[0]) if weights is None else weights
    inertia = float(np.sum(w * np.einsum("ij,ij->i", diffs, diffs)))
    return Clustering(labels=labels, centroids=centroids, inertia=inertia, sizes=counts.astype(np.int64))


@dataclass
class ClusterResult:
    """Fine and coarse clusters of a corpus.

    ``fine_labels[i]`` is the fine cluster of text i; ``fine_to_coarse[c]`` the coarse cluster of fine cluster c.
    Both levels are contiguous (0..k-1) and have no empty cluster; ``k_*_requested`` and ``warnings`` record what
    was dropped. ``embeddings`` is kept for follow-up work (report, target assignment) and is not written out.
    """

    fine_labels: np.ndarray
    fine_centroids: np.ndarray
    fine_to_coarse: np.ndarray
    coarse_centroids: np.ndarray
    fine_inertia: float
    k_fine_requested: int
    k_coarse_requested: int
    seed: int = 0
    method: str = "kmeans"
    coarse_method: str = "centroids"
    model: str | None = None
    report: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    embeddings: np.ndarray | None = field(default=None, repr=False)

    @property
    def k_fine(self) -> int:
        return int(self.fine_centroids.shape[0])

    @property
    def k_coarse(self) -> int:
        return int(self.coarse_centroids.shape[0])

    @property
    def fine_sizes(self) -> np.ndarray:
        return np.bincount(self.fine_labels, minlength=self.k_fine)

    @property
    def coarse_labels(self) -> np.ndarray:
        """Coarse cluster of each text."""
        return self.fine_to_coarse[self.fine_labels]

    @property
    def coarse_sizes(self) -> np.ndarray:
        return np.bincount(self.coarse_labels, minlength=self.k_coarse)


def _drop_empty(clustering: Clustering, level: str, warn: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Renumber non-empty clusters contiguously; record the dropped ones. Returns (labels, centroids)."""
    keep = np.flatnonzero(clustering.sizes > 0)
    if keep.size == clustering.k:
        return clustering.labels, clustering.centroids
    warn.append(
        f"{level}: {clustering.k - keep.size} of {clustering.k} clusters came out empty (fewer distinct points "
        f"than k, e.g. duplicate texts, or centres mini-batch k-means left unused) and were dropped; "
        f"{keep.size} {level} clusters remain "
        f"(dropped original ids {clustering.empty_clusters[:20]})"
    )
    new_id = np.full(clustering.k, -1, dtype=np.int64)
    new_id[keep] = np.arange(keep.size)
    return new_id[clustering.labels], clustering.centroids[keep]


def cluster_corpus(
    texts: Sequence[str] | None,
    k_fine: int,
    k_coarse: int,
    *,
    embeddings: Any = None,
    model: str | os.PathLike[str] | EmbedFn | None = None,
    seed: int = 0,
    method: str = "kmeans",
    coarse_method: str = "centroids",
    batch_size: int = 64,
    cache_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
    n_init: int = 3,
) -> ClusterResult:
    """Embed ``texts`` (or take ``embeddings``) and cluster them into k_fine fine and k_coarse coarse clusters.

    Coarse level (``coarse_method``):
      * ``"centroids"`` (default): k-means on the fine centroids weighted by fine-cluster size. For exact-mean
        centroids this minimises the k-means objective over all texts among groupings that keep fine clusters whole,
        at the cost of k_fine points instead of n.
      * ``"nearest"``: a separate k-means with k_coarse on all texts; each fine cluster joins the coarse centroid
        nearest to its own centroid.
    The coarse centroids returned are the size-weighted means of their fine centroids (= the mean of their texts).
    ``show_progress``: bars for the embedding and the two k-means fits, on a terminal only (``gradmix_kit.progress``).
    """
    if embeddings is None:
        if texts is None:
            raise ClusterError("cluster_corpus needs texts or embeddings")
        if len(texts) == 0:
            raise ClusterError("the corpus is empty: no texts to cluster")
        k_fine_checked = check_k(k_fine, len(texts), "k_fine")  # before the expensive embedding
        embedder = load_embedder(model)
        model_name = model_identity(embedder, None)[1]
        emb = embed_texts(
            texts, model=embedder, batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress
        )
    else:
        model_name = None
        emb = embeddings
        k_fine_checked = k_fine
    points = check_embeddings(emb)
    if texts is not None and len(texts) != points.shape[0]:
        raise ClusterError(f"{len(texts)} texts but {points.shape[0]} embeddings")
    k_fine = check_k(k_fine_checked, points.shape[0], "k_fine")
    if coarse_method not in COARSE_METHODS:
        raise ClusterError(f"unknown coarse_method {coarse_method!r}; use one of {COARSE_METHODS}")
    check_k(k_coarse, k_fine, "k_coarse (at most k_fine)")

    warn: list[str] = []
    # k-means reports no progress of its own: the bar counts the two fits and names the one running
    bar = progress_bar(2, "k-means", progress=show_progress, unit="fit", leave=True)
    try:
        bar.set_postfix_str(f"fine: k={k_fine} on {points.shape[0]} texts, {n_init} restart(s)")
        fine = cluster_embeddings(points, k_fine, seed=seed, method=method, n_init=n_init)
        bar.update(1)
        fine_labels, fine_centroids = _drop_empty(fine, "fine", warn)
        fine_sizes = np.bincount(fine_labels, minlength=fine_centroids.shape[0]).astype(np.float64)
        if k_coarse > fine_centroids.shape[0]:
            raise ClusterError(
                f"k_coarse={k_coarse} is larger than the {fine_centroids.shape[0]} non-empty fine clusters "
                f"(k_fine={k_fine} requested); lower --coarse-k"
            )

        bar.set_postfix_str(f"coarse: k={k_coarse} ({coarse_method})")
        if coarse_method == "centroids":
            coarse = cluster_embeddings(
                fine_centroids, k_coarse, seed=seed, method="kmeans", n_init=n_init, sample_weight=fine_sizes
            )
            fine_to_coarse, _ = _drop_empty(coarse, "coarse", warn)
        else:
            coarse_all = cluster_embeddings(points, k_coarse, seed=seed, method=method, n_init=n_init)
            valid = coarse_all.centroids[coarse_all.sizes > 0]
            fine_to_coarse = assign_to_clusters(fine_centroids, valid)
            used = np.unique(fine_to_coarse)
            if used.size < valid.shape[0]:
                warn.append(
                    f"coarse: {valid.shape[0] - used.size} of {k_coarse} coarse clusters got no fine cluster "
                    f"and were dropped; {used.size} remain"
                )
            fine_to_coarse = np.searchsorted(used, fine_to_coarse)
        bar.update(1)
    finally:
        bar.close()
    k_coarse_kept = int(fine_to_coarse.max()) + 1
    coarse_centroids, _ = _means(fine_centroids, fine_to_coarse, k_coarse_kept, fine_sizes)
    fine_inertia = float(np.sum((points - fine_centroids[fine_labels]) ** 2))
    return ClusterResult(
        fine_labels=fine_labels,
        fine_centroids=fine_centroids,
        fine_to_coarse=fine_to_coarse.astype(np.int64),
        coarse_centroids=coarse_centroids,
        fine_inertia=fine_inertia,
        k_fine_requested=k_fine,
        k_coarse_requested=int(k_coarse),
        seed=int(seed),
        method=method,
        coarse_method=coarse_method,
        model=model_name,
        warnings=warn,
        embeddings=points.astype(np.float32),
    )


def assign_to_clusters(emb: Any, centroids: Any) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) for each row of ``emb``."""
    points = check_embeddings(emb)
    centres = np.asarray(centroids, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[0] == 0 or not np.all(np.isfinite(centres)):
        raise ClusterError(f"centroids must be a non-empty finite 2-D array, got shape {centres.shape}")
    if centres.shape[1] != points.shape[1]:
        raise ClusterError(
            f"embedding dimension {points.shape[1]} does not match the centroids' {centres.shape[1]} "
            "(embed the target with the same model as the corpus)"
        )
    labels = np.empty(points.shape[0], dtype=np.int64)
    centre_sq = np.einsum("ij,ij->i", centres, centres)
    chunk = max(1, min(4096, 2**24 // centres.shape[0]))  # at most ~16M distances (128 MB) at a time, any k
    for start in range(0, points.shape[0], chunk):
        block = points[start : start + chunk]
        dist = centre_sq[None, :] - 2.0 * block @ centres.T  # + |x|^2, constant per row
        labels[start : start + chunk] = np.argmin(dist, axis=1)
    return labels
