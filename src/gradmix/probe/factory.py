"""``make_probe``: the one place that knows all three probes and picks one for a model."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from gradmix.probe.coverage import coverage_report, describe_uncovered, static_coverage, summary_line
from gradmix.probe.fused import FUSED_ONLY, FusedGradientProbe
from gradmix.probe.layout import select_parameters, unwrap
from gradmix.probe.micro import GradientProbe
from gradmix.probe.protocol import Probe
from gradmix.probe.sharded import ShardedGradientProbe

__all__ = ["make_probe"]


def _sharded(model: nn.Module) -> bool:
    """FSDP (flat parameters) or DTensor parameters: per-example factors of module hooks do not apply."""
    if "FullyShardedDataParallel" in type(model).__name__:
        return True
    for p in model.parameters():
        if type(p).__name__ in ("FlatParameter", "DTensor") or getattr(p, "_is_flat_param", False):
            return True
    return False


def make_probe(model: nn.Module, *, fused: bool | str = "auto", **params: Any) -> Probe:
    """The probe a Mixer builds: ``FusedGradientProbe`` where the model allows it, else ``GradientProbe``.

    ``fused``: ``"auto"`` (default) - the fused probe unless the model is sharded (FSDP2 / DTensor parameters: the
    ``ShardedGradientProbe``; FSDP1 flat parameters: the micro-batch probe) or its hooks statically cover too
    little of the selected parameters (more than ``max_skipped_fraction`` of the scalars uncovered), in which case
    the micro-batch probe; a fallback is said once (a warning naming the uncovered parameters grouped by reason) and
    recorded in the probe's ``coverage_report`` (mode ``micro_fallback``); ``True`` - always the fused probe (which
    still falls back at run time according to ``uncovered``); ``False`` - always the micro-batch probe. ``params``
    go to the probe (``parameters``, ``num_splits``, ``gram``, ``preconditioner``, ...; the fused-only ``uncovered``,
    ``max_skipped_fraction``, ``exact_global``, ``chunk_bytes`` are ignored when the micro-batch probe is chosen by
    ``"auto"`` and rejected with ``fused=False``).
    """
    if fused not in (True, False, "auto"):
        raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
    fused_only = {key: params.pop(key) for key in FUSED_ONLY if key in params}
    if fused is False:
        if fused_only:
            raise ValueError(f"{sorted(fused_only)} apply to the fused probe only (fused=False was asked for)")
        return GradientProbe(model, **params)
    if fused == "auto":
        module = unwrap(model)
        if _sharded(module):
            if any(type(p).__name__ == "DTensor" for p in module.parameters()):  # FSDP2: statistics from shards
                return ShardedGradientProbe(model, **params)
            warnings.warn(
                "make_probe: FSDP flat parameters hide the per-layer factors of the fused probe; using the "
                "micro-batch GradientProbe",
                stacklevel=2,
            )
            flat = GradientProbe(model, **params)
            why = {name: "FSDP flat parameter" for name, _ in flat.named_parameters}
            flat.coverage_report = coverage_report("GradientProbe", "micro_fallback", flat.named_parameters, why)
            return flat
        named = select_parameters(module, params.get("parameters"))
        _, reasons = static_coverage(module, named)
        total = sum(p.numel() for _, p in named)
        uncovered = sum(p.numel() for name, p in named if name in reasons)
        if uncovered > float(fused_only.get("max_skipped_fraction", 0.05)) * total:
            sizes = {name: p.numel() for name, p in named}
            warnings.warn(
                f"make_probe: the fused probe's hooks cover {100.0 * (total - uncovered) / total:.1f}% of the selected "
                f"scalars ({uncovered} of {total} uncovered: {summary_line(describe_uncovered(reasons, sizes))}); "
                "using the micro-batch GradientProbe (extra forward/backward passes per group on measuring steps)",
                stacklevel=2,
            )
            probe = GradientProbe(model, **params)
            probe.coverage_report = coverage_report("GradientProbe", "micro_fallback", named, reasons)
            return probe
    return FusedGradientProbe(model, **params, **fused_only)
