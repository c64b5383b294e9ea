"""The Mixer: the one object a training loop talks to.

It owns the domains, the sampler, the method and the schedule; on the steps where the method needs gradient
statistics it has the probe measure them inside the training step; it pushes new weights to the sampler, records
metrics, and saves / loads all of its state in one atomic checkpoint.

A plain loop::

    mixer = Mixer(domains, method="pike", batch_size=32, update_every=50, model=model)
    for batch in mixer.batches(num_steps):
        mixer.backward(model, batch, per_example_loss)   # forward + backward (+ probe on update steps)
        optimizer.step(); optimizer.zero_grad()
        mixer.step()
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from gradmix.checkpoint import load_checkpoint_file, save_checkpoint_file
from gradmix.methods import make_method
from gradmix.methods.base import MixingMethod
from gradmix.sampler import DataExhaustedError, MixtureSampler
from gradmix.sources import Domain, DomainSet, DomainSource, collate_examples
from gradmix.stats import DomainStats

__all__ = ["Mixer", "MixerConfig", "MixingWarning"]

LossFn = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
GRADIENT_STATS = frozenset({"grad_sq_norm", "grad_var", "target_alignment", "gram"})


class MixingWarning(UserWarning):
    """A skipped update, an exhausted domain, or another event worth a user's attention."""


