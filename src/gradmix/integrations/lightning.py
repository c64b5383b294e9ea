"""Lightning integration (``pip install 'gradmix[lightning]'``): a Callback and a LightningModule mixin.

    class LitModel(MixingModuleMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False          # gradient methods: the probe runs the backward passes
            self.net = ...

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            self.mixing_backward(batch, per_example_loss)  # every backward through self.manual_backward
            opt.step()
            opt.zero_grad()

    mixing = MixingCallback(domains, "pike", batch_size=32, update_every=50, run_dir="runs/x")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1000, callbacks=[mixing])
    trainer.fit(LitModel())           # the mixin's train_dataloader() is gradmix's live sampler

What the callback does:

* ``setup``: builds the ``Mixer`` (rank and world size from the Trainer) - the reference composition of core, sampler,
  probe and metrics writer; ``callback.mixer`` is it. Under ``ModelParallelStrategy`` (FSDP2) it is built at
  ``on_fit_start`` instead, after ``configure_model`` has sharded the module.
* ``dataloader()`` (returned by the mixin's ``train_dataloader``): an iterable over the live sampler, each rank its
  share of the same global batch (micro-batches when ``accumulation_steps > 1``). Lightning injects no distributed
  sampler into it (it is an ``IterableDataset``). Lightning fetches one batch ahead, so a weight change after step t
  first shows in batch t + 2; checkpoints stay exact (the sampler rolls prefetched batches back).
* ``on_train_batch_end``: once per optimizer step (every ``accumulation_steps`` batches) ``mixer.step()``: the core's
  ``end_step`` (method update when due, KPIs, alerts), new weights into the sampler, the record into
  ``run_dir/metrics.jsonl`` (rank 0), and weights / KPIs / per-domain losses into ``pl_module.log`` (the Trainer's
  loggers), under ``log_prefix`` and the writers' names: every step ``gradmix/requested_weights/<domain>`` (the
  weights the next batch is drawn from), on the Mixer's log steps the record's KPIs (``gradmix/weights/<domain>``,
  ``gradmix/train_loss/<domain>``, ``gradmix/weight_entropy``, ...; ``gradmix.writers.kpi_scalars``). Not when the
  Mixer writes TensorBoard or W&B itself (``writers=[..., "tensorboard"]``): each number is shown once
  (``log_to_trainer`` decides otherwise).
* ``state_dict`` / ``load_state_dict``: the Mixer's state goes into Lightning's checkpoints (plain Python values); on
  resume it is restored and ``metrics.jsonl`` is cut back to the checkpoint's step, so ``trainer.fit(ckpt_path=...)``
  continues exactly (the same batches, the same weights).
* the run folder: the Mixer locks ``run_dir`` (rank 0) from ``setup`` to ``teardown``: a second process on it is
  refused meanwhile.
  A fit that does not resume (no ``ckpt_path``, or a checkpoint without gradmix state) on a ``run_dir`` that holds
  a run is a ``ValueError`` on every rank at ``on_train_start``, unless ``overwrite=True`` (the old records are
  deleted). Under DDP the Mixer's construction checks that every rank has the same domains, batch geometry, method
  and seed; pass ``DDPStrategy(timeout=gradmix.distributed.default_timeout())`` so that a hung rank does not block
  the others for torch's 30 minutes.

Gradient methods (PiKE, DGA, ...) need manual optimization: ``mixing_backward`` runs the step's forward/backward
passes through the ``GradientProbe`` with ``self.manual_backward`` as its ``backward_fn``; under DDP it blocks DDP's
own gradient sync (``strategy.block_backward_sync()``) while the probe's per-domain micro-passes run and then
averages the gradients once itself (``GradientProbe(sync_gradients=True)``), so the per-rank statistics are what the
probe expects. Loss-only and static methods also work with automatic optimization: call ``mixing_observe(batch,
per_example_losses)`` in ``training_step`` (or nothing, for static methods).

Supported strategies: single device, DDP (``"ddp"``, ``"ddp_spawn"``) and FSDP2 through ``ModelParallelStrategy``
(``data_parallel_size=N, tensor_parallel_size=1``; the module applies ``fully_shard`` on
``self.device_mesh["data_parallel"]`` in ``configure_model``; examples/lightning_fsdp.py). Under it the Mixer is built
at ``on_fit_start``, once the module is sharded, so gradient methods measure through the ``ShardedGradientProbe``
(statistics from the local gradient shards, a few all-reduced scalars: the same weights on every rank, equal to one
process over the same global batch up to float rounding; ``probe_params`` without ``sync_gradients``); the Mixer's
state goes into Lightning's sharded checkpoints (``meta.pt`` beside the DCP shards) and comes back exactly.
``FSDPStrategy`` (FSDP1, flat parameters; CUDA only) runs loss-only and static methods; a gradient method there is a
one-line ``ValueError`` at ``on_fit_start`` naming ModelParallelStrategy. ``DeepSpeedStrategy`` (its engine runs the
backward and partitions the gradients) and tensor parallelism (``tensor_parallel_size > 1``: every rank draws its own
share of the batch) are one-line ``NotImplementedError``s at ``setup``. A checkpoint from another run (other
domains, method, batch geometry) is a ``ValueError`` at restore. One written under another world size is accepted:
the sampler's global batches are the same and each rank takes its new share (the probe's per-rank statistics then
follow the new world size), with a ``MixingWarning`` saying so.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
except ImportError as exc:  # pragma: no cover
    raise ImportError("gradmix.integrations.lightning needs Lightning: pip install 'gradmix[lightning]'") from exc

from gradmix.controller import Mixer, MixingWarning
from gradmix.distributed import raise_on_any_rank
from gradmix.integrations.fsdp import has_dtensor_parameters
from gradmix.methods import MixingMethod, resolve_weight_params
from gradmix.runlock import RunDirError, check_run_dir
from gradmix.sources import DomainSet
from gradmix.stats import Measurement
from gradmix.writers import kpi_scalars, writes_scalars

__all__ = ["MixingCallback", "MixingModuleMixin"]

STATE_FORMAT = "gradmix.lightning.MixingCallback/1"


class _LiveBatches(torch.utils.data.IterableDataset):
    """This rank's (micro-)batches from the Mixer's live sampler, forever (until the data is exhausted)."""

    def __init__(self, mixer: Mixer) -> None:
        self.mixer = mixer

    def __iter__(self):
        return iter(self.mixer.batches())


def _is_model_parallel(strategy: Any) -> bool:
    return isinstance(strategy, ModelParallelStrategy)


def _is_fsdp1(strategy: Any) -> bool:
    return isinstance(strategy, FSDPStrategy)


def _check_strategy(strategy: Any) -> None:
    """Refuse, in one line, what the callback cannot drive: DeepSpeed (its engine runs the backward and partitions the
    gradients itself) and tensor parallelism (ranks of one tensor-parallel group must see the same examples, but the
    sampler gives every rank its own share)."""
    name = type(strategy).__name__
    if "DeepSpeed" in name:
        raise NotImplementedError(
            f"MixingCallback does not support {name}: DeepSpeed's engine runs the backward and partitions the "
            "gradients itself; use ModelParallelStrategy with fully_shard (FSDP2, examples/lightning_fsdp.py) or DDP"
        )
    if _is_model_parallel(strategy):
        mesh = strategy.device_mesh
        tensor_parallel = int(mesh["tensor_parallel"].size()) if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
        if tensor_parallel > 1:
            raise NotImplementedError(
                f"MixingCallback: ModelParallelStrategy with tensor_parallel_size={tensor_parallel} is not supported "
                "(every rank draws its own share of the batch); use ModelParallelStrategy(data_parallel_size="
                f"{strategy.world_size}, tensor_parallel_size=1) with fully_shard (FSDP2)"
            )


class MixingCallback(Callback):
    """Drives a gradmix ``Mixer`` from a Lightning ``Trainer``.

    Args:
        domains, method, batch_size: as ``Mixer`` (``batch_size`` = examples per optimizer step, all ranks together).
        run_dir: where rank 0 writes ``metrics.jsonl`` (None: records stay in ``mixer.history``).
        method_params, probe_params, target: as ``Mixer`` (weights as a list or ``{domain name: weight}``, checked
            here when ``domains`` is a ``DomainSet``); ``probe_params`` defaults to ``sync_gradients=True``
            (the probe averages gradients itself; see the module docstring).
        log_prefix: prefix of the names logged through ``pl_module.log`` (None: log nothing).
        log_to_trainer: log the KPIs through ``pl_module.log``; default (None): yes, unless the Mixer has a
            TensorBoard or W&B writer itself (the same numbers under a second tag).
        overwrite: a fit that does not resume may start over a ``run_dir`` that holds a run (its records are
            deleted); without it that is a ``ValueError``. Resuming is ``trainer.fit(ckpt_path=...)``.
        other keyword arguments: ``MixerConfig`` fields (``update_every``, ``accumulation_steps``, ``seed``, ...).
    """

    def __init__(
        self,
        domains: Any,
        method: Any = "uniform",
        batch_size: int = 32,
        *,
        run_dir: str | Path | None = None,
        method_params: Mapping[str, Any] | None = None,
        probe_params: Mapping[str, Any] | None = None,
        target: Any = None,
        log_prefix: str | None = "gradmix/",
        log_to_trainer: bool | None = None,
        overwrite: bool = False,
        **config: Any,
    ) -> None:
        super().__init__()
        for key in ("resume", "lock"):
            if key in config:
                raise ValueError(f"MixingCallback sets the Mixer's {key!r} itself (resume: trainer.fit(ckpt_path=...))")
        if isinstance(domains, DomainSet) and not isinstance(method, MixingMethod):
            method_params = resolve_weight_params(method_params, domains.names)  # by-name weights: checked now
        self._spec = dict(
            domains=domains,
            method=method,
            batch_size=batch_size,
            run_dir=run_dir,
            method_params=method_params,
            target=target,
            **config,
        )
        self._explicit_probe_params = dict(probe_params or {})
        self._probe_params = {"sync_gradients": True, **self._explicit_probe_params}
        self.log_prefix = log_prefix
        self.log_to_trainer = log_to_trainer
        self.overwrite = bool(overwrite)
        self._restored = False  # a checkpoint's gradmix state was loaded in this fit
        self.mixer: Mixer | None = None
        self._pending: Mapping[str, Any] | None = None
        self._micro = 0  # batches of the current optimizer step

    @property
    def state_key(self) -> str:
        return "gradmix.MixingCallback"

    # -- building -------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.mixer is not None:
            if self.mixer.run_lock is not None:
                self.mixer.run_lock.acquire()  # a later fit: the folder is ours again (released at teardown)
            return
        _check_strategy(trainer.strategy)
        if _is_model_parallel(trainer.strategy):
            return  # built at on_fit_start: configure_model (fully_shard) and the strategy's setup come first
        self._build(trainer, pl_module, dict(self._probe_params))

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe_params: dict[str, Any]) -> None:
        self.mixer = Mixer(
            model=pl_module,
            probe_params=probe_params,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            resume=True,  # the folder's records are kept or refused at on_train_start, once a restore is known
            **self._spec,
        )
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._restore(state)

    def _build_model_parallel(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """ModelParallelStrategy: the Mixer (and its probe) over the module as configure_model left it. Gradient
        methods need its parameters to be FSDP2 DTensors (``fully_shard`` on the strategy's data-parallel mesh):
        the probe is then a ``ShardedGradientProbe`` (FSDP2 reduces the gradients itself, so no ``sync_gradients``)."""
        probe_params = {key: value for key, value in self._probe_params.items() if key != "sync_gradients"}
        if "sync_gradients" in self._explicit_probe_params:
            raise ValueError(
                "MixingCallback: probe_params['sync_gradients'] does not apply under ModelParallelStrategy "
                "(FSDP2 reduces the gradients itself)"
            )
        self._build(trainer, pl_module, probe_params)
        mixer = self._require()
        if mixer.needs_gradients and trainer.world_size > 1 and not has_dtensor_parameters(pl_module):
            raise ValueError(
                f"MixingCallback: method {mixer.method.name!r} needs gradient statistics, but under "
                "ModelParallelStrategy the module's parameters are not sharded: apply fully_shard(..., "
                "mesh=self.device_mesh['data_parallel']) in configure_model (examples/lightning_fsdp.py)"
            )

    def _require(self) -> Mixer:
        if self.mixer is None:
            raise RuntimeError(
                "the MixingCallback has no Mixer yet: it is built when trainer.fit starts (setup(); on_fit_start() "
                "under ModelParallelStrategy)"
            )
        return self.mixer

    def dataloader(self, **kwargs: Any) -> torch.utils.data.DataLoader:
        """The train dataloader: this rank's share of the live sampler's batches (no workers: the sampler must see
        every weight change; the batches are gathered from in-memory or memory-mapped windows)."""
        mixer = self._require()
        # its own generator: building the iterator draws nothing from the global RNG (dropout stays exact on resume)
        kwargs.setdefault("generator", torch.Generator().manual_seed(mixer.config.seed * 1_000_003 + mixer.rank))
        return torch.utils.data.DataLoader(_LiveBatches(mixer), batch_size=None, **kwargs)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mixer is None and _is_model_parallel(trainer.strategy):
            self._build_model_parallel(trainer, pl_module)
        mixer = self._require()
        strategy = type(trainer.strategy).__name__
        if mixer.needs_gradients and _is_fsdp1(trainer.strategy):
            raise ValueError(
                f"MixingCallback: method {mixer.method.name!r} needs gradient statistics, which {strategy} "
                "(FSDP1, flat parameters) hides; use ModelParallelStrategy with fully_shard in configure_model "
                "(FSDP2, examples/lightning_fsdp.py) or a loss-only method"
            )
        accumulation = mixer.accumulation_steps
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches != accumulation:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) but the Mixer has "
                f"accumulation_steps={accumulation}: pass the same number to both"
            )
        if mixer.needs_gradients and pl_module.automatic_optimization:
            raise ValueError(
                f"method {mixer.method.name!r} needs gradient statistics: set "
                "self.automatic_optimization = False and call self.mixing_backward(batch, loss_fn) "
                "(MixingModuleMixin) in training_step"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit that did not restore gradmix state must not write over a run: refuse (every rank) or, with
        ``overwrite``, delete its records first."""
        mixer = self._require()
        error: RunDirError | None = None
        fresh = not self._restored and mixer.step_count == 0  # not a restore, nor a second fit continuing in memory
        if fresh and mixer.rank == 0 and mixer.run_dir is not None:
            try:
                check_run_dir(
                    mixer.run_dir,
                    overwrite=self.overwrite,
                    flags=("trainer.fit(ckpt_path=...)", "MixingCallback(overwrite=True)"),
                )
            except RunDirError as exc:
                error = exc
        raise_on_any_rank(error)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The fit is over: the run folder is free for the next owner."""
        if self.mixer is not None and self.mixer.run_lock is not None:
            self.mixer.run_lock.release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    # -- per step -------------------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mixer = self._require()
        self._micro += 1
        if self._micro < mixer.accumulation_steps:
            return
        self._micro = 0
        weights = mixer.step()  # the core's end_step, new weights into the sampler, metrics.jsonl on rank 0
        forward = (not writes_scalars(mixer.writers)) if self.log_to_trainer is None else self.log_to_trainer
        if self.log_prefix is None or not forward:
            return
        p = self.log_prefix
        values = {f"{p}requested_weights/{name}": float(w) for name, w in zip(mixer.names, weights)}
        record = mixer.history[-1] if mixer.history and mixer.history[-1].get("step") == mixer.step_count else None
        if record is not None:
            values.update(kpi_scalars(record, p))
        # identical on every rank: no sync needed
        pl_module.log_dict(values, on_step=True, on_epoch=False, sync_dist=False, batch_size=mixer.config.batch_size)

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.mixer is None:
            return {}
        if self._micro:
            raise RuntimeError(
                f"checkpoint in the middle of an optimizer step ({self._micro} of "
                f"{self.mixer.accumulation_steps} batches): save on optimizer-step boundaries"
            )
        return {
            "format": STATE_FORMAT,
            "world_size": self.mixer.world_size,
            "mixer": copy.deepcopy(self.mixer.state_dict()),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not state_dict:
            return
        if self.mixer is None:
            self._pending = state_dict
        else:
            self._restore(state_dict)

    def _restore(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} state in this checkpoint (format={state.get('format')!r})")
        mixer = self._require()
        mixer.load_state_dict(state["mixer"])  # refuses another run's state (domains, method, sizes, seed, batch)
        saved_world = int(state.get("world_size", mixer.world_size))
        if saved_world != mixer.world_size and mixer.rank == 0:
            warnings.warn(
                f"resuming a run checkpointed with {saved_world} ranks on {mixer.world_size}: the global "
                "batches stay the same, each rank takes its new share",
                MixingWarning,
                stacklevel=2,
            )
        mixer.truncate_metrics()  # rank 0: drop records after the checkpoint's step (they are logged again)
        self._micro = 0
        self._restored = True


class MixingModuleMixin:
    """For a ``LightningModule`` (list it first among the bases): the train dataloader and the backward of gradmix.

    Needs a ``MixingCallback`` among the Trainer's callbacks.
    """

    @property
    def mixing_callback(self) -> MixingCallback:
        trainer = self.trainer  # type: ignore[attr-defined]
        found = [cb for cb in trainer.callbacks if isinstance(cb, MixingCallback)]
        if len(found) != 1:
            raise RuntimeError(f"expected one MixingCallback among the Trainer's callbacks, found {len(found)}")
        return found[0]

    @property
    def mixer(self) -> Mixer:
        return self.mixing_callback._require()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.mixing_callback.dataloader()

    def mixing_backward(self, batch: Mapping[str, torch.Tensor], loss_fn: Any) -> Measurement | None:
        """Forward + backward of one (micro-)batch through gradmix's probe (``loss_fn(model, batch)`` returns
        per-example losses), every backward by ``self.manual_backward``. Manual optimization only. Returns the
        step's measurement (global losses per domain; gradient statistics on measuring steps) after its last
        micro-batch, None before."""
        if self.automatic_optimization:  # type: ignore[attr-defined]
            raise RuntimeError("mixing_backward needs manual optimization: set self.automatic_optimization = False")
        strategy = self.trainer.strategy  # type: ignore[attr-defined]
        block = getattr(strategy, "block_backward_sync", None)
        context = block() if callable(block) else contextlib.nullcontext()
        with context:  # DDP must not sync the probe's micro-passes; the probe averages the gradients once
            return self.mixer.backward(self, batch, loss_fn, backward_fn=self.manual_backward)  # type: ignore

    def mixing_observe(self, batch: Mapping[str, torch.Tensor], losses: torch.Tensor) -> None:
        """Record the batch's per-example losses (loss-based methods under automatic optimization)."""
        self.mixer.observe(batch["domain"], losses)
