"""The statistics record that flows from the training step (via a probe) to a mixing method.

One record describes one update interval. Every field but ``step`` and ``num_domains`` is optional, so the
static methods, PiKE (norms and variances), DGA (target alignments) and the diagnostics (Gramian) all read the
same type and each checks only for the fields it needs (``MixingMethod.required_stats``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

__all__ = ["DomainStats", "StatsError"]


class StatsError(ValueError):
    """A statistics record is malformed (wrong length, wrong shape, missing a field a method needs)."""


_VECTOR_FIELDS = (
    "loss",
    "tokens",
    "examples",
    "grad_sq_norm",
    "grad_var",
    "target_alignment",
)


@dataclass
class DomainStats:
    """Per-domain statistics for one update of a mixing method.

    Arrays have one entry per domain (K). ``NaN`` marks "not measured for this domain in this interval" (for
    example a domain absent from the probed batch); methods must treat NaN entries as missing, never propagate them.

    Attributes:
        step: optimizer step at which the statistics were taken.
        num_domains: K.
        loss: mean training loss per domain.
        tokens: tokens seen per domain in the interval.
        examples: examples the estimates for each domain were computed from.
        batch_size: global batch size b (PiKE's variance term is scaled by 1/(2b)).
        grad_sq_norm: unbiased estimate of ||grad L_k||^2 (squared norm of the domain's mean gradient).
        grad_var: unbiased estimate of sigma_k^2, the trace of the per-sample gradient covariance of domain k.
        target_alignment: <grad L_k, grad L_target> (DGA).
        target_loss: loss on the target batch (DGA), if one was computed.
        gram: K x K matrix of inner products <grad L_i, grad L_j> (diagnostics, FAMO-style methods).
        extra: anything else a probe wants to pass on (kept out of the math).
    """

    step: int
    num_domains: int
    loss: np.ndarray | None = None
    tokens: np.ndarray | None = None
    examples: np.ndarray | None = None
    batch_size: int | None = None
    grad_sq_norm: np.ndarray | None = None
    grad_var: np.ndarray | None = None
    target_alignment: np.ndarray | None = None
    target_loss: float | None = None
    gram: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.num_domains) < 1:
            raise StatsError(f"num_domains must be >= 1, got {self.num_domains}")
        self.num_domains = int(self.num_domains)
        for name in _VECTOR_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            arr = np.asarray(value, dtype=np.float64).reshape(-1)
            if arr.shape[0] != self.num_domains:
                raise StatsError(
                    f"DomainStats.{name} has {arr.shape[0]} entries but there are {self.num_domains} domains"
                )
            setattr(self, name, arr)
        if self.gram is not None:
            gram = np.asarray(self.gram, dtype=np.float64)
            if gram.shape != (self.num_domains, self.num_domains):
                raise StatsError(
                    f"DomainStats.gram has shape {gram.shape}, expected ({self.num_domains}, {self.num_domains})"
                )
            self.gram = gram

    def require(self, names: tuple[str, ...] | frozenset[str], method: str) -> None:
        """Raise a clear error if any field in ``names`` is missing."""
        missing = [n for n in names if getattr(self, n, None) is None]
        if missing:
            raise StatsError(
                f"method {method!r} needs statistics {sorted(missing)} that this record does not carry; "
                "attach a GradientProbe to the Mixer (or fill them in your own stats provider)"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (lists, NaN kept as None)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                out[f.name] = [None if not np.isfinite(v) else float(v) for v in value.reshape(-1)] if value.ndim == 1 \
                    else [[None if not np.isfinite(v) else float(v) for v in row] for row in value]
            elif f.name == "extra":
                continue
            else:
                out[f.name] = value
        return out
