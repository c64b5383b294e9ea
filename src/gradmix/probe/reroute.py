"""The weight gradient of a Linear-like layer from the fused probe's per-example blocks, so that a measuring step
does not compute it twice.

A measuring step materialises, for a Linear weight, the per-example gradients ``g_i = G_i^T A_i`` (a batched matmul
that costs as much as the weight gradient itself); autograd would then compute ``sum_i g_i`` once more. Instead, the
probe's forward hook replaces the layer's output by ``Reroute.apply(output.detach(), x, weight, bias, site)``: a
custom autograd Function whose forward returns the already computed output (marked dirty, not a view: in-place ops
on it stay legal; nothing is recomputed) and whose backward computes what the layer's own backward would (the input
gradient ``G W``, the bias gradient ``sum G``) and takes the weight gradient from ``site`` when the probe formed it
from the blocks (else computes ``G^T A`` itself, exactly as autograd would). The original output is detached, so
autograd never runs the layer's own weight-gradient matmul. No method or class is patched. The Function keeps ``x``
and the weight as attributes, not through ``save_for_backward``: activation checkpointing's saved-tensor hooks then
see what the layer alone saved (its recomputation in the backward runs without the probe's hooks); an in-place change
of either before the backward is refused as autograd refuses it.

Used only where the layer is a plain ``y = x W^T + b`` (``nn.Linear``) or ``y = x W + b`` (HF ``Conv1D``): the hook
checks the output's autograd graph (only linear/view nodes between the output and ``x``, ``weight``, ``bias``, each
reached once) and the dtypes (``x``, weight and output of the weight's float32/float64 dtype: under bf16/float16
autocast the layer keeps autograd's path, since its own backward rounds through half precision).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LINEAR_NODES", "Reroute", "RerouteSite", "plain_linear_output"]

LINEAR_NODES = frozenset(
    {
        "AddmmBackward0",
        "MmBackward0",
        "BmmBackward0",
        "LinearBackward0",
        "AddBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "TBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ExpandBackward0",
    }
)
"""Autograd nodes ``F.linear`` / ``torch.addmm`` leave between a layer's output and its input and parameters."""


class RerouteSite:
    """What one rerouted layer call shares with the probe: ``store`` maps a parameter id to the weight gradient the
    probe formed from its blocks (taken once by the backward); ``transposed`` is True for HF ``Conv1D``
    (weight (in, out))."""

    __slots__ = ("key", "store", "transposed")

    def __init__(self, store: dict[int, torch.Tensor], key: int, transposed: bool) -> None:
        self.store = store
        self.key = key
        self.transposed = transposed

    def take(self) -> torch.Tensor | None:
        return self.store.pop(self.key, None)


class Reroute(torch.autograd.Function):
    """Identity on the precomputed output; the backward of ``y = x W^T + b`` (or ``x W + b``) with the weight
    gradient taken from the probe when it formed it (module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        output: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        site: RerouteSite,
    ) -> torch.Tensor:
        ctx.site = site
        # kept as attributes, not save_for_backward: saved-tensor hooks (activation checkpointing) must see what the
        # layer's recomputation without the probe saves; the probe keeps the input alive until the backward anyway.
        # Modified in place before the backward, they are refused as save_for_backward would.
        ctx.inputs = (x, weight)
        ctx.versions = (x._version, weight._version)
        ctx.mark_dirty(output)  # returned as is but not a view of an input: later in-place ops stay legal
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.inputs
        if (x._version, weight._version) != ctx.versions:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                "the input or weight of a Linear layer rerouted by FusedGradientProbe (gradmix.probe.reroute)"
            )
        site: RerouteSite = ctx.site
        _, need_x, need_w, need_b, _ = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = (g2 @ (weight.T if site.transposed else weight)).view(x.shape)
        if need_w:
            grad_w = site.take()
            if grad_w is None:  # the probe did not form it (Gram form, a skipped parameter, an unusable scale)
                a2 = x.reshape(-1, x.shape[-1])
                grad_w = a2.T @ g2 if site.transposed else g2.T @ a2
        if need_b:
            grad_b = g2.sum(0)
        return None, grad_x, grad_w, grad_b, None


def plain_linear_output(
    output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> str:
    """ "" when ``output`` is exactly ``x W^T + b`` (``x W + b`` if ``transposed``) as autograd sees it, else why not
    (the reroute then leaves the layer to autograd)."""
    if not (weight.dtype == x.dtype == output.dtype) or weight.dtype not in (torch.float32, torch.float64):
        return "autocast or half precision (its own backward rounds through the lower precision)"
    if bias is not None and bias.dtype != weight.dtype:
        return f"bias {bias.dtype} against weight {weight.dtype}"
    features_in, features_out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    if x.dim() < 1 or x.shape[-1] != features_in or output.shape[-1] != features_out:
        return "its input or output does not have the weight's feature dimensions"
    if output.shape[:-1] != x.shape[:-1]:
        return "its output's leading dimensions are not its input's"
    root = output.grad_fn
    if root is None:
        return "its output has no autograd node"
    x_node = x.grad_fn
    seen = {"x": 0, "weight": 0, "bias": 0}
    stack = [root]
    steps = 0
    while stack:
        node = stack.pop()
        steps += 1
        if steps > 32:
            return "its output's autograd graph is not a plain linear map"
        if x_node is not None and node is x_node:
            seen["x"] += 1
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:
            if variable is weight:
                seen["weight"] += 1
            elif bias is not None and variable is bias:
                seen["bias"] += 1
            elif variable is x:
                seen["x"] += 1
            else:
                return "its output depends on a tensor other than its input, weight and bias"
            continue
        if type(node).__name__ not in LINEAR_NODES:
            return f"its output's autograd graph has a {type(node).__name__} (not a plain linear map)"
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    expected = {
        "x": 1 if x.requires_grad else 0,
        "weight": 1,
        "bias": 1 if bias is not None and bias.requires_grad else 0,
    }
    if seen != expected:
        return "its output's autograd graph is not a plain linear map of its input, weight and bias"
    return ""
