"""Hook coverage of the fused probe: which selected parameters its module hooks can factor per example, the
behaviour test that recognises LayerNorm / RMSNorm look-alikes, and the coverage report a run records.

Supported, by class (exactly those classes, or subclasses that do not override ``forward``):

* ``nn.Linear`` (weight, bias), ``nn.Embedding`` (weight; not with ``scale_grad_by_freq``), ``nn.LayerNorm``
  (weight, bias), ``nn.RMSNorm`` (weight);
* HF ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections: weight (in, out), ``y = x @ W + b``), recognised by
  its class without importing transformers;
* ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (weight, bias; any stride, padding - numbers, ``"same"``,
  ``"valid"`` - dilation, groups and padding mode). Transposed convolutions are not covered;
* ``nn.GroupNorm`` (weight, bias) and ``nn.BatchNorm1d/2d/3d`` / ``nn.SyncBatchNorm`` (weight, bias; in training
  mode the examples of a batch interact through the batch statistics, which the probe says once, see ``fused``);
* ``nn.MultiheadAttention``: its packed ``in_proj_weight`` / ``in_proj_bias`` (or ``q/k/v_proj_weight``) and its
  ``out_proj`` (a ``Linear`` the module never calls as a module: ``F.multi_head_attention_forward`` reads its weight),
  whose factors are recomputed from the module's inputs (``gradmix.probe.attention``). ``bias_k`` / ``bias_v``
  (``add_bias_kv=True``) are not covered.

Supported by behaviour (any class): a module whose own parameters are ``weight`` and optionally ``bias`` of the same
shape, that holds no other parameter (none in children either) and is not a Linear/Embedding/convolution, and whose
output, checked on every hooked call, equals ``h(input) * (weight + c) (+ bias)`` with ``c`` 0 or 1 (Gemma's
``1 + weight``) and ``h`` one of: layer normalisation, RMS normalisation (over the weight's trailing dimensions, or
over dimension 1 for a channels-first norm with a 1-d weight), or the identity (a learned scale such as LayerScale).
The ``eps`` is read from the module (``eps``, ``variance_epsilon``, ``epsilon``, ``norm_eps``; else the closest of
1e-5, 1e-6, 1e-8, 1e-12). HF ``LlamaRMSNorm`` / ``Qwen2RMSNorm`` / ``MistralRMSNorm``, ``T5LayerNorm`` and timm-style
``LayerNorm`` subclasses that override ``forward`` are covered this way. A call whose output fails the check drops
the module's parameters from coverage (said once, with the reason).

Run-time checks in ``FusedGradientProbe`` (batch-first inputs, no functional reuse) can still drop covered ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from gradmix.probe.layout import ParameterSpec, select_parameters, unwrap

__all__ = [
    "AFFINE_FORMS",
    "BATCH_NORMS",
    "ROLES",
    "Normaliser",
    "batch_coupled",
    "coupling_now",
    "coverage_report",
    "describe_uncovered",
    "fused_coverage",
    "match_affine",
    "module_roles",
    "sequence_first",
    "static_coverage",
    "summary_line",
]

_RMSNorm = getattr(nn, "RMSNorm", None)

ROLES: dict[type[nn.Module], dict[str, str]] = {
    nn.Linear: {"weight": "linear", "bias": "bias"},
    nn.Embedding: {"weight": "embed"},
    nn.LayerNorm: {"weight": "norm", "bias": "bias"},
}
"""module class -> {parameter attribute: role}"""
if _RMSNorm is not None:
    ROLES[_RMSNorm] = {"weight": "rms"}
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    ROLES[_conv] = {"weight": "conv", "bias": "cbias"}
ROLES[nn.GroupNorm] = {"weight": "cscale", "bias": "cbias"}
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
"""Normalisations over the batch: covered, but the examples of a batch interact in training mode."""
for _bn in BATCH_NORMS:
    ROLES[_bn] = {"weight": "cscale", "bias": "cbias"}

_MHA_ROLES = {
    name: "mha" for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
}
_MHA_UNSUPPORTED = {
    "bias_k": "MultiheadAttention(add_bias_kv=True): bias_k is one key row shared by every example of the batch",
    "bias_v": "MultiheadAttention(add_bias_kv=True): bias_v is one value row shared by every example of the batch",
}
_HF_CONV1D_ROLES = {"weight": "linear_t", "bias": "bias"}
_AFFINE_ROLES = {"weight": "affine", "bias": "affine_bias"}
_MATRIX_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.conv._ConvNd,
    nn.MultiheadAttention,
    nn.Bilinear,
)
"""Modules whose weight is never an elementwise scale: not candidates for the behaviour test."""
_EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon", "norm_eps")
_EPS_GUESSES = (1e-5, 1e-6, 1e-8, 1e-12)

AFFINE_FORMS: tuple[tuple[str, str, int], ...] = tuple(
    (layout, h, offset) for layout in ("last", "channels") for h in ("rms", "ln", "identity") for offset in (0, 1)
)
"""The behaviour test's forms: (layout of the weight: trailing dims / dim 1, normalisation, weight offset c)."""


