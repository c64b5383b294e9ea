"""``nn.MultiheadAttention`` in the fused probe: the per-example factors of its in- and out-projections.

``F.multi_head_attention_forward`` applies both projections inside one function, so no module hook sees the
projected queries/keys/values ``P`` or the attention output ``A`` that enters ``out_proj``. The probe's hook on the
attention module therefore recomputes them from the module's inputs, on measuring calls only:

* ``P = linear(x, W_in, b_in)`` with the module's (detached) weights, exactly as torch splits them (packed self-
  attention, packed with shared key/value, three inputs, or separate ``q/k/v_proj_weight``); each projection becomes
  a leaf;
* ``A = F.multi_head_attention_forward(P_q, P_k, P_v, ...)`` - the same function with the same masks, flags and
  dropout (the RNG state from before the module's call is replayed, and the state after it restored), with identity
  matrices in place of the projections (exact: a product with the identity adds only zeros);
* a check: ``linear(A, W_out, b_out)`` must equal the module's output, else the module's parameters drop out of
  coverage with that reason.

In the backward, the module's output gradient ``G`` gives ``out_proj``'s factors ``(A, G)`` and ``dA = G W_out``; one
backward of the recomputed attention gives ``dP``, the in-projection's output gradient, and its factors ``(x, dP)``.
Per example these are exact (attention never mixes examples). Cost on a measuring call: the attention once more,
forward and backward (not the rest of the model), and its activations until the backward. Not covered:
``bias_k`` / ``bias_v`` (``add_bias_kv=True``; the other parameters still are), unbatched calls, and a loss that
uses the attention weights the module returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARGUMENTS", "AttentionCapture", "bind", "contributions", "recompute", "rng_state", "set_rng_state"]

ARGUMENTS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)
"""``MultiheadAttention.forward``'s arguments, in order."""
_DEFAULTS: dict[str, Any] = {
    "key_padding_mask": None,
    "need_weights": True,
    "attn_mask": None,
    "average_attn_weights": True,
    "is_causal": False,
}


