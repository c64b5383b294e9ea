"""Input checks every probe makes: its settings, the batch and group ids, and what the loss function returns."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from gradmix.probe.protocol import LossFn

__all__ = ["check_inputs", "check_settings", "per_example_losses", "target_losses"]


def check_settings(model: Any, num_splits: Any, eps: Any, preconditioner: Any) -> float:
    """Validate the settings all probes share; returns ``eps`` as a float."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)) or num_splits < 2:
        raise ValueError(f"num_splits must be an integer >= 2 (two parts per group at least), got {num_splits!r}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if preconditioner is not None and not isinstance(preconditioner, torch.optim.Optimizer):
        raise TypeError(
            f"preconditioner must be a torch.optim.Optimizer (Adam/AdamW), got {type(preconditioner).__name__}"
        )
    return eps


def check_inputs(batch: Any, groups: Any, num_groups: Any) -> int:
    """Validate one ``backward`` call's batch and group ids; returns the number of examples n."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of tensors, got {type(batch).__name__}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    if not isinstance(groups, torch.Tensor) or groups.dim() != 1:
        raise ValueError(
            f"groups must be a 1-D tensor of group ids, got {getattr(groups, 'shape', type(groups).__name__)}"
        )
    if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
        raise ValueError(f"groups must hold integer group ids, got dtype {groups.dtype}")
    n = int(groups.shape[0])
    if n == 0:
        raise ValueError("empty batch: groups has no entries")
    low, high = int(groups.min()), int(groups.max())
    if low < 0 or high >= num_groups:
        bad = low if low < 0 else high
        raise ValueError(f"groups contains id {bad}, outside 0..{num_groups - 1} (num_groups={num_groups})")
    if not any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n for v in batch.values()):
        raise ValueError(
            f"no tensor in the batch has leading dimension {n} (= len(groups)); keys: {sorted(map(str, batch.keys()))}"
        )
    return n


def per_example_losses(loss_fn: LossFn, model: nn.Module, batch: Mapping, n: int, what: str) -> torch.Tensor:
    """``loss_fn(model, batch)``, checked to be n floating-point per-example losses."""
    losses = loss_fn(model, batch)
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n,):
        raise ValueError(
            f"loss_fn must return one loss per example, shape ({n},) for {what}, got "
            f"{getattr(losses, 'shape', type(losses).__name__)}"
        )
    if not losses.dtype.is_floating_point:
        raise ValueError(f"loss_fn returned dtype {losses.dtype} for {what}; losses must be floating point")
    return losses


def target_losses(loss_fn: LossFn, module: nn.Module, target_batch: Any) -> torch.Tensor:
    """``loss_fn(module, target_batch)``, checked to be per-example losses that depend on a trainable parameter."""
    if not isinstance(target_batch, Mapping):
        raise TypeError(f"target_batch must be a mapping of tensors, got {type(target_batch).__name__}")
    losses = loss_fn(module, target_batch)
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.shape[0] == 0:
        raise ValueError(
            f"loss_fn must return per-example losses of shape (n,) for the target batch, got "
            f"{getattr(losses, 'shape', type(losses).__name__)}"
        )
    if not losses.requires_grad:
        raise ValueError("the target batch's loss does not depend on any trainable parameter")
    return losses
