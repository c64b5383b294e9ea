"""torchtitan integration (``pip install 'gradmix[torchtitan]'``): the Mixer as torchtitan's dataloader.

``MixingDataLoader`` is a torchtitan ``BaseDataLoader``: it yields this rank's share of the Mixer's global batches in
the form torchtitan's trainer consumes, ``({"input": ids[:, :-1]}, labels)`` (labels ``ids[:, 1:]``, padding and
masked positions ``IGNORE_INDEX`` = -100), and its ``state_dict`` / ``load_state_dict`` carry the Mixer's whole state
(weights, the sampler's position, the method's state, the schedule) the way torchtitan's own
``ParallelAwareDataloader`` carries its state: keyed by data-parallel rank (``"dp_rank_R"``: every rank's entry is
distinct, so torch.distributed.checkpoint keeps them all) beside ``"world_size"``. torchtitan's ``CheckpointManager``
saves it under ``"dataloader"`` with the model, optimizer, LR schedulers and train state, and restores it before
training: the resumed run draws the batches and computes the weights the uninterrupted run would, and the Mixer's
``metrics.jsonl`` is cut back to the checkpoint's step. The Mixer state travels as one opaque bytes value
(``torch.save``), read back with ``torch.load(weights_only=True)``. As with torchtitan's own dataloader, the number
of data-parallel ranks must not change across a resume (a one-line ``ValueError`` says so; gradmix's own
``gradmix.integrations.fsdp`` checkpoints do re-shard).

Built by torchtitan's trainer from its config (``config.dataloader``)::

    def make_mixer(*, dp_rank, dp_world_size, model):   # model: None unless bind_model(...) was called
        return Mixer(domains, "odm", batch_size=64, run_dir=dump_folder, resume=True, rank=dp_rank,
                     world_size=dp_world_size)

    config.dataloader = MixingDataLoader.Config(mixer_factory=make_mixer)
    config.training.disable_cuda_graphs = True   # gradmix reads per-example losses on the host

or directly: ``MixingDataLoader(mixer=mixer, dp_rank=r, dp_world_size=w, local_batch_size=b, seq_len=t)``. The
trainer's ``local_batch_size`` must be the Mixer's ``batch_size / (dp_world_size x accumulation_steps)`` and its
``gradient_accumulation_steps`` the Mixer's ``accumulation_steps``; ``seq_len`` the windows' length T (windows hold
T + 1 tokens).

The train step (what a torchtitan ``Trainer`` subclass adds; ``examples/torchtitan_mix.py`` runs the same calls in
a loop that mirrors ``Trainer.train_step`` on CPU)::

    class MixingTrainer(Trainer):
        def __init__(self, config):
            super().__init__(config)
            self.dataloader.bind_model(self.model_parts[0])       # gradient methods: the sharded model
            self.loss_fn = self.dataloader.observing(self.loss_fn)  # per-example losses -> mixer.observe

        def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
            if not self.dataloader.measuring():                    # torchtitan's own forward/backward
                return super().forward_backward_step(
                    input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens)
            with self.train_context():                             # a measuring step: the probe's passes
                return self.dataloader.forward_backward(
                    self.model_parts[0], input_dict, labels, self.loss_fn,
                    global_valid_tokens=global_valid_tokens)

        def train_step(self, data_iterator):
            super().train_step(data_iterator)
            self.dataloader.step()                                 # weights update, metrics record

        def close(self):
            self.dataloader.close()
            super().close()

* **Loss-only and static methods** (ODM, FAMO, DoReMi-style, fixed, schedule, ...) need only ``observing``: it
  wraps torchtitan's loss function (``(pred, labels, global_valid_tokens) -> (loss, metrics)``, unchanged for the
  trainer) and, for each training micro-batch, computes every example's mean token loss with the same loss function
  (one call per example, without gradient) and hands them to ``mixer.observe``. torchtitan runs its forward and
  backward as always; gradmix calls no ``.backward()``. ``step()`` may even be left out: the next step's first batch,
  the next checkpoint save and ``close()`` each run a pending ``mixer.step()`` (so a plain ``Trainer`` with the
  wrapped loss works; call ``dataloader.close()`` after ``train()`` for the last step's record).
* **Gradient methods** (PiKE, DGA, ...) with FSDP2 models: on the steps the Mixer measures (``measuring()``, every
  ``probe_every`` steps), ``forward_backward`` runs the step's micro-batches through the Mixer's probe - for a
  ``fully_shard``-ed model the ``ShardedGradientProbe`` (statistics from the local gradient shards, a few all-reduced
  scalars: the same weights on every rank). Each of its forward/backward passes calls the model and torchtitan's loss
  function and runs the backward through ``backward_fn`` (default ``loss.backward()``; pass the trainer's own).
  torchtitan disables FSDP's gradient averaging (``disable_fsdp_gradient_division``: factor 1.0, the loss is divided
  by the global token count instead); the sharded probe assumes FSDP's default averaging, so ``forward_backward``
  switches the model's FSDP modules to it for its passes and back to ``fsdp_divide_factor`` (default 1.0, torchtitan's)
  afterwards. On those steps the training gradient is the mean over the global batch of each example's mean token
  loss (torchtitan: the mean over all tokens): the same for fixed-length windows, slightly different weighting for
  examples of unequal length. The other steps are torchtitan's own. The probe calls ``model(input)`` only (no
  ``positions`` / attention masks: causal models over unpacked sequences).

Limits: one data-parallel dimension over all ranks (FSDP, or HSDP through the sharded probe); tensor, context and
pipeline parallelism are refused at construction (every rank of a data-parallel group would observe the same
examples). CUDA graphs must be off (``training.disable_cuda_graphs = True``). torchtitan's ``Trainer`` and its models
need ``triton`` and a CUDA device, so they are not run by gradmix's CPU tests; its dataloader, checkpoint manager,
optimizer and LR-scheduler containers, loss and FSDP helpers are (tests/test_integration_torchtitan.py, 2 gloo ranks).
"""