def _hf_conv1d_class(module: nn.Module) -> type | None:
    """HF ``transformers.pytorch_utils.Conv1D`` (or an older home of it) in the module's class hierarchy."""
    for cls in type(module).__mro__:
        if cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers":
            return cls
    return None


def _is_affine_candidate(module: nn.Module) -> bool:
    """The structural half of the behaviour test: own parameters ``weight`` (+ ``bias`` of its shape), nothing else,
    no parameter in children, not a matrix-weight module."""
    if isinstance(module, _MATRIX_MODULES) or _hf_conv1d_class(module) is not None:
        return False
    own = {name: p for name, p in module._parameters.items() if p is not None}
    weight = own.get("weight")
    if weight is None or weight.dim() < 1 or set(own) - {"weight", "bias"}:
        return False
    if "bias" in own and own["bias"].shape != weight.shape:
        return False
    return not any(True for child in module.children() for _ in child.parameters())


def module_roles(module: nn.Module) -> tuple[dict[str, str] | None, str | None]:
    """(attribute -> role) for a supported module, else (None, reason)."""
    overridden = None
    for cls, roles in ROLES.items():
        if isinstance(module, cls):
            if type(module).forward is not cls.forward:
                overridden = f"{type(module).__name__} overrides {cls.__name__}.forward"
                break
            if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
                return None, "Embedding(scale_grad_by_freq=True) couples the examples of a batch"
            return roles, None
    if overridden is None:
        hf = _hf_conv1d_class(module)
        if hf is not None:
            if type(module).forward is not cast(Any, hf).forward:
                overridden = f"{type(module).__name__} overrides Conv1D.forward"
            else:
                return _HF_CONV1D_ROLES, None
        elif isinstance(module, nn.MultiheadAttention):
            if type(module).forward is not nn.MultiheadAttention.forward:
                return None, f"{type(module).__name__} overrides MultiheadAttention.forward"
            return _MHA_ROLES, None
    if _is_affine_candidate(module):
        return _AFFINE_ROLES, None
    if overridden is not None:
        return None, overridden
    return None, f"held by an unsupported module ({type(module).__name__})"


def static_coverage(
    module: nn.Module, named: list[tuple[str, nn.Parameter]]
) -> tuple[dict[int, list[tuple[nn.Module, str]]], dict[str, str]]:
    """For each selected parameter: the (module, role) pairs that hold it (by parameter id), or the reason it is not
    covered (by name).

    A ``MultiheadAttention``'s ``out_proj`` parameters are held by the attention module (it reads them inside
    ``F.multi_head_attention_forward``). A parameter held by a supported module and also registered on an unsupported
    one (e.g. BERT's tied decoder bias) is covered: the run-time graph check drops it if the other holder uses it."""
    claimed: dict[int, nn.Module] = {}
    for _, sub in module.named_modules():
        if isinstance(sub, nn.MultiheadAttention) and isinstance(getattr(sub, "out_proj", None), nn.Linear):
            claimed[id(sub.out_proj)] = sub
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for _, sub in module.named_modules():
        for attr, p in sub._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((sub, attr, type(sub).__name__))
    covered: dict[int, list[tuple[nn.Module, str]]] = {}
    reasons: dict[str, str] = {}
    for name, p in named:
        uses: list[tuple[nn.Module, str]] = []
        reason = None
        unsupported = None
        for sub, attr, _ in owners.get(id(p), []):
            holder = claimed.get(id(sub))
            if holder is not None:
                roles, why = module_roles(holder)
                if roles is None:
                    reason = why
                    break
                uses.append((holder, "mha"))
                continue
            roles, why = module_roles(sub)
            if roles is None:
                unsupported = unsupported or why
                continue
            if attr not in roles:
                reason = _MHA_UNSUPPORTED.get(attr) if isinstance(sub, nn.MultiheadAttention) else None
                reason = reason or f"attribute {attr!r} of {type(sub).__name__} is not a supported role"
                break
            uses.append((sub, roles[attr]))
        if reason is None and not uses:
            reason = unsupported or "not held by any module"
        if reason is None:
            covered[id(p)] = uses
        else:
            reasons[name] = reason
    return covered, reasons


