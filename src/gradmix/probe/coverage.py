"""Static hook coverage of the fused probe: which selected parameters its module hooks can factor per example.

Supported: ``nn.Linear`` (weight, bias), ``nn.Embedding`` (weight; not with ``scale_grad_by_freq``), ``nn.LayerNorm``
(weight, bias), ``nn.RMSNorm`` (weight) - of exactly those classes or subclasses that do not override ``forward``.
Run-time checks in ``FusedGradientProbe`` (batch-first inputs, no functional reuse) can still drop covered ones.
"""

from __future__ import annotations

from torch import nn

from gradmix.probe.layout import ParameterSpec, select_parameters, unwrap

__all__ = ["ROLES", "fused_coverage", "module_roles", "static_coverage"]

_RMSNorm = getattr(nn, "RMSNorm", None)

ROLES: dict[type[nn.Module], dict[str, str]] = {
    nn.Linear: {"weight": "linear", "bias": "bias"},
    nn.Embedding: {"weight": "embed"},
    nn.LayerNorm: {"weight": "norm", "bias": "bias"},
}
"""module class -> {parameter attribute: role}"""
if _RMSNorm is not None:
    ROLES[_RMSNorm] = {"weight": "rms"}


def module_roles(module: nn.Module) -> tuple[dict[str, str] | None, str | None]:
    """(attribute -> role) for a supported module, else (None, reason)."""
    for cls, roles in ROLES.items():
        if isinstance(module, cls):
            if type(module).forward is not cls.forward:
                return None, f"{type(module).__name__} overrides {cls.__name__}.forward"
            if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
                return None, "Embedding(scale_grad_by_freq=True) couples the examples of a batch"
            return roles, None
    return None, f"held by an unsupported module ({type(module).__name__})"


def static_coverage(
    module: nn.Module, named: list[tuple[str, nn.Parameter]]
) -> tuple[dict[int, list[tuple[nn.Module, str]]], dict[str, str]]:
    """For each selected parameter: the (module, role) pairs that hold it (by parameter id), or the reason it is not
    covered (by name)."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for _, sub in module.named_modules():
        for attr, p in sub._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((sub, attr, type(sub).__name__))
    covered: dict[int, list[tuple[nn.Module, str]]] = {}
    reasons: dict[str, str] = {}
    for name, p in named:
        uses = []
        reason = None
        for sub, attr, _ in owners.get(id(p), []):
            roles, why = module_roles(sub)
            if roles is None:
                reason = why
                break
            if attr not in roles:
                reason = f"attribute {attr!r} of {type(sub).__name__} is not a supported role"
                break
            uses.append((sub, roles[attr]))
        if reason is None and not uses:
            reason = "not held by any module"
        if reason is None:
            covered[id(p)] = uses
        else:
            reasons[name] = reason
    return covered, reasons


def fused_coverage(model: nn.Module, parameters: ParameterSpec = None) -> tuple[list[str], dict[str, str]]:
    """Static coverage of ``FusedGradientProbe``: (names of selected parameters its hooks cover, {name: reason} for
    the others). Run-time checks (batch-first inputs, no functional reuse) can still drop covered ones."""
    module = unwrap(model)
    named = select_parameters(module, parameters)
    covered, reasons = static_coverage(module, named)
    return [name for name, p in named if id(p) in covered], reasons
