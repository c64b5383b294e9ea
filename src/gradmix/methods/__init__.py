"""Mixing methods and the registry that maps names to them.

Each method lives in its own module and is imported lazily, so optional pieces never slow ``import gradmix``.
``register_method`` lets users plug in their own method under a new name.
"""

from __future__ import annotations

import importlib
from typing import Any

from gradmix.methods.base import MixingMethod, WeightError, validate_weights

__all__ = ["make_method", "available_methods", "method_class", "MethodRegistry", "MixingMethod", "WeightError",
           "validate_weights"]

# name -> "module:ClassName" for the built-ins. Read-only: plug-ins go into a MethodRegistry of the user's own,
# or are passed to make_method as a class.
_BUILTIN: dict[str, str] = {
    "uniform": "gradmix.methods.static:Uniform",
    "fixed": "gradmix.methods.static:Fixed",
    "proportional": "gradmix.methods.static:Proportional",
    "temperature": "gradmix.methods.static:Temperature",
    "round_robin": "gradmix.methods.static:RoundRobin",
    "random": "gradmix.methods.static:RandomTask",
    "pike": "gradmix.methods.pike:PiKE",
    "fair_pike": "gradmix.methods.fair_pike:FairPiKE",
    "balanced_pike": "gradmix.methods.fair_pike:FairPiKE",
    "dga": "gradmix.methods.dga:DGA",
    "importance": "gradmix.methods.importance:Importance",
    "doge": "gradmix.methods.doge:DoGE",
    "doremi": "gradmix.methods.doremi:DoReMi",
    "odm": "gradmix.methods.odm:ODM",
    "famo": "gradmix.methods.famo:FAMO",
}


class MethodRegistry:
    """Name -> method class. One default instance backs ``make_method``; create your own to isolate plug-ins."""

    def __init__(self) -> None:
        self._entries: dict[str, Any] = dict(_BUILTIN)

    def register(self, name: str, cls: type[MixingMethod]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, MixingMethod)):
            raise TypeError(f"{cls!r} is not a MixingMethod subclass")
        self._entries[name] = cls

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> type[MixingMethod]:
        key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
        if key not in self._entries:
            raise ValueError(f"unknown mixing method {name!r}; available: {', '.join(self.names())}")
        entry = self._entries[key]
        if isinstance(entry, str):
            module_name, cls_name = entry.split(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                raise ValueError(f"mixing method {name!r} is not available in this install ({exc})") from exc
            entry = getattr(module, cls_name)
        return entry

    def make(self, name: str, num_domains: int, **params: Any) -> MixingMethod:
        cls = self.get(name)
        try:
            return cls(num_domains, **params)
        except TypeError as exc:
            raise ValueError(f"bad parameters for mixing method {name!r}: {exc}") from exc


def make_method(name: str | type[MixingMethod], num_domains: int, *, registry: MethodRegistry | None = None,
                **params: Any) -> MixingMethod:
    """Build a mixing method by name (``make_method("pike", 6, zeta1=1.0)``) or from a MixingMethod subclass."""
    if isinstance(name, type) and issubclass(name, MixingMethod):
        return name(num_domains, **params)
    return (registry or MethodRegistry()).make(name, num_domains, **params)


def method_class(name: str) -> type[MixingMethod]:
    return MethodRegistry().get(name)


def available_methods() -> list[str]:
    return MethodRegistry().names()
