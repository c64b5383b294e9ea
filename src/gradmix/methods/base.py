"""The interface every mixing method implements, and the weight checks they all share.

A method is pure math: statistics in, weights out, plus its own state. No IO, no torch.distributed, no logging:
problems are reported by raising (bad input) or by returning the previous weights and recording why in
``last_skip_reason`` (degenerate statistics), which the controller turns into a warning and a metric.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from gradmix.stats import DomainStats

__all__ = [
    "WEIGHT_PARAMS",
    "MixingMethod",
    "WeightError",
    "keep_weights",
    "normalize_log_weights",
    "resolve_weight_params",
    "state_int",
    "state_vector",
    "uniform_weights",
    "unmeasurable_domains",
    "validate_weights",
    "weights_by_name",
]

WEIGHT_TOLERANCE = 1e-9


class WeightError(ValueError):
    """Weights that are not a valid probability vector (or cannot be turned into one)."""


def _detached(value: Any) -> Any:
    """A torch tensor (or a list of them) as numpy / floats, without importing torch: ``np.asarray`` refuses a
    tensor that requires grad ("Can't call numpy() on Tensor that requires grad") or lives on a GPU."""
    detach = getattr(value, "detach", None)
    if callable(detach) and hasattr(value, "cpu"):
        return detach().cpu().double().numpy()
    if isinstance(value, (list, tuple)):
        return [_detached(v) for v in value]
    return value


# Method parameters that hold one weight per domain: given as a {domain name: weight} mapping to the Mixer (or a
# ``gradmix run`` config's ``mixing.params``), they are turned into positional vectors by ``resolve_weight_params``.
WEIGHT_PARAMS: tuple[str, ...] = ("weights", "initial_weights")


def weights_by_name(weights: Mapping[Any, Any], names: Sequence[str] | None, *, what: str = "weights") -> list[Any]:
    """A ``{domain name: weight}`` mapping as a positional list in the order of ``names`` (the one translation of
    weights by name; every entry point goes through it via ``validate_weights``). The mapping's order does not
    matter; an unknown or a missing name is a one-line ``WeightError`` naming it and listing the domains."""
    if names is None:
        raise WeightError(
            f"{what} is given by domain name, but the domain names are not known here: pass a list (one weight "
            "per domain), or build through Mixer/DomainSet so names are known"
        )
    names = [str(n) for n in names]
    known = ", ".join(repr(n) for n in names)
    if len(set(names)) != len(names):
        raise WeightError(f"{what} is given by domain name, but the domain names are not unique ({known})")
    unknown = [key for key in weights if key not in names]
    if unknown:
        raise WeightError(f"{what} names an unknown domain {unknown[0]!r}; the domains are {known}")
    missing = [name for name in names if name not in weights]
    if missing:
        raise WeightError(f"{what} has no weight for domain {missing[0]!r}; give one for every domain: {known}")
    return [weights[name] for name in names]


def resolve_weight_params(
    params: Mapping[str, Any] | None, names: Sequence[str], *, label: str = "method_params[{key!r}]"
) -> dict[str, Any]:
    """Method parameters with every ``WEIGHT_PARAMS`` entry given as a ``{domain name: weight}`` mapping turned into
    a positional list (checked: unknown / missing names, negatives, NaN), in the order of ``names``. Used where the
    domain names are known (the Mixer, the integrations, ``gradmix run``) before ``make_method``, which has none.
    Everything else, positional weights included, is passed on untouched. ``label`` names a parameter in errors."""
    out = dict(params or {})
    for key in WEIGHT_PARAMS:
        value = out.get(key)
        if isinstance(value, Mapping):
            what = label.format(key=key)
            out[key] = validate_weights(value, len(names), names=list(names), what=what).tolist()
    return out


def validate_weights(
    weights: Any, num_domains: int | None = None, *, names: list[str] | None = None, what: str = "weights"
) -> np.ndarray:
    """Check and normalise a user-given weight vector; raise ``WeightError`` naming the fault.

    Accepts any non-negative finite vector with a positive sum (it is rescaled to sum to 1). Individual zeros are
    allowed (a method may switch a domain off); all zeros, negatives, NaN/Inf and a wrong length are errors.
    Tensors (also ones that require grad, or live on a GPU) are read as plain numbers. A ``{domain name: weight}``
    mapping is read by name against ``names`` (``weights_by_name``); without ``names`` it is an error.
    """
    if isinstance(weights, Mapping):
        weights = weights_by_name(weights, names, what=what)
    try:
        arr = np.asarray(_detached(weights), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise WeightError(f"{what} must be a vector of numbers, got {type(weights).__name__} ({exc})") from None
    if arr.ndim != 1:
        raise WeightError(f"{what} must be a 1-D vector, got shape {arr.shape}")
    if num_domains is not None and arr.shape[0] != num_domains:
        raise WeightError(f"{what} has {arr.shape[0]} entries but there are {num_domains} domains")
    if arr.shape[0] == 0:
        raise WeightError(f"{what} is empty")

    def label(i: int) -> str:
        return f"domain {names[i]!r}" if names is not None and i < len(names) else f"domain {i}"

    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise WeightError(f"{what} has a non-finite value {arr[bad[0]]} for {label(int(bad[0]))}")
    neg = np.flatnonzero(arr < 0)
    if neg.size:
        raise WeightError(f"{what} has a negative value {arr[neg[0]]} for {label(int(neg[0]))}")
    with np.errstate(over="ignore"):
        total = arr.sum()
    if np.isinf(total):  # huge but finite entries: rescale first so the sum does not overflow to inf (-> all 0)
        arr = arr / arr.max()
        total = arr.sum()
    if not total > 0:
        raise WeightError(f"{what} are all zero: at least one domain needs a positive weight")
    if abs(total - 1.0) <= 1e-12:
        # already normalised: return as is, so a checkpoint round trip is bit-exact
        return arr.copy()
    return arr / total


def normalize_log_weights(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (renormalised log-weights, weights) from unnormalised log-weights.

    Exponentiated-gradient methods keep their state in log space and renormalise every step (log-sum-exp), so the
    weights never overflow however many updates run (a raw multiplicative EXP3 mixer overflows after ~800 updates).
    ``-inf`` entries (domains switched off) stay at weight 0.
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    finite = np.isfinite(log_weights)
    if not finite.any():
        raise WeightError("every log-weight is -inf or NaN: no domain left to sample")
    if np.isnan(log_weights).any():
        raise WeightError("a log-weight is NaN")
    shift = log_weights[finite].max()
    exp = np.where(finite, np.exp(np.where(finite, log_weights - shift, 0.0)), 0.0)
    total = exp.sum()
    weights = exp / total
    normalised = np.where(finite, log_weights - shift - np.log(total), -np.inf)
    return normalised, weights


def uniform_weights(num_domains: int) -> np.ndarray:
    return np.full(num_domains, 1.0 / num_domains)


def state_int(state: Mapping[str, Any], key: str, method: str, *, low: int = 0) -> int:
    """An integer field of a checkpointed method state, checked at load (not at the next update): ``ValueError``
    naming the method, the field and the value when it is missing, not an integer, or below ``low``."""
    if key not in state:
        raise ValueError(f"{method}: checkpointed state has no field {key!r}")
    value = state[key]
    integral = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()
    )
    if isinstance(value, (bool, np.bool_)) or not integral or int(value) < low:
        raise ValueError(f"{method}: checkpointed {key} must be an integer >= {low}, got {value!r}")
    return int(value)


def state_vector(
    state: Mapping[str, Any],
    key: str,
    method: str,
    length: int,
    *,
    finite: bool = True,
    nonnegative: bool = False,
) -> np.ndarray:
    """A length-``length`` float vector field of a checkpointed method state (None entries read as NaN, allowed only
    with ``finite=False``), checked at load: ``ValueError`` naming the method, the field and the fault."""
    if key not in state:
        raise ValueError(f"{method}: checkpointed state has no field {key!r}")
    raw = state[key]
    try:
        values = [np.nan if v is None else v for v in raw]
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{method}: checkpointed {key} must be a list of {length} numbers, got {raw!r}") from None
    if arr.shape != (length,):
        raise ValueError(f"{method}: checkpointed {key} has shape {arr.shape}, expected ({length},)")
    bad = np.flatnonzero(np.isinf(arr) | (np.isnan(arr) if finite else False))
    if bad.size:
        raise ValueError(f"{method}: checkpointed {key} has a non-finite value {arr[bad[0]]} at index {int(bad[0])}")
    if nonnegative and np.any(arr < 0):
        i = int(np.flatnonzero(arr < 0)[0])
        raise ValueError(f"{method}: checkpointed {key} has a negative value {arr[i]} at index {i}")
    return arr


def unmeasurable_domains(stats: DomainStats) -> np.ndarray:
    """Domains that were trained on in the interval but whose loss could not be computed (NaN/inf): a mask.

    Such a domain has examples (``stats.examples > 0``) and a non-finite ``stats.loss``. A domain that was simply not
    sampled (no examples) is not one of them: its absence is information a method may use (a bandit's unplayed arm).
    """
    if stats.loss is None or stats.examples is None:
        return np.zeros(stats.num_domains, dtype=bool)
    return (np.asarray(stats.examples) > 0) & ~np.isfinite(np.asarray(stats.loss))


def keep_weights(old: np.ndarray, new: np.ndarray, held: np.ndarray) -> np.ndarray:
    """``new`` with the ``held`` domains back at their ``old`` weights; the others share the rest in ``new``'s
    proportions. The one policy for a domain whose loss could not be computed: it is never starved for it."""
    if not held.any() or held.all():
        return old.copy() if held.all() else new
    rest = 1.0 - float(old[held].sum())
    free = float(new[~held].sum())
    if rest <= 0.0 or free <= 0.0:  # the held domains had all the mass, or the method gave the others none
        return old.copy()
    out = np.where(held, old, new / free * rest)  # divide first: free may be tiny (1e-300), rest / free overflow
    return out / out.sum()


class MixingMethod(ABC):
    """Base class: holds the current weights and the bookkeeping every method shares.

    Subclasses set ``name`` and implement ``_update``. What a method needs is declared here, as class attributes,
    and read by everything that builds one (``Mixer``, the experiment runner, the CLI) instead of lists of names:

    * ``required_stats``: the ``DomainStats`` fields the method reads; the controller uses it to decide what the
      probe must measure (gradient statistics need a model or probe).
    * ``needs_sizes``: the constructor takes ``sizes=`` (examples per domain); the Mixer passes them itself.
    * ``needs_target``: the method steers toward a target set (``Mixer(..., target=...)``, ``data.target``).
    * ``needs_target_counts``: the constructor takes ``target_counts=`` (the target's histogram over the domains,
      e.g. from ``gradmix cluster --target``).
    * ``every_step``: updated at every optimizer step (round robin, random task) instead of on the schedule.
    """

    name: ClassVar[str] = "base"
    required_stats: ClassVar[frozenset[str]] = frozenset()
    every_step: ClassVar[bool] = False
    needs_sizes: ClassVar[bool] = False
    needs_target: ClassVar[bool] = False
    needs_target_counts: ClassVar[bool] = False

    def __init__(self, num_domains: int, *, initial_weights: Any = None) -> None:
        if not isinstance(num_domains, (int, np.integer)) or num_domains < 1:
            raise ValueError(f"num_domains must be a positive integer, got {num_domains!r}")
        self.num_domains = int(num_domains)
        self._weights = (
            uniform_weights(self.num_domains)
            if initial_weights is None
            else validate_weights(initial_weights, self.num_domains, what="initial_weights")
        )
        self.num_updates = 0
        self.last_skip_reason: str | None = None
        self.last_held: list[int] = []  # domains whose weight the last update kept (loss NaN/inf; see update)

    @property
    def weights(self) -> np.ndarray:
        """Current sampling weights (a copy): finite, >= 0, sum to 1."""
        return self._weights.copy()

    def probe_groups(self) -> np.ndarray | None:
        """Which probe group each sampled domain belongs to (length K, values 0..G-1), or None for one per domain.

        Methods that optimise over G coarser units than the K sampled domains (DGA's distribution reweighting: K
        fine clusters, G base distributions) return the grouping; the controller then measures gradient statistics
        per group and passes a ``DomainStats`` with ``num_domains == G``.
        """
        return None

    def examples_to_measure(self, batch_size: int) -> int:
        """Examples the gradient statistics of one update should be pooled from (0: one measuring batch is enough).
        When one batch of ``batch_size`` has fewer, the core measures several steps of each update interval (unless
        the user set ``probe_every``)."""
        return 0

    @property
    def num_stat_groups(self) -> int:
        groups = self.probe_groups()
        return self.num_domains if groups is None else int(np.max(groups)) + 1

    def update(self, stats: DomainStats) -> np.ndarray:
        """Consume one statistics record and return the new weights.

        A domain that was trained on but whose loss is NaN/inf in ``stats`` (``unmeasurable_domains``) keeps its
        weight in every method that reads the loss: a loss that could not be computed is no evidence against the
        domain, and a method must not starve it for that (ODM, an EXP3 bandit, would: the domain earns no reward).
        The others share the rest of the mass in the proportions the method chose; ``last_held`` lists the kept
        domains. (Methods that do not read the loss are not moved by it; the gradient methods have their own rule
        for a domain without gradient statistics.)"""
        if stats.num_domains != self.num_stat_groups:
            raise ValueError(
                f"{self.name}: statistics for {stats.num_domains} domains, method expects {self.num_stat_groups}"
            )
        stats.require(self.required_stats, self.name)
        self.last_skip_reason = None
        self.last_held = []
        new = self._update(stats)
        if new is None:  # skipped update: keep the weights, reason in last_skip_reason
            return self.weights
        new = np.asarray(new, dtype=np.float64)
        if new.shape != (self.num_domains,) or not np.all(np.isfinite(new)) or np.any(new < 0) or new.sum() <= 0:
            # A method bug must never reach the sampler: keep the old weights and say why.
            self.last_skip_reason = f"{self.name} produced invalid weights {new!r}; update skipped"
            return self.weights
        if not np.array_equal(new, self._weights):  # unchanged weights stay bit-identical (no ulp drift to the sampler)
            new = new / new.sum()
        if "loss" in self.required_stats and self.probe_groups() is None:  # the loss steers it, per sampled domain
            held = unmeasurable_domains(stats)
            new = keep_weights(self._weights, new, held)
            self.last_held = [int(i) for i in np.flatnonzero(held)]
        self._weights = new
        self.num_updates += 1
        return self.weights

    @abstractmethod
    def _update(self, stats: DomainStats) -> np.ndarray | None:
        """Return new (unnormalised, non-negative) weights, or None to skip with ``last_skip_reason`` set."""

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "name": self.name,
            "num_domains": self.num_domains,
            "weights": self._weights.tolist(),
            "num_updates": self.num_updates,
        }
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for method {state.get('name')!r}, not {self.name!r}")
        if int(state.get("num_domains", -1)) != self.num_domains:
            raise ValueError(
                f"state is for {state.get('num_domains')} domains, this {self.name} has {self.num_domains}"
            )
        # all or nothing: a state whose method fields fail their checks leaves this method exactly as it was
        backup = (self._weights, self.num_updates, self._extra_state())
        try:
            self._weights = validate_weights(state["weights"], self.num_domains, what="checkpointed weights")
            self.num_updates = state_int(state, "num_updates", self.name) if "num_updates" in state else 0
            self._load_extra_state(state)
        except Exception:
            self._weights, self.num_updates = backup[0], backup[1]
            self._load_extra_state(backup[2])
            raise

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the fields ``_extra_state`` wrote, checking each (``state_int``, ``state_vector``): a crafted or
        corrupt state is refused at load, naming the field, instead of failing at the next update."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_domains={self.num_domains}, weights={np.round(self._weights, 4).tolist()})"
