"""Named data domains: in memory, in memory-mapped token files, in HF datasets, or streamed.

Every domain is a ``DomainSource``: ``name``, ``size`` (examples), ``window_tokens`` (T, tokens predicted per example),
``num_tokens``, ``shuffle`` and ``take(indices)`` -> LongTensor (len(indices), T + 1). Inputs are ``[:, :-1]`` and
next-token targets ``[:, 1:]``. Where a domain is cut from a token stream, consecutive windows overlap by one token so
every token of the stream is predicted exactly once (``pack_tokens``).

Kinds and what each guarantees:

- ``Domain``: windows in RAM (tests, small corpora). Random access.
- ``TokenFileDomain``: a memory-mapped ``.bin`` (flat uint16/uint32 stream, as nanoGPT-style pipelines write) or
  ``.npy`` (1-D stream or 2-D windows). Only the rows a batch asks for are read; pickles as path + layout, so
  DataLoader workers re-open the file instead of copying it. Random access.
- ``HFDatasetDomain``: a map-style ``datasets.Dataset`` (Arrow, read by index); one row = one window. Random access.
- ``StreamDomain``: an HF ``datasets.IterableDataset`` or any re-iterable of token lists, packed in stream order.

Random-access kinds (``shuffle = True``) get the sampler's exact seeded permutation per pass: every example once per
pass, in an order fixed by the seed. Streams (``shuffle = False``) are read in stream order, with no shuffling beyond
what the stream itself does: a pass is one read of the stream, and the example index the sampler hands out is the
position in that read. That position is the sampler's cursor, so it is saved in the sampler's checkpoint; after a
resume the stream is re-read (and discarded) up to that position. Read a stream from one process
(``num_workers=0`` or ``mixer.batches()``): a stream keeps its read position in the object.

Any other data - SFT examples with label masks, features, images, map-style or iterable datasets of any examples -
comes in through ``DomainSet.from_datasets`` as ``ExampleDomain``s (``gradmix.example_sources``), batched by a
``collate_fn``; SFT losses and packing within a domain are in ``gradmix.sft``.

``DomainSet`` is a map-style torch Dataset addressed by the ``(domain_index, example_index)`` pairs the
``MixtureSampler`` yields, so it drops straight into a ``DataLoader(batch_sampler=...)``; its ``__getitems__`` reads
the DataLoader's whole batch with one ``gather`` (one read per domain, not one per example).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DocumentSplitError",
    "Domain",
    "DomainSet",
    "DomainSource",
    "ExampleDomain",
    "GatheredExamples",
    "HFDatasetDomain",
    "StreamDomain",
    "TokenFileDomain",
    "collate_examples",
    "pack_tokens",
    "read_documents",
    "text_files",
]

DOC_SEPARATOR = "<|doc|>"

Tokenize = Callable[[list[str]], list[list[int]]] | Any


class DocumentSplitError(ValueError):
    """A domain cannot be built (empty, too short, unreadable)."""


class _MissingFileError(FileNotFoundError, ValueError):
    """A token file that does not exist: catchable as either, since callers of both conventions exist."""


def _encode(tokenizer: Tokenize, texts: list[str]) -> list[list[int]]:
    """Encode with a HF ``tokenizers.Tokenizer`` (``encode_batch``) or any callable texts -> token id lists."""
    if hasattr(tokenizer, "encode_batch"):
        return [enc.ids for enc in tokenizer.encode_batch(texts)]
    if callable(tokenizer):
        return [list(ids) for ids in tokenizer(texts)]
    raise TypeError("tokenizer must be a tokenizers.Tokenizer or a callable list[str] -> list[list[int]]")


def pack_tokens(
    sequences: Iterable[Sequence[int] | np.ndarray], window: int, *, separator: int | None = None, name: str = "domain"
) -> torch.Tensor:
    """Concatenate token sequences (``separator`` between documents) and cut into (n, window + 1) windows.

    The trailing remainder shorter than a window is dropped (at most ``window`` tokens per domain).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    chunks: list[np.ndarray] = []
    for seq in sequences:
        arr = np.asarray(seq, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            continue
        chunks.append(arr)
        if separator is not None:
            chunks.append(np.asarray([separator], dtype=np.int64))
    if not chunks:
        raise DocumentSplitError(f"domain {name!r} is empty: no tokens to pack")
    stream = np.concatenate(chunks)
    n = (stream.size - 1) // window
    if n < 1:
        raise DocumentSplitError(
            f"domain {name!r} has {stream.size} tokens; one window needs {window + 1} - add text or shorten the window"
        )
    idx = np.arange(n)[:, None] * window + np.arange(window + 1)[None, :]
    return torch.from_numpy(stream[idx])


def _not_utf8(path: Path) -> DocumentSplitError:
    """The error for a text file that is not UTF-8, naming the file, line, offset and byte (found by re-reading the
    bytes: only on this error path)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return DocumentSplitError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); re-encode the "
            "file as UTF-8"
        )
    return DocumentSplitError(f"{path}: not UTF-8 text")


def text_files(folder: Path, entries: Iterable[Path]) -> list[Path]:
    """The ``.txt`` / ``.jsonl`` files among ``entries`` of ``folder``, sorted. One that cannot be read as a file
    (a dangling symlink, a FIFO) is a ``DocumentSplitError`` naming it, never skipped: a run must not silently train
    on the rest. Folders are passed over (a recursive listing walks into them)."""
    out = []
    for p in sorted(entries):
        if p.suffix not in (".txt", ".jsonl") or p.is_dir():
            continue
        if p.is_file():
            out.append(p)
        elif p.is_symlink() and not p.exists():
            raise DocumentSplitError(f"{p} in folder {str(folder)!r} is a dangling symlink (to {os.readlink(p)!r})")
        else:
            raise DocumentSplitError(f"{p} in folder {str(folder)!r} is not a regular file")
    return out


def read_documents(path: str | Path) -> list[str]:
    """Documents of a text source: ``.jsonl`` ({"text": ...} per line), ``.txt`` (split on lines holding only
    ``<|doc|>`` if present, else on blank lines), or a folder of those (files in sorted order). Text must be UTF-8:
    anything else is a ``DocumentSplitError`` naming the file, line and byte."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise FileNotFoundError(f"text source {str(path)!r} is a dangling symlink (to {os.readlink(path)!r})")
        raise FileNotFoundError(f"text source {str(path)!r} does not exist")
    if path.is_dir():
        files = text_files(path, path.rglob("*"))
        if not files:
            raise DocumentSplitError(f"folder {str(path)!r} holds no .txt or .jsonl files")
        docs: list[str] = []
        for f in files:
            docs.extend(read_documents(f))
        return docs
    try:
        return _read_text_source(path)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _read_text_source(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DocumentSplitError(f"{path}:{line_no}: expected a JSON object with a 'text' field") from exc
                if not isinstance(text, str):
                    raise DocumentSplitError(
                        f"{path}:{line_no}: field 'text' must be a string, got {type(text).__name__} {text!r:.60}"
                    )
                if text.strip():
                    docs.append(text)
        return docs
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")  # Windows line ends split like Unix ones
    lines = text.split("\n")
    if any(line.strip() == DOC_SEPARATOR for line in lines):
        parts: list[str] = []
        current: list[str] = []
        for line in lines:  # a separator line may carry surrounding spaces
            if line.strip() == DOC_SEPARATOR:
                parts.append("\n".join(current).strip("\n"))
                current = []
            else:
                current.append(line)
        parts.append("\n".join(current).strip("\n"))
    else:
        parts = [p.strip() for p in text.split("\n\n")]
    return [p for p in parts if p.strip()]


def check_domain_name(name: Any) -> str:
    """A domain name: a non-empty string (every entry point checks it the same way)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"domain name must be a non-empty string, got {name!r}")
    return name


def as_indices(indices: Any, size: int, name: str) -> np.ndarray:
    """Example indices as a 1-D int64 array, each in [0, size): a wrong index fails here, naming the domain,
    rather than wrapping around (negative) or failing deep inside numpy/Arrow."""
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()
    arr = np.asarray(indices)
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"domain {name!r}: example indices must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False).reshape(-1)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= size):
        bad = int(arr[(arr < 0) | (arr >= size)][0])
        raise IndexError(f"domain {name!r}: example index {bad} is out of range for {size} examples")
    return arr


class DomainSource(ABC):
    """What every domain offers the sampler and ``DomainSet``: a name, a size, a window length and batched reads.

    ``shuffle`` is True where examples can be read in any order (the sampler permutes them per pass) and False for
    streams, which must be read in order (the sampler hands out positions 0, 1, 2, ... per pass).
    """

    name: str
    shuffle: ClassVar[bool] = True

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of examples (windows) per pass."""

    @property
    @abstractmethod
    def window_tokens(self) -> int:
        """Tokens predicted per example (window length T); each example holds T + 1 tokens."""

    @property
    def num_tokens(self) -> int:
        return self.size * self.window_tokens

    @abstractmethod
    def take(self, indices: np.ndarray) -> torch.Tensor:
        """Examples ``indices`` as a LongTensor of shape (len(indices), T + 1), in the order asked."""

    def _read_into(self, rows: np.ndarray, out: torch.Tensor) -> None:
        """``take(rows)`` written into ``out``, a slice of the batch ``DomainSet.gather`` is filling; ``rows`` are
        int64 and already checked to be in range. Kinds that can read straight into it override this: per call
        overhead counts when a batch holds a few examples of each of many domains."""
        out.copy_(self.take(rows))


class ExampleDomain(DomainSource):
    """A domain of examples of any structure (``gradmix.example_sources``: ``DatasetDomain``,
    ``IterableDatasetDomain``), batched by the ``DomainSet``'s ``collate_fn`` instead of stacked as token windows.
    ``examples(indices)`` returns the examples as a list, in the order asked."""

    @abstractmethod
    def examples(self, indices: np.ndarray) -> list[Any]:
        """Examples ``indices`` as a list, in the order asked."""

    @property
    def window_tokens(self) -> int:
        raise TypeError(f"domain {self.name!r} holds examples of any structure, not token windows: no window length")

    def take(self, indices: np.ndarray) -> torch.Tensor:
        raise TypeError(
            f"domain {self.name!r} holds examples of any structure, not token windows: read it with examples()"
        )


@dataclass
class Domain(DomainSource):
    """One named in-memory source of examples: ``windows`` has shape (num_examples, window + 1)."""

    name: str
    windows: torch.Tensor
    num_documents: int | None = None

    def __post_init__(self) -> None:
        check_domain_name(self.name)
        if not isinstance(self.windows, torch.Tensor):
            self.windows = torch.as_tensor(np.asarray(self.windows))
        if self.windows.dim() != 2:
            raise ValueError(
                f"domain {self.name!r}: windows must be 2-D (examples, tokens), got {tuple(self.windows.shape)}"
            )
        if self.windows.shape[0] == 0:
            raise DocumentSplitError(f"domain {self.name!r} is empty (0 examples)")
        if self.windows.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"domain {self.name!r}: token windows must be integers, got {self.windows.dtype}")
        self.windows = self.windows.long()

    @property
    def size(self) -> int:
        return int(self.windows.shape[0])

    @property
    def window_tokens(self) -> int:
        """Tokens predicted per example (window length T)."""
        return int(self.windows.shape[1]) - 1

    @property
    def num_tokens(self) -> int:
        return self.size * self.window_tokens

    def take(self, indices: np.ndarray) -> torch.Tensor:
        return self.windows[torch.from_numpy(as_indices(indices, self.size, self.name))]


_BIN_DTYPES = ("uint16", "uint32", "int32", "int64")


class TokenFileDomain(DomainSource):
    """Token ids in a file that stays on disk: memory-mapped, so a corpus larger than RAM costs only page cache.

    - ``.bin``: a flat token stream of ``dtype`` (uint16, uint32, int32 or int64; required, since the file has no
      header), e.g. what nanoGPT-style ``prepare.py`` scripts write with ``ndarray.tofile``.
    - ``.npy``: opened with ``np.load(mmap_mode="r")``; 1-D = a flat token stream, 2-D = pre-cut windows of shape
      (n, T + 1) (``window`` must then be T or None).

    A flat stream of n tokens gives ``(n - 1) // window`` windows; window i is ``tokens[i*T : i*T + T + 1]`` (the same
    overlap-by-one cut as ``pack_tokens``). Pickling stores the path and layout, never the data; the file is
    re-opened on first use in each process (DataLoader workers).
    """

    def __init__(self, name: str, path: str | Path, window: int | None, dtype: Any = None) -> None:
        self.name = check_domain_name(name)
        self.path = Path(path)
        where = f"token file {str(self.path)!r} (domain {name!r})"
        if not self.path.exists():
            raise _MissingFileError(f"{where} does not exist")
        if not self.path.is_file():
            raise ValueError(f"{where} is not a regular file")
        if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
            raise ValueError(f"{where}: window must be an integer >= 1, got {window!r}")
        suffix = self.path.suffix.lower()
        if suffix == ".bin":
            if dtype is None:
                raise ValueError(f"{where}: a .bin file has no header; pass dtype= one of {list(_BIN_DTYPES)}")
            dt = _parse_dtype(dtype, where)
            if dt.name not in _BIN_DTYPES:
                raise ValueError(f"{where}: dtype {dt.name} is not a token dtype; use one of {list(_BIN_DTYPES)}")
            nbytes = self.path.stat().st_size
            if nbytes % dt.itemsize:
                raise ValueError(
                    f"{where}: {nbytes} bytes is not a multiple of the {dt.name} item size "
                    f"({dt.itemsize}); wrong dtype or a truncated file"
                )
            self._dtype, self._shape, self._npy = dt, (nbytes // dt.itemsize,), False
        elif suffix == ".npy":
            try:
                arr = np.load(self.path, mmap_mode="r")
            except (ValueError, OSError) as exc:  # object arrays (need pickle), a broken header
                raise ValueError(f"{where}: cannot memory-map this .npy: {exc}") from exc
            if dtype is not None and _parse_dtype(dtype, where) != arr.dtype:
                raise ValueError(f"{where}: the file holds {arr.dtype}, but dtype={np.dtype(dtype).name} was passed")
            self._dtype, self._shape, self._npy = arr.dtype, tuple(arr.shape), True
            del arr
        else:
            raise ValueError(f"{where}: unsupported file type {suffix or '(none)'!r}; use .bin or .npy")
        if self._dtype.kind not in "iu":
            raise ValueError(f"{where}: tokens must be integers, the file holds {self._dtype}")
        if len(self._shape) == 1:
            if window is None:
                raise ValueError(f"{where}: a flat token stream needs window= (tokens predicted per example)")
            self._window = int(window)
            n = self._shape[0]
            self._size = (n - 1) // self._window if n else 0
            if self._size < 1:
                raise DocumentSplitError(f"{where} has {n} tokens; one window needs {self._window + 1}")
        elif len(self._shape) == 2:
            width = self._shape[1] - 1
            if width < 1:
                raise ValueError(f"{where}: windows of shape {self._shape} hold fewer than 2 tokens")
            if window is not None and int(window) != width:
                raise ValueError(f"{where}: the file holds windows of {width} + 1 tokens, but window={window}")
            self._window, self._size = width, self._shape[0]
            if self._size < 1:
                raise DocumentSplitError(f"{where} holds 0 windows")
        else:
            raise ValueError(f"{where}: expected a 1-D token stream or 2-D windows, got shape {self._shape}")
        self._mm: np.memmap | None = None
        self._win: np.ndarray | None = None
        if self._dtype.kind == "i" or self._dtype.itemsize == 8:
            self._check_ids(where)

    def _check_ids(self, where: str) -> None:
        """A negative id (int32/int64 files) or one past int64 (uint64) is an error naming the file, the position
        and the value: read as an index it would pick the wrong embedding row, or wrap. One streamed pass over the
        file, in chunks (never the whole file in memory); uint16/uint32 files, the usual ones, need none."""
        flat = self.data.reshape(-1)
        chunk = 1 << 24
        for start in range(0, flat.shape[0], chunk):
            part = np.asarray(flat[start : start + chunk])
            bad = np.flatnonzero(part < 0) if self._dtype.kind == "i" else np.flatnonzero(part > np.iinfo(np.int64).max)
            if bad.size:
                i = int(bad[0])
                raise ValueError(
                    f"{where}: token id {part[i]} at position {start + i} is not a valid id (ids must be in "
                    f"[0, 2^63)); wrong dtype, or a corrupt file"
                )

    @property
    def size(self) -> int:
        return self._size

    @property
    def window_tokens(self) -> int:
        return self._window

    @property
    def data(self) -> np.memmap:
        """The memory-mapped array (opened on first use in this process; its pages are read only when touched)."""
        if self._mm is None:
            if self._npy:
                mm = np.load(self.path, mmap_mode="r")
            else:
                mm = np.memmap(self.path, dtype=self._dtype, mode="r", shape=self._shape)
            if mm.dtype != self._dtype or tuple(mm.shape) != self._shape:
                raise ValueError(
                    f"token file {str(self.path)!r} (domain {self.name!r}) changed since it was opened: "
                    f"now {mm.dtype} {tuple(mm.shape)}, was {self._dtype} {self._shape}"
                )
            self._mm = mm
        return self._mm

    @property
    def windows(self) -> np.ndarray:
        """The file as a read-only (size, T + 1) array: a strided view of a flat stream (windows overlap by one
        token), so reading rows is one fancy index with no index arithmetic per call."""
        if self._win is None:
            mm: np.ndarray = self.data
            if mm.ndim == 1:
                step = mm.strides[0]
                mm = np.lib.stride_tricks.as_strided(
                    mm, shape=(self._size, self._window + 1), strides=(self._window * step, step), writeable=False
                )
            self._win = mm
        return self._win

    def take(self, indices: np.ndarray) -> torch.Tensor:
        rows = as_indices(indices, self._size, self.name)
        # one fancy index: each window is one contiguous read of the mapping, in the order asked
        return torch.from_numpy(np.asarray(self.windows[rows], dtype=np.int64))

    def _read_into(self, rows: np.ndarray, out: torch.Tensor) -> None:
        out.numpy()[...] = self.windows[rows]  # file dtype -> int64 in the one copy into the batch

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mm"] = state["_win"] = None  # never pickle the mapped data; each process maps the file itself
        return state

    def __repr__(self) -> str:
        return (
            f"TokenFileDomain({self.name!r}, {str(self.path)!r}, window={self._window}, dtype={self._dtype.name}, "
            f"size={self._size})"
        )


def _parse_dtype(dtype: Any, where: str) -> np.dtype:
    try:
        return np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"{where}: {dtype!r} is not a numpy dtype") from exc


class HFDatasetDomain(DomainSource):
    """A map-style HF ``datasets.Dataset`` whose ``column`` holds one window of T + 1 token ids per row.

    Rows are read by index from the Arrow table (memory-mapped when the dataset lives on disk), a batch at a time;
    nothing is copied into RAM up front. T comes from the first row; every row read is checked to have T + 1 tokens.
    Needs the optional ``datasets`` package (``pip install gradmix[hf]``).
    """

    def __init__(self, name: str, dataset: Any, column: str = "input_ids") -> None:
        self.name = check_domain_name(name)
        import datasets as hf_datasets

        if isinstance(dataset, hf_datasets.IterableDataset):
            raise TypeError(f"domain {name!r}: an IterableDataset cannot be read by index; use StreamDomain")
        if not isinstance(dataset, hf_datasets.Dataset):
            raise TypeError(
                f"domain {name!r}: expected a datasets.Dataset (pick a split of a DatasetDict), "
                f"got {type(dataset).__name__}"
            )
        if column not in dataset.column_names:
            raise ValueError(f"domain {name!r}: dataset has no column {column!r}; it has {dataset.column_names}")
        self.column = column
        self.dataset = dataset.with_format("numpy", columns=[column])  # a view on the same Arrow table, no copy
        self._size = len(self.dataset)
        if self._size == 0:
            raise DocumentSplitError(f"domain {name!r}: dataset is empty (0 rows)")
        first = np.asarray(self.dataset[0][column])
        if first.ndim != 1 or first.dtype.kind not in "iu":
            raise ValueError(
                f"domain {name!r}: column {column!r} row 0 must be a list of integer token ids, "
                f"got shape {first.shape} dtype {first.dtype}"
            )
        if first.size < 2:
            raise ValueError(f"domain {name!r}: column {column!r} row 0 has {first.size} tokens; a window needs >= 2")
        self._window = int(first.size) - 1

    @property
    def size(self) -> int:
        return self._size

    @property
    def window_tokens(self) -> int:
        return self._window

    def take(self, indices: np.ndarray) -> torch.Tensor:
        rows = as_indices(indices, self._size, self.name)
        if rows.size == 0:
            return torch.empty((0, self._window + 1), dtype=torch.long)
        values = self.dataset[rows.tolist()][self.column]
        width = self._window + 1
        if not (isinstance(values, np.ndarray) and values.ndim == 2 and values.shape[1] == width):
            # ragged rows come back as an object array of 1-D arrays; name the first row of the wrong length
            lengths = [len(v) for v in values]
            bad = next((k for k, n in enumerate(lengths) if n != width), 0)
            raise ValueError(
                f"domain {self.name!r}: column {self.column!r} row {int(rows[bad])} has "
                f"{lengths[bad]} tokens; every row must hold window + 1 = {width} (from row 0)"
            )
        if values.dtype.kind not in "iu":
            raise ValueError(f"domain {self.name!r}: column {self.column!r} holds {values.dtype}, not token ids")
        return torch.from_numpy(values.astype(np.int64, copy=False))

    def __repr__(self) -> str:
        return f"HFDatasetDomain({self.name!r}, column={self.column!r}, window={self._window}, size={self._size})"


class StreamDomain(DomainSource):
    """Documents from a stream, packed in stream order into windows of ``window + 1`` tokens (stride ``window``).

    ``iterable`` is an HF ``datasets.IterableDataset`` or any re-iterable (``iter()`` starts over each time) that
    yields dicts with a ``column`` of token ids, or plain token-id sequences; or a zero-argument callable returning a
    fresh iterator. Packing matches ``pack_tokens`` (``separator`` between documents, empty documents skipped).

    ``take(positions)`` serves positions in stream order: it keeps the read position and a ring buffer of the last
    ``buffer_windows`` windows, so continuing, or stepping back a little (a DataLoader prefetch rollback), is cheap; a
    jump further back (a new pass, a resume) re-opens the stream and reads forward, and a jump ahead reads and
    discards. Positions are fastest in consecutive runs, as the sampler hands them; any order is correct.

    ``size`` (windows per pass) should be given: with ``size=None`` the whole stream is read once, on first use of
    ``size``, just to count. Windows past ``size`` are never read; a stream that ends before ``size`` windows is an
    error naming the domain. The read position lives in this object: read a stream from one process
    (``num_workers=0`` / ``mixer.batches()``). A pickled copy (a DataLoader worker) starts over at position 0 and
    stays correct, but every worker re-reads the stream. The ring costs ``buffer_windows * (window + 1) * 8`` bytes.
    """

    shuffle: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        iterable: Any,
        window: int,
        size: int | None = None,
        column: str = "input_ids",
        *,
        separator: int | None = None,
        buffer_windows: int = 1024,
    ) -> None:
        self.name = check_domain_name(name)
        if not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"domain {name!r}: window must be an integer >= 1, got {window!r}")
        if size is not None and (not isinstance(size, (int, np.integer)) or size < 1):
            raise ValueError(
                f"domain {name!r}: size must be a positive integer (windows per pass) or None, got {size!r}"
            )
        if not isinstance(buffer_windows, (int, np.integer)) or buffer_windows < 1:
            raise ValueError(f"domain {name!r}: buffer_windows must be an integer >= 1, got {buffer_windows!r}")
        if callable(iterable) and not hasattr(iterable, "__iter__"):
            self._open: Callable[[], Iterator[Any]] = iterable
        elif hasattr(iterable, "__iter__"):
            if iter(iterable) is iterable:
                raise TypeError(
                    f"domain {name!r}: a one-shot iterator/generator cannot be re-read for a second pass "
                    f"or a resume; pass a re-iterable (list, IterableDataset) or a callable returning a "
                    f"fresh iterator"
                )
            self._open = iterable.__iter__
        else:
            raise TypeError(f"domain {name!r}: expected an iterable of documents, got {type(iterable).__name__}")
        self.iterable = iterable
        self.column = column
        self.separator = separator
        self._window = int(window)
        self._size = None if size is None else int(size)
        self._cap = int(buffer_windows)
        self.reopens = 0  # how many times the stream was (re-)opened: a diagnostic for costly jumps
        self._ring: np.ndarray | None = None  # window j sits in slot j % buffer_windows; allocated on first read
        self._reset()

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        if self._size is None:
            self._size = self._count_windows()
        return self._size

    @property
    def window_tokens(self) -> int:
        return self._window

    # -- reading ------------------------------------------------------------------------------------------------
    def take(self, indices: np.ndarray) -> torch.Tensor:
        pos = as_indices(indices, self.size, self.name)
        out = torch.empty((pos.size, self._window + 1), dtype=torch.long)
        if pos.size == 0:
            return out
        breaks = np.flatnonzero(np.diff(pos) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, pos.size], strict=True):
            self._read_run(int(pos[lo]), int(hi - lo), out[lo:hi])
        return out

    def _read_run(self, start: int, count: int, out: torch.Tensor) -> None:
        """Windows start .. start + count - 1 into ``out``: from the ring where possible, then read forward."""
        oldest = self._pos - min(self._pos, self._cap)
        if start < oldest:
            self._reset()
            oldest = 0
        stop = start + count
        have = min(stop, self._pos)
        if have > start:
            assert self._ring is not None
            slots = np.arange(start, have) % self._cap
            out[: have - start] = torch.from_numpy(self._ring[slots])
        if stop > self._pos:
            if start > self._pos:
                self._produce(start - self._pos, None)
            done = max(0, self._pos - start)
            self._produce(stop - self._pos, out[done:])

    def _reset(self) -> None:
        """Back to position 0; the stream is opened lazily on the next read (the ring's memory is kept)."""
        self._it: Iterator[Any] | None = None
        self._carry = np.empty(0, dtype=np.int64)
        self._pos = 0

    def _produce(self, count: int, out: torch.Tensor | None) -> None:
        """Cut the next ``count`` windows from the stream into the ring (and ``out`` if given)."""
        if self._it is None:
            self._it = iter(self._open())
            self.reopens += 1
        if self._ring is None:
            self._ring = np.empty((self._cap, self._window + 1), dtype=np.int64)
        T, written = self._window, 0
        ar = np.arange(T + 1)
        while written < count:
            available = (self._carry.size - 1) // T if self._carry.size else 0
            if out is None and available and count - written > self._cap:
                # skipping ahead: windows that will not be among the ring's last ``buffer_windows`` are never cut
                skip = min(available, count - written - self._cap)
                self._carry = self._carry[skip * T :]
                self._pos += skip
                written += skip
                continue
            if available == 0:
                doc = next(self._it, None)
                if doc is None:
                    raise DocumentSplitError(
                        f"stream domain {self.name!r} ended after {self._pos} windows; its size is {self._size} "
                        f"(pass the true size, or size=None to count)"
                    )
                self._carry = np.concatenate([self._carry, *self._doc_tokens(doc)])
                continue
            m = min(available, count - written, self._cap)
            windows = self._carry[np.arange(m)[:, None] * T + ar]
            self._carry = self._carry[m * T :]
            self._ring[np.arange(self._pos, self._pos + m) % self._cap] = windows
            if out is not None:
                out[written : written + m] = torch.from_numpy(windows)
            self._pos += m
            written += m

    def _doc_tokens(self, doc: Any) -> list[np.ndarray]:
        """One document as token arrays to append (plus the separator), as ``pack_tokens`` would."""
        if isinstance(doc, Mapping):
            if self.column not in doc:
                raise ValueError(
                    f"stream domain {self.name!r}: item has no column {self.column!r}; it has {sorted(doc)}"
                )
            doc = doc[self.column]
        if isinstance(doc, (str, bytes)):
            raise TypeError(
                f"stream domain {self.name!r}: items must be token ids, got text; tokenize the stream first"
            )
        if isinstance(doc, torch.Tensor):
            doc = doc.cpu().numpy()
        arr = np.asarray(doc)
        if arr.size and arr.dtype.kind not in "iu":
            raise ValueError(f"stream domain {self.name!r}: tokens must be integers, got {arr.dtype}")
        arr = arr.astype(np.int64, copy=False).reshape(-1)
        if arr.size == 0:
            return []
        if self.separator is None:
            return [arr]
        return [arr, np.asarray([self.separator], dtype=np.int64)]

    def _count_windows(self) -> int:
        """Read the whole stream once to count its windows (only when no ``size`` was given)."""
        tokens = sum(part.size for doc in self._open() for part in self._doc_tokens(doc))
        n = (tokens - 1) // self._window if tokens else 0
        if n < 1:
            raise DocumentSplitError(
                f"stream domain {self.name!r} has {tokens} tokens; one window needs {self._window + 1}"
            )
        return n

    def __getstate__(self) -> dict[str, Any]:
        """A copy starts over at position 0 (live iterators do not pickle); it stays correct, but re-reads."""
        state = self.__dict__.copy()
        state.update(_it=None, _carry=np.empty(0, dtype=np.int64), _pos=0, _ring=None)
        return state

    def __repr__(self) -> str:
        return f"StreamDomain({self.name!r}, window={self._window}, size={self._size}, position={self._pos})"


