"""The loss divisor of a (micro-)batch and the backward-scale anchor.

Every backward goes through the caller's ``backward_fn``, which may multiply the loss by a constant (a GradScaler's
scale, accelerate's 1/accumulation). The probes measure that factor on a zero-valued anchor added to the loss (its
gradient is the factor) and divide it out, so statistics always describe the unscaled loss.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from gradmix.probe.checks import check_inputs
from gradmix.probe.protocol import BackwardFn
from gradmix.probe.reduce import distributed_active

__all__ = [
    "CallSetup",
    "anchor_for",
    "default_backward",
    "loss_divisor",
    "run_backward",
    "scale_of",
    "setup_call",
    "usable_scale",
]


def default_backward(loss: torch.Tensor) -> None:
    """The backward a probe runs when the caller gives no ``backward_fn``."""
    loss.backward()


def loss_divisor(n: int, global_batch_size: int | None, world: int) -> float:
    """The divisor of a call's loss sum: n (the local mean, which DDP's averaging turns into the global mean), or
    ``global_batch_size / world`` when given (unequal shares, accumulation)."""
    if global_batch_size is None:
        return float(n)
    if isinstance(global_batch_size, bool) or not global_batch_size > 0:
        raise ValueError(f"global_batch_size must be a positive number, got {global_batch_size!r}")
    return float(global_batch_size) / world


def anchor_for(loss: torch.Tensor) -> torch.Tensor:
    """A zero scalar leaf to add to ``loss``: after the backward its gradient is the factor the backward applied."""
    return torch.zeros((), dtype=loss.dtype, device=loss.device, requires_grad=True)


def scale_of(grad: torch.Tensor | None) -> float:
    """The backward's factor read from the anchor's gradient (NaN when the backward never reached it)."""
    return float(grad) if grad is not None else float("nan")


def usable_scale(scale: float) -> bool:
    """A factor the statistics can be divided by."""
    return math.isfinite(scale) and scale != 0.0


def run_backward(loss: torch.Tensor, run: BackwardFn) -> float:
    """``run(loss + anchor)``; returns the factor ``run`` applied to the loss (1.0 for the default backward)."""
    if run is default_backward:
        loss.backward()
        return 1.0
    anchor = anchor_for(loss)
    run(loss + anchor)
    return scale_of(anchor.grad)


class CallSetup(NamedTuple):
    """What one ``backward`` call works with: n examples, whether torch.distributed is active, the world size, the
    loss divisor and the backward to run."""

    n: int
    distributed: bool
    world: int
    divisor: float
    run: BackwardFn


def setup_call(
    batch: Any,
    groups: Any,
    num_groups: Any,
    global_batch_size: int | None,
    backward_fn: BackwardFn | None,
    process_group: Any,
) -> CallSetup:
    """Check a ``backward`` call's inputs and work out its divisor and backward (every probe starts a call here)."""
    n = check_inputs(batch, groups, num_groups)
    distributed = distributed_active()
    world = dist.get_world_size(process_group) if distributed else 1
    divisor = loss_divisor(n, global_batch_size, world)
    run = backward_fn if backward_fn is not None else default_backward
    return CallSetup(n, distributed, world, divisor, run)
