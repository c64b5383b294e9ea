"""DGA's target gradient over a probe's flat layout, and its Adam preconditioning."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from gradmix.probe.checks import target_losses
from gradmix.probe.layout import FlatLayout, is_ddp
from gradmix.probe.protocol import BackwardFn, LossFn
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
) -> tuple[torch.Tensor, float]:
    """Mean-loss gradient of the target batch over ``layout`` (global under torch.distributed) and the target's mean
    loss; Adam-preconditioned if the probe has a ``preconditioner``. ``.grad`` is left as it was: with the default
    backward by autograd.grad, with a caller's ``backward_fn`` by saving the gradients, running it (its constant
    factor measured on the anchor and divided out), reading the change and putting them back."""
    model, module = probe.model, probe.module
    losses = target_losses(loss_fn, module, target_batch)
    params = layout.parameters
    scale = 1.0
    grads: list[torch.Tensor | None]
    if run is default_backward:
        grads = list(torch.autograd.grad(losses.sum(), params, allow_unused=True))
    else:
        trainable = [p for p in module.parameters() if p.requires_grad]
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


def precondition(
    flat: torch.Tensor, layout: FlatLayout, optimizer: torch.optim.Optimizer, eps: float, bias_correction: bool
) -> None:
    """Divide ``flat`` by sqrt(v_hat) + eps per parameter where the optimizer has a second moment (Adam/AdamW);
    parameters without optimizer state yet stay unpreconditioned. ``bias_correction`` divides v by 1 - beta2^t as
    Adam's own step does."""
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[p] = group
    for name, p, offset in layout:
        view = flat[offset : offset + p.numel()]
        state = optimizer.state.get(p)
        if not state or "exp_avg_sq" not in state:
            continue
        second = state["exp_avg_sq"]
        if second.numel() != p.numel():
            raise ValueError(
                f"preconditioner state exp_avg_sq of {name!r} has shape {tuple(second.shape)}, "
                f"parameter has {tuple(p.shape)}; only Adam-style per-element state is supported"
            )
        second = second.detach().reshape(-1).to(flat.dtype)
        betas = group_of.get(p, {}).get("betas")
        step = state.get("step")
        if bias_correction and betas is not None and step is not None:
            correction = 1.0 - float(betas[1]) ** float(step)
            if correction > 0:
                second = second / correction
        view.div_(second.sqrt().add_(eps))
