"""Supervised fine-tuning with gradmix: the per-example loss of a causal LM, and packing within a domain.

Examples are dicts with ``input_ids`` and, for SFT, ``labels`` of the same length with -100 on the tokens that are not
trained on (the prompt); ``DomainSet.from_datasets`` batches them with ``pad_collate`` (right padding, ``labels``
-100 on padding, an ``attention_mask``) and ``causal_lm_loss`` gives the Mixer one loss per example::

    domains = DomainSet.from_datasets({"chat": chat_ds, "code": code_ds})           # or pack=True, max_length=2048
    mixer = Mixer(domains, "pike", batch_size=32, model=model)
    for batch in mixer.batches(steps):
        mixer.backward(model, batch, causal_lm_loss)

Packing (``PackedDataset`` / ``PackedIterable``, or ``from_datasets(pack=True, max_length=L)``) concatenates the
examples of ONE dataset, in order, into rows of at most L tokens: a packed row never mixes domains, so the per-domain
statistics stay valid (a packed row is then the sampler's and the probe's "example"). In a row, ``position_ids``
restart at 0 for every packed example, ``seq_lens`` lists the examples' lengths, and ``labels`` is -100 on each
example's first token, so the shifted loss never predicts one example's first token from the one before.

Attention in packed rows. A model that honours ``position_ids`` the way recent HF transformers does (its
``masking_utils``, tested with 5.x: Llama, Qwen, Mistral, ... given no ``attention_mask`` and no cache) detects the
restarts and attends block-causally, within each packed example only, whatever its attention implementation;
``causal_lm_loss`` calls it that way (``position_ids``, ``use_cache=False``, no ``attention_mask``). A model that
ignores ``position_ids`` would let each packed example see the ones before it in its row: give it
``block_causal_mask(batch["position_ids"])`` as its attention mask. The default collate's ``attention_mask`` only
marks padding: with right padding and causal attention no real token sees a padded one, so unpacked padded batches
need nothing more.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gradmix.example_sources import dataset_kind

__all__ = [
    "REDUCTIONS",
    "PackedDataset",
    "PackedIterable",
    "block_causal_mask",
    "causal_lm_loss",
    "pack_dataset",
    "sequence_losses",
]

REDUCTIONS = ("mean", "sum", "token")


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-example next-token losses (n,) from ``logits`` (n, L, V) and ``labels`` (n, L) aligned with the inputs
    (position t predicts ``labels[:, t + 1]``; -100 = not trained on).

    reduction:
        ``"mean"`` (default): each example's mean over its trained tokens. Every example weighs the same, whatever its
            length: the unit the Mixer samples, counts and averages in (the step's loss is the mean over examples),
            and the one the probe's per-example statistics (||grad L_k||^2, sigma_k^2) are unbiased for, since one
            example's loss does not depend on the others in its batch.
        ``"sum"``: each example's summed token loss; long examples weigh more (the step's gradient grows with length).
        ``"token"``: each example's summed loss times n / (trained tokens in the batch), so the mean over the batch is
            the token-weighted mean (sum over all tokens / all tokens), as in a plain token-level cross-entropy. The
            normaliser is the (micro-)batch's, on this rank: one example's loss then depends on the others, so the
            probe's statistics are those of a batch-dependent loss - exact for this batch, not i.i.d. per example.
    An example with no trained token has loss 0 (and no gradient) under every reduction.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"need logits (n, L, V) and labels (n, L), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    mask = targets != -100
    per_example = (token_loss * mask).sum(dim=1)
    if reduction == "sum":
        return per_example
    counts = mask.sum(dim=1)
    if reduction == "mean":
        return per_example / counts.clamp(min=1)
    return per_example * (labels.shape[0] / counts.sum().clamp(min=1))


def causal_lm_loss(model: torch.nn.Module, batch: Mapping[Any, Any], *, reduction: str = "mean") -> torch.Tensor:
    """The per-example loss of causal LM training / SFT on a collated batch: ``loss_fn`` for ``Mixer.backward``.

    Calls ``model(input_ids=..., ...)`` (an HF ``*ForCausalLM`` or any model returning logits or an object with
    ``.logits``): with ``position_ids`` when the batch has them, with ``attention_mask`` unless the batch is packed
    (``seq_lens`` present: the model must see the ``position_ids`` restarts, see the module docstring), and
    ``use_cache=False`` for models with a ``config.use_cache``. Targets are ``labels`` (-100 = not trained on), or,
    without labels, ``input_ids`` where ``attention_mask`` is 1. See ``sequence_losses`` for ``reduction``
    (default ``"mean"``: the mean over each example's trained tokens)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    kwargs: dict[str, Any] = {}
    packed = "seq_lens" in batch
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    if mask is not None and not packed:
        kwargs["attention_mask"] = mask
    config = getattr(getattr(model, "module", model), "config", None)
    if getattr(config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    out = model(input_ids=ids, **kwargs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return sequence_losses(logits, labels, reduction)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(n, L, L) bool, True where query t may attend key s: s <= t and both in the same packed example (a new example
    starts wherever ``position_ids`` does not go up by one; right padding with position 0 makes each pad its own
    example). For models that ignore ``position_ids``; add a head dimension (``[:, None]``) for 4-D masks."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (n, L), got {tuple(position_ids.shape)}")
    first = position_ids[:, :1] - 1
    doc = (torch.diff(position_ids, prepend=first, dim=1) != 1).cumsum(dim=1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (doc[:, :, None] == doc[:, None, :]) & causal


# -- packing --------------------------------------------------------------------------------------------------------


def _tokens(example: Any, name: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(input_ids, labels) of one example, cut to ``max_length``; and whether it was cut."""
    if not isinstance(example, Mapping) or "input_ids" not in example:
        got = sorted(map(str, example)) if isinstance(example, Mapping) else type(example).__name__
        raise ValueError(f"domain {name!r}: packing needs examples with an 'input_ids' field, got {got}")
    ids = torch.as_tensor(np.asarray(example["input_ids"])).reshape(-1).long()
    raw = example.get("labels")
    labels = ids.clone() if raw is None else torch.as_tensor(np.asarray(raw)).reshape(-1).long()
    if labels.shape != ids.shape:
        raise ValueError(
            f"domain {name!r}: an example has {ids.numel()} input_ids but {labels.numel()} labels; packing needs one "
            "label per token"
        )
    cut = ids.numel() > max_length
    return ids[:max_length], labels[:max_length], cut


def _pack_row(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    labels = []
    for _, lab in parts:
        lab = lab.clone()
        lab[0] = -100  # the first token of an example is never predicted from the example before it
        labels.append(lab)
    return {
        "input_ids": torch.cat([ids for ids, _ in parts]),
        "labels": torch.cat(labels),
        "position_ids": torch.cat([torch.arange(ids.numel()) for ids, _ in parts]),
        "seq_lens": torch.tensor([ids.numel() for ids, _ in parts], dtype=torch.long),
    }


def _warn_cut(name: str, cut: int, max_length: int) -> None:
    if cut:
        warnings.warn(
            f"domain {name!r}: {cut} example(s) longer than max_length={max_length} tokens were cut to it",
            UserWarning,
            stacklevel=3,
        )


class PackedDataset:
    """A map-style dataset's examples packed greedily, in dataset order, into rows of at most ``max_length`` tokens.

    Examples are dicts with ``input_ids`` and optional ``labels`` (other fields are dropped); a longer example is cut
    to ``max_length`` (with one warning), an empty one is skipped. Row r is a dict ``input_ids``, ``labels`` (-100 on
    each packed example's first token), ``position_ids`` (restarting at 0 per example) and ``seq_lens``. Building
    reads every example once to learn its length (the row boundaries are kept: O(rows) memory); a row is read when
    asked. The sampler then shuffles rows, not examples: examples that are neighbours in the dataset share rows."""

    def __init__(self, dataset: Any, max_length: int, *, name: str = "dataset") -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"domain {name!r}: max_length must be an integer >= 1, got {max_length!r}")
        if dataset_kind(dataset, name) != "map":
            raise TypeError(f"domain {name!r}: PackedDataset needs a map-style dataset (PackedIterable: a stream)")
        self.dataset, self.max_length, self.name = dataset, int(max_length), name
        starts: list[int] = []
        kept: list[int] = []  # index of every non-empty example, in order
        used, cut = self.max_length, 0
        for i in range(len(dataset)):
            ids, _, was_cut = _tokens(dataset[i], name, self.max_length)
            cut += was_cut
            if ids.numel() == 0:
                continue
            if used + ids.numel() > self.max_length:
                starts.append(len(kept))
                used = 0
            kept.append(i)
            used += ids.numel()
        _warn_cut(name, cut, self.max_length)
        self.truncated = cut
        self._examples = np.asarray(kept, dtype=np.int64)
        self._starts = np.asarray([*starts, len(kept)], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._starts.size - 1)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= row < len(self):
            raise IndexError(f"packed row {row} of {len(self)}")
        row %= len(self)
        members = self._examples[self._starts[row] : self._starts[row + 1]].tolist()
        return _pack_row([_tokens(self.dataset[i], self.name, self.max_length)[:2] for i in members])

    def __repr__(self) -> str:
        return (
            f"PackedDataset({self.name!r}, rows={len(self)}, examples={self._examples.size}, "
            f"max_length={self.max_length})"
        )


class PackedIterable:
    """An iterable dataset's examples packed greedily, in stream order, into rows of at most ``max_length`` tokens
    (the same rows as ``PackedDataset``; see there). Re-iterable when the stream is; the number of rows is known only
    by reading the stream (``from_datasets`` counts them unless ``sizes`` gives it)."""

    def __init__(self, iterable: Any, max_length: int, *, name: str = "dataset") -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"domain {name!r}: max_length must be an integer >= 1, got {max_length!r}")
        if hasattr(iterable, "__iter__"):
            self._open: Callable[[], Iterator[Any]] = iterable.__iter__
        elif callable(iterable):
            self._open = iterable
        else:
            raise TypeError(f"domain {name!r}: PackedIterable needs an iterable, got {type(iterable).__name__}")
        self.iterable, self.max_length, self.name = iterable, int(max_length), name

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        row: list[tuple[torch.Tensor, torch.Tensor]] = []
        used, cut = 0, 0
        for example in self._open():
            ids, labels, was_cut = _tokens(example, self.name, self.max_length)
            cut += was_cut
            if ids.numel() == 0:
                continue
            if row and used + ids.numel() > self.max_length:
                yield _pack_row(row)
                row, used = [], 0
            row.append((ids, labels))
            used += ids.numel()
        if row:
            yield _pack_row(row)
        _warn_cut(self.name, cut, self.max_length)


def pack_dataset(dataset: Any, max_length: int, *, name: str = "dataset") -> PackedDataset | PackedIterable:
    """``PackedDataset`` for a map-style dataset, ``PackedIterable`` for an iterable one."""
    if dataset_kind(dataset, name) == "map":
        return PackedDataset(dataset, max_length, name=name)
    return PackedIterable(dataset, max_length, name=name)
