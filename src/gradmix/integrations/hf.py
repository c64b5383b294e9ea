"""Hugging Face integration: ``datasets`` Datasets as domains and a ``transformers.Trainer`` whose data mix changes
while it trains (``pip install gradmix[hf]``).

    from gradmix.integrations.hf import MixingTrainer, hf_domains

    domains = hf_domains({"code": code_ds, "docs": docs_ds, "legal": legal_ds})   # rows of T + 1 token ids
    trainer = MixingTrainer(model=model, args=TrainingArguments(output_dir="out", max_steps=1000, ...),
                            domains=domains, method="pike", mixer_options={"update_every": 50})
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

What it does, on top of the Trainer:

- **Data**: the Trainer's train dataloader is gradmix's live sampler. Each optimizer step draws ONE global batch of
  ``per_device_train_batch_size x gradient_accumulation_steps x world_size`` examples from the current weights and
  feeds it as ``gradient_accumulation_steps`` strided micro-batches (exactly what ``gradmix.Mixer`` does).
- **Training step**: ``training_step`` runs each micro-batch through ``Mixer.backward`` with
  ``backward_fn=self.accelerator.backward``: loss-only methods see per-example losses; gradient methods (PiKE, DGA,
  ...) get their statistics from the probe on the steps that measure. The loss is the mean per-example loss
  (``per_example_loss``, default: token-mean next-token cross entropy of a causal LM on windows of T + 1 ids).
- **Live weights**: a ``MixingCallback`` calls ``Mixer.step()`` (the core's ``end_step``) after every optimizer step,
  which pushes new weights to the sampler; the next batch is drawn from them.
- **Metrics**: the Mixer's ``metrics.jsonl`` (``step``, ``weights``, ``train_loss``, ``weight_entropy``,
  ``effective_domains``, ``max_weight``, ...) goes to ``output_dir``; the same KPIs reach the Trainer's loggers
  under the writers' names (``gradmix/weights/<domain>``, ``gradmix/train_loss/<domain>``,
  ``gradmix/weight_entropy``, ...; ``gradmix.writers.kpi_scalars``; TensorBoard shows them as ``train/gradmix/...``)
  on the Mixer's log steps (default ``log_every = logging_steps``) - unless the Mixer writes TensorBoard or W&B
  itself (``mixer_options={"writers": [..., "tensorboard"]}``): then they are there once, under the Mixer's names
  (``weights/<domain>``), not a second time through the Trainer (``log_to_trainer`` decides otherwise).
- **Checkpoints**: every Trainer checkpoint folder gets ``gradmix_state.pt`` (the Mixer's state, written last: its
  presence marks a complete checkpoint). ``train(resume_from_checkpoint=...)`` restores the Mixer first (a checkpoint
  of another run - other domains, method, batch geometry - is a ``ValueError`` before anything else changes), drops
  metrics records after the checkpoint's step, and lets the Trainer restore model, optimizer, scheduler and RNG.
  The Trainer does not skip batches on resume (``ignore_data_skip`` is forced on): the sampler state already
  continues exactly where the checkpoint was taken, so a resumed run draws exactly the batches and weights of an
  uninterrupted one. ``resume_from_checkpoint=True`` picks the newest *complete* checkpoint (``last_checkpoint``).
  Exact with dropout too: the Trainer restores the global RNG from the checkpoint, and the data iterator it builds
  next draws nothing from it (the Mixer's DataLoader has its own generator).
- **One owner, no silent reuse**: the Mixer locks ``output_dir`` (rank 0; ``gradmix.runlock``) from its construction
  to the end of ``train()``, so a second process on the same folder is refused meanwhile. ``train()`` without
  ``resume_from_checkpoint`` on a folder that holds a run (``metrics.jsonl``, ``checkpoint-*``) is a ``ValueError``
  on every rank, unless the trainer was built with ``overwrite=True``: then the old records and ``checkpoint-*``
  folders are deleted first.
- **Ranks**: under DDP the Mixer's construction checks that every rank has the same domains, batch geometry, method
  and seed (``gradmix.distributed.check_agreement``). Set ``TrainingArguments(ddp_timeout=...)`` (gradmix's default:
  ``int(gradmix.distributed.default_timeout().total_seconds())``) so that a hung rank does not block the others for
  torch's 30 minutes.

- **Sharded training**: FSDP2 through accelerate's plugin (``TrainingArguments(fsdp="full_shard",
  fsdp_config={"version": 2, ...})``; examples/hf_trainer_fsdp.py): accelerate shards the model in place when
  ``train()`` starts, and the first ``training_step`` rebuilds the probe as a ``ShardedGradientProbe`` with the same
  settings (``gradmix.integrations.fsdp.reshard_probe``): gradient methods measure from the local gradient shards and
  all-reduce a few scalars (the same weights on every rank; equal to one process over the same global batch up to
  float rounding). The Trainer's sharded checkpoints carry ``gradmix_state.pt`` and resume exactly as above. accelerate
  builds FSDP only on GPUs/accelerators: on CPU it would silently train with DDP, so ``fsdp=...`` on CPU is a one-line
  ``ValueError``. Under FSDP2 DGA's alignment is plain (no Adam preconditioner: the Trainer builds its optimizer
  after sharding, long after the Mixer). DeepSpeed ZeRO-2/3 runs loss-only and static methods (on CPU too, resuming
  exactly from its checkpoints; FSDP1 is not refused for them either, untested here: accelerate's FSDP needs GPUs);
  a gradient method under DeepSpeed or FSDP1 is a one-line ``ValueError`` at construction (``sharding_refusal``):
  FSDP1's flat parameters and DeepSpeed's partitioned gradients (reduced inside the engine's backward, which also
  steps on every call) hide what the probe measures. ``last_measurement`` holds the step's pooled measurement
  (statistics on measuring steps) after its last micro-batch.

Not supported: ``torch.nn.DataParallel`` (n_gpu > 1 in one process; use DDP via torchrun/accelerate), gradient
methods under DeepSpeed or FSDP1, hyperparameter search (checkpoint folders under ``run-*``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from gradmix.checkpoint import load_checkpoint_file, save_checkpoint_file
from gradmix.controller import Mixer
from gradmix.distributed import raise_on_any_rank
from gradmix.integrations.fsdp import has_dtensor_parameters, reshard_probe
from gradmix.methods.base import MixingMethod
from gradmix.probe import Probe, ShardedGradientProbe
from gradmix.runlock import RUN_MARKERS, RunDirError, check_run_dir
from gradmix.sources import DomainSet, DomainSource, HFDatasetDomain
from gradmix.stats import Measurement
from gradmix.writers import kpi_scalars, writes_scalars

__all__ = [
    "GRADMIX_STATE_NAME",
    "MixingCallback",
    "MixingTrainer",
    "MixingTrainerMixin",
    "causal_lm_loss",
    "hf_domains",
    "last_checkpoint",
    "sharding_refusal",
    "windows_dataset",
]

GRADMIX_STATE_NAME = "gradmix_state.pt"
"""File in each Trainer checkpoint folder that holds the Mixer's state (written after the Trainer's own files)."""
STATE_FORMAT = "gradmix.hf.MixingTrainer/1"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

PerExampleLoss = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


# -- data ----------------------------------------------------------------------------------------------------------


def hf_domains(datasets: Mapping[str, Any], column: str = "input_ids") -> DomainSet:
    """A ``DomainSet`` from map-style ``datasets.Dataset`` objects, one per domain, each row one window of T + 1 token
    ids in ``column`` (read by index from the Arrow table; nothing is loaded into RAM up front)."""
    return DomainSet([HFDatasetDomain(name, ds, column) for name, ds in datasets.items()])


def windows_dataset(token_ids: Sequence[int] | np.ndarray, window: int, column: str = "input_ids") -> Any:
    """A ``datasets.Dataset`` of windows of ``window + 1`` tokens (stride ``window``) cut from one token stream."""
    import datasets as hf_datasets

    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    count = (ids.size - 1) // window
    if count < 1:
        raise ValueError(f"{ids.size} tokens make no window of {window} + 1 tokens")
    rows = np.lib.stride_tricks.sliding_window_view(ids, window + 1)[::window][:count]
    return hf_datasets.Dataset.from_dict({column: rows.tolist()})


def causal_lm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example loss of a causal LM on windows of T + 1 token ids: the token mean of the next-token cross entropy
    of ``model(input_ids=ids[:, :-1])`` against ``ids[:, 1:]`` (positions with target -100 are ignored)."""
    ids = batch["input_ids"]
    inner = getattr(model, "module", model)
    try:
        device = next(inner.parameters()).device
    except StopIteration:
        device = ids.device
    ids = ids.to(device)  # target batches (DGA) come from the CPU
    inputs, targets = ids[:, :-1], ids[:, 1:]
    out = model(input_ids=inputs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    n, t = targets.shape
    losses = F.cross_entropy(
        logits.float().reshape(n * t, -1), targets.reshape(-1), reduction="none", ignore_index=-100
    ).view(n, t)
    valid = (targets != -100).to(losses.dtype)
    return (losses * valid).sum(1) / valid.sum(1).clamp_min(1.0)


# -- checkpoints ---------------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int | None:
    m = _CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete Trainer checkpoint folder in ``output_dir`` (one holding both ``trainer_state.json`` and
    the gradmix state, which is written last), or None. A folder left half-written by a crash is passed over."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in folder.iterdir():
        step = _checkpoint_step(child)
        if step is None or not child.is_dir():
            continue
        if not (child / GRADMIX_STATE_NAME).is_file() or not (child / "trainer_state.json").is_file():
            continue
        if best is None or step > best[0]:
            best = (step, child)
    return None if best is None else str(best[1])


def _trainer_step(checkpoint: Path) -> int | None:
    try:
        with (checkpoint / "trainer_state.json").open(encoding="utf-8") as fh:
            return int(json.load(fh)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- logging -------------------------------------------------------------------------------------------------------


def _forwards_kpis(log_to_trainer: bool | None, mixer: Mixer) -> bool:
    """Whether the KPIs go to the Trainer's loggers: as asked, else unless the Mixer plots them itself (TensorBoard,
    W&B writers), which would show every number twice."""
    return (not writes_scalars(mixer.writers)) if log_to_trainer is None else bool(log_to_trainer)


# -- sharding ------------------------------------------------------------------------------------------------------


def _fsdp_version(trainer: Any) -> int | None:
    """The FSDP version accelerate runs (1 or 2), or None without FSDP."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return int(getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1))


def sharding_refusal(method: str, needs_gradients: bool, *, deepspeed: bool, fsdp_version: int | None) -> str | None:
    """Why a Trainer sharded this way cannot carry ``method`` (one line), or None. FSDP2 is fine (the probe becomes a
    ``ShardedGradientProbe`` once accelerate has sharded the model); FSDP1's flat parameters and DeepSpeed's
    partitioned gradients hide what a gradient method measures. Loss-only and static methods run under any of them."""
    if not needs_gradients:
        return None
    if deepspeed:
        return (
            f"MixingTrainer: method {method!r} needs gradient statistics, which DeepSpeed hides (its engine reduces "
            "and partitions the gradients inside backward and steps on every backward call); use FSDP2 "
            "(TrainingArguments(fsdp='full_shard', fsdp_config={'version': 2}), examples/hf_trainer_fsdp.py) or a "
            "loss-only method"
        )
    if fsdp_version is not None and fsdp_version != 2:
        return (
            f"MixingTrainer: method {method!r} needs gradient statistics, which FSDP{fsdp_version} (flat parameters) "
            "hides; use FSDP2: TrainingArguments(fsdp='full_shard', fsdp_config={'version': 2})"
        )
    return None


# -- the callback --------------------------------------------------------------------------------------------------


class MixingCallback(TrainerCallback):
    """Drives the Mixer from the Trainer's events: ``Mixer.step()`` (the core's ``end_step``, which also pushes new
    weights to the sampler and writes ``metrics.jsonl``) after every optimizer step, the KPIs to the Trainer's
    loggers, and the Mixer's state into every checkpoint folder. ``MixingTrainer`` installs it (first in the list,
    so that other callbacks' ``on_save`` see a complete checkpoint)."""

    def __init__(self, trainer: MixingTrainerMixin) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        mixer = self.trainer.mixer
        before = mixer.history[-1] if mixer.history else None
        mixer.step()
        if mixer.step_count != state.global_step:
            raise RuntimeError(
                f"gradmix: the Mixer is at step {mixer.step_count} but the Trainer at "
                f"{state.global_step}; the Mixer's state does not belong to this training run"
            )
        after = mixer.history[-1] if mixer.history else None
        if after is not None and after is not before:
            if _forwards_kpis(self.trainer.gradmix_log_to_trainer, mixer):
                self.trainer._gradmix_pending_logs.update(kpi_scalars(after))
            control.should_log = True  # the KPIs reach the loggers on the step they describe (same on every rank)
        return control

    def on_save(self, args, state, control, **kwargs):
        self.trainer.save_mixer_state(state.global_step)
        return control


# -- the Trainer ---------------------------------------------------------------------------------------------------

if TYPE_CHECKING:  # type the mixin as the Trainer it is combined with
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class MixingTrainerMixin(_TrainerBase):
    """Makes a ``transformers.Trainer`` (sub)class train on a gradmix mix: combine it as
    ``class MyTrainer(MixingTrainerMixin, SomeTrainer)`` (``MixingTrainer`` is the mixin on ``Trainer``).

    Keyword arguments (besides the Trainer's own; ``train_dataset`` is the domains):
        domains: a ``DomainSet``, a list of gradmix domains, or ``{name: datasets.Dataset}`` (rows of T + 1 ids in
            ``column``).
        method: a gradmix method name or a ``MixingMethod``; method_params: its parameters (weights as a list or
            ``{domain name: weight}``, as ``Mixer``).
        mixer_options: further ``Mixer`` keyword arguments (``update_every``, ``warmup_steps``, ``probe_every``,
            ``seed`` (default ``args.seed``), ``mode``, ``max_repeats``, ``log_every`` (default
            ``args.logging_steps``), ``target``, ``probe_params``, ``alert_min_weight``, ...). ``batch_size``,
            ``accumulation_steps``, ``rank``, ``world_size`` and ``run_dir`` come from the ``TrainingArguments``.
        mixer: a ready ``Mixer`` instead (it must match the arguments' batch geometry; its writers are kept).
        per_example_loss: ``(model, batch) -> (n,)`` losses (default ``causal_lm_loss``); batches hold
            ``input_ids`` (n, T + 1), ``domain`` and ``index``.
        column: the token column of ``{name: Dataset}`` domains.
        overwrite: let ``train()`` without ``resume_from_checkpoint`` start over a folder that holds a run (its
            ``metrics.jsonl`` and ``checkpoint-*`` folders are deleted); without it that is a ``ValueError``.
        log_to_trainer: hand the KPIs to the Trainer's loggers (``gradmix/weights/<domain>``, ...). Default (None):
            yes, unless the Mixer has a TensorBoard or W&B writer itself (one tag per number).

    ``args.max_steps`` must be set (the mix is an endless stream; epochs do not apply).
    """

    def __init__(
        self,
        *args: Any,
        domains: DomainSet | Sequence[DomainSource] | Mapping[str, Any] | None = None,
        method: str | MixingMethod = "uniform",
        method_params: Mapping[str, Any] | None = None,
        mixer_options: Mapping[str, Any] | None = None,
        mixer: Mixer | None = None,
        per_example_loss: PerExampleLoss | None = None,
        column: str = "input_ids",
        overwrite: bool = False,
        log_to_trainer: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("train_dataset") is not None:
            raise ValueError("MixingTrainer draws its training data from domains=...; do not pass train_dataset")
        if (domains is None) == (mixer is None):
            raise ValueError("MixingTrainer needs exactly one of domains=... or mixer=...")
        super().__init__(*args, **kwargs)
        targs = self.args
        if targs.max_steps is None or targs.max_steps <= 0:
            raise ValueError(
                "MixingTrainer needs TrainingArguments(max_steps=N > 0): the mix is an endless stream of "
                "batches, so epochs do not end it"
            )
        if getattr(targs, "n_gpu", 1) > 1:
            raise ValueError(
                f"MixingTrainer does not support torch.nn.DataParallel (n_gpu={targs.n_gpu} in one "
                "process); launch one process per device (torchrun / accelerate launch)"
            )
        fsdp_asked = bool(getattr(targs, "fsdp", None)) and not getattr(self, "is_fsdp_xla_enabled", False)
        if fsdp_asked and not getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                "MixingTrainer: TrainingArguments(fsdp=...) but accelerate did not enable FSDP (it shards only on "
                "GPUs/accelerators; on CPU it falls back to DDP without saying so): run on GPUs "
                "(examples/hf_trainer_fsdp.py) or drop fsdp=... to train with DDP"
            )
        # The sampler's state resumes exactly; the Trainer must not skip already-seen batches a second time.
        targs.ignore_data_skip = True
        accumulation = int(targs.gradient_accumulation_steps)
        world_size, rank = int(targs.world_size), int(targs.process_index)
        batch_size = int(targs.per_device_train_batch_size) * accumulation * world_size

        built = mixer is None
        if mixer is None:
            if isinstance(domains, Mapping):
                domains = hf_domains(domains, column=column)
            options = dict(mixer_options or {})
            for key in ("batch_size", "accumulation_steps", "rank", "world_size", "run_dir", "resume", "overwrite"):
                if key in options:
                    raise ValueError(
                        f"mixer_options[{key!r}] is set by MixingTrainer from the TrainingArguments "
                        "(per_device_train_batch_size, gradient_accumulation_steps, world size, "
                        "output_dir; resume / overwrite: train(resume_from_checkpoint=...) / overwrite=True)"
                    )
            assert domains is not None  # checked above: exactly one of domains / mixer
            options.setdefault("seed", int(targs.seed))
            if "log_every" not in options:
                logging_steps = targs.logging_steps
                options["log_every"] = (
                    int(logging_steps) if isinstance(logging_steps, int) and logging_steps >= 1 else 10
                )
            mixer = Mixer(
                domains,
                method,
                batch_size,
                method_params=method_params,
                model=self.model,
                accumulation_steps=accumulation,
                rank=rank,
                world_size=world_size,
                run_dir=targs.output_dir,
                resume=True,  # the folder's records are kept or refused in train(), which knows if it resumes
                **options,
            )
        else:
            if mixer_options or method_params:
                raise ValueError("pass mixer_options/method_params to the Mixer you build, not with mixer=...")
            found = (mixer.config.batch_size, mixer.accumulation_steps, mixer.world_size, mixer.rank)
            wanted = (batch_size, accumulation, world_size, rank)
            if found != wanted:
                raise ValueError(
                    f"the Mixer has (batch_size, accumulation_steps, world_size, rank) = {found}, the "
                    f"TrainingArguments give {wanted} (batch_size = per_device_train_batch_size x "
                    "gradient_accumulation_steps x world size)"
                )
        refusal = sharding_refusal(
            mixer.method.name,
            mixer.needs_gradients,
            deepspeed=bool(getattr(self, "is_deepspeed_enabled", False)),
            fsdp_version=_fsdp_version(self),
        )
        if refusal is not None:
            if built:
                mixer.close()  # the run folder's lock is free again
            raise ValueError(refusal)
        self.mixer = mixer
        self.last_measurement: Measurement | None = None
        self.gradmix_overwrite = bool(overwrite)
        self.gradmix_log_to_trainer = log_to_trainer
        self.per_example_loss = per_example_loss if per_example_loss is not None else causal_lm_loss
        self.train_dataset = mixer.domains
        self._gradmix_pending_logs: dict[str, float] = {}
        self.gradmix_callback = MixingCallback(self)
        self.callback_handler.callbacks.insert(0, self.gradmix_callback)

    # -- data ------------------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """A DataLoader over the Mixer's live sampler: one global batch per optimizer step, as
        ``gradient_accumulation_steps`` micro-batches. Not wrapped by accelerate (the sampler shards by rank itself)."""
        args = self.args
        kwargs: dict[str, Any] = {
            "num_workers": args.dataloader_num_workers,
            "pin_memory": bool(args.dataloader_pin_memory) and self.args.device.type == "cuda",
        }
        if args.dataloader_num_workers > 0:
            kwargs["persistent_workers"] = bool(args.dataloader_persistent_workers)
            if args.dataloader_prefetch_factor is not None:
                kwargs["prefetch_factor"] = args.dataloader_prefetch_factor
        return self.mixer.dataloader(**kwargs)

    def get_resumed_dataloader(self, dataloader, num_batches):
        """Never skip: the sampler's restored state already continues after the checkpoint's last batch."""
        return dataloader

    # -- training step ---------------------------------------------------------------------------------------------
    def _ensure_probe(self, model: torch.nn.Module) -> None:
        """The probe must drive the model as the Trainer prepared it after __init__: under DDP its
        DistributedDataParallel wrapper (rebuilt there once, with the same settings: probed parameters, splits, Gram,
        preconditioner); under FSDP2 (accelerate's plugin shards the model in place when ``train()`` starts) a
        ``ShardedGradientProbe`` with the same settings."""
        probe: Probe | None = self.mixer.probe
        if probe is None or probe.accumulating:
            return
        if not isinstance(probe, ShardedGradientProbe) and has_dtensor_parameters(model):
            self.mixer.probe = reshard_probe(probe, model)
            return
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if probe.model is model or not ddp or model.module is not probe.module:
            return
        self.mixer.probe = probe.rebind(model)

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Forward + backward of one micro-batch through the Mixer (and its probe on measuring steps); every backward
        goes through ``self.accelerator.backward``. ``.grad`` ends as the gradient of the mean per-example loss over
        the step's global batch. Returns the step's mean loss on its last micro-batch (0 before), so the Trainer's
        logged ``loss`` is the mean loss per optimizer step."""
        model.train()
        optimizer_train = getattr(self.optimizer, "train", None)  # schedule-free optimizers
        if callable(optimizer_train):
            optimizer_train()
        inputs = self._prepare_inputs(inputs)
        self._ensure_probe(model)
        with self.compute_loss_context_manager():
            result = self.mixer.backward(model, inputs, self.per_example_loss, backward_fn=self.accelerator.backward)
        self.last_measurement = result
        if result is None:
            return torch.zeros((), device=self.args.device)
        loss_sum, counts = result.loss_sums()
        total = float(np.sum(counts))
        value = float(np.sum(loss_sum)) / total if total > 0 else float("nan")
        return torch.tensor(value, dtype=torch.float32, device=self.args.device)

    # -- logging ---------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the Mixer's KPIs of the step merged in when it produced a record."""
        if self._gradmix_pending_logs:
            logs = {**logs, **self._gradmix_pending_logs}
            self._gradmix_pending_logs = {}
        super().log(logs, *args, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def _checkpoint_folder(self, step: int) -> Path:
        return Path(str(self.args.output_dir)) / f"checkpoint-{step}"

    def save_mixer_state(self, step: int | None = None) -> Path | None:
        """Write the Mixer's state into the Trainer checkpoint folder of ``step`` (default: the current step);
        world process zero only. Called by ``MixingCallback.on_save``."""
        step = self.state.global_step if step is None else int(step)
        if not self.state.is_world_process_zero:
            return None
        folder = self._checkpoint_folder(step)
        if not folder.is_dir():
            warnings.warn(
                f"gradmix: Trainer checkpoint folder {str(folder)!r} is missing; the Mixer state is written "
                "there anyway",
                RuntimeWarning,
                stacklevel=2,
            )
            folder.mkdir(parents=True, exist_ok=True)
        state = {
            "format": STATE_FORMAT,
            "global_step": step,
            "method": self.mixer.method.name,
            "gradmix": self.mixer.state_dict(),
        }
        return save_checkpoint_file(state, folder / GRADMIX_STATE_NAME)

    def load_mixer_state(self, checkpoint: str | os.PathLike) -> None:
        """Restore the Mixer from a Trainer checkpoint folder (all-or-nothing); ``ValueError`` naming the folder if
        it holds no gradmix state or one from another run (domains, method, batch geometry, seed)."""
        folder = Path(checkpoint)
        path = folder / GRADMIX_STATE_NAME
        if not path.is_file():
            newest = last_checkpoint(folder.parent)
            hint = f"; the newest complete checkpoint there is {newest!r}" if newest else ""
            raise ValueError(
                f"checkpoint {str(folder)!r} holds no gradmix state ({GRADMIX_STATE_NAME}): it was not "
                f"written by a MixingTrainer, or the run stopped while saving it{hint}"
            )
        state = load_checkpoint_file(path)
        if state.get("format") != STATE_FORMAT or not isinstance(state.get("gradmix"), Mapping):
            raise ValueError(f"{str(path)!r} is not a {STATE_FORMAT} state (format={state.get('format')!r})")
        trainer_step = _trainer_step(folder)
        if trainer_step is not None and trainer_step != int(state["global_step"]):
            raise ValueError(
                f"checkpoint {str(folder)!r}: the Trainer state is at step {trainer_step} but the gradmix "
                f"state at step {state['global_step']}; the folder mixes two runs"
            )
        try:
            self.mixer.load_state_dict(state["gradmix"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"checkpoint {str(folder)!r} does not fit this run: {exc}") from exc

    def _claim_output_dir(self, resuming: bool) -> None:
        """A fresh start over a folder holding a run is refused (or, with ``overwrite=True``, the old run's records
        and checkpoint folders are deleted). Rank 0 decides; every rank raises its error together."""
        error: RunDirError | None = None
        if not resuming and self.mixer.rank == 0:
            flags = ("train(resume_from_checkpoint=...)", "MixingTrainer(overwrite=True)")
            out = Path(str(self.args.output_dir))
            run_dir = self.mixer.run_dir
            same = run_dir is not None and run_dir.resolve() == out.resolve()
            try:
                if run_dir is not None and not same:
                    check_run_dir(run_dir, overwrite=self.gradmix_overwrite, flags=flags)
                markers = (*RUN_MARKERS, "checkpoint-*") if same else ("checkpoint-*",)
                check_run_dir(out, overwrite=self.gradmix_overwrite, markers=markers, flags=flags)
            except RunDirError as exc:
                error = exc
        raise_on_any_rank(error)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train`` that first restores the Mixer from the checkpoint (``True``: the newest complete one in
        ``output_dir``) and drops metrics records after the step it continues from. Without a checkpoint, a folder
        that holds a run is refused unless the trainer has ``overwrite=True`` (see the module docstring)."""
        if resume_from_checkpoint is True:
            found = last_checkpoint(str(self.args.output_dir))
            if found is None:
                raise ValueError(
                    f"no complete checkpoint (with {GRADMIX_STATE_NAME}) in output directory {self.args.output_dir!r}"
                )
            resume_from_checkpoint = found
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        lock = self.mixer.run_lock
        if lock is not None:
            lock.acquire()  # again, if an earlier train() of this trainer released it
        try:
            self._claim_output_dir(resuming=resume_from_checkpoint is not None)
            if resume_from_checkpoint is not None:
                self.load_mixer_state(resume_from_checkpoint)
            elif self.mixer.step_count:
                raise ValueError(
                    f"this MixingTrainer's Mixer has already trained {self.mixer.step_count} steps; build a "
                    "new trainer (and Mixer) for a new run, or pass resume_from_checkpoint=..."
                )
            self.mixer.truncate_metrics()
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if lock is not None:
                lock.release()  # the folder is free once training ends (or fails)


class MixingTrainer(MixingTrainerMixin, Trainer):
    """``transformers.Trainer`` training on a gradmix mix that changes while it trains (see the module docstring)."""
