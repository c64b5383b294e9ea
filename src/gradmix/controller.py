"""The Mixer: the plain-loop composition of the core, the sampler, the probe and a metrics writer.

A plain loop::

    mixer = Mixer(domains, method="pike", batch_size=32, update_every=50, model=model)
    for batch in mixer.batches(num_steps):
        mixer.backward(model, batch, per_example_loss)   # forward + backward (+ probe on measuring steps)
        optimizer.step(); optimizer.zero_grad()
        mixer.step()

With ``accumulation_steps=A``, ``batches(n)`` yields n * A micro-batches; call ``backward`` once per micro-batch and
``step`` (and the optimizer) once per A. The A micro-batches of a step are together exactly the batch a Mixer
without accumulation would draw. Every backward runs through ``backward_fn`` (default ``loss.backward()``), so a
GradScaler, ``accelerator.backward`` or Lightning's ``manual_backward`` keep working.

Framework integrations drive ``MixingCore`` directly; the Mixer is the reference composition for a loop you own.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradmix.alerts import AlertCallback, AlertConfig, MixingWarning
from gradmix.checkpoint import capture_rng_state, load_checkpoint_file, restore_rng_state, save_checkpoint_file
from gradmix.core import GRADIENT_STATS, MixingCore, Schedule
from gradmix.distributed import check_agreement, is_distributed
from gradmix.example_sources import count_tokens
from gradmix.methods import make_method, method_class
from gradmix.methods.base import MixingMethod, resolve_weight_params
from gradmix.probe import BackwardFn, Probe, make_probe
from gradmix.runlock import RunDirError, RunLock, check_run_dir
from gradmix.sampler import DataExhaustedError, MixtureSampler
from gradmix.sources import Domain, DomainSet, DomainSource, ExampleDomain, collate_examples
from gradmix.stats import Measurement
from gradmix.writers import JsonlWriter, make_writers

__all__ = ["GRADIENT_STATS", "Mixer", "MixerConfig", "MixingWarning"]

LossFn = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
CHECKPOINT_FORMAT = "gradmix.Mixer/2"


EvalMetric = Callable[..., Any]
"""A user metric: called with whatever the loop passes to ``Mixer.evaluate_metrics``; returns a number or a
{domain: number} mapping."""


@dataclass
class MixerConfig:
    """Schedule and sampling settings (everything but the data, the method object and the model).

    update_every: optimizer steps between method updates (PiKE's T0, DGA's T_r).
    warmup_steps: steps before the first update (weights stay at the method's initial weights).
    probe_every: steps between gradient measurements; default (None): ``auto_probe_every``, one measuring step per
        update unless a batch holds fewer examples per domain than the method wants. 1 measures every step: less
        estimator noise at the cost of a measuring step each step (BENCHMARKS.md, PiKE's seventh round).
    accumulation_steps: micro-batches per optimizer step; batch_size stays the examples per optimizer step.
    mix_unit: ``"examples"`` (default): weights are shares of the examples drawn. ``"tokens"``: weights are target
        shares of the real tokens drawn (``count_tokens``: unpadded, unmasked): the sampler draws examples with
        weights w_k / m_k (normalised), m_k = a domain's mean tokens per example estimated once, at construction,
        from up to 256 seeded examples (``DomainSet.mean_tokens``). Approximate: realised token shares follow w
        up to the estimate's error and the spread of example lengths; methods still measure per example; records'
        ``weights`` are converted back to token shares; ``sizes`` given to methods are in tokens.
    """

    batch_size: int
    update_every: int = 50
    warmup_steps: int = 0
    probe_every: int | None = None
    accumulation_steps: int = 1
    seed: int = 0
    mode: str = "quota"
    max_repeats: int | None = None
    target_batch_size: int = 32
    log_every: int = 10
    alerts: AlertConfig | Mapping[str, Any] | None = None
    alert_min_weight: float | None = None
    alert_repeats: int | None = None
    history_size: int = 1000
    mix_unit: str = "examples"

    def __post_init__(self) -> None:
        if self.mix_unit not in ("examples", "tokens"):
            raise ValueError(f"mix_unit must be 'examples' or 'tokens', got {self.mix_unit!r}")
        for name in ("batch_size", "target_batch_size", "history_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def schedule(self) -> Schedule:
        return Schedule(
            update_every=self.update_every,
            warmup_steps=self.warmup_steps,
            probe_every=self.probe_every,
            log_every=self.log_every,
            accumulation_steps=self.accumulation_steps,
        )


def _metric_number(name: str, value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"eval metric {name!r} returned {value!r}; return a number or a {{domain: number}} mapping"
        ) from None
    return number if math.isfinite(number) else None


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _MicroBatchSampler:
    """A DataLoader batch sampler: each of the sampler's (rank-share) batches as ``parts`` strided micro-batches."""

    def __init__(self, sampler: MixtureSampler, parts: int) -> None:
        self.sampler, self.parts = sampler, parts

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.sampler:
            for j in range(self.parts):
                yield batch[j :: self.parts]


class Mixer:
    """Adaptive data mixing for one training run.

    Args:
        domains: a ``DomainSet`` (or a list of domains): token windows, or any datasets of examples
            (``DomainSet.from_datasets``; batches are ``collate_fn(examples)`` plus ``domain``, and ``loss_fn`` sees
            them as collated; ``gradmix.sft.causal_lm_loss`` for causal LM / SFT).
        method: a method name from the registry (``gradmix.register_method`` adds yours) or a ``MixingMethod``.
        batch_size: global batch size (examples per optimizer step, all ranks and micro-batches together).
        method_params: keyword arguments for the method (``sizes`` is filled in for methods that need it). Weights
            (``weights`` of ``fixed``, ``initial_weights``) may be a list or ``{domain name: weight}``:
            ``method_params={"weights": {"code": 0.3, "web": 0.7}}`` (every domain once, in any order).
        model: the model, needed when the method uses gradient statistics: the probe built for it is
            ``gradmix.probe.make_probe(model, **probe_params)`` - the one-backward ``FusedGradientProbe``
            where the model's layers allow it (cost flat in the number of domains), else the micro-batch
            ``GradientProbe``; ``probe_params={"fused": False}`` asks for the micro-batch probe.
        probe: a ready probe (overrides ``model``); probe_params: arguments for the one built here.
        target: the target set for DGA-style methods: a domain, or a tensor of token windows.
        run_dir: where ``metrics.jsonl`` goes (rank 0 only); None = keep records in memory only (``history``).
            The Mixer locks it (``gradmix.runlock.RunLock``, rank 0) until ``close()`` or the end of the process: a
            second process on the same folder is refused while this one lives. A folder that already holds a run
            (non-empty ``metrics.jsonl``, ``metrics.csv`` or ``tensorboard/``) is refused unless ``resume`` or
            ``overwrite`` says what to do with it.
        resume: continue the run in ``run_dir``: its records are kept; ``mixer.resume(checkpoint)`` then drops the
            records after the checkpoint's step (without a checkpoint, the first record written drops them all:
            the run starts over).
        overwrite: replace the run in ``run_dir``: its metrics files are deleted now (your own checkpoint files
            are yours to delete).
        lock: False when the caller already holds the folder's ``RunLock`` (``gradmix run`` does).
        writers: metrics writers: objects with ``write(record)`` and/or names ``"jsonl"``, ``"csv"``,
            ``"tensorboard"``, ``"wandb"`` (built in ``run_dir`` by ``gradmix.writers.make_writers``); default a
            ``JsonlWriter`` in ``run_dir``. Rank 0 writes; ``close()`` flushes and closes them.
        on_alert: called with every ``gradmix.alerts.Alert`` (collapse, starved, overfitting, repetition) on rank 0;
            alerts are also ``MixingWarning``s and the records' ``alerts``. Thresholds: ``alerts=AlertConfig(...)``.
        eval_metrics: {name: callable}: your own metrics, computed by ``evaluate_metrics(...)`` at evaluations and
            recorded as ``eval_metrics`` {name: value} beside the losses.
        rank, world_size: default from torch.distributed when it is initialised.
        other keyword arguments: see ``MixerConfig`` (``alerts``, ``alert_min_weight``, ``alert_repeats``, ...).

    Under torch.distributed (world_size > 1) construction is a collective: one all-gather checks that every rank
    has the same domains and sizes, batch size, accumulation steps, method and parameters, initial weights, seed,
    schedule, probe and checkpoint format (``gradmix.distributed.check_agreement``); a mismatch, or rank 0 refusing
    its run folder, is a ``ValueError`` on every rank.
    """

    def __init__(
        self,
        domains: DomainSet | Sequence[DomainSource],
        method: str | MixingMethod = "uniform",
        batch_size: int = 32,
        *,
        method_params: Mapping[str, Any] | None = None,
        model: torch.nn.Module | None = None,
        probe: Probe | None = None,
        probe_params: Mapping[str, Any] | None = None,
        target: DomainSource | torch.Tensor | None = None,
        run_dir: str | Path | None = None,
        writers: Sequence[Any] | None = None,
        on_alert: AlertCallback | None = None,
        eval_metrics: Mapping[str, EvalMetric] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        resume: bool = False,
        overwrite: bool = False,
        lock: bool = True,
        **config: Any,
    ) -> None:
        self.domains = domains if isinstance(domains, DomainSet) else DomainSet(domains)
        self.config = MixerConfig(batch_size=batch_size, **config)
        dist_rank, dist_world = _dist_info()
        self.rank = dist_rank if rank is None else int(rank)
        self.world_size = dist_world if world_size is None else int(world_size)
        self.names = self.domains.names
        k = len(self.names)
        # mix_unit="tokens": mean tokens per example, to turn token shares into the sampler's example shares
        tokens_mix = self.config.mix_unit == "tokens"
        self._token_scale = self.domains.mean_tokens(seed=self.config.seed) if tokens_mix else None
        self._local_tokens: np.ndarray | None = None  # real tokens per domain this step on this rank (examples)
        accumulation = self.config.accumulation_steps
        if isinstance(accumulation, bool) or not isinstance(accumulation, (int, np.integer)) or accumulation < 1:
            raise ValueError(f"accumulation_steps must be a positive integer, got {accumulation!r}")
        if self.config.batch_size % (self.world_size * accumulation):
            raise ValueError(
                f"batch_size {self.config.batch_size} must be divisible by world_size x "
                f"accumulation_steps = {self.world_size} x {accumulation}"
            )

        if not isinstance(method, MixingMethod):  # weights by name -> positional (the method knows no names)
            method_params = resolve_weight_params(method_params, self.names)
        if isinstance(method, MixingMethod):
            self.method = method
        else:
            params = dict(method_params or {})
            cls = method_class(method)
            if cls.needs_sizes and "sizes" not in params:
                params["sizes"] = self.domains.sizes
                if self._token_scale is not None:  # sizes in the unit of the mix
                    params["sizes"] = [round(n * m) for n, m in zip(self.domains.sizes, self._token_scale)]
            self.method = make_method(cls, k, **params)  # an unknown parameter: a ValueError naming it
        self.core = MixingCore(
            self.method,
            self.names,
            batch_size=self.config.batch_size,
            schedule=self.config.schedule(),
            tokens_per_example=self.domains.window_tokens if self.domains.is_windows else None,
            alerts=self.config.alerts,
            on_alert=on_alert if self.rank == 0 else None,
            alert_min_weight=self.config.alert_min_weight,
            alert_repeats=self.config.alert_repeats,
            history_size=self.config.history_size,
        )
        self.eval_metrics: dict[str, EvalMetric] = {}
        for name, fn in dict(eval_metrics or {}).items():
            if not callable(fn):
                raise TypeError(f"eval_metrics[{name!r}] must be callable, got {type(fn).__name__}")
            self.eval_metrics[str(name)] = fn

        self.sampler = MixtureSampler(
            self.domains.sizes,
            self.config.batch_size,
            self._to_sampler(self.method.weights),
            seed=self.config.seed,
            mode=self.config.mode,
            rank=self.rank,
            world_size=self.world_size,
            max_repeats=self.config.max_repeats,
            domain_names=self.names,
            shuffle=self.domains.shuffle,
        )

        # target set (DGA, DoGE)
        self.target: DomainSource | None = None
        self._target_sampler: MixtureSampler | None = None
        if target is not None:
            if not self.domains.is_windows:  # a set of examples: the target is a dataset of the same kind of examples
                from gradmix.example_sources import as_example_domain

                self.target = as_example_domain(getattr(target, "name", "target"), target)
            else:
                self.target = target if isinstance(target, DomainSource) else Domain("target", torch.as_tensor(target))
            if self.domains.is_windows and self.target.window_tokens != self.domains.window_tokens:
                raise ValueError(
                    f"target windows have {self.target.window_tokens} tokens, domains have {self.domains.window_tokens}"
                )
            if self.target.size < 2:
                raise ValueError(
                    f"target set {self.target.name!r} has {self.target.size} example(s); "
                    "a target gradient needs at least 2 (better: a few hundred)"
                )
            tbs = min(self.config.target_batch_size, self.target.size)
            tbs -= tbs % self.world_size
            if tbs < self.world_size:
                raise ValueError(
                    f"target set {self.target.name!r} has {self.target.size} examples, fewer than the "
                    f"{self.world_size} ranks"
                )
            self._target_sampler = MixtureSampler(
                [self.target.size],
                tbs,
                [1.0],
                seed=self.config.seed + 1,
                rank=self.rank,
                world_size=self.world_size,
                domain_names=[self.target.name],
                shuffle=self.target.shuffle,
            )
        if self.method.needs_target and self.target is None:
            raise ValueError(f"method {self.method.name!r} steers toward a target set: pass target=... to the Mixer")

        self.needs_gradients = self.core.needs_gradients
        self.probe: Probe | None = probe
        if self.probe is None and self.needs_gradients:
            if model is None:
                raise ValueError(
                    f"method {self.method.name!r} needs gradient statistics: pass model=... (or probe=...)"
                )
            self.probe = make_probe(model, **dict(probe_params or {}))

        groups = self.method.probe_groups()
        self._groups = None if groups is None else torch.as_tensor(np.asarray(groups), dtype=torch.long)
        self._micro = 0  # backward/observe calls in the current optimizer step
        self._plan = self.core.plan()
        self._observed: list[Measurement] = []  # local losses from observe() this step
        self._step_result: Measurement | None = None
        self._local_counts = np.zeros(k)  # examples per domain this step on this rank (probe groups only)
        self._coverage_seen: Any = None  # the probe's coverage report as last recorded
        self._coverage_pending: Any = None  # ... and a changed one waiting for the next record
        self._num_sampler_events = 0
        self.exhausted_message: str | None = None  # set when ``batches()`` ended because the data ran out
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._lock, claim_error = self._claim_run_dir(resume, overwrite, lock)
        try:
            if self.world_size > 1 and is_distributed():  # one all-gather: what every rank must share
                check_agreement(
                    self._agreement_fields(method, method_params), what="Mixer", rank=self.rank, error=claim_error
                )
            elif claim_error is not None:
                raise claim_error
            if writers is not None:
                self.writers = make_writers(writers, self.run_dir) if self.rank == 0 else []
            else:
                self.writers = [JsonlWriter(self.run_dir / "metrics.jsonl")] if self.run_dir is not None else []
        except BaseException:
            self._release_lock()  # a Mixer that was not built holds no folder
            raise
        # resume=True: the folder's records wait for mixer.resume(); if none comes, the first write drops them
        self._reconcile_records = bool(resume) and self.run_dir is not None
        self._loaded_step = -1  # the step of the last state loaded (records up to it belong to this run)
        self._emit(self.core.take_messages())

    # -- run folder and ranks -----------------------------------------------------------------------------------
    def _claim_run_dir(self, resume: bool, overwrite: bool, lock: bool) -> tuple[RunLock | None, RunDirError | None]:
        """Rank 0: lock ``run_dir`` and apply the used-folder rule; the error is returned, not raised, so that
        every rank raises it together (a rank that left alone would leave its peers waiting in a collective)."""
        if self.run_dir is None or self.rank != 0:
            return None, None
        held: RunLock | None = None
        try:
            if lock:
                held = RunLock(self.run_dir).acquire()
            check_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
        except RunDirError as exc:
            if held is not None:
                held.release()
            return None, exc
        return held, None

    @property
    def run_lock(self) -> RunLock | None:
        """The lock this Mixer holds on ``run_dir`` (rank 0; None elsewhere, after ``close()`` or with
        ``lock=False``). An integration releases it when its fit ends and ``acquire()``s it again for the next."""
        return self._lock

    def _release_lock(self) -> None:
        held: RunLock | None = getattr(self, "_lock", None)
        if held is not None:
            held.release()
            self._lock = None

    def _agreement_fields(self, method: str | MixingMethod, method_params: Mapping[str, Any] | None) -> dict[str, Any]:
        """What every rank's Mixer must share: a difference means duplicated examples, weights drifting apart or
        one domain's statistics pooled into another's."""
        from gradmix import __version__

        if isinstance(method, MixingMethod):
            params: Any = self.method.state_dict()  # a ready method: its whole state must agree
        else:
            params = dict(method_params or {})
        target = None
        if self.target is not None and self._target_sampler is not None:
            target = [self.target.name, int(self.target.size), int(self._target_sampler.batch_size)]
        return {
            "world_size": self.world_size,
            "format": f"{CHECKPOINT_FORMAT} (gradmix {__version__})",
            "domain_names": list(self.names),
            "domain_sizes": [int(n) for n in self.domains.sizes],
            "window_tokens": self.domains.window_tokens if self.domains.is_windows else None,
            "mix_unit": self.config.mix_unit,
            "token_scale": None if self._token_scale is None else [float(m) for m in self._token_scale],
            "batch_size": int(self.config.batch_size),
            "accumulation_steps": int(self.config.accumulation_steps),
            "seed": int(self.config.seed),
            "mode": self.config.mode,
            "max_repeats": self.config.max_repeats,
            "update_every": self.config.update_every,
            "warmup_steps": self.config.warmup_steps,
            "probe_every": self.config.probe_every,
            "method": self.method.name,
            "method_params": params,
            "initial_weights": [float(w) for w in self.method.weights],
            "target": target,
            "probe": None if self.probe is None else type(self.probe).__name__,
        }

    # -- views --------------------------------------------------------------------------------------------------
    @property
    def weights(self) -> np.ndarray:
        """The method's current weights (what the next fresh batch is drawn from)."""
        return self.method.weights

    @property
    def step_count(self) -> int:
        """Optimizer steps finished."""
        return self.core.step_count

    @property
    def history(self) -> Sequence[dict[str, Any]]:
        """The last ``history_size`` metrics records (all of them are in the writers)."""
        return self.core.history

    @property
    def accumulation_steps(self) -> int:
        return self.config.accumulation_steps

    # -- data ---------------------------------------------------------------------------------------------------
    def batches(self, num_steps: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Collated batches (this rank's share), without a DataLoader: the fastest path for in-memory windows.

        Yields ``num_steps * accumulation_steps`` micro-batches. Ends early, with a ``MixingWarning`` naming the
        domains and the step, when every domain has used its ``max_repeats`` passes.
        """
        parts = self.config.accumulation_steps
        produced = 0
        while num_steps is None or produced < num_steps:
            try:
                domains, examples = self.sampler.next_arrays()
            except DataExhaustedError as exc:  # every domain used its max_repeats passes: end, do not crash
                self.exhausted_message = f"step {self.step_count}: data exhausted, iteration ends: {exc}"
                self._emit([self.exhausted_message])
                self.core.warn(self.exhausted_message)
                return
            produced += 1
            for j in range(parts):
                yield self.domains.gather(domains[j::parts], examples[j::parts])

    def dataloader(self, **kwargs: Any) -> torch.utils.data.DataLoader:
        """A DataLoader over the live sampler (micro-batches when accumulating). With ``num_workers > 0`` a weight
        change reaches batches after the prefetch depth (see ``MixtureSampler``); checkpoints stay exact because the
        Mixer checkpoints the sampler at the consumed step.

        Each batch is read whole (``DomainSet.__getitems__``: one ``gather``, one read per domain) and, from a worker,
        sent back by value when small (see ``gradmix.sources.collate_examples``): as fast as a plain DataLoader over the
        same files (``benchmarks/bench_dataloader.py``). A ``collate_fn`` of your own still gets per-example dicts.

        Its ``generator`` (default: a private one seeded from the Mixer's seed and rank) draws the workers' base seed
        each time an iterator is built; a DataLoader without one draws it from the global torch RNG, which would
        shift dropout and every other random draw of a resumed run (the HF Trainer restores the RNG, then builds the
        iterator) against an uninterrupted one."""
        kwargs.setdefault("collate_fn", collate_examples)
        kwargs.setdefault("generator", torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.rank))
        batch_sampler: Any = self.sampler
        if self.config.accumulation_steps > 1:
            batch_sampler = _MicroBatchSampler(self.sampler, self.config.accumulation_steps)
        return torch.utils.data.DataLoader(self.domains, batch_sampler=batch_sampler, **kwargs)

    def next_target_batch(self) -> dict[str, torch.Tensor]:
        if self._target_sampler is None or self.target is None:
            raise ValueError("this Mixer has no target set")
        _, idx = self._target_sampler.next_arrays()
        if not self.domains.is_windows:
            assert isinstance(self.target, ExampleDomain) and self.domains.collate_fn is not None
            return dict(self.domains.collate_fn(self.target.examples(idx)))
        return {"input_ids": self.target.take(idx)}

    # -- schedule -----------------------------------------------------------------------------------------------
    def should_measure(self) -> bool:
        """Whether the coming optimizer step measures gradient statistics."""
        return self.core.plan().measure

    # -- training step ------------------------------------------------------------------------------------------
    def _begin_micro(self, what: str) -> bool:
        """Count one micro-batch of the current step; returns True on the last one."""
        if self._micro >= self.config.accumulation_steps:
            raise RuntimeError(
                f"{what} called {self._micro + 1} times in one optimizer step, but "
                f"accumulation_steps={self.config.accumulation_steps}: call mixer.step() after each "
                f"{self.config.accumulation_steps}"
            )
        if self._micro == 0:
            self._plan = self.core.plan()
        self._micro += 1
        return self._micro == self.config.accumulation_steps

    def backward(
        self,
        model: torch.nn.Module,
        batch: Mapping[str, torch.Tensor],
        loss_fn: LossFn,
        backward_fn: BackwardFn | None = None,
    ) -> Measurement | None:
        """Forward + backward of one (micro-)batch (``loss_fn`` returns per-example losses); measures gradient
        statistics on the steps that need them. After the step's last micro-batch ``.grad`` is the gradient of the
        mean loss over the whole optimizer batch, and the step's pooled measurement is returned (None before).

        Every backward goes through ``backward_fn(loss)`` (default ``loss.backward()``); statistics are unscaled.
        """
        if self._observed:
            raise RuntimeError("mixer.observe() and mixer.backward() cannot be mixed within one optimizer step")
        if self.probe is None:
            self.probe = make_probe(model)
        first = self._micro == 0
        final = self._begin_micro("mixer.backward()")
        plan = self._plan
        domains = batch["domain"].long()
        if self._groups is not None:
            self._local_counts += np.bincount(domains.cpu().numpy(), minlength=len(self.names))
        if not self.domains.is_windows:
            self._count_tokens(domains, count_tokens(batch))
        groups = domains if self._groups is None else self._groups[domains.cpu()].to(domains.device)
        target_batch = self.next_target_batch() if (plan.needs_target and first) else None
        if target_batch is not None:  # to the device the training batch lives on
            device = batch["input_ids"].device if "input_ids" in batch else domains.device
            target_batch = {key: value.to(device) for key, value in target_batch.items()}
        started = time.perf_counter()
        try:
            result = self.probe.backward(
                batch,
                groups,
                self.method.num_stat_groups,
                loss_fn,
                measure=plan.measure,
                target_batch=target_batch,
                global_batch_size=self.config.batch_size,
                backward_fn=backward_fn,
                final=final,
            )
        except BaseException:
            self._micro -= 1
            raise
        # time in the probe: the measuring backward passes (0 for a plain backward), summed per record
        self.core.add_probe_seconds(time.perf_counter() - started if plan.measure else 0.0)
        report = getattr(self.probe, "coverage_report", None)  # what the probe covers: recorded once per change
        if report is not None and report != self._coverage_seen:
            self._coverage_seen = self._coverage_pending = report
        if final:
            self._step_result = result
        return result

    def observe(
        self,
        domains: torch.Tensor | np.ndarray,
        losses: torch.Tensor | np.ndarray,
        tokens: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Record per-example losses when you run the backward yourself (static and loss-based methods need nothing
        else). Call once per micro-batch; under torch.distributed the step's sums are all-reduced in ``step()``.
        ``tokens``: real tokens per example (``gradmix.example_sources.count_tokens(batch)``) for the ``tokens``
        KPI of a set of examples."""
        if self._step_result is not None or (self._micro and not self._observed):
            raise RuntimeError("mixer.observe() and mixer.backward() cannot be mixed within one optimizer step")
        d = np.asarray(domains.detach().cpu() if isinstance(domains, torch.Tensor) else domains, dtype=np.int64)
        loss = np.asarray(
            losses.detach().float().cpu() if isinstance(losses, torch.Tensor) else losses, dtype=np.float64
        )
        k = len(self.names)
        if d.ndim != 1 or loss.shape != d.shape:
            raise ValueError(f"observe() needs one loss per example: {d.shape} domain ids, {loss.shape} losses")
        if d.size and (d.min() < 0 or d.max() >= k):
            bad = int(d.min()) if d.min() < 0 else int(d.max())
            raise ValueError(f"observe(): domain id {bad} is outside 0..{k - 1} ({self.names})")
        self._begin_micro("mixer.observe()")
        self._observed.append(Measurement.from_losses(d, loss, k))
        if tokens is not None and not self.domains.is_windows:
            self._count_tokens(torch.as_tensor(d), torch.as_tensor(np.asarray(tokens)))

    def _observed_measurement(self) -> Measurement:
        sums = [m.loss_sums() for m in self._observed]
        loss_sum = np.sum([s for s, _ in sums], axis=0)
        counts = np.sum([c for _, c in sums], axis=0)
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.from_numpy(np.concatenate([loss_sum, counts]))
            torch.distributed.all_reduce(t)
            loss_sum, counts = t.numpy().reshape(2, -1)
        return Measurement.from_sums(loss_sum, counts)

    def step(self) -> np.ndarray:
        """Call once per optimizer step, after the step's ``backward``/``observe`` calls: logs, and updates the
        weights when due. Returns the weights the next batch will be drawn from."""
        if 0 < self._micro < self.config.accumulation_steps:
            raise RuntimeError(
                f"mixer.step() after {self._micro} of {self.config.accumulation_steps} micro-batches "
                "(accumulation_steps): call backward/observe once per micro-batch first"
            )
        measurement = self._observed_measurement() if self._observed else self._step_result
        self._micro, self._observed, self._step_result = 0, [], None
        if measurement is not None:
            self.core.observe(measurement)
        counts = self._counts(measurement)
        step = self.core.step_count + 1
        outcome = self.core.end_step(
            counts=counts,
            sampled_weights=self._from_sampler(self.sampler.sampled_weights_at(step - 1)),
            passes=self.sampler.passes,
            tokens=self._step_tokens(),
        )
        if outcome.weights_changed:
            self.sampler.set_weights(self._to_sampler(outcome.weights))
        for event in self.sampler.events[self._num_sampler_events :]:
            self.core.warn(event.message)
            outcome.warnings.append(event.message)
        self._num_sampler_events = len(self.sampler.events)
        self._emit(outcome.warnings)
        if outcome.record is not None:
            if self._coverage_pending is not None:  # the probe's coverage, in the first record after it changed
                outcome.record["probe_coverage"] = self._coverage_pending
                self._coverage_pending = None
            self._write(outcome.record)
        return outcome.weights

    def _to_sampler(self, weights: np.ndarray) -> np.ndarray:
        """The method's weights as the sampler's example shares (``mix_unit="tokens"``: w_k / m_k, normalised)."""
        if self._token_scale is None:
            return weights
        v = np.asarray(weights, dtype=np.float64) / self._token_scale
        return v / v.sum()

    def _from_sampler(self, weights: np.ndarray) -> np.ndarray:
        """The sampler's example shares in the unit of the mix (inverse of ``_to_sampler``)."""
        if self._token_scale is None:
            return weights
        v = np.asarray(weights, dtype=np.float64) * self._token_scale
        return v / v.sum()

    def _count_tokens(self, domains: torch.Tensor, tokens: torch.Tensor | None) -> None:
        """Add a micro-batch's real tokens per example (None: the batch does not say) to this step's sums."""
        if tokens is None:
            return
        d = domains.detach().to("cpu", torch.long).numpy().reshape(-1)
        t = tokens.detach().to("cpu", torch.float64).numpy().reshape(-1)
        if t.shape != d.shape:
            raise ValueError(f"{t.size} token counts for {d.size} examples")
        local = np.bincount(d, weights=t, minlength=len(self.names))[: len(self.names)]
        self._local_tokens = local if self._local_tokens is None else self._local_tokens + local

    def _step_tokens(self) -> np.ndarray | None:
        """Global real tokens per domain this step (a set of examples whose batches carry counts), else None."""
        local, self._local_tokens = self._local_tokens, None
        if self.domains.is_windows:
            return None
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            k = len(self.names)  # one all-reduce: the sums and how many ranks had counts
            t = torch.zeros(k + 1, dtype=torch.float64)
            if local is not None:
                t[:k], t[k] = torch.from_numpy(local), 1.0
            torch.distributed.all_reduce(t)
            return None if float(t[k]) == 0 else t[:k].numpy()
        return local

    def _counts(self, measurement: Measurement | None) -> np.ndarray | None:
        """Examples per domain in this step's global batch (from the measurement when it is per domain)."""
        if measurement is not None and self._groups is None:
            return np.asarray(measurement.examples, dtype=np.float64)
        local, self._local_counts = self._local_counts, np.zeros(len(self.names))
        if measurement is None:
            return None
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.from_numpy(local)
            torch.distributed.all_reduce(t)
            local = t.numpy()
        return local

    def _emit(self, messages: Sequence[str]) -> None:
        if self.rank == 0:
            for message in messages:
                warnings.warn(message, MixingWarning, stacklevel=3)

    # -- metrics ------------------------------------------------------------------------------------------------
    def add_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Attach fields (e.g. ``val_loss``) to the record logged at the end of the current step."""
        self.core.add_metrics(metrics)

    def compute_eval_metrics(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Call every ``eval_metrics`` function with these arguments and return {name: value} (a number, or a
        {domain: number} mapping; non-finite numbers become None) without recording anything."""
        values: dict[str, Any] = {}
        for name, fn in self.eval_metrics.items():
            value = fn(*args, **kwargs)
            if isinstance(value, Mapping):
                values[name] = {str(k): _metric_number(name, v) for k, v in value.items()}
            else:
                values[name] = _metric_number(name, value)
        return values

    def evaluate_metrics(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``compute_eval_metrics`` and attach the results to the current step's record as ``eval_metrics``
        {name: value} (beside ``val_loss`` when you add that too); returns them. Call it at your evaluations,
        before ``step()``."""
        values = self.compute_eval_metrics(*args, **kwargs)
        if values:
            self.core.add_metrics({"eval_metrics": values})
        return values

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one metrics record yourself (rank 0 writes)."""
        record = dict(record)
        self.core.history.append(record)
        self._write(record)

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._reconcile_records:  # resume=True and never cut back by resume(): the run starts over
            self._reconcile_records = False
            if self.rank == 0:
                for writer in self.writers:
                    if hasattr(writer, "truncate_after"):
                        writer.truncate_after(self._loaded_step)
        if self.rank == 0:
            for writer in self.writers:
                writer.write(record)

    def close(self) -> None:
        """Flush and close the writers (a W&B run is finished, TensorBoard files are closed) and release the run
        folder's lock. Idempotent."""
        for writer in self.writers:
            close = getattr(writer, "close", None)
            if close is not None:
                close()
        self._release_lock()

    def truncate_metrics(self) -> int:
        """Drop metrics records after the current step (and a half-written last line): the explicit step a resumed
        run takes after loading a checkpoint, so the records it logs again are not duplicated. Rank 0 only."""
        dropped = 0
        self._reconcile_records = False
        if self.rank == 0:
            for writer in self.writers:
                if hasattr(writer, "truncate_after"):
                    dropped += writer.truncate_after(self.step_count)
        return dropped

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: core (method, schedule position), sampler at the consumed step."""
        if self._micro:
            raise RuntimeError(
                f"cannot checkpoint in the middle of an optimizer step ({self._micro} of "
                f"{self.config.accumulation_steps} micro-batches done): save after mixer.step()"
            )
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "domain_names": list(self.names),
            "core": self.core.state_dict(),
            "sampler": self.sampler.state_dict(batch_index=self.step_count),
            "sampler_events_seen": self._num_sampler_events,
        }
        if self._target_sampler is not None:
            state["target_sampler"] = self._target_sampler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state. Pure (no file IO, no RNG changes) and all-or-nothing: a refused state leaves the Mixer
        as it was."""
        if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not a {CHECKPOINT_FORMAT} state (format={found!r})")
        if list(state["domain_names"]) != self.names:
            raise ValueError(
                f"checkpoint is from a run with other domains: checkpoint has "
                f"{list(state['domain_names'])}, this Mixer has {self.names}"
            )
        if (self._target_sampler is None) != ("target_sampler" not in state):
            raise ValueError("checkpoint and this Mixer disagree on having a target set")
        backup = (
            self.core.state_dict(),
            self.sampler.state_dict(),
            None if self._target_sampler is None else self._target_sampler.state_dict(),
        )
        try:
            self.sampler.load_state_dict(state["sampler"])
            if self._target_sampler is not None:
                self._target_sampler.load_state_dict(state["target_sampler"])
            self.core.load_state_dict(state["core"])
        except Exception:
            self.sampler.load_state_dict(backup[1])
            if self._target_sampler is not None and backup[2] is not None:
                self._target_sampler.load_state_dict(backup[2])
            self.core.load_state_dict(backup[0])
            raise
        self._num_sampler_events = int(state.get("sampler_events_seen", len(self.sampler.events)))
        self._loaded_step = self.core.step_count
        self._micro, self._observed, self._step_result = 0, [], None
        self._local_tokens = None
        if self.probe is not None:
            self.probe.reset()

    def save_checkpoint(
        self,
        path: str | Path,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        extra: Mapping[str, Any] | None = None,
        rng: bool = True,
    ) -> Path:
        """One atomic, verified file with the Mixer state, optionally the model and optimizer, and (``rng=True``)
        every global RNG (torch CPU and CUDA, numpy, Python) so that a resumed run draws what this one would."""
        state: dict[str, Any] = {"gradmix": self.state_dict()}
        if rng:
            state["rng"] = capture_rng_state()
        if model is not None:
            state["model"] = model.state_dict()
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if extra:
            state["extra"] = dict(extra)
        return save_checkpoint_file(state, path)

    def load_checkpoint(
        self,
        path: str | Path,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        rng: bool = True,
    ) -> dict[str, Any]:
        """Restore what ``save_checkpoint`` wrote, all-or-nothing: if the model, optimizer, RNG or Mixer part does
        not fit, nothing is changed and a ``ValueError`` names the file. Returns the file's dict (for ``extra``).
        Metrics files are not touched: call ``truncate_metrics()`` (or use ``resume``) for that."""
        state = load_checkpoint_file(path)
        where = f"checkpoint {str(path)!r}"
        if not isinstance(state.get("gradmix"), Mapping):
            raise ValueError(f"{where} is not a gradmix Mixer checkpoint (no 'gradmix' section)")
        for name, wanted in (("model", model), ("optimizer", optimizer)):
            if wanted is not None and name not in state:
                raise ValueError(f"{where} holds no {name} state")
        backups: list[tuple[Any, Any]] = []
        prior_rng = capture_rng_state() if rng and "rng" in state else None
        try:
            if prior_rng is not None:  # validated in full before anything changes; undone below if the rest fails
                restore_rng_state(state["rng"], strict_cuda=False)
            if model is not None:
                backups.append((model, copy.deepcopy(model.state_dict())))
                model.load_state_dict(state["model"])
            if optimizer is not None:
                backups.append((optimizer, copy.deepcopy(optimizer.state_dict())))
                optimizer.load_state_dict(state["optimizer"])
            self.load_state_dict(state["gradmix"])
        except Exception as exc:
            for obj, saved in reversed(backups):
                obj.load_state_dict(saved)
            if prior_rng is not None:
                restore_rng_state(prior_rng)
            raise ValueError(f"{where} does not fit this run: {exc}") from exc
        return state

    def resume(
        self, path: str | Path, *, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, Any]:
        """``load_checkpoint`` and then ``truncate_metrics``: the two explicit steps of resuming a run."""
        state = self.load_checkpoint(path, model=model, optimizer=optimizer)
        self.truncate_metrics()
        return state