class DomainSet(Dataset):
    """The named domains of one run (any mix of kinds); ``dataset[(d, i)]`` is example i of domain d.

    Two kinds of set. A set of token-window domains (the fast kind) batches by stacking windows: ``input_ids``
    (n, T + 1), ``domain``, ``index``. A set with any ``ExampleDomain``, or built with a ``collate_fn``
    (``from_datasets``), batches ``collate_fn(examples)`` (default ``gradmix.example_sources.pad_collate``) plus
    ``batch["domain"]``; token-window domains in it are read as examples ``{"input_ids": w, "labels": w}``.
    ``is_windows`` says which kind this is."""

    def __init__(self, domains: Sequence[DomainSource], collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        domains = list(domains)
        if not domains:
            raise ValueError("a DomainSet needs at least one domain")
        for d in domains:
            if not isinstance(d, DomainSource):
                raise TypeError(
                    f"expected domains (Domain, TokenFileDomain, HFDatasetDomain, StreamDomain, DatasetDomain, "
                    f"IterableDatasetDomain), got {type(d).__name__}; for any dataset use DomainSet.from_datasets"
                )
        names = [d.name for d in domains]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate domain names: {dupes}")
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
        self.is_windows = collate_fn is None and not any(isinstance(d, ExampleDomain) for d in domains)
        self.collate_fn: Callable[[list[Any]], Any] | None = None
        if self.is_windows:
            widths = {d.name: d.window_tokens for d in domains}
            if len(set(widths.values())) > 1:
                raise ValueError(f"domains predict different numbers of tokens per example (window): {widths}")
        else:
            from gradmix.example_sources import as_example_domain, pad_collate

            domains = [as_example_domain(d.name, d) for d in domains]
            self.collate_fn = collate_fn if collate_fn is not None else pad_collate
        self.domains = domains
        if not self.is_windows:
            for k, d in enumerate(domains):  # a collate_fn that cannot batch a domain fails here, naming it
                assert isinstance(d, ExampleDomain)
                self.collate(d.examples(np.zeros(1, dtype=np.int64)), np.full(1, k, dtype=np.int64))

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def from_texts(
        cls, texts: Mapping[str, Sequence[str] | str], tokenizer: Tokenize, window: int, *, separator: int | None = None
    ) -> DomainSet:
        """Tokenize documents per domain and pack them into windows of ``window`` predicted tokens."""
        domains = []
        for name, docs in texts.items():
            docs = [docs] if isinstance(docs, str) else list(docs)
            docs = [d for d in docs if d and d.strip()]
            if not docs:
                raise DocumentSplitError(f"domain {name!r} has no non-empty documents")
            ids = _encode(tokenizer, docs)
            domains.append(Domain(name, pack_tokens(ids, window, separator=separator, name=name), len(docs)))
        return cls(domains)

    @classmethod
    def from_token_sequences(
        cls, sequences: Mapping[str, Sequence[Sequence[int]]], window: int, *, separator: int | None = None
    ) -> DomainSet:
        return cls(
            [
                Domain(name, pack_tokens(seqs, window, separator=separator, name=name), len(seqs))
                for name, seqs in sequences.items()
            ]
        )

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> DomainSet:
        """Pre-windowed numpy/torch arrays of shape (n, T + 1) per domain."""
        return cls([Domain(name, torch.as_tensor(np.asarray(arr))) for name, arr in arrays.items()])

    @classmethod
    def from_paths(
        cls, paths: Mapping[str, str | Path], tokenizer: Tokenize, window: int, *, separator: int | None = None
    ) -> DomainSet:
        """Text files or folders (see ``read_documents``), one per domain."""
        return cls.from_texts(
            {name: read_documents(p) for name, p in paths.items()}, tokenizer, window, separator=separator
        )

    @classmethod
    def from_token_files(cls, paths: Mapping[str, str | Path], window: int | None, dtype: Any = None) -> DomainSet:
        """Memory-mapped ``.bin`` / ``.npy`` token files, one per domain (see ``TokenFileDomain``)."""
        return cls([TokenFileDomain(name, p, window, dtype) for name, p in paths.items()])

    @classmethod
    def from_hf_datasets(cls, datasets: Mapping[str, Any], column: str = "input_ids") -> DomainSet:
        """Map-style HF datasets of pre-cut windows, one per domain (see ``HFDatasetDomain``)."""
        return cls([HFDatasetDomain(name, ds, column) for name, ds in datasets.items()])

    @classmethod
    def from_datasets(
        cls,
        datasets: Mapping[str, Any],
        collate_fn: Callable[[list[Any]], Any] | None = None,
        *,
        sizes: Mapping[str, int] | None = None,
        pack: bool = False,
        max_length: int | None = None,
        buffer_examples: int = 1024,
    ) -> DomainSet:
        """Domains of any data: ``{name: dataset}``, each map-style (``__len__`` + ``__getitem__``: a list, a torch
        ``Dataset``, an HF ``datasets.Dataset``) or iterable (a torch or HF ``IterableDataset``, any re-iterable, a
        callable returning a fresh iterator), with examples of any structure (see ``gradmix.example_sources``).

        A batch is ``collate_fn(examples)`` - a dict (a mapping) - plus ``batch["domain"]`` (LongTensor of domain
        indices); the default ``pad_collate`` stacks tensors and numbers and right-pads variable-length sequences
        (``labels`` with -100) and adds an ``attention_mask``. Each domain's first example is collated once here, so
        a ``collate_fn`` that cannot batch a domain fails now, naming it.

        sizes: examples per pass of iterable datasets ({name: n}); an iterable without one is read once to count.
        pack: pack each domain's examples (dicts with ``input_ids``, optional ``labels``) into rows of at most
            ``max_length`` tokens, one domain per row (``gradmix.sft.PackedDataset`` / ``PackedIterable``): a row is
            then the sampler's example, and its ``position_ids`` restart at every packed example.
        buffer_examples: examples an iterable domain keeps for re-reads (see ``IterableDatasetDomain``).

        A value that already is a domain (token windows, ``DatasetDomain``, ...) is used as it is; with
        ``collate_fn=None`` and only token-window domains the set stays the fast token-window kind."""
        from gradmix.example_sources import as_example_domain

        if not isinstance(datasets, Mapping) or not datasets:
            raise ValueError("from_datasets needs a non-empty {domain name: dataset} mapping")
        sizes = dict(sizes or {})
        unknown = sorted(set(sizes) - set(datasets))
        if unknown:
            raise ValueError(f"sizes names domains that are not in datasets: {unknown}")
        if pack and (max_length is None or isinstance(max_length, bool) or int(max_length) < 1):
            raise ValueError(f"pack=True needs max_length (tokens per packed row) >= 1, got {max_length!r}")
        domains: list[DomainSource] = []
        for name, ds in datasets.items():
            check_domain_name(name)
            if isinstance(ds, DomainSource) and not isinstance(ds, ExampleDomain):
                if pack:
                    raise ValueError(f"domain {name!r} is already token windows: it cannot be packed (pack=True)")
                if ds.name != name:
                    raise ValueError(f"domain {ds.name!r} is given under the name {name!r}")
                domains.append(ds)
                continue
            if pack:
                from gradmix.sft import pack_dataset

                assert max_length is not None
                ds = pack_dataset(ds, int(max_length), name=name)
            domains.append(as_example_domain(name, ds, size=sizes.get(name), buffer_examples=buffer_examples))
        return cls(domains, collate_fn)

    # -- views --------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    @property
    def sizes(self) -> list[int]:
        return [d.size for d in self.domains]

    @property
    def num_tokens(self) -> list[int]:
        return [d.num_tokens for d in self.domains]

    @property
    def shuffle(self) -> list[bool]:
        """Per domain: True if its examples may be read in any order (sampler permutes), False for streams."""
        return [bool(d.shuffle) for d in self.domains]

    @property
    def window_tokens(self) -> int:
        """Tokens predicted per example (T) of a token-window set; a ``TypeError`` for a set of examples."""
        if not self.is_windows:
            raise TypeError("this DomainSet holds examples of any structure (from_datasets), not token windows")
        return self.domains[0].window_tokens

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        """Token windows: ``{"input_ids": row, "domain": d, "index": i}``; examples: ``{"example": the example as
        the dataset gives it, "domain": d, "index": i}``."""
        domain, index = key
        if not self.is_windows:
            source = self.domains[domain]
            assert isinstance(source, ExampleDomain)
            example = source.examples(np.asarray([index], dtype=np.int64))[0]
            return {"example": example, "domain": int(domain), "index": int(index)}
        row = self.domains[domain].take(np.asarray([index], dtype=np.int64))[0]
        return {"input_ids": row, "domain": int(domain), "index": int(index)}

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> Sequence[dict[str, Any]]:
        """A DataLoader's whole batch of ``(domain, example)`` keys in one ``gather`` (torch calls this instead of
        ``__getitem__`` per key): one read per domain, not one file read, dict and stack per example. A subclass
        with its own ``__getitem__`` is read through it, key by key, as before. For a set of examples the batch is
        read and collated here (in the DataLoader worker, if any)."""
        if type(self).__getitem__ is not DomainSet.__getitem__:
            return [self[key] for key in keys]
        if not self.is_windows:
            pairs = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
            batch, items = self._gather_examples(pairs[:, 0], pairs[:, 1])
            return GatheredExamples(batch, items)
        return GatheredExamples(self.get_batch(keys))

    def get_batch(self, pairs: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Gather a whole batch without per-example Python objects (fast path for the plain loop)."""
        pairs_arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        return self.gather(pairs_arr[:, 0], pairs_arr[:, 1])

    def gather(self, domains: np.ndarray, examples: np.ndarray) -> dict[Any, Any]:
        """One batch: each domain present is read with a single ``take`` (its examples in batch order).

        The sampler hands batches sorted by domain, so each domain is one run of rows, read straight into its slice;
        any other order is grouped by domain first. The three tensors share one buffer, so a DataLoader worker hands
        a batch too large for its pipe (``_PipedBatch``) over as one shared-memory block rather than three.

        A set of examples reads each domain's examples (``ExampleDomain.examples``, one call per domain) and returns
        ``collate_fn(examples)`` plus ``domain``."""
        domains = np.asarray(domains, dtype=np.int64).reshape(-1)
        examples = np.asarray(examples, dtype=np.int64).reshape(-1)
        if domains.shape != examples.shape:
            raise ValueError(f"gather needs one example index per domain index, got {domains.size} and {examples.size}")
        if not self.is_windows:
            return self._gather_examples(domains, examples)[0]
        n, width = domains.size, self.window_tokens + 1
        if n and (int(domains.min()) < 0 or int(domains.max()) >= len(self.domains)):
            bad = int(domains[(domains < 0) | (domains >= len(self.domains))][0])
            raise IndexError(f"domain index {bad} is out of range for {len(self.domains)} domains")
        sizes = np.array([d.size for d in self.domains], dtype=np.int64)[domains]
        if n and (int(examples.min()) < 0 or bool((examples >= sizes).any())):  # checked once for the whole batch
            j = int(np.flatnonzero((examples < 0) | (examples >= sizes))[0])
            as_indices(examples[j : j + 1], int(sizes[j]), self.domains[int(domains[j])].name)  # raises, naming it
        buffer = torch.empty(n * (width + 2), dtype=torch.long)
        rows = buffer[: n * width].view(n, width)
        out_domains, out_examples = buffer[n * width : n * (width + 1)], buffer[n * (width + 1) :]
        out_domains.numpy()[:] = domains
        out_examples.numpy()[:] = examples
        bounds = [0, *(np.flatnonzero(domains[1:] != domains[:-1]) + 1).tolist(), n] if n else [0]
        run_domains = domains[bounds[:-1]].tolist()
        if len(set(run_domains)) == len(run_domains):  # each domain one run: read into slices
            for d, lo, hi in zip(run_domains, bounds[:-1], bounds[1:], strict=True):
                self.domains[d]._read_into(examples[lo:hi], rows[lo:hi])
        else:
            for d in np.unique(domains).tolist():
                where = np.flatnonzero(domains == d)
                rows[torch.from_numpy(where)] = self.domains[d].take(examples[where])
        return {"input_ids": rows, "domain": out_domains, "index": out_examples}

    # -- sets of examples ---------------------------------------------------------------------------------------
    def _gather_examples(self, domains: np.ndarray, examples: np.ndarray) -> tuple[dict[Any, Any], list[Any]]:
        """The collated batch and the examples it was made of (one ``examples`` read per domain present)."""
        k = len(self.domains)
        if domains.size and (int(domains.min()) < 0 or int(domains.max()) >= k):
            bad = int(domains[(domains < 0) | (domains >= k)][0])
            raise IndexError(f"domain index {bad} is out of range for {k} domains")
        items: list[Any] = [None] * domains.size
        for d in dict.fromkeys(domains.tolist()):  # domains in order of first appearance
            where = np.flatnonzero(domains == d)
            source = self.domains[d]
            assert isinstance(source, ExampleDomain)
            for j, example in zip(where.tolist(), source.examples(examples[where]), strict=True):
                items[j] = example
        return self.collate(items, domains), items

    def collate(self, items: list[Any], domains: np.ndarray | Sequence[int]) -> dict[Any, Any]:
        """``collate_fn(items)`` as a dict plus ``domain`` (LongTensor): what a batch of a set of examples is.

        A ``collate_fn`` that fails, or returns something that is not a mapping (so the domain cannot be attached),
        or a ``domain`` field of its own, is a ``ValueError`` naming the domain (found by collating each domain's
        examples alone when the whole batch fails)."""
        assert self.collate_fn is not None, "collate() is for sets of examples"
        ids = np.asarray(domains, dtype=np.int64).reshape(-1)
        present = list(dict.fromkeys(ids.tolist()))

        def where(ds: Sequence[int]) -> str:
            names = [self.domains[d].name for d in ds]
            return f"domain {names[0]!r}" if len(names) == 1 else f"domains {names}"

        try:
            out = self.collate_fn(items)
        except Exception as exc:
            for d in present:  # which domain's examples does it fail on?
                alone = [items[j] for j in np.flatnonzero(ids == d).tolist()]
                try:
                    self.collate_fn(alone)
                except Exception as inner:
                    raise ValueError(f"{where([d])}: collate_fn failed: {type(inner).__name__}: {inner}") from inner
            raise ValueError(
                f"{where(present)}: collate_fn cannot batch their examples together: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(out, Mapping):
            raise ValueError(
                f"{where(present)}: collate_fn returned a {type(out).__name__}, not a dict: the batch must be a "
                "mapping so that gradmix can add batch['domain']"
            )
        if "domain" in out:
            raise ValueError(
                f"{where(present)}: collate_fn returned a 'domain' field of its own; gradmix sets batch['domain'] to "
                "the domain index: rename that field"
            )
        batch = dict(out)
        batch["domain"] = torch.from_numpy(ids.copy())
        return batch

    def mean_tokens(self, sample: int = 256, seed: int = 0) -> np.ndarray:
        """Mean real tokens per example of each domain (``gradmix.example_sources.count_tokens`` of its collated
        examples), estimated from up to ``sample`` examples per domain: seeded random ones of a map-style domain, the
        first ones of a stream. Token windows: exactly T each. A set whose batches carry no token counts (no
        ``labels`` / ``attention_mask``) is a ``ValueError``."""
        if self.is_windows:
            return np.full(len(self.domains), float(self.window_tokens))
        from gradmix.example_sources import count_tokens

        out = np.zeros(len(self.domains))
        for k, source in enumerate(self.domains):
            assert isinstance(source, ExampleDomain)
            m = min(int(sample), source.size)
            if source.shuffle:
                idx = np.sort(np.random.default_rng([seed, k]).choice(source.size, size=m, replace=False))
            else:
                idx = np.arange(m)
            counts = count_tokens(self.collate(source.examples(idx), np.full(m, k)))
            if counts is None:
                raise ValueError(
                    f"domain {source.name!r}: its batches carry no token counts (no 'labels' or 'attention_mask' "
                    "field), so a mix in tokens cannot be set"
                )
            out[k] = float(counts.double().mean())
            if not out[k] > 0:
                raise ValueError(f"domain {source.name!r}: its examples hold no tokens (mean 0 in {m} examples)")
        return out


class GatheredExamples(Sequence[dict[str, Any]]):
    """A batch read by ``DomainSet.__getitems__``, handed to the DataLoader's ``collate_fn``.

    ``collate_examples`` (the Mixer's default) returns ``batch`` as it is: no per-example objects. Any other
    ``collate_fn`` sees what it always saw: a sequence of the per-example dicts ``DomainSet[(d, i)]`` gives
    (``input_ids`` row, ``domain`` and ``index`` ints), built on access."""

    def __init__(self, batch: dict[Any, Any], items: list[Any] | None = None) -> None:
        self.batch = batch
        self.items = items  # a set of examples: the examples as the datasets gave them

    def __len__(self) -> int:
        return int(self.batch["domain"].shape[0])

    def _example(self, i: int) -> dict[str, Any]:
        if self.items is not None:
            return {"example": self.items[i], "domain": int(self.batch["domain"][i])}
        return {
            "input_ids": self.batch["input_ids"][i],
            "domain": int(self.batch["domain"][i]),
            "index": int(self.batch["index"][i]),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self._example(i) for i in range(len(self)))

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._example(j) for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of a batch of {len(self)}")
        return self._example(i % len(self))


def collate_examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """DataLoader collate for ``DomainSet`` items: stacks windows, keeps domain/index as LongTensors. A batch that
    ``DomainSet.__getitems__`` already gathered is returned as it is (a new dict of the same tensors). In a
    DataLoader worker a small batch leaves by value through the worker's pipe (see ``_PipedBatch``)."""
    if isinstance(examples, GatheredExamples):
        batch = dict(examples.batch)
    else:
        batch = {
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
            "domain": torch.tensor([e["domain"] for e in examples], dtype=torch.long),
            "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        }
    if torch.utils.data.get_worker_info() is not None and _pipeable(batch):
        return _PipedBatch(batch)
    return batch


_NUMPY_DTYPES = frozenset(
    (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    )
)


def _pipeable(batch: Mapping[Any, Any]) -> bool:
    """Small enough for the worker's pipe, and only tensors numpy can carry (a set of examples may hold lists,
    strings or bfloat16)."""
    total = 0
    for value in batch.values():
        if not isinstance(value, torch.Tensor) or value.dtype not in _NUMPY_DTYPES:
            return False
        if value.requires_grad or value.is_sparse or value.device.type != "cpu":
            return False
        total += value.nbytes
    return total <= _PIPE_MAX_BYTES


_PIPE_MAX_BYTES = 1 << 21
"""Batches up to this size leave a DataLoader worker by value (``_PipedBatch``), larger ones through shared memory:
on 2 cores the pipe was 1.3-1.6x ahead up to 2 MiB, about even at 4 MiB and 2-4x behind at 16 MiB."""


def _unpipe(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The main-process side of ``_PipedBatch``: a plain dict of tensors again."""
    return {k: torch.from_numpy(a if a.flags.writeable else a.copy()) for k, a in arrays.items()}


class _PipedBatch(dict):
    """A collated batch leaving a DataLoader worker: pickled by value, so it goes through the worker's pipe in one
    write and arrives as a plain ``dict`` of the same tensors. Left to torch, each storage would be moved to shared
    memory and its file descriptor handed over a socket: for a batch of tens of KB that costs both processes
    several times the copy (issue #20: about 0.25 ms of main-process and 0.25 ms of worker CPU per 66 KB batch,
    nearly half the loader's throughput on 2 cores). Only ``collate_examples`` makes these, only in a worker."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _unpipe, ({k: t.numpy() for k, t in self.items()},)
