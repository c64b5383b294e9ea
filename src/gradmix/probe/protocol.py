"""What a probe is to the rest of the library: the ``Probe`` protocol and the types of its one ``backward``.

The Mixer, the core's callers and the integrations talk to a probe through this interface only; which class stands
behind it (micro-batch, fused or sharded) is ``make_probe``'s business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from gradmix.stats import Measurement

__all__ = ["BackwardFn", "LossFn", "Probe", "ProbeResult"]

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
"""(model, batch) -> per-example losses, shape (n,). On measuring steps and for the target batch the probe passes
the module inside a DistributedDataParallel wrapper (its micro-passes must not trigger DDP's sync), so a loss
function should only call the model it is given."""

BackwardFn = Callable[[torch.Tensor], Any]
"""loss -> None: runs the backward of ``loss`` the way the training loop does (GradScaler, accelerate, Lightning)."""

ProbeResult = Measurement
"""What one ``backward`` measured (the library's one measurement type, ``gradmix.stats.Measurement``)."""


@runtime_checkable
class Probe(Protocol):
    """Runs a training step's backward so that it also yields per-group gradient statistics.

    Implemented by ``GradientProbe`` (micro-batch), ``FusedGradientProbe`` (one forward + one backward) and
    ``ShardedGradientProbe`` (FSDP2); ``make_probe`` picks one for a model. A probe may also carry a
    ``coverage_report`` (a JSON-safe dict, ``gradmix.probe.coverage.coverage_report``): the Mixer writes it into its
    next metrics record as ``probe_coverage`` whenever it changes (not part of the protocol: a probe of your own
    need not have one).
    """

    model: nn.Module
    """The model the probe drives (a plain module, a DDP wrapper or an FSDP2 root)."""
    module: nn.Module
    """The module inside a DDP wrapper (the model itself otherwise)."""

    @property
    def accumulating(self) -> bool:
        """True between a non-final ``backward`` call and the final one."""
        ...

    @property
    def num_probed(self) -> int:
        """Number of scalars the statistics are computed over."""
        ...

    def backward(
        self,
        batch: Mapping[str, torch.Tensor],
        groups: torch.Tensor,
        num_groups: int,
        loss_fn: LossFn,
        *,
        measure: bool,
        target_batch: Mapping[str, torch.Tensor] | None = None,
        global_batch_size: int | None = None,
        backward_fn: BackwardFn | None = None,
        final: bool = True,
    ) -> Measurement | None:
        """Accumulate into ``.grad`` the gradient of the batch's mean loss (sum of per-example losses /
        (global_batch_size / world_size)), every backward through ``backward_fn`` (default ``loss.backward()``), and
        on the final call of an optimizer step return the step's per-group statistics (None before).

        ``measure=False``: losses per group only. ``measure=True``: gradient statistics; ``target_batch`` (first
        call of a measurement) adds DGA's target alignment. Statistics describe the unscaled loss whatever constant
        factor ``backward_fn`` applies."""
        ...

    def reset(self) -> None:
        """Drop a half-done accumulation (e.g. after skipping a step)."""
        ...

    def rebind(self, model: nn.Module) -> Probe:
        """The same probe for another wrapper of the same module (a framework's DDP wrapper built after the probe)."""
        ...
