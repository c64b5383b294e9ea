"""FSDP2 (``torch.distributed.fsdp.fully_shard``) support: a probe that reads sharded gradients, and checkpoints.

Under FSDP2 every parameter is a ``DTensor`` sharded over the ranks, and each backward reduce-scatters (averages)
the gradients: after a micro-pass, rank r's ``.grad`` holds its *shard* of the gradient averaged over all ranks.
Per-rank part gradients are never visible, so ``ShardedGradientProbe`` makes its parts global:

* on a measuring step the ranks share the group ids of their shares (two small all-reduces) and lay them out in
  global order: position i * W + r for example i of rank r, which is the sampler's global batch (rank r's share is
  global[r::W]). Group k's n_k examples, in that order, are cut into P_k = min(num_splits, n_k) contiguous chunks
  whose sizes differ by at most one: exactly the parts a one-process ``GradientProbe`` makes from the global batch.
  A **global part** may span ranks;
* every rank runs one forward/backward per global part with its own examples of that part (a rank that has none
  runs a zero-weighted pass, so all ranks issue the same collectives); the change of its gradient shard is its
  shard of the global part's mean gradient (FSDP's reduce-scatter has summed the ranks' contributions);
* the running sums of the estimator (``gradmix.probe._PartAccumulator``: sum_{i != j} m_i m_j <g_i, g_j> and
  sum_i m_i ||g_i - gbar||^2) are *linear in inner products*, so every rank runs them on its local shard with the
  global part sizes and the per-rank partial sums add up to the full-vector sums: one all-reduce of a few scalars per
  group at the end of the step. Nothing is gathered: memory is a few flat buffers the size of the local shard.

The estimates are the probe's usual unbiased ones (||grad L_k||^2 and sigma_k^2 from disjoint parts of i.i.d.
examples), over global parts: equal, up to float rounding, to a one-process ``GradientProbe`` over the same global
batch (tested in tests/test_integration_fsdp.py), whatever the number of ranks. ``num_splits`` counts global parts
per group (with DDP, each rank has its own ``num_splits`` parts). DGA's target alignment and Adam preconditioning
are not supported under FSDP yet (``NotImplementedError``). The default gradient averaging of FSDP2 (divide by the
mesh size) is assumed; only 1-D meshes (plain FSDP, not HSDP).

Checkpoints: ``save_sharded_checkpoint`` / ``load_sharded_checkpoint`` write a folder per step with the model and
optimizer through ``torch.distributed.checkpoint`` (each rank writes its shards; loading re-shards to the current
world size), the Mixer state (rank 0, a verified gradmix file) and, last, a ``COMPLETE`` marker: a folder without it
(a run killed while saving) is never resumed from.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gradmix.checkpoint import write_json_atomic
from gradmix.probe import GradientProbe, _PartAccumulator, _per_example_losses, _slice_batch

__all__ = [
    "ShardedGradientProbe",
    "checkpoint_dir",
    "latest_checkpoint",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _is_dtensor(t: torch.Tensor) -> bool:
    return callable(getattr(t, "to_local", None)) and hasattr(t, "device_mesh")


def _chunk_size(n: int, parts: int, j: int) -> int:
    """Size of chunk j when ``torch.tensor_split`` cuts n items into ``parts`` chunks."""
    return n // parts + (1 if j < n % parts else 0)


class ShardedGradientProbe(GradientProbe):
    """``GradientProbe`` for a ``fully_shard``-ed model: statistics from local gradient shards, reduced as scalars.

    Args:
        model: the FSDP2 root module (``fully_shard`` applied); its probed parameters must be DTensors sharded over
            one 1-D mesh. A plain module is accepted in a single process (then this is a ``GradientProbe`` with
            global-part bookkeeping, useful as a reference).
        parameters, num_splits, gram: as ``GradientProbe`` (``num_splits`` = global parts per group).
        process_group: default the parameters' mesh group.

    All ranks must call ``backward`` with the same ``measure`` / ``final`` (as with any FSDP forward/backward).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        parameters: Any = None,
        num_splits: int = 2,
        gram: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__(model, parameters=parameters, num_splits=num_splits, gram=gram, process_group=process_group)
        params = [p for _, p in self.named_parameters]
        sharded = [_is_dtensor(p) for p in params]
        if any(sharded) and not all(sharded):
            plain = [name for (name, p), s in zip(self.named_parameters, sharded) if not s][:5]
            raise ValueError(
                f"ShardedGradientProbe: some probed parameters are not sharded DTensors ({plain}); "
                "apply fully_shard to the whole model or select sharded parameters (parameters=...)"
            )
        if all(sharded):
            meshes = {id(p.device_mesh) for p in params}  # type: ignore[attr-defined]
            mesh = params[0].device_mesh  # type: ignore[attr-defined]
            if len(meshes) > 1 or mesh.ndim != 1:
                raise NotImplementedError(
                    "ShardedGradientProbe supports one 1-D device mesh (FSDP); HSDP / several meshes are not supported"
                )
            if self.process_group is None:
                self.process_group = mesh.get_group()
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "ShardedGradientProbe needs a fully_shard-ed model under torch.distributed; for a DDP "
                "or plain module use gradmix.probe.GradientProbe"
            )
        locals_ = [_local(p.detach()) for p in params]
        self._local_sizes = [t.numel() for t in locals_]
        self._numel = sum(self._local_sizes)
        self.device = locals_[0].device

    # -- unsupported pieces -------------------------------------------------------------------------------------
    def _target_gradient(self, target_batch, loss_fn, distributed, run):
        raise NotImplementedError(
            "target alignment (DGA-style methods) is not supported under FSDP yet; use DDP "
            "(GradientProbe) for methods that need a target gradient"
        )

    # -- gradient plumbing over local shards ----------------------------------------------------------------------
    def _snapshot_grad(self, buffer: torch.Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for (_, p), size in zip(self.named_parameters, self._local_sizes):
                view = buffer[offset : offset + size]
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(_local(p.grad).reshape(-1))
                offset += size

    def _grad_minus(self, buffer: torch.Tensor) -> None:
        offset = 0
        for (_, p), size in zip(self.named_parameters, self._local_sizes):
            view = buffer[offset : offset + size]
            view.neg_()
            if p.grad is not None:
                view.add_(_local(p.grad).reshape(-1))
            offset += size

    def _world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return 0, 1

    def _global_order(self, ids: torch.Tensor, rank: int, world: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The global (micro-)batch's group ids in global order, with each position's rank and index there.

        Global order interleaves the ranks' shares, position i * world + r for example i of rank r: exactly the
        sampler's global batch, whose rank-r share is global[r::world]. Ranks with unequal shares are taken in
        rank order instead. Two small all-reduces (the shares' sizes, then their group ids)."""
        n = int(ids.numel())
        if world == 1:
            return np.zeros(n, dtype=np.int64), np.arange(n), ids.numpy()
        sizes = torch.zeros(world, dtype=torch.float64, device=self.device)
        sizes[rank] = n
        dist.all_reduce(sizes, group=self.process_group)
        ns = sizes.cpu().numpy().astype(np.int64)
        table = torch.zeros(world, int(ns.max()), dtype=torch.float64, device=self.device)
        table[rank, :n] = ids.to(torch.float64) + 1.0  # 0 = padding
        dist.all_reduce(table, group=self.process_group)
        table_np = table.cpu().numpy().astype(np.int64) - 1
        if (ns == ns[0]).all():
            owner = np.tile(np.arange(world), int(ns[0]))  # position i * world + r -> rank r, index i
            local_index = np.repeat(np.arange(int(ns[0])), world)
        else:
            owner = np.concatenate([np.full(c, r) for r, c in enumerate(ns)])
            local_index = np.concatenate([np.arange(c) for c in ns])
        return owner, local_index, table_np[owner, local_index]

    # -- the measured step over global parts ----------------------------------------------------------------------
    def _measured_backward(self, session, batch, groups, loss_fn, n, divisor, run, final) -> None:
        num_groups = session.num_groups
        rank, world = self._world()
        ids = groups.detach().to("cpu", torch.long).reshape(-1)
        owner, local_index, global_groups = self._global_order(ids, rank, world)
        session.add_losses(groups, None)
        if session.accumulators is None:
            session.accumulators = [None] * num_groups
            session.sharded = np.zeros((num_groups, 5))  # cross, spread, denominator, parts, bad
            session.sharded[:, 3] = 0
            if self.gram:
                session.means = torch.zeros(num_groups, self._numel, dtype=self._dtype, device=self.device)
        session.calls += 1
        work = torch.empty(self._numel, dtype=self._dtype, device=self.device)
        for k in range(num_groups):
            # group k's examples in global order, cut into P contiguous chunks as split_indices cuts them in one
            # process: global part j may span ranks; this rank runs its own examples of it
            in_group = np.flatnonzero(global_groups == k)
            total = int(in_group.size)
            parts = min(self.num_splits, total)
            begin = 0
            for j in range(parts):
                count = _chunk_size(total, parts, j)  # the global part's size
                chunk = in_group[begin : begin + count]
                begin += count
                size = float(count)
                index = torch.from_numpy(local_index[chunk[owner[chunk] == rank]])
                if len(index):
                    part = _slice_batch(batch, index, n)
                    losses = _per_example_losses(loss_fn, self.model, part, len(index), f"a micro-batch of group {k}")
                    part_loss_sum = float(losses.detach().to(torch.float64).sum())
                    session.loss_sums[k] += part_loss_sum
                    scaled = losses.sum() / divisor
                    if not math.isfinite(part_loss_sum):
                        session.finite[k] = False
                else:  # no example of this global part here: a zero-weighted pass keeps the collectives in step
                    part = _slice_batch(batch, torch.zeros(1, dtype=torch.long), n)
                    losses = _per_example_losses(loss_fn, self.model, part, 1, "a zero-weighted pass")
                    scaled = losses.sum() * 0.0
                if not session.finite[k]:  # unmeasurable group (here): still train on it, in step with the others
                    self._run(scaled, run)
                    continue
                self._snapshot_grad(work)
                scale = self._run(scaled, run)
                with torch.no_grad():
                    self._grad_minus(work)  # this rank's shard of scale * (sum over ranks of S_r) / (world * divisor)
                    if not (math.isfinite(scale) and scale != 0.0):
                        session.finite[k] = False
                        continue
                    work.mul_(world * divisor / (size * scale))  # -> shard of the global part's mean gradient
                    acc = session.accumulators[k]
                    if acc is None:
                        acc = session.accumulators[k] = _PartAccumulator(
                            torch.empty(self._numel, dtype=self._dtype, device=self.device)
                        )
                    session.finite[k] = acc.add(work, size)  # partial (this shard's) cross / spread sums
        if final:
            for k in range(num_groups):
                self._finish_sharded(session, k)

    @staticmethod
    def _finish_sharded(session, k: int) -> None:
        acc = session.accumulators[k]
        row = session.sharded[k]
        bad = not session.finite[k] or (acc is not None and not bool(torch.isfinite(acc.mean).all()))
        if acc is not None:
            row[0], row[1] = acc.cross, acc.spread
            row[2] = acc.total_weight * acc.total_weight - acc.sizes_sq
            row[3] = acc.num_parts
            if session.means is not None:
                session.means[k].copy_(acc.mean)
        row[4] = 1.0 if bad else 0.0
        if bad and session.means is not None:
            session.means[k].fill_(float("nan"))
        session.accumulators[k] = None

    def _combine(self, session, distributed: bool):
        if not session.measure:
            return super()._combine(session, distributed)
        g = session.num_groups
        info = session.sharded
        rows = [session.loss_sums, session.counts, info[:, 0], info[:, 1], info[:, 4]]
        scalars = torch.tensor(np.concatenate(rows), dtype=torch.float64, device=self.device)
        if distributed:
            dist.all_reduce(scalars, group=self.process_group)
        loss_sums, counts, cross, spread, bad = scalars.cpu().numpy().reshape(len(rows), g)
        from gradmix.stats import Measurement

        result = Measurement.from_sums(loss_sums, counts)
        denom, parts = info[:, 2], info[:, 3]
        ok = (parts >= 2) & (bad == 0) & (denom > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            result.grad_sq_norm = np.where(ok, cross / np.where(ok, denom, 1.0), np.nan)
            result.grad_var = np.where(ok, spread / np.where(ok, parts - 1, 1.0), np.nan)
        if session.means is not None:
            with torch.no_grad():
                gram_t = (session.means @ session.means.T).to(torch.float64)
                if distributed:
                    dist.all_reduce(gram_t, group=self.process_group)
                gram = gram_t.cpu().numpy()
            absent = counts < 1
            gram[absent, :] = np.nan
            gram[:, absent] = np.nan
            np.fill_diagonal(gram, result.grad_sq_norm)
            result.gram = gram
        return result


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
