"""Domains of examples of any structure: ``DomainSet.from_datasets({name: dataset}, collate_fn=None)``.

A dataset is anything map-style (``__len__`` and ``__getitem__``: a list, a torch ``Dataset``, an HF
``datasets.Dataset``, a tensor) or an iterable (a torch ``IterableDataset``, an HF ``datasets.IterableDataset``, any
re-iterable, or a zero-argument callable returning a fresh iterator). Its examples may be anything: dicts of lists,
tensors or numbers (SFT examples with ``input_ids`` / ``labels``), ``(features, label)`` tuples, images. A batch is
``collate_fn(examples)`` (default ``pad_collate``) as a dict, plus ``batch["domain"]`` (LongTensor of domain indices).

- ``DatasetDomain`` (map-style): read by index, example by example (or through the dataset's ``__getitems__``, which
  torch and HF datasets have). The sampler gives each pass an exact seeded permutation, as for token windows.
- ``IterableDatasetDomain`` (streams): consumed in stream order, never shuffled beyond what the stream does; the
  sampler hands out positions 0, 1, 2, ... of each pass, and that position is its cursor, saved in its checkpoint.
  After a resume the stream is opened again and read (and discarded) up to the saved position, so a resumed run sees
  exactly the examples an uninterrupted one would (cost: one read of the skipped part). A new pass re-opens the
  stream. Under torch.distributed every rank reads the stream and keeps its own share of the positions. Read a
  stream from one process (``mixer.batches()`` or ``num_workers=0``): the read position lives in the object.
  ``size`` (examples per pass) should be given; without it the stream is read once to count.

Token windows (``Domain``, ``TokenFileDomain``, ...) stay the fast kind of ``DomainSet``; in a set of example domains
they take part as examples ``{"input_ids": window, "labels": window}``. Nothing here imports HF ``datasets``: its
objects are used through the protocols above.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from gradmix.sources import DocumentSplitError, DomainSource, ExampleDomain, as_indices, check_domain_name

__all__ = [
    "PAD_VALUES",
    "DatasetDomain",
    "IterableDatasetDomain",
    "WindowExamples",
    "as_example_domain",
    "count_tokens",
    "dataset_kind",
    "pad_collate",
]

PAD_VALUES: dict[str, int] = {"labels": -100, "attention_mask": 0, "position_ids": 0, "seq_lens": 0}
"""Padding per field in ``pad_collate``: ``labels`` -100 (ignored by a cross-entropy loss), masks and positions 0;
``input_ids`` get ``pad_token_id``; any other field 0."""


# -- what a dataset is ----------------------------------------------------------------------------------------------


def dataset_kind(dataset: Any, name: str) -> str:
    """``"map"`` (``__len__`` + ``__getitem__``) or ``"stream"`` (``__iter__``, or a callable returning an iterator);
    anything else is a ``TypeError`` naming the domain."""
    if isinstance(dataset, (str, bytes)):
        raise TypeError(f"domain {name!r}: a dataset must hold examples, got a string")
    if isinstance(dataset, Mapping):
        raise TypeError(
            f"domain {name!r}: got a mapping ({type(dataset).__name__}, keys {sorted(map(str, dataset))[:5]}), not a "
            f"dataset; pick one split, e.g. dataset['train']"
        )
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return "stream"
    cls = type(dataset)
    if hasattr(cls, "__len__") and hasattr(cls, "__getitem__"):
        return "map"
    if hasattr(cls, "__iter__") or callable(dataset):
        return "stream"
    raise TypeError(
        f"domain {name!r}: a {cls.__name__} is not a dataset: it has neither __len__ and __getitem__ (map-style) nor "
        f"__iter__ (iterable)"
    )


def as_example_domain(
    name: str, dataset: Any, *, size: int | None = None, buffer_examples: int = 1024
) -> ExampleDomain:
    """The ``ExampleDomain`` for ``dataset``: itself if it is one, token windows as ``WindowExamples``, a map-style
    dataset as ``DatasetDomain``, an iterable as ``IterableDatasetDomain``."""
    if isinstance(dataset, ExampleDomain):
        return dataset
    if isinstance(dataset, DomainSource):
        if dataset.shuffle:
            return DatasetDomain(name, WindowExamples(dataset))
        return IterableDatasetDomain(name, WindowExamples(dataset), size=dataset.size, buffer_examples=buffer_examples)
    if dataset_kind(dataset, name) == "map":
        if size is not None:
            raise ValueError(f"domain {name!r}: size= is for iterable datasets; a map-style one has len()")
        return DatasetDomain(name, dataset)
    return IterableDatasetDomain(name, dataset, size=size, buffer_examples=buffer_examples)


class WindowExamples:
    """A token-window domain read as examples ``{"input_ids": window, "labels": window}`` (T + 1 tokens each), so it
    can sit in a ``DomainSet`` of example domains. Batched reads go through the domain's ``take``; a stream domain is
    iterated in order."""

    def __init__(self, source: DomainSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return self.source.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        rows = self.source.take(np.asarray(indices, dtype=np.int64))
        return [{"input_ids": row, "labels": row} for row in rows]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        chunk = 256
        for start in range(0, len(self), chunk):
            yield from self.__getitems__(list(range(start, min(start + chunk, len(self)))))


# -- map-style ------------------------------------------------------------------------------------------------------


class DatasetDomain(ExampleDomain):
    """A map-style dataset of examples (``__len__`` + ``__getitem__``): random access, shuffled by the sampler.

    Reads go through the dataset's ``__getitems__`` when it has one (torch and HF datasets do: one call per domain
    and batch), else ``dataset[i]`` per example. Nothing is read or copied up front."""

    shuffle: ClassVar[bool] = True

    def __init__(self, name: str, dataset: Any) -> None:
        self.name = check_domain_name(name)
        if dataset_kind(dataset, name) != "map":
            raise TypeError(f"domain {name!r}: {type(dataset).__name__} is not map-style (__len__ + __getitem__)")
        self.dataset = dataset
        self._size = len(dataset)
        if self._size == 0:
            raise DocumentSplitError(f"domain {name!r}: dataset is empty (0 examples)")
        self._batched = callable(getattr(dataset, "__getitems__", None))

    @property
    def size(self) -> int:
        return self._size

    def examples(self, indices: np.ndarray) -> list[Any]:
        rows = as_indices(indices, self._size, self.name)
        keys = rows.tolist()
        if self._batched and keys:
            items = list(self.dataset.__getitems__(keys))
            if len(items) != len(keys):
                raise ValueError(
                    f"domain {self.name!r}: dataset.__getitems__ returned {len(items)} examples for {len(keys)} indices"
                )
            return items
        return [self.dataset[i] for i in keys]

    def __repr__(self) -> str:
        return f"DatasetDomain({self.name!r}, {type(self.dataset).__name__}, size={self._size})"


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and bool(value >= 1)


# -- iterable -------------------------------------------------------------------------------------------------------


class IterableDatasetDomain(ExampleDomain):
    """An iterable dataset of examples, consumed in stream order (see the module docstring for sampling and resume).

    ``iterable``: a torch ``IterableDataset``, an HF ``datasets.IterableDataset``, any re-iterable (``iter()`` starts
    over each time), or a zero-argument callable returning a fresh iterator. A one-shot iterator or generator is
    refused: it cannot be read again for a second pass or a resume. ``size``: examples per pass (None: the stream is
    read once, on first use of ``size``, to count them); a stream that ends before ``size`` examples is an error
    naming the domain, examples past ``size`` are never read. The last ``buffer_examples`` examples read are kept, so
    a small step back (a DataLoader prefetch rollback, another rank's interleaved positions) is free; a jump further
    back re-opens the stream (``reopens`` counts how often)."""

    shuffle: ClassVar[bool] = False

    def __init__(self, name: str, iterable: Any, size: int | None = None, *, buffer_examples: int = 1024) -> None:
        self.name = check_domain_name(name)
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
            raise ValueError(f"domain {name!r}: size must be a positive integer (examples per pass) or None: {size!r}")
        if not _positive_int(buffer_examples):
            raise ValueError(f"domain {name!r}: buffer_examples must be an integer >= 1, got {buffer_examples!r}")
        if hasattr(iterable, "__iter__"):
            try:
                one_shot = iter(iterable) is iterable
            except TypeError:
                one_shot = False
            if one_shot:
                raise TypeError(
                    f"domain {name!r}: a one-shot iterator/generator cannot be re-read for a second pass or a resume; "
                    f"pass a re-iterable (list, IterableDataset) or a callable returning a fresh iterator"
                )
            self._open: Callable[[], Iterator[Any]] = iterable.__iter__
        elif callable(iterable):
            self._open = iterable
        else:
            dataset_kind(iterable, name)  # raises, naming the domain
            raise TypeError(f"domain {name!r}: {type(iterable).__name__} is not iterable")
        self.iterable = iterable
        self._size = None if size is None else int(size)
        self._cap = int(buffer_examples)
        self.reopens = 0
        self._ring: list[Any] = [None] * self._cap  # example j of the pass sits in slot j % buffer_examples
        self._reset()

    def _reset(self) -> None:
        self._it: Iterator[Any] | None = None
        self._pos = 0  # examples read from the current iterator

    @property
    def size(self) -> int:
        if self._size is None:
            count = sum(1 for _ in self._open())
            if count == 0:
                raise DocumentSplitError(f"domain {self.name!r}: the stream is empty (0 examples)")
            self._size = count
        return self._size

    def examples(self, indices: np.ndarray) -> list[Any]:
        positions = as_indices(indices, self.size, self.name)
        return [self._at(int(p)) for p in positions]

    def _at(self, position: int) -> Any:
        if position < self._pos - min(self._pos, self._cap):  # fell out of the buffer: start the stream over
            self._reset()
        while self._pos <= position:
            if self._it is None:
                self._it = iter(self._open())
                self.reopens += 1
            try:
                item = next(self._it)
            except StopIteration:
                if self._pos == 0:
                    raise DocumentSplitError(f"domain {self.name!r}: the stream is empty (0 examples)") from None
                raise DocumentSplitError(
                    f"domain {self.name!r}: the stream ended after {self._pos} examples; its size is {self.size} "
                    f"(pass the true size, or size=None to count)"
                ) from None
            self._ring[self._pos % self._cap] = item
            self._pos += 1
        return self._ring[position % self._cap]

    def __getstate__(self) -> dict[str, Any]:
        """A copy (a DataLoader worker) starts over at position 0: live iterators do not pickle."""
        state = self.__dict__.copy()
        state.update(_it=None, _pos=0, _ring=[None] * self._cap)
        return state

    def __repr__(self) -> str:
        return f"IterableDatasetDomain({self.name!r}, size={self._size}, position={self._pos})"


# -- batching -------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (bool, int, float, np.number, np.bool_)) or (
        isinstance(value, torch.Tensor) and value.dim() == 0
    )


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return torch.as_tensor(value)


def _collate_field(key: Any, values: list[Any], pad_token_id: int, pad_values: Mapping[str, int]) -> tuple[Any, Any]:
    """One field over the batch -> (collated value, lengths of a padded 1-D field or None)."""
    first = values[0]
    if all(v is None for v in values):
        return list(values), None
    if isinstance(first, Mapping):
        if not all(isinstance(v, Mapping) for v in values):
            raise ValueError(f"field {key!r} is a mapping in some examples and not in others")
        return pad_collate(values, pad_token_id=pad_token_id, pad_values=pad_values), None
    if isinstance(first, (str, bytes)) or not all(
        _is_number(v) or isinstance(v, (torch.Tensor, np.ndarray, list, tuple)) for v in values
    ):
        return list(values), None  # text, ids, objects: passed on as a list
    if isinstance(first, (list, tuple)) and any(isinstance(x, (str, bytes)) for x in first):
        return list(values), None  # lists of strings (tokens as text, tags)
    try:
        tensors = [_as_tensor(v) for v in values]
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"field {key!r}: cannot make a tensor of {type(first).__name__} values: {exc}") from exc
    nonempty = [t for t in tensors if t.numel()]
    dtype = nonempty[0].dtype if nonempty else torch.long
    for t in nonempty[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    tensors = [t.to(dtype) for t in tensors]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) == 1:
        lengths = [int(t.shape[0]) for t in tensors] if tensors[0].dim() == 1 else None
        return torch.stack(tensors), lengths
    if all(t.dim() == 1 for t in tensors):
        lengths = [int(t.shape[0]) for t in tensors]
        pad = pad_token_id if key == "input_ids" else pad_values.get(str(key), 0)
        out = torch.full((len(tensors), max(lengths)), pad, dtype=dtype)
        for i, t in enumerate(tensors):
            out[i, : t.shape[0]] = t
        return out, lengths
    a, b = sorted(shapes)[:2]
    raise ValueError(
        f"field {key!r}: examples have shapes {a} and {b}; only 1-D sequences are padded: pass a collate_fn"
    )


def pad_collate(
    examples: Sequence[Any], *, pad_token_id: int = 0, pad_values: Mapping[str, int] | None = None
) -> dict[Any, Any]:
    """The default ``collate_fn`` of ``DomainSet.from_datasets``: examples of any structure -> one dict batch.

    - dict examples -> a dict with the same keys (every example must have the same keys); tuple examples -> a dict
      with keys 0, 1, ...; any other example -> ``{0: batch}``;
    - numbers -> a tensor (n,); tensors / arrays / lists of equal shape -> stacked; 1-D sequences of different
      lengths (``input_ids``, ``labels``, ``attention_mask``, any integer or float list) -> right-padded to the
      longest: ``input_ids`` with ``pad_token_id``, ``labels`` with -100, others as ``PAD_VALUES`` says (0 by
      default); nested dicts are collated the same way; strings and other objects stay lists;
    - when the examples have ``input_ids`` and no ``attention_mask``, ``attention_mask`` (n, L) is added: 1 on each
      example's tokens, 0 on its padding. Padding is on the right, so with causal attention no real token ever sees a
      padded one; the mask is what a bidirectional model needs. Labels are never invented: without ``labels`` a loss
      decides what to predict (``gradmix.sft.causal_lm_loss`` uses ``input_ids`` where ``attention_mask`` is 1).

    Packed rows (``gradmix.sft.PackedDataset``) carry ``position_ids`` (reset to 0 at every packed example) and
    ``seq_lens`` (lengths of the packed examples, padded with 0): see ``gradmix.sft`` for the attention they need.
    Use ``functools.partial(pad_collate, pad_token_id=...)`` for another padding id.
    """
    if len(examples) == 0:
        raise ValueError("pad_collate got no examples")
    pads = {**PAD_VALUES, **dict(pad_values or {})}
    first = examples[0]
    if isinstance(first, Mapping):
        keys = list(first)
        for e in examples:
            if not isinstance(e, Mapping):
                raise ValueError(f"examples mix dicts and {type(e).__name__}s")
            if len(e) != len(keys) or any(k not in e for k in keys):
                missing = sorted(map(str, set(keys) - set(e)))
                extra = sorted(map(str, set(e) - set(keys)))
                raise ValueError(
                    f"examples have different fields: one lacks {missing} / has extra {extra} (fields {keys})"
                )
        fields: list[Any] = keys
        columns = [[e[k] for e in examples] for k in keys]
    elif isinstance(first, tuple):
        width = len(first)
        if not all(isinstance(e, tuple) and len(e) == width for e in examples):
            raise ValueError(f"tuple examples of different lengths (the first has {width} parts)")
        fields = list(range(width))
        columns = [[e[j] for e in examples] for j in range(width)]
    else:
        fields, columns = [0], [list(examples)]
    batch: dict[Any, Any] = {}
    lengths: dict[Any, Any] = {}
    for key, values in zip(fields, columns):
        batch[key], lengths[key] = _collate_field(key, values, pad_token_id, pads)
    ids = batch.get("input_ids")
    if (
        isinstance(first, Mapping)
        and "attention_mask" not in batch
        and isinstance(ids, torch.Tensor)
        and ids.dim() == 2
        and lengths.get("input_ids") is not None
    ):
        n_tokens = torch.tensor(lengths["input_ids"])
        batch["attention_mask"] = (torch.arange(ids.shape[1])[None, :] < n_tokens[:, None]).long()
    return batch


def count_tokens(batch: Mapping[Any, Any]) -> torch.Tensor | None:
    """Real tokens per example of a collated batch (LongTensor (n,)), or None when the batch does not say.

    - ``labels`` (n, L) integer: ``labels[:, 1:] != -100`` - the tokens a causal LM loss is trained on (HF convention:
      labels aligned with ``input_ids``, the shift happens in the loss), so padding, masked prompts and packed
      examples' first tokens are not counted; for token windows (``input_ids`` = ``labels`` = T + 1 tokens) this is T,
      as the window path counts;
    - else ``attention_mask`` (n, L): its sum (real, unpadded tokens);
    - else None (features, images: the ``tokens`` KPI is not reported).
    """
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and not labels.is_floating_point():
        return (labels[:, 1:] != -100).sum(dim=1)
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return (mask != 0).sum(dim=1)
    return None