def bind(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (defaults filled in)."""
    bound = dict(_DEFAULTS)
    bound.update(zip(ARGUMENTS, args))
    bound.update(kwargs)
    return bound


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generator states dropout draws from (CPU, and the device's when it is a GPU)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class AttentionCapture:
    """What one attention call keeps until its backward: the projections' inputs (batch first), the leaves ``P``,
    the recomputed ``A`` (seq first, with its graph) and the out-projection weight."""

    def __init__(self, batch_first: bool, weight_out: torch.Tensor) -> None:
        self.batch_first = batch_first
        self.weight_out = weight_out
        # (input (n, L, E_in), weight parameter, rows of it (None: all), rows of in_proj_bias, leaves)
        self.pieces: list[tuple[torch.Tensor, torch.Tensor, slice | None, slice, list[torch.Tensor]]] = []
        self.a: torch.Tensor | None = None


def _canonical(bound: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Any]:
    """The masks as ``MultiheadAttention.forward`` hands them on (bool -> float, against the query's dtype)."""
    canonical = getattr(F, "_canonical_mask", None)
    none_or_dtype = getattr(F, "_none_or_dtype", None)
    key_padding_mask, attn_mask = bound["key_padding_mask"], bound["attn_mask"]
    if canonical is None or none_or_dtype is None:  # pragma: no cover - older torch
        return key_padding_mask, attn_mask
    key_padding_mask = canonical(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=dtype,
    )
    attn_mask = canonical(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=dtype, check_other=False
    )
    return key_padding_mask, attn_mask


def recompute(
    module: nn.MultiheadAttention,
    bound: dict[str, Any],
    output: torch.Tensor,
    n: int,
    rng_before: tuple[torch.Tensor, torch.Tensor | None] | None,
) -> tuple[AttentionCapture | None, str]:
    """Recompute the call's projections and attention (module docstring): (capture, "") or (None, reason)."""
    name = type(module).__name__
    query, key, value = bound["query"], bound["key"], bound["value"]
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return None, f"a call of its {name} has non-tensor query/key/value"
    if query.dim() != 3:
        return None, f"an unbatched call of its {name} (query of {query.dim()} dimensions)"
    batch_dim = 0 if module.batch_first else 1
    if any(t.dim() != 3 or t.shape[batch_dim] != n for t in (query, key, value)):
        where = "leading dimension" if module.batch_first else "dimension 1 (batch_first=False)"
        return None, f"a call of its {name} does not see the batch as {where}"
    if bound.get("is_causal") and bound.get("attn_mask") is None:
        return None, f"a call of its {name} has is_causal without attn_mask (torch refuses it too)"

    def seq_first(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.transpose(0, 1) if module.batch_first else t

    def batch_first(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1)

    e = module.embed_dim
    q_in, k_in, v_in = seq_first(query), seq_first(key), seq_first(value)
    bias = module.in_proj_bias
    bias_d = None if bias is None else bias.detach()
    packed = module._qkv_same_embed_dim
    # (seq-first input, weight parameter, weight rows (None: all of a separate weight), bias rows, projections)
    plan: list[tuple[torch.Tensor, torch.Tensor, slice | None, slice, list[int]]]
    if packed:
        w = module.in_proj_weight
        if key is value and query is key:
            plan = [(q_in, w, slice(0, 3 * e), slice(0, 3 * e), [0, 1, 2])]
        elif key is value:
            plan = [(q_in, w, slice(0, e), slice(0, e), [0]), (k_in, w, slice(e, 3 * e), slice(e, 3 * e), [1, 2])]
        else:
            spans = [slice(j * e, (j + 1) * e) for j in range(3)]
            plan = [(t, w, spans[j], spans[j], [j]) for j, t in enumerate((q_in, k_in, v_in))]
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        plan = [
            (t, wj, None, slice(j * e, (j + 1) * e), [j]) for j, (t, wj) in enumerate(zip((q_in, k_in, v_in), weights))
        ]
    capture = AttentionCapture(module.batch_first, module.out_proj.weight.detach())
    leaves: list[torch.Tensor] = [torch.empty(0)] * 3
    key_padding_mask, attn_mask = _canonical(bound, query.dtype)
    after = None
    device = query.device
    if rng_before is not None:
        after = rng_state(device)
        set_rng_state(rng_before, device)
    try:
        with torch.enable_grad():
            for x, weight, rows, bias_rows, projections in plan:
                wd = weight.detach() if rows is None else weight.detach()[rows]
                projected = F.linear(x, wd, None if bias_d is None else bias_d[bias_rows])
                own = []
                for i, j in enumerate(projections):
                    leaf = projected[..., i * e : (i + 1) * e].detach().contiguous().requires_grad_(True)
                    leaves[j] = leaf
                    own.append(leaf)
                capture.pieces.append((batch_first(x), weight, rows, bias_rows, own))
            eye = torch.eye(e, dtype=leaves[0].dtype, device=leaves[0].device)
            bias_k = None if module.bias_k is None else module.bias_k.detach()
            bias_v = None if module.bias_v is None else module.bias_v.detach()
            a, _ = F.multi_head_attention_forward(
                leaves[0],
                leaves[1],
                leaves[2],
                e,
                module.num_heads,
                None,
                None,
                bias_k,
                bias_v,
                module.add_zero_attn,
                module.dropout,
                eye,
                None,
                training=module.training,
                key_padding_mask=key_padding_mask,
                need_weights=bool(bound["need_weights"]),
                attn_mask=attn_mask,
                use_separate_proj_weight=True,
                q_proj_weight=eye,
                k_proj_weight=eye,
                v_proj_weight=eye,
                average_attn_weights=bool(bound["average_attn_weights"]),
                is_causal=bool(bound["is_causal"]),
            )
    finally:
        if after is not None:
            set_rng_state(after, device)
    capture.a = a
    with torch.no_grad():
        out_bias = module.out_proj.bias
        again = F.linear(a.detach(), capture.weight_out, None if out_bias is None else out_bias.detach())
        seen = seq_first(output)
        tol = 1e-2 if seen.dtype in (torch.float16, torch.bfloat16) else (1e-9 if seen.dtype == torch.float64 else 1e-5)
        scale = 1.0 + float(seen.abs().nan_to_num(0.0, 0.0, 0.0).max()) if seen.numel() else 1.0
        if again.shape != seen.shape or not torch.allclose(
            again.to(seen.dtype), seen, rtol=tol, atol=tol * scale, equal_nan=True
        ):
            return None, f"its {name}'s recomputed output differs from the module's (dropout that cannot be replayed?)"
    return capture, ""


def contributions(
    module: nn.MultiheadAttention, capture: AttentionCapture, grad: torch.Tensor
) -> list[tuple[torch.Tensor, str, torch.Tensor, torch.Tensor]]:
    """(parameter, role, saved, output gradient) contributions of one call from the gradient of its output (in the
    output's layout): out_proj's ``(A, G)``, the in-projection's ``(x, dP)`` (rows of a packed weight padded with
    zeros to the whole weight), the biases' ``G`` / ``dP`` (a bias needs no saved factor: it carries its gradient
    there too)."""
    a = cast(torch.Tensor, capture.a)
    g_sf = grad.transpose(0, 1) if capture.batch_first else grad  # (L, N, E)
    out: list[tuple[torch.Tensor, str, torch.Tensor, torch.Tensor]] = []
    g_bf = g_sf.transpose(0, 1)
    out.append((module.out_proj.weight, "linear", a.detach().transpose(0, 1), g_bf))
    if module.out_proj.bias is not None:
        out.append((module.out_proj.bias, "bias", g_bf, g_bf))
    leaves = [leaf for *_, own in capture.pieces for leaf in own]
    with torch.no_grad():
        d_a = g_sf.to(a.dtype) @ capture.weight_out.to(a.dtype)
    grads = torch.autograd.grad(a, leaves, d_a, allow_unused=True)
    found = {id(leaf): (torch.zeros_like(leaf) if g is None else g) for leaf, g in zip(leaves, grads)}
    total = 3 * module.embed_dim
    for x, weight, rows, bias_rows, own in capture.pieces:
        d_p = torch.cat([found[id(leaf)] for leaf in own], dim=-1).transpose(0, 1)  # (n, L, width), batch first
        width = d_p.shape[-1]

        def padded(span: slice, d_p: torch.Tensor = d_p, width: int = width) -> torch.Tensor:
            if width == total:
                return d_p
            full = d_p.new_zeros(*d_p.shape[:-1], total)
            full[..., span] = d_p
            return full

        out.append((weight, "linear", x, d_p if rows is None else padded(rows)))
        if module.in_proj_bias is not None:
            bias_grad = padded(bias_rows)
            out.append((module.in_proj_bias, "bias", bias_grad, bias_grad))
    return out