from __future__ import annotations

import contextlib
import io
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

try:
    from torchtitan.components.dataloader import BaseDataLoader
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "gradmix.integrations.torchtitan needs torchtitan (>= 0.3, Python >= 3.11): pip install 'gradmix[torchtitan]'"
    ) from exc

from gradmix.controller import Mixer
from gradmix.distributed import raise_on_any_rank

__all__ = ["IGNORE_INDEX", "MixingDataLoader", "MixingLoss", "titan_batch"]

IGNORE_INDEX = -100
"""Label of a position that carries no loss (torchtitan's ``components.loss.IGNORE_INDEX``)."""

STATE_FORMAT = "gradmix.torchtitan/1"

Batch = Mapping[str, torch.Tensor]
Converter = Callable[[Batch], tuple[dict[str, torch.Tensor], torch.Tensor]]


def titan_batch(batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A gradmix batch as torchtitan's ``(input_dict, labels)``: ``input`` = ``input_ids[:, :-1]``; labels =
    ``labels[:, 1:]`` when the batch has labels (HF convention, -100 where masked) else ``input_ids[:, 1:]``;
    positions whose ``attention_mask`` is 0 get ``IGNORE_INDEX``."""
    ids = batch["input_ids"]
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"input_ids must have shape (n, tokens >= 2), got {tuple(ids.shape)}")
    labels = batch.get("labels", ids)[:, 1:].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"][:, 1:] == 0] = IGNORE_INDEX
    return {"input": ids[:, :-1]}, labels


def _loss_value(out: Any) -> torch.Tensor:
    """A loss function's result: torchtitan's ``(loss, metrics)`` or a bare tensor."""
    return out[0] if isinstance(out, tuple) else out


def _example_sums(loss_fn: Callable[..., Any], pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's summed token loss under ``loss_fn`` (torchtitan's losses sum over tokens): one call per row."""
    return torch.stack([_loss_value(loss_fn(pred[i : i + 1], labels[i : i + 1])).reshape(()) for i in range(len(pred))])


@contextlib.contextmanager
def _fsdp_averaging(model: nn.Module, restore: float | None) -> Iterator[None]:
    """FSDP's default gradient averaging on the model's FSDP2 modules for the duration, then ``restore`` (the divide
    factor the model uses otherwise; torchtitan: 1.0). ``restore=None``: the model keeps the default anyway."""
    if restore is None:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    default = cast(float, None)  # FSDP2's own default: divide by the data-parallel size
    for module in modules:
        module.set_gradient_divide_factor(default)
    try:
        yield
    finally:
        for module in modules:
            module.set_gradient_divide_factor(float(restore))


class MixingLoss:
    """torchtitan's loss function, unchanged for the trainer, that also hands each training micro-batch's per-example
    losses to the Mixer (``MixingDataLoader.observing``). Calls without gradient (validation) pass straight through."""

    def __init__(self, loader: MixingDataLoader, base: Callable[..., Any]) -> None:
        self.loader, self.base = loader, base

    def __call__(
        self, pred: torch.Tensor, labels: torch.Tensor, global_valid_tokens: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        out = self.base(pred, labels, global_valid_tokens, **kwargs)
        if torch.is_grad_enabled() and not self.loader._inside_probe:
            self.loader._observe(self.base, pred, labels)
        return out


class MixingDataLoader(BaseDataLoader):
    """torchtitan dataloader over a gradmix ``Mixer``: this rank's share of each global batch, the Mixer's state in
    torchtitan's checkpoints, and the hooks of the train step (see the module docstring).

    Args:
        config: torchtitan builds it as ``config.dataloader.build(dp_world_size=..., dp_rank=..., tokenizer=...,
            seq_len=..., local_batch_size=..., snapshot_every_n_steps=...)``; its ``mixer_factory(dp_rank=...,
            dp_world_size=..., model=...)`` builds the Mixer on first use (after ``bind_model``, if called).
        mixer: a ready Mixer (instead of ``config.mixer_factory``).
        dp_rank, dp_world_size: torchtitan's data-parallel rank and size; they must be the Mixer's rank and world
            size and span all ranks (no tensor / context / pipeline parallelism).
        local_batch_size, seq_len: checked against the Mixer when given (examples per rank per micro-batch; tokens of
            ``input``).
        tokenizer, snapshot_every_n_steps: what torchtitan's trainer passes to every dataloader; not used.
        convert: gradmix batch -> ``(input_dict, labels)`` (default ``titan_batch``).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        mixer_factory: Callable[..., Mixer] | None = None
        """Called as ``mixer_factory(dp_rank=..., dp_world_size=..., model=...)``; returns the run's Mixer."""

    def __init__(
        self,
        config: MixingDataLoader.Config | None = None,
        *,
        mixer: Mixer | None = None,
        dp_rank: int | None = None,
        dp_world_size: int | None = None,
        local_batch_size: int | None = None,
        seq_len: int | None = None,
        tokenizer: Any = None,
        snapshot_every_n_steps: int | None = None,
        convert: Converter | None = None,
    ) -> None:
        super().__init__()
        del tokenizer, snapshot_every_n_steps  # torchtitan passes them to every dataloader
        self.config = config
        factory = None if config is None else config.mixer_factory
        if (mixer is None) == (factory is None):
            raise ValueError("MixingDataLoader needs exactly one of mixer=... and config.mixer_factory")
        self._factory = factory
        self._mixer: Mixer | None = None
        self._model: nn.Module | None = None
        if mixer is not None:
            rank, world = mixer.rank, mixer.world_size
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        self.dp_rank = int(rank if dp_rank is None else dp_rank)
        self.dp_world_size = int(world if dp_world_size is None else dp_world_size)
        self._rank_id = f"dp_rank_{self.dp_rank}"
        self._local_batch_size = local_batch_size
        self._seq_len = seq_len
        self.convert: Converter = convert or titan_batch
        self._pending: deque[dict[str, torch.Tensor]] = deque()  # batches yielded and not yet fed to the Mixer
        self._yielded = 0  # micro-batches of the current step yielded
        self._observed = 0  # ... whose losses reached the Mixer (observing or forward_backward)
        self._probed = 0  # ... that ran through forward_backward
        self._measure = False  # the current step measures gradient statistics
        self._inside_probe = False
        self._closed = False
        if mixer is not None:
            self._adopt(mixer)

    # -- the Mixer --------------------------------------------------------------------------------------------------
    def bind_model(self, model: nn.Module) -> None:
        """The (sharded) model for ``config.mixer_factory``: gradient methods build their probe from it. Call before
        the first batch or checkpoint load."""
        if self._mixer is not None:
            raise RuntimeError("bind_model() after the Mixer was built: call it right after the trainer's __init__")
        self._model = model

    @property
    def mixer(self) -> Mixer:
        """The Mixer (built by ``config.mixer_factory`` on first use)."""
        if self._mixer is None:
            assert self._factory is not None
            mixer = self._factory(dp_rank=self.dp_rank, dp_world_size=self.dp_world_size, model=self._model)
            if not isinstance(mixer, Mixer):
                raise TypeError(f"mixer_factory must return a gradmix Mixer, got {type(mixer).__name__}")
            try:
                self._adopt(mixer)
            except ValueError:
                mixer.close()  # built here and refused: release its run folder
                raise
        assert self._mixer is not None
        return self._mixer

    def _adopt(self, mixer: Mixer) -> None:
        rank, world = self.dp_rank, self.dp_world_size
        if (mixer.rank, mixer.world_size) != (rank, world):
            raise ValueError(
                f"the Mixer has rank {mixer.rank} of {mixer.world_size}, torchtitan's data parallelism rank {rank} of "
                f"{world}: build the Mixer with rank=dp_rank, world_size=dp_world_size"
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            total = torch.distributed.get_world_size()
            if total != world:
                raise ValueError(
                    f"torchtitan's data-parallel size is {world} of {total} ranks: gradmix supports one "
                    "data-parallel dimension over all ranks (FSDP / HSDP), not tensor, context or pipeline parallelism"
                )
        per_rank, rest = divmod(mixer.config.batch_size, world * mixer.accumulation_steps)
        if self._local_batch_size is not None and (rest or per_rank != self._local_batch_size):
            raise ValueError(
                f"torchtitan's local_batch_size is {self._local_batch_size}, the Mixer's batch_size "
                f"{mixer.config.batch_size} / ({world} ranks x {mixer.accumulation_steps} accumulation steps) is "
                f"{mixer.config.batch_size / (world * mixer.accumulation_steps):g}"
            )
        if self._seq_len is not None and mixer.domains.is_windows and mixer.domains.window_tokens != self._seq_len:
            raise ValueError(
                f"torchtitan's seq_len is {self._seq_len}, the Mixer's windows predict {mixer.domains.window_tokens} "
                f"tokens (they hold {mixer.domains.window_tokens + 1})"
            )
        self._mixer = mixer

    @property
    def weights(self) -> np.ndarray:
        """The Mixer's current weights."""
        return self.mixer.weights

    def measuring(self) -> bool:
        """Whether the current step (the one whose batches were drawn last; before any, the next one) measures
        gradient statistics: its micro-batches must then go through ``forward_backward``."""
        return self._measure if self._yielded else self.mixer.should_measure()

    # -- iteration --------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """This rank's micro-batches, ``accumulation_steps`` per optimizer step, until the data runs out (then
        torchtitan ends training: ``DataloaderExhaustedError``). A step left pending is completed first (``step()``)."""
        mixer = self.mixer
        while True:
            self._settle()
            self._measure = mixer.should_measure()
            drawn = False
            for batch in mixer.batches(1):
                drawn = True
                self._pending.append(batch)
                self._yielded += 1
                yield self.convert(batch)
            if not drawn:
                return

    def _settle(self) -> None:
        """Run a step whose micro-batches were all drawn but that nobody ``step()``-ed."""
        if self._yielded and self._yielded == self.mixer.accumulation_steps:
            self.step()

    def _take(self, rows: int, what: str) -> dict[str, torch.Tensor]:
        if not self._pending:
            raise RuntimeError(
                f"{what}: no training batch of this MixingDataLoader is waiting (each micro-batch it yields must reach "
                "the loss or forward_backward once, in order)"
            )
        batch = self._pending.popleft()
        n = int(batch["domain"].shape[0])
        if rows != n:
            raise RuntimeError(
                f"{what} got {rows} examples, the next batch this MixingDataLoader yielded has {n}: every micro-batch "
                "must reach the loss in the order it was drawn"
            )
        return batch

    # -- the train step's hooks -------------------------------------------------------------------------------------
    def observing(self, loss_fn: Callable[..., Any]) -> MixingLoss:
        """``loss_fn`` (torchtitan's ``(pred, labels, global_valid_tokens) -> (loss, metrics)``, token losses summed)
        for the trainer, also observing each training micro-batch's per-example mean token losses."""
        return loss_fn if isinstance(loss_fn, MixingLoss) and loss_fn.loader is self else MixingLoss(self, loss_fn)

    def _observe(self, loss_fn: Callable[..., Any], pred: torch.Tensor, labels: torch.Tensor) -> None:
        batch = self._take(int(labels.shape[0]), "the loss")
        if self._measure:
            raise RuntimeError(
                f"step {self.mixer.step_count + 1} measures gradient statistics (method {self.mixer.method.name!r}): "
                "run its micro-batches through dataloader.forward_backward(...), not torchtitan's forward/backward"
            )
        with torch.no_grad():
            sums = _example_sums(loss_fn, pred.detach(), labels).to("cpu", torch.float64)
        tokens = (labels != IGNORE_INDEX).sum(1).to("cpu", torch.float64)
        keep = tokens > 0  # an example without a labelled token has no loss
        self.mixer.observe(batch["domain"][keep], sums[keep] / tokens[keep], tokens=tokens[keep])
        self._observed += 1

    def forward_backward(
        self,
        model: nn.Module,
        input_dict: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        loss_fn: Callable[..., Any],
        *,
        backward_fn: Callable[[torch.Tensor], Any] | None = None,
        global_valid_tokens: torch.Tensor | None = None,
        fsdp_divide_factor: float | None = 1.0,
    ) -> torch.Tensor:
        """One micro-batch through the Mixer's probe (``mixer.backward``): its forward/backward passes call ``model``
        on the batch's ``input`` and ``loss_fn`` (torchtitan's) per example, every backward through ``backward_fn``
        (default ``loss.backward()``); on measuring steps that yields the gradient statistics. ``.grad`` then holds
        the gradient of the mean over the global batch of each example's mean token loss. The model's FSDP2 modules
        run with FSDP's default averaging meanwhile and get ``fsdp_divide_factor`` back (torchtitan's 1.0; None: the
        model uses the default). Returns this micro-batch's loss as torchtitan's loss functions do (summed token
        losses / ``global_valid_tokens``, or the mean over its tokens), detached, for logging."""
        del input_dict  # the batch is the one drawn: the probe re-slices it per part
        batch = self._take(int(labels.shape[0]), "forward_backward")
        base = loss_fn.base if isinstance(loss_fn, MixingLoss) else loss_fn
        device = labels.device
        n = int(labels.shape[0])
        work: dict[str, torch.Tensor] = {key: value.to(device) for key, value in batch.items()}
        work["_row"] = torch.arange(n, device=device)  # which rows a pass holds (the target batch has none)
        sums: dict[int, torch.Tensor] = {}

        def per_example(module: nn.Module, part: Mapping[str, torch.Tensor]) -> torch.Tensor:
            inputs, part_labels = self.convert(part)
            pred = module(inputs["input"].to(device))
            part_labels = part_labels.to(device)
            loss = _example_sums(base, pred, part_labels)
            if "_row" in part:  # a pass may repeat a row (a zero-weighted pass): same parameters, same value
                for row, value in zip(part["_row"].tolist(), loss.detach()):
                    sums.setdefault(int(row), value)
            return loss / (part_labels != IGNORE_INDEX).sum(1).clamp(min=1).to(loss.dtype)

        self._inside_probe = True
        try:
            with _fsdp_averaging(model, fsdp_divide_factor):
                self.mixer.backward(model, work, per_example, backward_fn)
        finally:
            self._inside_probe = False
        self._observed += 1
        self._probed += 1
        total = torch.stack([sums[i] for i in sorted(sums)]).sum() if sums else torch.zeros((), device=device)
        denominator = global_valid_tokens if global_valid_tokens is not None else (labels != IGNORE_INDEX).sum()
        return (total / denominator).detach()

    def step(self) -> np.ndarray:
        """After the optimizer step: ``mixer.step()`` (the method's update when due, the metrics record). Returns the
        weights the next batch is drawn from."""
        mixer = self.mixer
        parts = mixer.accumulation_steps
        if self._yielded != parts:
            raise RuntimeError(
                f"step(): {self._yielded} of this step's {parts} micro-batches were drawn (accumulation_steps={parts})"
            )
        step = mixer.step_count + 1
        if self._measure and self._probed != parts:
            raise RuntimeError(
                f"step {step} measures gradient statistics (method {mixer.method.name!r}) but {self._probed} of its "
                f"{parts} micro-batches ran through dataloader.forward_backward(...)"
            )
        if "loss" in mixer.method.required_stats and self._observed != parts:
            raise RuntimeError(
                f"method {mixer.method.name!r} steers by the loss, but {self._observed} of step {step}'s {parts} "
                "micro-batches reached it: use dataloader.observing(loss_fn) as the trainer's loss function"
            )
        self._pending.clear()
        self._yielded = self._observed = self._probed = 0
        self._measure = False
        return mixer.step()

    def close(self) -> None:
        """Complete a pending step and close the Mixer (flush its metrics, release the run folder)."""
        if self._closed or self._mixer is None:
            return
        self._settle()
        self._mixer.close()
        self._closed = True

    # -- checkpoint state (torch.distributed.checkpoint Stateful) ---------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"dp_rank_R": the Mixer's state (bytes), "world_size": W}``, taken between optimizer steps (a step left
        pending is completed first)."""
        mixer = self.mixer
        self._settle()
        if self._yielded:
            raise RuntimeError(
                f"cannot checkpoint in the middle of an optimizer step ({self._yielded} of "
                f"{mixer.accumulation_steps} micro-batches drawn): save after the step"
            )
        buffer = io.BytesIO()
        torch.save({"format": STATE_FORMAT, "mixer": mixer.state_dict()}, buffer)
        return {self._rank_id: buffer.getvalue(), "world_size": self.dp_world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the Mixer from this rank's entry and cut ``metrics.jsonl`` back to its step (collective: every
        rank raises if one cannot load). An empty state (a model-only checkpoint) changes nothing."""
        if not state_dict:
            return
        mixer = self.mixer
        error: Exception | None = None
        try:
            saved_world = int(state_dict.get("world_size", -1))
            if saved_world != self.dp_world_size:
                raise ValueError(
                    f"the dataloader state was written by {saved_world} data-parallel ranks, this run has "
                    f"{self.dp_world_size}: torchtitan's dataloader state is per rank (resume with as many ranks)"
                )
            if self._rank_id not in state_dict:
                raise ValueError(f"the checkpoint holds no dataloader state for {self._rank_id}")
            raw = state_dict[self._rank_id]
            loaded = torch.load(io.BytesIO(bytes(raw)), map_location="cpu", weights_only=True)
            if not isinstance(loaded, Mapping) or loaded.get("format") != STATE_FORMAT:
                raise ValueError(f"the dataloader state is not a {STATE_FORMAT} state")
            mixer.load_state_dict(loaded["mixer"])
        except Exception as exc:
            error = ValueError(f"gradmix: this checkpoint's dataloader state does not fit this run: {exc}")
        raise_on_any_rank(error)
        mixer.truncate_metrics()
        self._pending.clear()
        self._yielded = self._observed = self._probed = 0
        self._measure = False
