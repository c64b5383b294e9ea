"""``gradmix cluster``: read a corpus, embed it, cluster it at two levels, report granularity, write the domains."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gradmix_kit.clustering.embed import DEFAULT_MODEL_PACKAGE, embed_texts, load_embedder, model_identity
from gradmix_kit.clustering.errors import ClusterError, ModelUnavailableError
from gradmix_kit.clustering.files import _prepare_folder, read_texts, write_clusters
from gradmix_kit.clustering.granularity import format_report, granularity_report
from gradmix_kit.clustering.kmeans import COARSE_METHODS, KMEANS_METHODS, Clustering, check_k, cluster_corpus
from gradmix_kit.clustering.targets import target_histogram

__all__ = ["add_cluster_parser", "default_cache_dir", "run_cluster"]


def _int_list(value: str) -> list[int]:
    try:
        ks = [int(part) for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,16,32, got {value!r}") from exc
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return ks


def default_cache_dir() -> Path:
    """The embedding cache: ``<data dir>/embeddings`` (data dir: ``$GRADMIX_DATA``, default ``~/.cache/gradmix``)."""
    from gradmix_kit.corpora.store import default_data_dir

    return default_data_dir() / "embeddings"


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
    parser.add_argument(
        "--report-k",
        type=_int_list,
        metavar="K,K,...",
        help="also cluster at these k and print a granularity report (sizes, inertia, silhouette)",
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="local sentence-transformers model folder (default: MiniLM-L6 from the "
        f"{DEFAULT_MODEL_PACKAGE} package), or 'hashing[:DIM]' for a hashed bag of words",
    )
    parser.add_argument("--cache-dir", metavar="DIR", help=f"embedding cache (default {default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    parser.add_argument("--seed", type=int, default=0, help="k-means and silhouette sample seed (default 0)")
    parser.add_argument(
        "--method",
        choices=KMEANS_METHODS,
        default="kmeans",
        help="kmeans (Lloyd) or minibatch (MiniBatchKMeans, for large corpora)",
    )
    parser.add_argument(
        "--coarse-method",
        choices=COARSE_METHODS,
        default="centroids",
        help="centroids: size-weighted k-means on fine centroids; nearest: k-means on all texts, "
        "fine clusters join the nearest coarse centroid",
    )
    parser.add_argument("--n-init", type=int, default=3, help="k-means restarts, best kept (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="embedding batch size (default 64)")
    parser.add_argument(
        "--silhouette-sample", type=int, default=2000, help="texts sampled for the silhouette score (default 2000)"
    )
    parser.add_argument("--write-coarse", action="store_true", help="also write OUT/coarse/<gNNNN>.jsonl")
    parser.add_argument("--overwrite", action="store_true", help="replace .jsonl files already in OUT/fine")
    parser.add_argument(
        "--quiet", "--no-progress", action="store_true", help="no progress bars (none either off a terminal)"
    )
    parser.set_defaults(func=run_cluster)
    return parser


def run_cluster(args: argparse.Namespace) -> int:
    """Carry out ``gradmix cluster``; returns the exit code (2 with a one-line message on bad input)."""
    try:
        return _run_cluster(args)
    except (ClusterError, ModelUnavailableError) as exc:
        print(f"gradmix: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _run_cluster(args: argparse.Namespace) -> int:
    texts = read_texts(args.input)
    target_texts = read_texts(args.target) if args.target else None
    check_k(args.k, len(texts), "--k")
    check_k(args.coarse_k, args.k, "--coarse-k (at most --k)")
    for k in args.report_k or []:
        check_k(k, len(texts), "--report-k")
    out = Path(args.out) if args.out else Path(f"clusters-k{args.k}")
    for sub in ("fine", "coarse") if args.write_coarse else ("fine",):
        _prepare_folder(out / sub, args.overwrite, check_only=True)  # fail before the slow part
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    show = not args.quiet
    embedder = load_embedder(args.model)
    print(f"embedding {len(texts)} texts with {model_identity(embedder, None)[1]}", file=sys.stderr)
    emb = embed_texts(texts, model=embedder, batch_size=args.batch_size, cache_dir=cache_dir, show_progress=show)
    result = cluster_corpus(
        texts,
        args.k,
        args.coarse_k,
        embeddings=emb,
        seed=args.seed,
        method=args.method,
        coarse_method=args.coarse_method,
        n_init=args.n_init,
        show_progress=show,
    )
    result.model = model_identity(embedder, None)[1]

    fine_as_found = Clustering(
        labels=result.fine_labels, centroids=result.fine_centroids, inertia=result.fine_inertia, sizes=result.fine_sizes
    )
    report_ks = sorted(set(args.report_k or []) | {args.k})
    precomputed = {args.k: fine_as_found} if result.k_fine == args.k else {}
    result.report = granularity_report(
        emb,
        report_ks,
        seed=args.seed,
        method=args.method,
        silhouette_sample=args.silhouette_sample,
        n_init=args.n_init,
        precomputed=precomputed,
        show_progress=show,
    )

    hist = None
    if target_texts is not None:
        target_emb = embed_texts(
            target_texts, model=embedder, batch_size=args.batch_size, cache_dir=cache_dir, show_progress=show
        )
        hist = target_histogram(target_emb, result.fine_centroids)
    write_clusters(out, texts, result, hist, overwrite=args.overwrite, write_coarse=args.write_coarse)

    print(format_report(result.report))
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    sizes = result.fine_sizes
    print(
        f"wrote {result.k_fine} fine domains (sizes {int(sizes.min())}..{int(sizes.max())}) in "
        f"{result.k_coarse} coarse groups to {out}/fine"
        + ("" if hist is None else f"; target: {int(hist.sum())} texts over {int(np.sum(hist > 0))} clusters")
    )
    return 0