@dataclass
class MixerConfig:
    """Schedule and sampling settings (everything but the data, the method object and the model).

    update_every: optimizer steps between method updates (PiKE's T0, DGA's T_r).
    warmup_steps: steps before the first update (weights stay at the method's initial weights).
    probe_every: steps between gradient measurements; default = update_every (measure on the step that ends each
        interval). Smaller values average several measurements into one update (less estimator noise, more cost).
    """

    batch_size: int
    update_every: int = 50
    warmup_steps: int = 0
    probe_every: int | None = None
    seed: int = 0
    mode: str = "quota"
    max_repeats: int | None = None
    target_batch_size: int = 32
    log_every: int = 10
    alert_min_weight: float | None = None
    alert_repeats: int | None = 4

    def __post_init__(self) -> None:
        for name in ("batch_size", "update_every", "log_every", "target_batch_size"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.probe_every is not None and (self.probe_every < 1 or self.update_every % self.probe_every):
            raise ValueError(f"probe_every ({self.probe_every}) must be a positive divisor of update_every "
                             f"({self.update_every})")


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class _Interval:
    """Per-domain loss sums and example counts over a span of steps."""

    loss_sum: np.ndarray
    loss_count: np.ndarray

    def add(self, loss_sum: np.ndarray, counts: np.ndarray) -> None:
        self.loss_sum += np.where(counts > 0, loss_sum, 0.0)
        self.loss_count += counts

    def mean(self) -> np.ndarray:
        """Mean loss per domain (NaN where no example was seen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.loss_count > 0, self.loss_sum / np.maximum(self.loss_count, 1), np.nan)


class Mixer:
    """Adaptive data mixing for one training run.

    Args:
        domains: a ``DomainSet`` (or a list of ``Domain``).
        method: a method name from the registry or a ``MixingMethod`` instance.
        batch_size: global batch size (examples per optimizer step, all ranks together).
        method_params: keyword arguments for the method (``sizes`` is filled in for methods that need it).
        model: the model, needed when the method uses gradient statistics (a ``GradientProbe`` is built for it).
        probe: a ready ``GradientProbe`` (overrides ``model``); or any object with the same ``backward``.
        target: the target set for DGA-style methods: a ``Domain``, or a tensor of token windows.
        run_dir: where ``metrics.jsonl`` goes (rank 0 only); None = keep metrics in memory only.
        rank, world_size: default from torch.distributed when it is initialised.
        other keyword arguments: see ``MixerConfig``.
    """

    def __init__(
        self,
        domains: DomainSet | Sequence[Domain],
        method: str | MixingMethod = "uniform",
        batch_size: int = 32,
        *,
        method_params: Mapping[str, Any] | None = None,
        model: torch.nn.Module | None = None,
        probe: Any = None,
        probe_params: Mapping[str, Any] | None = None,
        target: DomainSource | torch.Tensor | None = None,
        run_dir: str | Path | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        **config: Any,
    ) -> None:
        self.domains = domains if isinstance(domains, DomainSet) else DomainSet(domains)
        self.config = MixerConfig(batch_size=batch_size, **config)
        dist_rank, dist_world = _dist_info()
        self.rank = dist_rank if rank is None else int(rank)
        self.world_size = dist_world if world_size is None else int(world_size)
        self.names = self.domains.names
        k = len(self.names)

        if isinstance(method, MixingMethod):
            if method.num_domains != k:
                raise ValueError(f"method {method.name!r} was built for {method.num_domains} domains, "
                                 f"the Mixer has {k}: {self.names}")
            self.method = method
        else:
            params = dict(method_params or {})
            from gradmix.methods import method_class

            cls = method_class(method)
            if cls.needs_sizes and "sizes" not in params:
                params["sizes"] = self.domains.sizes
            self.method = make_method(method, k, **params)

        self.sampler = MixtureSampler(
            self.domains.sizes, self.config.batch_size, self.method.weights, seed=self.config.seed,
            mode=self.config.mode, rank=self.rank, world_size=self.world_size,
            max_repeats=self.config.max_repeats, domain_names=self.names, shuffle=self.domains.shuffle,
        )

        # target set (DGA, DoGE)
        self.target: DomainSource | None = None
        self._target_sampler: MixtureSampler | None = None
        if target is not None:
            self.target = target if isinstance(target, DomainSource) else Domain("target", torch.as_tensor(target))
            if self.target.window_tokens != self.domains.window_tokens:
                raise ValueError(f"target windows have {self.target.window_tokens} tokens, domains have "
                                 f"{self.domains.window_tokens}")
            tbs = self.config.target_batch_size
            if self.target.size < 2:
                raise ValueError(f"target set {self.target.name!r} has {self.target.size} example(s); "
                                 "a target gradient needs at least 2 (better: a few hundred)")
            tbs = min(tbs, self.target.size)
            tbs -= tbs % self.world_size
            if tbs < self.world_size:
                raise ValueError(f"target set {self.target.name!r} has {self.target.size} examples, fewer than the "
                                 f"{self.world_size} ranks")
            self._target_sampler = MixtureSampler([self.target.size], tbs, [1.0], seed=self.config.seed + 1,
                                                  rank=self.rank, world_size=self.world_size,
                                                  domain_names=[self.target.name], shuffle=self.target.shuffle)
        if self.method.needs_target and self.target is None:
            raise ValueError(f"method {self.method.name!r} steers toward a target set: pass target=... to the Mixer")

        self.needs_gradients = bool(self.method.required_stats & GRADIENT_STATS)
        self.probe = probe
        if self.probe is None and self.needs_gradients:
            if model is None:
                raise ValueError(f"method {self.method.name!r} needs gradient statistics: pass model=... (or probe=...)")
            from gradmix.probe import GradientProbe

            self.probe = GradientProbe(model, **dict(probe_params or {}))

        groups = self.method.probe_groups()
        self._groups = None if groups is None else torch.as_tensor(np.asarray(groups), dtype=torch.long)
        self.step_count = 0
        self._interval = self._new_interval()  # logging interval (train_loss in metrics.jsonl)
        self._update_losses = self._new_interval()  # update interval (the losses a loss-based method sees)
        self._update_interval: list[Any] = []
        self._last_result: Any = None
        self._last_counts: np.ndarray | None = None
        self._pending_metrics: dict[str, Any] = {}
        self._tokens = np.zeros(k, dtype=np.int64)
        self._events: list[str] = []
        self._starved: set[int] = set()
        self._repeat_alerted: set[int] = set()
        self._num_sampler_events = 0
        self.history: list[dict[str, Any]] = []
        self.exhausted_message: str | None = None  # set when ``batches()`` ended because the data ran out
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._metrics_path = self.run_dir / "metrics.jsonl" if self.run_dir is not None else None
        self._alert_low_weights(self.method.weights)  # a starting mix can already starve a domain

    # -- data ---------------------------------------------------------------------------------------------------
    def _new_interval(self) -> _Interval:
        k = len(self.names)
        return _Interval(np.zeros(k), np.zeros(k))

    def batches(self, num_steps: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Collated batches (this rank's share), without a DataLoader: the fastest path for in-memory windows."""
        produced = 0
        while num_steps is None or produced < num_steps:
            try:
                domains, examples = self.sampler.next_arrays()
            except DataExhaustedError as exc:  # every domain used its max_repeats passes: end, do not crash
                self.exhausted_message = f"step {self.step_count}: data exhausted, iteration ends: {exc}"
                self._warn(self.exhausted_message)
                return
            produced += 1
            yield self.domains.gather(domains, examples)

    def dataloader(self, **kwargs: Any) -> torch.utils.data.DataLoader:
        """A DataLoader over the live sampler. With ``num_workers > 0`` a weight change reaches batches after the
        prefetch depth (see ``MixtureSampler``); checkpoints stay exact because the Mixer checkpoints the sampler at
        the consumed step."""
        kwargs.setdefault("collate_fn", collate_examples)
        return torch.utils.data.DataLoader(self.domains, batch_sampler=self.sampler, **kwargs)

    def next_target_batch(self) -> dict[str, torch.Tensor]:
        if self._target_sampler is None or self.target is None:
            raise ValueError("this Mixer has no target set")
        _, idx = self._target_sampler.next_arrays()
        return {"input_ids": self.target.take(idx)}

    # -- schedule -----------------------------------------------------------------------------------------------
    @property
    def weights(self) -> np.ndarray:
        return self.method.weights

    def _update_due(self, step: int) -> bool:
        """Whether the method updates after optimizer step ``step`` (1-based count of finished steps)."""
        return step >= max(self.config.warmup_steps, 1) and step % self.config.update_every == 0

    def should_measure(self) -> bool:
        """Whether the step about to run must measure gradient statistics."""
        if not self.needs_gradients:
            return False
        step = self.step_count + 1
        probe_every = self.config.probe_every or self.config.update_every
        if step % probe_every:
            return False
        # only measure within the interval that ends in an update
        next_update = math.ceil(step / self.config.update_every) * self.config.update_every
        return self._update_due(next_update)

    # -- training step ------------------------------------------------------------------------------------------
    def backward(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor], loss_fn: LossFn) -> Any:
        """Forward + backward of the mixed batch (``loss_fn`` returns per-example losses); measures gradient
        statistics on the steps that need them. ``.grad`` afterwards is the gradient of the batch's mean loss."""
        if self.probe is None:
            from gradmix.probe import GradientProbe

            self.probe = GradientProbe(model)
        measure = self.should_measure()
        domains = batch["domain"].long()
        groups = domains if self._groups is None else self._groups[domains]
        target_batch = None
        if measure and self.method.needs_target:
            target_batch = self.next_target_batch()
        result = self.probe.backward(batch, groups, self.method.num_stat_groups, loss_fn, measure=measure,
                                     target_batch=target_batch, global_batch_size=self.config.batch_size)
        self._last_result = result
        # The probe already all-reduced per-group counts; with one group per domain they are the domain counts.
        self._last_counts = (np.asarray(result.examples, dtype=np.float64) if self._groups is None
                             else self._global_counts(domains))
        return result

    def _global_counts(self, domains: torch.Tensor | np.ndarray) -> np.ndarray:
        """Examples per domain in this step's global batch (all-reduced across ranks when distributed)."""
        local = np.bincount(np.asarray(domains.cpu() if isinstance(domains, torch.Tensor) else domains,
                                       dtype=np.int64), minlength=len(self.names)).astype(np.float64)
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.from_numpy(local)
            torch.distributed.all_reduce(t)
            local = t.numpy()
        return local

    def observe(self, domains: torch.Tensor | np.ndarray, losses: torch.Tensor | np.ndarray) -> None:
        """Record per-example losses when you run the backward yourself (static methods need nothing else)."""
        d = np.asarray(domains.detach().cpu() if isinstance(domains, torch.Tensor) else domains, dtype=np.int64)
        l = np.asarray(losses.detach().float().cpu() if isinstance(losses, torch.Tensor) else losses, dtype=np.float64)
        k = len(self.names)
        self._last_result = _ObservedLosses(np.bincount(d, weights=l, minlength=k), np.bincount(d, minlength=k))
        self._last_counts = self._global_counts(d)

    def step(self) -> np.ndarray:
        """Call once per optimizer step, after ``backward``/``observe``: logs, and updates weights when due."""
        self.step_count += 1
        step = self.step_count
        result, self._last_result = self._last_result, None
        counts_now, self._last_counts = self._last_counts, None
        if counts_now is not None:
            self._tokens += (counts_now * self.domains.window_tokens).astype(np.int64)
        if result is not None:
            if isinstance(result, _ObservedLosses) or self._groups is None:
                loss_sum, counts = _loss_sums(result)
                self._interval.add(loss_sum, counts)
                self._update_losses.add(loss_sum, counts)
            if getattr(result, "grad_sq_norm", None) is not None or getattr(result, "target_alignment", None) is not None:
                self._update_interval.append(result)

        if self.method.every_step:
            self._apply(self.method.update(DomainStats(step=step, num_domains=self.method.num_stat_groups,
                                                       batch_size=self.config.batch_size)))
        elif self._update_due(step):
            stats = self._build_stats(step)
            if stats is not None:
                new = self.method.update(stats)
                if self.method.last_skip_reason:
                    self._warn(f"step {step}: {self.method.last_skip_reason}")
                self._apply(new)
            self._update_interval = []
            self._update_losses = self._new_interval()

        self._check_repeats()
        for event in self.sampler.events[self._num_sampler_events:]:
            self._warn(event.message)
        self._num_sampler_events = len(self.sampler.events)

        if step % self.config.log_every == 0 or self._pending_metrics:
            self._log_train(step)
        return self.method.weights

    def _build_stats(self, step: int) -> DomainStats | None:
        g = self.method.num_stat_groups
        if not self.needs_gradients:
            if self._groups is not None:
                return DomainStats(step=step, num_domains=g, batch_size=self.config.batch_size)
            return DomainStats(step=step, num_domains=g, loss=self._update_losses.mean(),
                               examples=self._update_losses.loss_count.copy(), batch_size=self.config.batch_size)
        if not self._update_interval:
            self._warn(f"step {step}: no gradient measurement in this interval (call mixer.backward); update skipped")
            return None
        stats_list = [r.to_stats(step, self.config.batch_size) for r in self._update_interval]
        return _average_stats(stats_list, step)

    def _apply(self, weights: np.ndarray) -> None:
        self.sampler.set_weights(weights)
        self._alert_low_weights(weights)

    def _alert_low_weights(self, weights: np.ndarray) -> None:
        """One warning per change of the set of barely sampled domains (a domain that recovers may alert again)."""
        floor = self.config.alert_min_weight
        floor = 0.1 / len(weights) if floor is None else floor
        low = set(np.flatnonzero(weights < floor).tolist())
        new = sorted(low - self._starved)
        self._starved = low
        if new:
            shown = ", ".join(f"{self.names[i]!r} ({weights[i]:.4f})" for i in new[:5])
            more = f" and {len(new) - 5} more" if len(new) > 5 else ""
            self._warn(f"step {self.step_count}: weight of domain {shown}{more} is below {floor:.4f}; "
                       "barely sampled now")

    def _check_repeats(self) -> None:
        limit = self.config.alert_repeats
        if limit is None:
            return
        for i in np.flatnonzero(self.sampler.passes >= limit):
            if int(i) not in self._repeat_alerted:
                self._repeat_alerted.add(int(i))
                self._warn(f"step {self.step_count}: domain {self.names[i]!r} started pass {self.sampler.passes[i]} "
                           "over its examples; consider max_repeats to cap repetition")

    def _warn(self, message: str) -> None:
        self._events.append(message)
        if self.rank == 0:
            warnings.warn(message, MixingWarning, stacklevel=3)

    # -- metrics ------------------------------------------------------------------------------------------------
    def _log_train(self, step: int) -> None:
        interval = self._interval
        train_loss = {}
        for i, name in enumerate(self.names):
            value = interval.loss_sum[i] / interval.loss_count[i] if interval.loss_count[i] > 0 else float("nan")
            train_loss[name] = float(value) if math.isfinite(value) else None
        record = {
            "step": step,
            # what this step's batch was actually drawn from (exhausted domains removed) ...
            "weights": dict(zip(self.names, map(float, self.sampler.sampled_weights_at(step - 1)))),
            # ... and what the method asks for now (from the next batch on)
            "requested_weights": dict(zip(self.names, map(float, self.method.weights))),
            "train_loss": train_loss,
            "tokens": dict(zip(self.names, map(int, self._tokens))),
            "repeats": dict(zip(self.names, map(int, self.sampler.passes - 1))),
        }
        if self._events:
            record["events"] = list(self._events)
            self._events = []
        record.update(self._pending_metrics)
        self._pending_metrics = {}
        self._interval = self._new_interval()
        self.log(record)

    def add_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Attach fields (e.g. ``val_loss``) to the record logged at the end of the current step."""
        self._pending_metrics.update(metrics)

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one metrics record (rank 0 writes ``metrics.jsonl``)."""
        record = dict(record)
        self.history.append(record)
        if self._metrics_path is not None and self.rank == 0:
            self._metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with self._metrics_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, allow_nan=False, default=_json_default) + "\n")

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: method, sampler at the consumed step, schedule position."""
        state = {
            "format": "gradmix.Mixer/1",
            "domain_names": list(self.names),
            "step": self.step_count,
            "method": self.method.state_dict(),
            "sampler": self.sampler.state_dict(batch_index=self.step_count),
            "tokens": self._tokens.tolist(),
            "interval": {"loss_sum": self._interval.loss_sum.tolist(), "loss_count": self._interval.loss_count.tolist()},
            "update_losses": {"loss_sum": self._update_losses.loss_sum.tolist(),
                              "loss_count": self._update_losses.loss_count.tolist()},
            "update_interval": [_result_to_dict(r) for r in self._update_interval],
        }
        if self._target_sampler is not None:
            state["target_sampler"] = self._target_sampler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != "gradmix.Mixer/1":
            raise ValueError(f"not a Mixer state (format={state.get('format')!r})")
        if list(state["domain_names"]) != self.names:
            raise ValueError(f"checkpoint is from a run with other domains: checkpoint has {list(state['domain_names'])}, "
                             f"this Mixer has {self.names}")
        self.method.load_state_dict(state["method"])
        self.sampler.load_state_dict(state["sampler"])
        self.step_count = int(state["step"])
        self._tokens = np.asarray(state["tokens"], dtype=np.int64)
        self._interval, self._update_losses = (
            _Interval(np.asarray(state[key]["loss_sum"], dtype=np.float64),
                      np.asarray(state[key]["loss_count"], dtype=np.float64))
            for key in ("interval", "update_losses"))
        self._update_interval = [_ResultRecord(**r) for r in state.get("update_interval", [])]
        self._num_sampler_events = len(self.sampler.events)
        if self._target_sampler is not None and "target_sampler" in state:
            self._target_sampler.load_state_dict(state["target_sampler"])
        if self._metrics_path is not None and self.rank == 0:
            _truncate_metrics(self._metrics_path, self.step_count)

    def save_checkpoint(self, path: str | Path, *, model: torch.nn.Module | None = None,
                        optimizer: torch.optim.Optimizer | None = None, extra: Mapping[str, Any] | None = None) -> Path:
        """One atomic file with the Mixer state, and optionally the model, optimizer and torch RNG state."""
        state: dict[str, Any] = {"gradmix": self.state_dict(), "torch_rng": torch.get_rng_state()}
        if model is not None:
            state["model"] = model.state_dict()
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if extra:
            state["extra"] = dict(extra)
        return save_checkpoint_file(state, path)

    def load_checkpoint(self, path: str | Path, *, model: torch.nn.Module | None = None,
                        optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Restore what ``save_checkpoint`` wrote; returns the whole file's dict (for ``extra``)."""
        state = load_checkpoint_file(path)
        self.load_state_dict(state["gradmix"])
        if model is not None:
            if "model" not in state:
                raise ValueError(f"checkpoint {str(path)!r} holds no model state")
            model.load_state_dict(state["model"])
        if optimizer is not None:
            if "optimizer" not in state:
                raise ValueError(f"checkpoint {str(path)!r} holds no optimizer state")
            optimizer.load_state_dict(state["optimizer"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        return state


# -- helpers ----------------------------------------------------------------------------------------------------
@dataclass
class _ObservedLosses:
    loss_sum: np.ndarray
    counts: np.ndarray


@dataclass
class _ResultRecord:
    """A probe measurement kept across a checkpoint (plain lists)."""

    step: int
    stats: dict[str, Any]

    def to_stats(self, step: int, batch_size: int) -> DomainStats:
        kwargs = {k: (None if v is None else np.asarray(v, dtype=np.float64)) for k, v in self.stats.items()
                  if k in ("loss", "examples", "grad_sq_norm", "grad_var", "target_alignment", "gram")}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return DomainStats(step=step, num_domains=int(self.stats["num_domains"]), batch_size=batch_size,
                           target_loss=self.stats.get("target_loss"), **kwargs)


def _result_to_dict(result: Any) -> dict[str, Any]:
    if isinstance(result, _ResultRecord):
        return {"step": result.step, "stats": result.stats}
    stats = result.to_stats(0, 1)
    out: dict[str, Any] = {"num_domains": stats.num_domains, "target_loss": stats.target_loss}
    for key in ("loss", "examples", "grad_sq_norm", "grad_var", "target_alignment", "gram"):
        value = getattr(stats, key)
        out[key] = None if value is None else np.asarray(value).tolist()
    return {"step": 0, "stats": out}


def _loss_sums(result: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(result, _ObservedLosses):
        return result.loss_sum, result.counts.astype(np.float64)
    loss = np.asarray(result.loss, dtype=np.float64)
    counts = np.asarray(result.examples, dtype=np.float64)
    return np.where(counts > 0, loss * counts, 0.0), counts


def _average_stats(stats_list: list[DomainStats], step: int) -> DomainStats:
    """Average several measurements of one interval (count-weighted where counts exist, NaN-aware)."""
    if len(stats_list) == 1:
        s = stats_list[0]
        s.step = step
        return s
    first = stats_list[0]
    out: dict[str, Any] = {}
    for key in ("loss", "grad_sq_norm", "grad_var", "target_alignment"):
        values = [getattr(s, key) for s in stats_list if getattr(s, key) is not None]
        if values:
            stacked = np.stack(values)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[key] = np.nanmean(stacked, axis=0)
    grams = [s.gram for s in stats_list if s.gram is not None]
    if grams:
        out["gram"] = np.nanmean(np.stack(grams), axis=0)
    examples = [s.examples for s in stats_list if s.examples is not None]
    if examples:
        out["examples"] = np.sum(np.stack(examples), axis=0)
    target_losses = [s.target_loss for s in stats_list if s.target_loss is not None]
    return DomainStats(step=step, num_domains=first.num_domains, batch_size=first.batch_size,
                       target_loss=float(np.mean(target_losses)) if target_losses else None, **out)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (a resumed run re-logs them), atomically."""
    if not path.exists():
        return
    kept = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip() and json.loads(line).get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    from gradmix.checkpoint import atomic_write

    atomic_write(path, lambda fh: fh.writelines(kept), mode="w")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")