def fused_coverage(model: nn.Module, parameters: ParameterSpec = None) -> tuple[list[str], dict[str, str]]:
    """Static coverage of ``FusedGradientProbe``: (names of selected parameters its hooks cover, {name: reason} for
    the others). Run-time checks (batch-first inputs, no functional reuse, the behaviour test of norm look-alikes)
    can still drop covered ones."""
    module = unwrap(model)
    named = select_parameters(module, parameters)
    covered, reasons = static_coverage(module, named)
    return [name for name, p in named if id(p) in covered], reasons


# -- the behaviour test of LayerNorm / RMSNorm look-alikes ------------------------------------------------------------


def _module_eps(module: nn.Module) -> float | None:
    for attr in _EPS_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _normalise(x: torch.Tensor, h: str, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    if h == "identity":
        return x
    if h == "ln":
        mean = x.mean(dim=dims, keepdim=True)
        centred = x - mean
        return centred * torch.rsqrt(centred.pow(2).mean(dim=dims, keepdim=True) + eps)
    return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)


def _tolerance(dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return 1e-9
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2
    return 2e-5


Normaliser = Callable[[torch.Tensor], torch.Tensor]
"""x -> the normalised input ``h(x)`` a matched look-alike multiplies by its weight (float32 or float64)."""


def match_affine(
    module: nn.Module, x: torch.Tensor, output: torch.Tensor, first: tuple[str, str, int] | None = None
) -> tuple[tuple[str, str, int] | None, Normaliser | None, str]:
    """The behaviour test: (form, normaliser ``x -> h(x)``, "") when ``output`` equals ``h(x) * (weight + c)
    (+ bias)`` for one of ``AFFINE_FORMS``, else (None, None, reason). ``first`` (the form an earlier call matched) is
    accepted when it passes; otherwise the form with the smallest error among those that pass. A float64 module that
    normalises in float32 (HF's RMSNorms do) is matched, and its ``h(x)`` computed, in float32 as well. The
    normaliser recomputes ``h(x)`` from the input (the probe keeps the input, not a normalised copy)."""
    weight = cast(torch.Tensor, module.weight).detach()
    bias = module._parameters.get("bias")
    what = f"its {type(module).__name__}"
    if output.shape != x.shape:
        return None, None, f"{what}'s output shape {tuple(output.shape)} is not its input's {tuple(x.shape)}"
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    precisions = [compute] if compute == torch.float32 else [compute, torch.float32]
    out = output.detach().to(compute)
    w = weight.to(compute)
    b = None if bias is None else bias.detach().to(compute)
    largest = 1.0 + float(out.abs().nan_to_num(0.0, 0.0, 0.0).max())
    finite = torch.isfinite(out)
    module_eps = _module_eps(module)

    def attempt(form: tuple[str, str, int]) -> tuple[float, Normaliser] | None:
        """(relative error, normaliser) of the form's best eps and precision that pass, else None."""
        layout, h, offset = form
        if layout == "last":
            k = w.dim()
            if x.dim() < k + 1 or tuple(x.shape[-k:]) != tuple(w.shape):
                return None
            dims = tuple(range(-k, 0))
            view: Sequence[int] = w.shape
        else:
            if w.dim() != 1 or x.dim() < 3 or x.shape[1] != w.numel():
                return None
            dims = (1,)
            view = (w.numel(),) + (1,) * (x.dim() - 2)
        guesses = [0.0] if h == "identity" else ([module_eps] if module_eps is not None else list(_EPS_GUESSES))
        for precision in precisions:  # the input's precision first
            tol = max(_tolerance(output.dtype), _tolerance(precision))
            xp = x.detach().to(precision)
            best: tuple[float, float] | None = None
            for eps in guesses:  # the module's eps, or the closest of the usual ones
                xhat = _normalise(xp, h, dims, eps).to(compute)
                expected = xhat * (w + offset).view(*view)
                if b is not None:
                    expected = expected + b.view(*view)
                if not bool((torch.isfinite(expected) == finite).all()):
                    continue
                err = float(torch.where(finite, (expected - out).abs(), torch.zeros_like(out)).max()) / largest
                if err <= tol and (best is None or err < best[0]):
                    best = (err, eps)
            if best is not None:
                chosen = best[1]

                def normaliser(
                    t: torch.Tensor, h: str = h, dims: tuple[int, ...] = dims, eps: float = chosen, p=precision
                ) -> torch.Tensor:
                    return _normalise(t.detach().to(p), h, dims, eps).to(compute)

                return best[0], normaliser
        return None

    if first is not None:
        found = attempt(first)
        if found is not None:
            return first, found[1], ""
    choice: tuple[float, tuple[str, str, int], Normaliser] | None = None
    for form in AFFINE_FORMS:  # the closest form: LayerNorm and RMSNorm nearly agree on inputs of small mean
        found = attempt(form)
        if found is not None and (choice is None or found[0] < choice[0]):
            choice = (found[0], form, found[1])
    if choice is not None:
        return choice[1], choice[2], ""
    return None, None, f"{what}'s output is not LayerNorm/RMSNorm/identity(input) * weight (+ bias) (behaviour test)"


def sequence_first(module: nn.Module) -> set[int]:
    """Ids of the modules that see (sequence, batch, ...) tensors, known from the structure: everything inside a
    torch ``TransformerEncoderLayer`` / ``TransformerDecoderLayer`` built with ``batch_first=False``, and the final
    norm of a ``TransformerEncoder`` / ``TransformerDecoder`` of such layers (their attention modules read the
    layout from their own ``batch_first``). Other modules must see the batch as their leading dimension."""
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    found: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, layers) and not sub.self_attn.batch_first:
            found.update(id(m) for m in sub.modules())
        stacks = (nn.TransformerEncoder, nn.TransformerDecoder)
        if isinstance(sub, stacks) and sub.norm is not None and len(sub.layers):
            first = sub.layers[0]
            if isinstance(first, layers) and not first.self_attn.batch_first:
                found.update(id(m) for m in sub.norm.modules())
    return found


