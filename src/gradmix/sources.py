"""Named data domains: texts, text files/folders, token sequences or arrays, packed into fixed-length windows.

A domain is a tensor of token windows of shape (n, T + 1): inputs are ``[:, :-1]`` and next-token targets
``[:, 1:]``. Consecutive windows overlap by one token so every token of the packed stream is predicted exactly once.
``DomainSet`` is a map-style torch Dataset addressed by the ``(domain_index, example_index)`` pairs the
``MixtureSampler`` yields, so it drops straight into a ``DataLoader(batch_sampler=...)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "Domain",
    "DomainSet",
    "DocumentSplitError",
    "pack_tokens",
    "read_documents",
    "collate_examples",
]

DOC_SEPARATOR = "<|doc|>"

Tokenize = Union[Callable[[list[str]], list[list[int]]], Any]


class DocumentSplitError(ValueError):
    """A domain cannot be built (empty, too short, unreadable)."""


def _encode(tokenizer: Tokenize, texts: list[str]) -> list[list[int]]:
    """Encode with a HF ``tokenizers.Tokenizer`` (``encode_batch``) or any callable texts -> token id lists."""
    if hasattr(tokenizer, "encode_batch"):
        return [enc.ids for enc in tokenizer.encode_batch(texts)]
    if callable(tokenizer):
        return [list(ids) for ids in tokenizer(texts)]
    raise TypeError("tokenizer must be a tokenizers.Tokenizer or a callable list[str] -> list[list[int]]")


def pack_tokens(sequences: Iterable[Sequence[int]], window: int, *, separator: int | None = None,
                name: str = "domain") -> torch.Tensor:
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


def read_documents(path: str | Path) -> list[str]:
    """Documents of a text source: ``.jsonl`` ({"text": ...} per line), ``.txt`` (split on lines holding only
    ``<|doc|>`` if present, else on blank lines), or a folder of those (files in sorted order)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text source {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise DocumentSplitError(f"folder {str(path)!r} holds no .txt or .jsonl files")
        docs: list[str] = []
        for f in files:
            docs.extend(read_documents(f))
        return docs
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
                if text.strip():
                    docs.append(text)
        return docs
    text = path.read_text(encoding="utf-8")
    if any(line.strip() == DOC_SEPARATOR for line in text.splitlines()):
        parts = [p.strip("\n") for p in text.split(f"\n{DOC_SEPARATOR}\n")]
        parts = [p.replace(DOC_SEPARATOR, "") for p in parts]
    else:
        parts = [p.strip() for p in text.split("\n\n")]
    return [p for p in parts if p.strip()]


@dataclass
class Domain:
    """One named source of examples: ``windows`` has shape (num_examples, window + 1)."""

    name: str
    windows: torch.Tensor
    num_documents: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"domain name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.windows, torch.Tensor):
            self.windows = torch.as_tensor(np.asarray(self.windows))
        if self.windows.dim() != 2:
            raise ValueError(f"domain {self.name!r}: windows must be 2-D (examples, tokens), got {tuple(self.windows.shape)}")
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


class DomainSet(Dataset):
    """The named domains of one run; ``dataset[(d, i)]`` is example i of domain d."""

    def __init__(self, domains: Sequence[Domain]) -> None:
        domains = list(domains)
        if not domains:
            raise ValueError("a DomainSet needs at least one domain")
        names = [d.name for d in domains]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate domain names: {dupes}")
        widths = {d.windows.shape[1] for d in domains}
        if len(widths) > 1:
            raise ValueError(f"domains have different window lengths: { {d.name: d.windows.shape[1] for d in domains} }")
        self.domains = domains

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: Mapping[str, Sequence[str] | str], tokenizer: Tokenize, window: int,
                   *, separator: int | None = None) -> "DomainSet":
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
    def from_token_sequences(cls, sequences: Mapping[str, Sequence[Sequence[int]]], window: int,
                             *, separator: int | None = None) -> "DomainSet":
        return cls([Domain(name, pack_tokens(seqs, window, separator=separator, name=name), len(seqs))
                    for name, seqs in sequences.items()])

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "DomainSet":
        """Pre-windowed numpy/torch arrays of shape (n, T + 1) per domain."""
        return cls([Domain(name, torch.as_tensor(np.asarray(arr))) for name, arr in arrays.items()])

    @classmethod
    def from_paths(cls, paths: Mapping[str, str | Path], tokenizer: Tokenize, window: int,
                   *, separator: int | None = None) -> "DomainSet":
        """Text files or folders (see ``read_documents``), one per domain."""
        return cls.from_texts({name: read_documents(p) for name, p in paths.items()}, tokenizer, window,
                              separator=separator)

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
    def window_tokens(self) -> int:
        return self.domains[0].window_tokens

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        domain, index = key
        return {"input_ids": self.domains[domain].windows[index], "domain": int(domain), "index": int(index)}

    def get_batch(self, pairs: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Gather a whole batch without per-example Python objects (fast path for the plain loop)."""
        pairs_arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        return self.gather(pairs_arr[:, 0], pairs_arr[:, 1])

    def gather(self, domains: np.ndarray, examples: np.ndarray) -> dict[str, torch.Tensor]:
        rows = torch.empty((len(domains), self.window_tokens + 1), dtype=torch.long)
        for d in np.unique(domains):
            mask = domains == d
            rows[torch.from_numpy(np.flatnonzero(mask))] = self.domains[int(d)].windows[torch.from_numpy(examples[mask])]
        return {"input_ids": rows, "domain": torch.from_numpy(np.asarray(domains, dtype=np.int64)),
                "index": torch.from_numpy(np.asarray(examples, dtype=np.int64))}


def collate_examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """DataLoader collate for ``DomainSet`` items: stacks windows, keeps domain/index as LongTensors."""
    return {
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "domain": torch.tensor([e["domain"] for e in examples], dtype=torch.long),
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
    }
