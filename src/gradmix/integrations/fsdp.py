"""FSDP2 (``torch.distributed.fsdp.fully_shard``) checkpoints.

The probe for an FSDP2 model, ``ShardedGradientProbe`` (statistics from the local gradient shards over global parts
of the global batch), lives in ``gradmix.probe``; ``make_probe`` (what a Mixer builds) picks it for a model with
``DTensor`` parameters.

Checkpoints: ``save_sharded_checkpoint`` / ``load_sharded_checkpoint`` write a folder per step with the model and
optimizer through ``torch.distributed.checkpoint`` (each rank writes its shards; loading re-shards to the current
world size), the Mixer state (rank 0, a verified gradmix file) and, last, a ``COMPLETE`` marker: a folder without it
(a run killed while saving) is never resumed from.

Frameworks that apply ``fully_shard`` after the Mixer was built (accelerate's FSDP2 plugin inside the HF Trainer,
Lightning's ``ModelParallelStrategy``) hand their probe to ``reshard_probe``, which rebuilds it as a
``ShardedGradientProbe`` with the same settings once the parameters are DTensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradmix.checkpoint import write_json_atomic

__all__ = [
    "checkpoint_dir",
    "has_dtensor_parameters",
    "latest_checkpoint",
    "load_sharded_checkpoint",
    "reshard_probe",
    "save_sharded_checkpoint",
]


# -- probes ---------------------------------------------------------------------------------------------------------


def has_dtensor_parameters(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (``fully_shard`` / FSDP2 or another DTensor sharding)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def reshard_probe(probe: Any, model: nn.Module) -> Any:
    """``probe`` as a ``ShardedGradientProbe`` of ``model`` when ``model``'s parameters are DTensors and ``probe`` is
    not one yet (built before the framework applied ``fully_shard``): same probed parameters (by name), splits, Gram,
    preconditioner. Otherwise ``probe`` itself. A mesh the sharded probe does not support is its one-line
    ``NotImplementedError``."""
    from gradmix.probe import ShardedGradientProbe

    if probe is None or isinstance(probe, ShardedGradientProbe) or not has_dtensor_parameters(model):
        return probe
    if probe.accumulating:
        raise RuntimeError("gradmix: the model was sharded in the middle of an optimizer step")
    settings = dict(probe.settings())
    keep = ("parameters", "num_splits", "gram", "preconditioner", "eps", "bias_correction")
    return ShardedGradientProbe(model, **{key: settings[key] for key in keep if key in settings})


# -- checkpoints ----------------------------------------------------------------------------------------------------

_CKPT = re.compile(r"^step-(\d{6,})$")
MARKER = "COMPLETE"


def checkpoint_dir(out: str | Path, step: int) -> Path:
    """``out/checkpoints/step-000010``."""
    return Path(out) / "checkpoints" / f"step-{int(step):06d}"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``out/checkpoints`` (one with its ``COMPLETE`` marker), or None."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        m = _CKPT.match(child.name)
        if m and child.is_dir() and (child / MARKER).is_file():
            found.append((int(m.group(1)), child))
    return max(found)[1] if found else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_sharded_checkpoint(
    out: str | Path,
    mixer: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Collective: every rank writes its model / optimizer shards (torch.distributed.checkpoint), rank 0 the Mixer
    state (``mixer.save_checkpoint``, verified file) and then the ``COMPLETE`` marker. Returns the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    step = int(mixer.step_count)
    folder = checkpoint_dir(out, step)
    folder.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder / "shards"))
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank == 0:
        mixer.save_checkpoint(folder / "gradmix.ckpt", rng=False, extra={"world_size": world, **dict(extra or {})})
    _barrier()  # every shard and the Mixer state are on disk
    if rank == 0:
        write_json_atomic(folder / MARKER, {"step": step, "world_size": world})
    _barrier()
    return folder


def load_sharded_checkpoint(
    folder: str | Path, mixer: Any, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Collective: restore the model / optimizer shards (re-sharded to this world size by DCP) and the Mixer state
    (every rank reads the same verified file; the sampler takes this rank's share of the same global batches), then
    drop metrics records after the checkpoint's step (rank 0). Returns the Mixer file's dict (``extra`` inside).

    A checkpoint from another run (other domains, method, batch geometry) is a ``ValueError`` naming the file; one
    written under another world size is accepted (documented re-sharding: the global batches stay the same, and so
    do ``ShardedGradientProbe``'s global parts: the run continues with the same weights up to float rounding)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise ValueError(f"checkpoint folder {str(folder)!r} is incomplete (no {MARKER} marker)")
    # the Mixer part first: a mismatched run fails before the model changes
    state = mixer.load_checkpoint(folder / "gradmix.ckpt", rng=False)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    target = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(target, checkpoint_id=str(folder / "shards"))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)  # loaded in place
    mixer.truncate_metrics()
    return state


def read_marker(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MARKER).read_text())
