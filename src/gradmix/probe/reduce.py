"""What the probes reduce across ranks: per-group scalars in one all-reduce, and DDP-style gradient averaging."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["BUCKET_BYTES", "all_reduce_rows", "average_gradients", "distributed_active", "rank_and_world"]

BUCKET_BYTES = 32 * 1024 * 1024  # gradient all-reduce bucket size: one collective per ~32 MB, like DDP's 25 MB


def distributed_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world(process_group: Any = None) -> tuple[int, int]:
    """(rank, world size) in ``process_group``; (0, 1) without torch.distributed."""
    if distributed_active():
        return dist.get_rank(process_group), dist.get_world_size(process_group)
    return 0, 1


def all_reduce_rows(
    rows: Sequence[np.ndarray], device: torch.device, process_group: Any, distributed: bool
) -> np.ndarray:
    """Rows of per-group scalars summed over ranks in one float64 all-reduce: an array of shape (len(rows), G)."""
    flat = torch.tensor(np.concatenate(rows), dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(flat, group=process_group)
    return flat.cpu().numpy().reshape(len(rows), -1)


def average_gradients(module: nn.Module, world: int, device: torch.device, process_group: Any = None) -> None:
    """All-reduce-average every trainable parameter's ``.grad`` (bucketed), as DDP would."""
    params = [p for p in module.parameters() if p.requires_grad]
    if any(p.grad is not None and p.grad.is_sparse for p in params):
        raise NotImplementedError("gradmix cannot average sparse gradients")
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has_grad, group=process_group)
    with torch.no_grad():
        for p, flag in zip(params, has_grad.tolist()):
            if flag > 0 and p.grad is None:
                p.grad = torch.zeros_like(p)  # another rank has a gradient here: contribute zero
        grads = [p.grad for p in params if p.grad is not None]
        buckets: list[list[torch.Tensor]] = []
        size = 0
        for grad in grads:
            if (
                not buckets
                or size + grad.numel() * grad.element_size() > BUCKET_BYTES
                or buckets[-1][0].dtype != grad.dtype
                or buckets[-1][0].device != grad.device
            ):
                buckets.append([])
                size = 0
            buckets[-1].append(grad)
            size += grad.numel() * grad.element_size()
        for bucket in buckets:
            flat = torch.cat([grad.reshape(-1) for grad in bucket])
            dist.all_reduce(flat, group=process_group)
            flat.div_(world)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
