"""The target set's histogram over the fine clusters: the static ``importance`` baseline's input."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradmix_kit.clustering.errors import ClusterError
from gradmix_kit.clustering.kmeans import assign_to_clusters

__all__ = ["target_histogram"]


def target_histogram(target_embeddings: Any, fine_centroids: Any) -> np.ndarray:
    """Counts of target texts per fine cluster (nearest centroid): the static ``importance`` baseline's input."""
    target = np.asarray(target_embeddings)
    if target.size == 0:
        raise ClusterError("the target set is empty: at least one target text is needed for a histogram")
    labels = assign_to_clusters(target, fine_centroids)
    return np.bincount(labels, minlength=np.asarray(fine_centroids).shape[0]).astype(np.int64)
