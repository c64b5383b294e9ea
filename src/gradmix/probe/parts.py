"""How a batch is cut into per-group parts (the micro-batch and sharded probes' micro-passes)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["chunk_size", "slice_batch", "split_indices"]


def split_indices(groups: torch.Tensor, num_groups: int, num_splits: int) -> list[list[torch.Tensor]]:
    """Per group, the batch positions of its parts: the group's positions in batch order cut into
    ``min(num_splits, n_k)`` contiguous chunks whose sizes differ by at most one (larger chunks first).

    The split ignores the data, so parts of i.i.d. examples are independent - all the estimators need.
    """
    groups_cpu = groups.detach().to("cpu", torch.long).reshape(-1)
    order = torch.argsort(groups_cpu, stable=True)
    counts = torch.bincount(groups_cpu, minlength=num_groups).tolist()
    parts: list[list[torch.Tensor]] = []
    start = 0
    for count in counts[:num_groups]:
        members = order[start : start + count]
        start += count
        parts.append(list(torch.tensor_split(members, min(num_splits, count))) if count else [])
    return parts


def chunk_size(n: int, parts: int, j: int) -> int:
    """Size of chunk j when ``torch.tensor_split`` (and so ``split_indices``) cuts n items into ``parts`` chunks."""
    return n // parts + (1 if j < n % parts else 0)


def slice_batch(batch: Mapping[str, torch.Tensor], index: torch.Tensor, n: int) -> dict:
    """Rows ``index`` of every tensor with leading dimension n; everything else passes through unchanged."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value.index_select(0, index.to(value.device))
        else:
            out[key] = value
    return out
