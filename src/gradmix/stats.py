"""The statistics record that flows from the training step (via a probe) to a mixing method.

One record describes one update interval. Every field but ``step`` and ``num_domains`` is optional, so the
static methods, PiKE (norms and variances), DGA (target alignments) and the diagnostics (Gramian) all read the
same type and each checks only for the fields it needs (``MixingMethod.required_stats``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

__all__ = ["DomainStats", "Measurement", "StatsError", "pool_measurements"]


class StatsError(ValueError):
    """A statistics record is malformed (wrong length, wrong shape, missing a field a method needs)."""


_VECTOR_FIELDS = (
    "loss",
    "tokens",
    "examples",
    "grad_examples",
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
        loss: mean training loss per domain over the update interval (``MixingCore`` averages every step it
            observed, not only the steps that measured gradients).
        tokens: tokens seen per domain in the interval.
        examples: examples the estimates for each domain were computed from.
        grad_examples: for statistics pooled from several measurements, the number of examples one batch would need
            to give ``grad_sq_norm`` and ``grad_var`` the same precision (None: ``examples``); methods that weigh
            the statistics by their noise use it.
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
    grad_examples: np.ndarray | None = None
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
                out[f.name] = (
                    [None if not np.isfinite(v) else float(v) for v in value.reshape(-1)]
                    if value.ndim == 1
                    else [[None if not np.isfinite(v) else float(v) for v in row] for row in value]
                )
            elif f.name == "extra":
                continue
            else:
                out[f.name] = value
        return out


@dataclass
class Measurement:
    """What one training step measured, per group (a domain, or a probe group of DGA's distribution reweighting):
    the one type that carries a step's losses and gradient statistics from the probe (or ``Mixer.observe``) to the
    core, into checkpoints and on to the method (via ``to_stats``). Identical on every rank under torch.distributed.

    Attributes:
        loss: (G,) mean per-example loss per group over the global batch (NaN where a group is absent).
        examples: (G,) global example counts per group.
        mean_loss: mean loss of the whole global batch.
        grad_sq_norm: (G,) unbiased ||grad L_k||^2 (measuring steps only; NaN where not estimable).
        grad_var: (G,) unbiased sigma_k^2, trace of the per-sample gradient covariance (same NaN rules).
        gram: (G, G) <grad L_i, grad L_j>; diagonal = grad_sq_norm (``gram=True`` probes only).
        target_alignment: (G,) <grad L_k, g_target> (NaN for an absent group), if a target batch was given.
        target_loss: mean loss of the target batch, if one was given.
    """

    loss: np.ndarray
    examples: np.ndarray
    mean_loss: float
    grad_sq_norm: np.ndarray | None = None
    grad_var: np.ndarray | None = None
    gram: np.ndarray | None = None
    target_alignment: np.ndarray | None = None
    target_loss: float | None = None

    @classmethod
    def from_losses(cls, groups: Any, losses: Any, num_groups: int) -> Measurement:
        """Per-example losses and their group ids -> a losses-only measurement (local; no collectives here)."""
        ids = np.asarray(groups, dtype=np.int64).reshape(-1)
        values = np.asarray(losses, dtype=np.float64).reshape(-1)
        if ids.shape != values.shape:
            raise StatsError(f"{ids.size} group ids for {values.size} losses")
        if ids.size and (ids.min() < 0 or ids.max() >= num_groups):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise StatsError(f"domain id {bad} is outside 0..{num_groups - 1}")
        return cls.from_sums(
            np.bincount(ids, weights=values, minlength=num_groups),
            np.bincount(ids, minlength=num_groups).astype(np.float64),
        )

    @classmethod
    def from_sums(cls, loss_sums: np.ndarray, counts: np.ndarray) -> Measurement:
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.where(counts > 0, loss_sums / np.where(counts > 0, counts, 1.0), np.nan)
        total = counts.sum()
        mean_loss = float(loss_sums.sum() / total) if total > 0 else float("nan")
        return cls(loss=loss, examples=np.rint(counts).astype(np.int64), mean_loss=mean_loss)

    @property
    def num_groups(self) -> int:
        return int(np.asarray(self.loss).shape[0])

    @property
    def has_gradients(self) -> bool:
        return self.grad_sq_norm is not None or self.target_alignment is not None

    def loss_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """(per-group loss sums, per-group counts), absent groups 0."""
        counts = np.asarray(self.examples, dtype=np.float64)
        loss = np.asarray(self.loss, dtype=np.float64)
        return np.where(counts > 0, loss * counts, 0.0), counts

    def to_stats(self, step: int, batch_size: int) -> DomainStats:
        """The record a mixing method consumes (one entry per group)."""
        return DomainStats(
            step=int(step),
            num_domains=self.num_groups,
            loss=self.loss,
            examples=np.asarray(self.examples, dtype=np.float64),
            batch_size=int(batch_size),
            grad_sq_norm=self.grad_sq_norm,
            grad_var=self.grad_var,
            target_alignment=self.target_alignment,
            target_loss=self.target_loss,
            gram=self.gram,
            extra={"mean_loss": self.mean_loss},
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and floats (NaN kept: checkpoints are not JSON), for state dicts."""
        out: dict[str, Any] = {"mean_loss": float(self.mean_loss), "target_loss": self.target_loss}
        for key in ("loss", "examples", "grad_sq_norm", "grad_var", "gram", "target_alignment"):
            value = getattr(self, key)
            out[key] = None if value is None else np.asarray(value).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        def arr(key: str, dtype: Any = np.float64) -> np.ndarray | None:
            value = data.get(key)
            return None if value is None else np.asarray(value, dtype=dtype)

        loss, examples = arr("loss"), arr("examples", np.int64)
        if loss is None or examples is None or loss.shape != examples.shape or loss.ndim != 1:
            raise StatsError(
                f"malformed measurement in state: loss {None if loss is None else loss.shape}, "
                f"examples {None if examples is None else examples.shape}"
            )
        return cls(
            loss=loss,
            examples=examples,
            mean_loss=float(data.get("mean_loss", float("nan"))),
            grad_sq_norm=arr("grad_sq_norm"),
            grad_var=arr("grad_var"),
            gram=arr("gram"),
            target_alignment=arr("target_alignment"),
            target_loss=data.get("target_loss"),
        )


def pool_measurements(measurements: list[Measurement], step: int, batch_size: int) -> DomainStats:
    """Several measurements of one update interval -> one record: losses count-weighted, statistics averaged where
    measured (NaN-aware), counts summed. Averaging unbiased estimates keeps them unbiased."""
    if len(measurements) == 1:
        return measurements[0].to_stats(step, batch_size)
    first = measurements[0]
    out: dict[str, Any] = {}
    sums = [m.loss_sums() for m in measurements]
    loss_sum = np.sum([s for s, _ in sums], axis=0)
    counts = np.sum([c for _, c in sums], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["loss"] = np.where(counts > 0, loss_sum / np.where(counts > 0, counts, 1.0), np.nan)
    # Unbiased per-domain estimates from small groups are weighted by their precision: ||g||^2-hat by its pairs
    # n (n - 1) (its noise is ~ 2 sigma^4 / (n (n - 1))), sigma^2-hat by n - 1; a plain mean would let a measurement
    # with 2 examples count as much as one with 20. The other statistics are averaged.
    per_measurement = np.stack([np.asarray(m.examples, dtype=np.float64) for m in measurements])
    precision = {
        "grad_sq_norm": per_measurement * (per_measurement - 1.0),
        "grad_var": per_measurement - 1.0,
    }
    pairs = None
    for key in ("grad_sq_norm", "grad_var", "target_alignment", "gram"):
        values = [getattr(m, key) for m in measurements if getattr(m, key) is not None]
        if values:
            stacked = np.stack(values)
            with np.errstate(invalid="ignore"):
                finite = np.isfinite(stacked)
                if key in precision and len(values) == len(measurements):
                    weight = np.where(finite, np.maximum(precision[key], 0.0), 0.0)
                    total = np.where(finite, stacked, 0.0) * weight
                    mass = weight.sum(axis=0)
                    out[key] = np.where(mass > 0, total.sum(axis=0) / np.where(mass > 0, mass, 1.0), np.nan)
                    if key == "grad_sq_norm":
                        pairs = mass
                    continue
                total = np.where(finite, stacked, 0.0).sum(axis=0)
                n = finite.sum(axis=0)
                out[key] = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    if pairs is not None:  # n_eff (n_eff - 1) = sum of the pairs behind the pooled ||g||^2-hat
        out["grad_examples"] = 0.5 + np.sqrt(0.25 + pairs)
    target_losses = [m.target_loss for m in measurements if m.target_loss is not None]
    return DomainStats(
        step=step,
        num_domains=first.num_groups,
        batch_size=batch_size,
        examples=counts,
        target_loss=float(np.mean(target_losses)) if target_losses else None,
        **out,
    )
