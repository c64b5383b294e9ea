"""Granularity report: the same embeddings clustered at several k, described side by side to help choose k."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from gradmix_kit.clustering.errors import ClusterError
from gradmix_kit.clustering.kmeans import Clustering, check_embeddings, check_k, cluster_embeddings
from gradmix_kit.progress import progress_bar

__all__ = ["describe_clustering", "format_report", "granularity_report"]


def describe_clustering(
    emb: Any, clustering: Clustering, *, seed: int = 0, silhouette_sample: int = 2000
) -> dict[str, Any]:
    """Sizes (min/median/max, empty, singletons), inertia and silhouette on a seeded sample of one clustering.

    Silhouette is None where undefined (fewer than 2 non-empty clusters in the sample, or k == n).
    """
    points = check_embeddings(emb)
    sizes = clustering.sizes
    nonempty = sizes[sizes > 0]
    silhouette = None
    n = points.shape[0]
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(int(silhouette_sample), n), replace=False))
    sample_labels = clustering.labels[sample]
    if 2 <= np.unique(sample_labels).size <= sample.size - 1:
        from sklearn.metrics import silhouette_score

        silhouette = float(silhouette_score(points[sample], sample_labels, metric="euclidean"))
    return {
        "k": clustering.k,
        "min_size": int(sizes.min()),
        "median_size": float(np.median(sizes)),
        "max_size": int(sizes.max()),
        "empty": int(np.sum(sizes == 0)),
        "singletons": int(np.sum(sizes == 1)),
        "nonempty": int(nonempty.size),
        "inertia": float(clustering.inertia),
        "silhouette": silhouette,
    }


def granularity_report(
    emb: Any,
    ks: Iterable[int],
    *,
    seed: int = 0,
    method: str = "kmeans",
    silhouette_sample: int = 2000,
    n_init: int = 3,
    precomputed: dict[int, Clustering] | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Cluster at each k in ``ks`` and describe it (see ``describe_clustering``), to help choose k.

    Inertia always falls as k grows, so compare its elbow and the silhouette (higher is better), and watch the
    empty/singleton counts: DGA and the importance baseline over-repeat tiny clusters. ``precomputed`` reuses
    clusterings already made (e.g. the fine level itself). ``show_progress``: a bar over the k values, on a terminal
    only (``gradmix_kit.progress``).
    """
    points = check_embeddings(emb)
    ks = sorted({check_k(k, points.shape[0], "report k") for k in ks})
    if not ks:
        raise ClusterError("granularity_report needs at least one k")
    rows = []
    bar = progress_bar(len(ks), "granularity report", progress=show_progress, unit="k", leave=True)
    try:
        for k in ks:
            bar.set_postfix_str(f"k={k}")
            clustering = (precomputed or {}).get(k) or cluster_embeddings(
                points, k, seed=seed, method=method, n_init=n_init
            )
            rows.append(describe_clustering(points, clustering, seed=seed, silhouette_sample=silhouette_sample))
            bar.update(1)
    finally:
        bar.close()
    return {
        "num_texts": int(points.shape[0]),
        "seed": int(seed),
        "method": method,
        "silhouette_sample": int(min(silhouette_sample, points.shape[0])),
        "rows": rows,
    }


def format_report(report: dict[str, Any]) -> str:
    """The granularity report as a fixed-width table."""
    header = (
        f"{'k':>7} {'min':>7} {'median':>8} {'max':>7} {'empty':>6} {'single':>7} {'inertia':>12} {'silhouette':>10}"
    )
    lines = [
        f"granularity report: {report['num_texts']} texts, {report['method']}, seed {report['seed']}, "
        f"silhouette on {report['silhouette_sample']} texts",
        header,
    ]
    for row in report["rows"]:
        sil = "n/a" if row["silhouette"] is None else f"{row['silhouette']:.4f}"
        lines.append(
            f"{row['k']:>7} {row['min_size']:>7} {row['median_size']:>8.1f} {row['max_size']:>7} "
            f"{row['empty']:>6} {row['singletons']:>7} {row['inertia']:>12.4g} {sil:>10}"
        )
    return "\n".join(lines)