# -- batch coupling and the report ----------------------------------------------------------------------------------


def batch_coupled(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the batch normalisations (``BATCH_NORMS``) inside ``module``: in training mode (or without
    running statistics) they normalise over the batch, so one example's loss depends on the others."""
    return [(name, sub) for name, sub in module.named_modules() if isinstance(sub, BATCH_NORMS)]


def coupling_now(coupled: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Names of the batch normalisations that use batch statistics right now."""
    return [
        name
        for name, sub in coupled
        if sub.training or getattr(sub, "running_mean", None) is None or not getattr(sub, "track_running_stats", True)
    ]


def describe_uncovered(reasons: dict[str, str], sizes: dict[str, int], limit: int = 4) -> list[dict[str, Any]]:
    """Uncovered parameters grouped by reason: [{reason, tensors, scalars, parameters (the first ``limit``)}],
    largest first."""
    groups: dict[str, dict[str, Any]] = {}
    for name, why in reasons.items():
        entry = groups.setdefault(why, {"reason": why, "tensors": 0, "scalars": 0, "parameters": []})
        entry["tensors"] += 1
        entry["scalars"] += int(sizes.get(name, 0))
        if len(entry["parameters"]) < limit:
            entry["parameters"].append(name)
    return sorted(groups.values(), key=lambda e: -e["scalars"])


def summary_line(groups: list[dict[str, Any]], limit: int = 3) -> str:
    """One line from ``describe_uncovered``'s groups: reason (k tensors, s scalars: names...)."""
    parts = []
    for entry in groups[:limit]:
        names = ", ".join(entry["parameters"]) + (", ..." if entry["tensors"] > len(entry["parameters"]) else "")
        parts.append(f"{entry['reason']} ({entry['tensors']} tensor(s), {entry['scalars']} scalars: {names})")
    if len(groups) > limit:
        parts.append(f"... ({len(groups) - limit} more reason(s))")
    return "; ".join(parts)


def coverage_report(
    probe: str,
    mode: str,
    named: Sequence[tuple[str, nn.Parameter]],
    reasons: dict[str, str],
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """What a run records about its probe (JSON-safe): which probe measures (``probe``), how (``mode``: ``fused``,
    ``fused_fallback`` - the fused probe handed the measurement to the micro-batch probe -, ``micro`` or
    ``micro_fallback`` - ``make_probe`` chose the micro-batch probe because the hooks cover too little), the selected
    scalars, the fraction the fused hooks cover (``hook_coverage``), the fraction the statistics are computed over
    (``measured_fraction``), the uncovered parameters grouped by reason, and notes (batch coupling)."""
    sizes = {name: p.numel() for name, p in named}
    total = sum(sizes.values())
    uncovered = sum(sizes.get(name, 0) for name in reasons)
    hook = 1.0 if total == 0 else (total - uncovered) / total
    measured = hook if mode == "fused" else 1.0
    return {
        "probe": probe,
        "mode": mode,
        "selected_scalars": int(total),
        "hook_coverage": float(round(hook, 6)) if math.isfinite(hook) else None,
        "measured_fraction": float(round(measured, 6)),
        "uncovered": describe_uncovered(reasons, sizes),
        "notes": list(notes),
    }
