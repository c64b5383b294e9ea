"""DGA's target gradient over a probe's flat layout, and its Adam preconditioning.

Over whole parameters (micro-batch, fused probes) the target gradient is this rank's sum of per-example gradients,
all-reduced with the example count and loss sum. Over the local shards of FSDP2 parameters (``FlatLayout(...,
shards=True)``, the sharded probe) the backward's reduce-scatter has already summed the ranks' gradients into each
shard (divided by the data-parallel size): only the count and loss sum are all-reduced, and the result is this
rank's shard of the global target gradient; preconditioning reads the optimizer state's local shards, which are
sharded as the parameters are. Nothing full-size is gathered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from gradmix.probe.checks import target_losses
from gradmix.probe.layout import FlatLayout, is_ddp, local_shard
from gradmix.probe.protocol import BackwardFn, LossFn
from gradmix.probe.reduce import rank_and_world
from gradmix.probe.scaling import default_backward, run_backward, usable_scale

__all__ = ["TargetSettings", "precondition", "target_gradient"]


class TargetSettings(Protocol):
    """What ``target_gradient`` reads from the probe that asks for it."""

    model: nn.Module
    module: nn.Module
    process_group: Any
    device: torch.device
    preconditioner: torch.optim.Optimizer | None
    eps: float
    bias_correction: bool


def target_gradient(
    probe: TargetSettings,
    layout: FlatLayout,
    dtype: torch.dtype,
    target_batch: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    run: BackwardFn,
    distributed: bool,
    trainable: Sequence[nn.Parameter] | None = None,
) -> tuple[torch.Tensor, float]:
    """Mean-loss gradient of the target batch over ``layout`` (global under torch.distributed; this rank's shard of
    it over a sharded layout) and the target's mean loss; Adam-preconditioned if the probe has a ``preconditioner``.
    ``.grad`` is left as it was: with the default backward by autograd.grad, with a caller's ``backward_fn`` (and
    always over a sharded layout, whose gradients only FSDP's backward hooks produce) by saving the gradients,
    running the backward (its constant factor measured on the anchor and divided out), reading the new gradients and
    putting the old ones back. ``trainable``: the parameters whose ``.grad`` is saved and put back (default the
    module's trainable ones, listed before the forward); the sharded probe passes the sharded parameters it listed
    when it was built, since an FSDP2 root whose forward ran (an evaluation under no_grad too) lists its unsharded
    parameters until its next backward, not the sharded ones whose ``.grad`` the backward sets."""
    model, module = probe.model, probe.module
    if trainable is None:
        trainable = [p for p in module.parameters() if p.requires_grad]
    losses = target_losses(loss_fn, module, target_batch)
    params = layout.parameters
    scale = 1.0
    grads: list[torch.Tensor | None]
    if run is default_backward and not layout.shards:
        grads = list(torch.autograd.grad(losses.sum(), params, allow_unused=True))
    else:
        saved = [p.grad for p in trainable]
        for p in trainable:
            p.grad = None
        try:
            context = model.no_sync() if is_ddp(model) else contextlib.nullcontext()
            with context:
                scale = run_backward(losses.sum(), run)
            grads = [p.grad for p in params]
        finally:
            for p, g in zip(trainable, saved):
                p.grad = g
    if layout.shards:
        return _sharded_target(probe, layout, dtype, grads, scale, losses, distributed)
    # [sum of per-example gradients, example count, loss sum]: one all-reduce makes the global mean.
    buffer = torch.empty(layout.numel + 2, dtype=dtype, device=probe.device)
    with torch.no_grad():
        layout.fill(buffer, grads)
        if scale != 1.0:
            buffer[:-2].div_(scale if usable_scale(scale) else float("nan"))
        buffer[-2] = float(losses.shape[0])
        buffer[-1] = float(losses.detach().to(torch.float64).sum())
        del grads
        if distributed:
            dist.all_reduce(buffer, group=probe.process_group)
        count = float(buffer[-2])
        target_loss = float(buffer[-1]) / count
        g_target = buffer[:-2]
        g_target.div_(count)
        if probe.preconditioner is not None:
            precondition(g_target, layout, probe.preconditioner, probe.eps, probe.bias_correction)
    return g_target, target_loss


def _sharded_target(
    probe: TargetSettings,
    layout: FlatLayout,
    dtype: torch.dtype,
    grads: list[torch.Tensor | None],
    scale: float,
    losses: torch.Tensor,
    distributed: bool,
) -> tuple[torch.Tensor, float]:
    """This rank's shard of the global mean target gradient from the reduce-scattered gradient shards: FSDP2 has
    already summed the ranks' gradients of their target-loss sums and divided by the data-parallel size (the world of
    ``probe.process_group``), so only the example count and loss sum are all-reduced (float64 scalars)."""
    _, world = rank_and_world(probe.process_group)
    totals = torch.tensor(
        [float(losses.shape[0]), float(losses.detach().to(torch.float64).sum())], dtype=torch.float64
    ).to(probe.device)
    g_target = torch.empty(layout.numel, dtype=dtype, device=probe.device)
    with torch.no_grad():
        layout.fill(g_target, grads)
        del grads
        if distributed:
            dist.all_reduce(totals, group=probe.process_group)
        count, loss_sum = (float(v) for v in totals.cpu())
        # shard of scale * (sum over ranks of the target-loss sums' gradients) / world -> shard of the global mean
        g_target.mul_(world / (count * (scale if usable_scale(scale) else float("nan"))))
        if probe.preconditioner is not None:
            precondition(g_target, layout, probe.preconditioner, probe.eps, probe.bias_correction)
    return g_target, loss_sum / count


def precondition(
    flat: torch.Tensor, layout: FlatLayout, optimizer: torch.optim.Optimizer, eps: float, bias_correction: bool
) -> None:
    """Divide ``flat`` by sqrt(v_hat) + eps per parameter where the optimizer has a second moment (Adam/AdamW);
    parameters without optimizer state yet stay unpreconditioned. ``bias_correction`` divides v by 1 - beta2^t as
    Adam's own step does. Over a sharded layout ``flat`` holds local shards and so is v read (an FSDP2 optimizer's
    state is sharded as its parameter is)."""
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[p] = group
    for (name, p, offset), size in zip(layout, layout.sizes):
        view = flat[offset : offset + size]
        state = optimizer.state.get(p)
        if not state or "exp_avg_sq" not in state:
            continue
        second = state["exp_avg_sq"]
        if layout.shards:
            second, shape = local_shard(second), tuple(local_shard(p.detach()).shape)
        else:
            shape = tuple(p.shape)
        if second.numel() != size:
            raise ValueError(
                f"preconditioner state exp_avg_sq of {name!r} has shape {tuple(second.shape)}, "
                f"parameter{' shard' if layout.shards else ''} has {shape}; only Adam-style per-element state is "
                "supported"
            )
        second = second.detach().reshape(-1).to(flat.dtype)
        betas = group_of.get(p, {}).get("betas")
        step = state.get("step")
        if bias_correction and betas is not None and step is not None:
            correction = 1.0 - float(betas[1]) ** float(step)
            if correction > 0:
                second = second / correction
        view.div_(second.sqrt().add_(eps))
