"""Mixing methods and the registry that maps names to them.

Each method lives in its own module and is imported lazily, so optional pieces never slow ``import gradmix``.
``register_method`` lets users plug in their own method under a new name: it is then usable by name everywhere a
method is named (``make_method``, ``Mixer(..., method="mine")``, a ``gradmix run`` config). A ``MethodRegistry`` of
one's own (``make_method(..., registry=...)``) keeps plug-ins isolated instead.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from gradmix.methods.base import MixingMethod, WeightError, resolve_weight_params, validate_weights

__all__ = [
    "MethodRegistry",
    "MixingMethod",
    "WeightError",
    "available_methods",
    "check_method_params",
    "make_method",
    "method_class",
    "register_method",
    "resolve_weight_params",
    "unregister_method",
    "validate_weights",
]

# name -> "module:ClassName" for the built-ins (read-only; registered methods live in a registry's own entries).
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
    "schedule": "gradmix.methods.schedule:StepSchedule",
}


class MethodRegistry:
    """Name -> method class. One default instance backs ``make_method``; create your own to isolate plug-ins."""

    def __init__(self) -> None:
        self._entries: dict[str, Any] = dict(_BUILTIN)

    @staticmethod
    def _key(name: Any) -> Any:
        return name.strip().lower().replace("-", "_") if isinstance(name, str) else name

    def register(self, name: str, cls: type[MixingMethod], *, overwrite: bool = False) -> type[MixingMethod]:
        """Make ``cls`` available as ``name`` (case-insensitive, ``-`` = ``_``); returns ``cls``.

        A name already taken (a built-in or an earlier registration) is a ``ValueError`` unless ``overwrite=True``;
        ``cls`` must be a ``MixingMethod`` subclass (``TypeError`` otherwise).
        """
        if not (isinstance(cls, type) and issubclass(cls, MixingMethod)):
            raise TypeError(f"register_method: {cls!r} is not a MixingMethod subclass")
        key = self._key(name)
        if not isinstance(key, str) or not key:
            raise ValueError(f"register_method: a method name must be a non-empty string, got {name!r}")
        if key in self._entries and not overwrite:
            raise ValueError(
                f"register_method: a mixing method named {key!r} already exists; pick another name or "
                "pass overwrite=True to replace it"
            )
        self._entries[key] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove a registered method (built-in names come back as the built-in)."""
        key = self._key(name)
        if key not in self._entries or self._entries[key] == _BUILTIN.get(key):
            raise ValueError(f"no registered mixing method named {name!r}")
        if key in _BUILTIN:
            self._entries[key] = _BUILTIN[key]
        else:
            del self._entries[key]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> type[MixingMethod]:
        key = self._key(name)
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
        return _build(self.get(name), name, num_domains, params)


def check_method_params(cls: type[MixingMethod], params: Any, name: str | None = None) -> None:
    """``ValueError`` naming the parameter and the ones the method takes when ``params`` has a name its constructor
    does not accept (a typo in a config must not be a ``TypeError`` traceback, nor silently ignored)."""
    label = name if name is not None else getattr(cls, "name", cls.__name__)
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):  # no introspectable signature: the constructor itself will judge
        return
    parameters = list(signature.parameters.values())[2:]  # self, num_domains
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [str(key) for key in params if key not in accepted]
    if unknown:
        takes = ", ".join(accepted) if accepted else "none"
        raise ValueError(
            f"bad parameters for mixing method {label!r}: it has no parameter {unknown[0]!r} (its parameters: {takes})"
        )


def _build(cls: type[MixingMethod], name: str, num_domains: int, params: dict[str, Any]) -> MixingMethod:
    check_method_params(cls, params, name)
    try:
        return cls(num_domains, **params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for mixing method {name!r}: {exc}") from exc


# The registry behind make_method / method_class / available_methods / register_method. The one piece of
# module-level mutable state in the library, on purpose: a method registered once must be usable by name from
# anywhere (Mixer, configs), as the design's contract asks.
_DEFAULT_REGISTRY = MethodRegistry()


def register_method(name: str, cls: type[MixingMethod], *, overwrite: bool = False) -> type[MixingMethod]:
    """Register a user's ``MixingMethod`` subclass under ``name``; then ``make_method(name, K)``,
    ``Mixer(..., method=name)`` and ``mixing.method = name`` in a ``gradmix run`` config all find it.

    ``ValueError`` if the name is taken (built-in or registered) unless ``overwrite=True``; ``TypeError`` if
    ``cls`` is not a ``MixingMethod`` subclass. Returns ``cls``.
    """
    return _DEFAULT_REGISTRY.register(name, cls, overwrite=overwrite)


def unregister_method(name: str) -> None:
    """Undo ``register_method(name, ...)``."""
    _DEFAULT_REGISTRY.unregister(name)


def make_method(
    name: str | type[MixingMethod], num_domains: int, *, registry: MethodRegistry | None = None, **params: Any
) -> MixingMethod:
    """Build a mixing method by name (``make_method("pike", 6, zeta1=1.0)``) or from a MixingMethod subclass."""
    if isinstance(name, type) and issubclass(name, MixingMethod):
        return _build(name, getattr(name, "name", name.__name__), num_domains, params)
    return (registry or _DEFAULT_REGISTRY).make(name, num_domains, **params)


def method_class(name: str | type[MixingMethod], *, registry: MethodRegistry | None = None) -> type[MixingMethod]:
    """The class behind a method name (a ``MixingMethod`` subclass is returned as is)."""
    if isinstance(name, type) and issubclass(name, MixingMethod):
        return name
    return (registry or _DEFAULT_REGISTRY).get(name)


def available_methods(*, registry: MethodRegistry | None = None) -> list[str]:
    return (registry or _DEFAULT_REGISTRY).names()
