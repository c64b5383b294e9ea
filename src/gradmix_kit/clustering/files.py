"""Reading the corpus to cluster (through ``gradmix.sources.read_documents``, the one document reader) and writing
the clusters as a gradmix source folder: ``OUT/fine/<cNNNN>.jsonl``, ``OUT/clusters.json``, ``OUT/assignments.npy``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradmix_kit.clustering.errors import ClusterError
from gradmix_kit.clustering.kmeans import ClusterResult

__all__ = ["domain_names", "read_texts", "write_clusters"]


def domain_names(k: int, prefix: str = "c") -> list[str]:
    """ "c0000".."c{k-1}", zero-padded to one width (>= 4) so name order is cluster order."""
    width = max(4, len(str(max(k - 1, 0))))
    return [f"{prefix}{i:0{width}d}" for i in range(k)]


def write_clusters(
    out_dir: str | os.PathLike[str],
    texts: Sequence[str],
    result: ClusterResult,
    target_hist: Any = None,
    *,
    overwrite: bool = False,
    write_coarse: bool = False,
) -> Path:
    """Write OUT/fine/<cNNNN>.jsonl (one {"text": ...} per line), OUT/clusters.json and OUT/assignments.npy.

    ``write_coarse`` also writes OUT/coarse/<gNNNN>.jsonl. An existing non-empty fine/ (or coarse/) folder is an
    error unless ``overwrite``, which first removes its .jsonl files: stale domains from an earlier run with a
    larger k would otherwise be picked up as sources.
    """
    from gradmix.checkpoint import atomic_write
    from gradmix_kit.corpora.store import write_jsonl

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
            write_jsonl(out / sub / f"{name}.jsonl", (texts[i] for i in order[bounds[c] : bounds[c + 1]]))
    assignments = labels.astype(np.int64)
    atomic_write(out / "assignments.npy", lambda fh: np.save(fh, assignments))
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
    atomic_write(out / "clusters.json", lambda fh: fh.write("{\n" + body + "\n}\n"), mode="w")
    return out


def _prepare_folder(folder: Path, overwrite: bool, *, check_only: bool = False) -> None:
    if folder.exists():
        if not folder.is_dir():
            raise ClusterError(f"{folder} exists and is not a folder")
        existing = sorted(folder.glob("*.jsonl"))
        if existing and not overwrite:
            raise ClusterError(
                f"{folder} already holds {len(existing)} .jsonl files (e.g. {existing[0].name}); "
                "choose another --out or pass --overwrite"
            )
        if not check_only:
            for path in existing:
                path.unlink()
    if not check_only:
        folder.mkdir(parents=True, exist_ok=True)


def read_texts(path: str | os.PathLike[str]) -> list[str]:
    """Texts to cluster: a .jsonl file ({"text": ...} per line), a .txt file, or a folder of those (its own files in
    name order, not subfolders: an output folder written inside the input must not be read back as input). Every
    file is read by ``gradmix.sources.read_documents``, the reader every gradmix source uses. Blank documents are
    skipped; a missing path, a malformed line or no text at all is a ``ClusterError``."""
    from gradmix.sources import read_documents

    source = Path(path)
    if not source.exists():
        raise ClusterError(f"input {str(source)!r} does not exist")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix in (".jsonl", ".txt"))
        if not files:
            raise ClusterError(f"folder {str(source)!r} holds no .jsonl or .txt files")
    elif source.suffix in (".jsonl", ".txt"):
        files = [source]
    else:
        raise ClusterError(f"{str(source)!r}: expected a .jsonl or .txt file (or a folder of them)")
    texts: list[str] = []
    for file in files:
        try:
            texts.extend(read_documents(file))
        except (ValueError, OSError, AttributeError) as exc:  # AttributeError: a non-string "text" field
            raise ClusterError(str(exc)) from exc
    if not texts:
        raise ClusterError(f"{str(source)!r} holds no non-empty texts")
    return texts
