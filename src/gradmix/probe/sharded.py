"""The sharded probe: per-domain statistics for an FSDP2 (``torch.distributed.fsdp.fully_shard``) model.

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
* the running sums of the estimator (``gradmix.probe.estimators.PartAccumulator``: sum_{i != j} m_i m_j <g_i, g_j>
  and sum_i m_i ||g_i - gbar||^2) are *linear in inner products*, so every rank runs them on its local shard with the
  global part sizes and the per-rank partial sums add up to the full-vector sums: one all-reduce of a few scalars per
  group at the end of the step. Nothing is gathered: memory is a few flat buffers the size of the local shard.

* DGA's target alignment <g_k, g_target> is linear in the same way: the target batch's backward (each rank its share
  of the target batch) leaves in every rank's gradient shard its shard of the global target gradient (only the
  example count and loss sum are all-reduced); Adam preconditioning divides it by sqrt(v_hat) + eps from the
  optimizer's local state shards (sharded as the parameters are); each rank adds <its shard of group k's mean,
  its shard of g_target> to the per-group scalars of that one all-reduce.

The estimates are the probe's usual unbiased ones (||grad L_k||^2 and sigma_k^2 from disjoint parts of i.i.d.
examples), over global parts: equal, up to float rounding, to a one-process ``GradientProbe`` over the same global
batch (tested in tests/test_integration_fsdp.py), whatever the number of ranks. ``num_splits`` counts global parts
per group (with DDP, each rank has its own ``num_splits`` parts). The default gradient averaging of FSDP2 (divide by
the data-parallel size) is assumed. Meshes: a 1-D mesh (FSDP, placements ``(Shard,)``) or a 2-D HSDP mesh
(``(Replicate, Shard)``) spanning all ranks: there the gradient shards are replicated over the replicate dimension,
so the per-group sums are all-reduced over all ranks (whose examples differ) and the shard sums divided by the
number of replicas. Other meshes (tensor parallelism, several meshes) are refused with a one-line error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gradmix.probe.checks import per_example_losses
from gradmix.probe.estimators import PartAccumulator, mask_gram, part_estimates
from gradmix.probe.layout import FlatLayout, is_dtensor, local_shard
from gradmix.probe.micro import GradientProbe, Session
from gradmix.probe.parts import chunk_size, slice_batch
from gradmix.probe.reduce import all_reduce_rows, distributed_active, rank_and_world
from gradmix.probe.scaling import run_backward, usable_scale
from gradmix.probe.target import target_gradient
from gradmix.stats import Measurement

__all__ = ["ShardedGradientProbe"]


class ShardedSession(Session):
    """A ``Session`` that also keeps, per group, this shard's part sums at the end of a measured step."""

    def __init__(self, num_groups: int, measure: bool) -> None:
        super().__init__(num_groups, measure)
        self.sharded = np.zeros((num_groups, 6))  # cross, spread, denominator, parts, bad, target alignment


class ShardedGradientProbe(GradientProbe):
    """``GradientProbe`` for a ``fully_shard``-ed model: statistics from local gradient shards, reduced as scalars.

    Args:
        model: the FSDP2 root module (``fully_shard`` applied); its probed parameters must be DTensors on one mesh:
            1-D (FSDP) or 2-D (replicate, shard) spanning all ranks (HSDP). A plain module is accepted in a single
            process (then this is a ``GradientProbe`` with global-part bookkeeping, useful as a reference).
        parameters, num_splits, gram: as ``GradientProbe`` (``num_splits`` = global parts per group).
        preconditioner, eps, bias_correction: DGA's Adam-preconditioned alignment, as ``GradientProbe`` (the
            optimizer of the ``fully_shard``-ed model; its state is read shard by shard).
        process_group: default the 1-D mesh's group; under HSDP all ranks (the default group), as the sampler's
            ranks are.

    All ranks must call ``backward`` with the same ``measure`` / ``final`` and presence of ``target_batch`` (as with
    any FSDP forward/backward).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        parameters: Any = None,
        num_splits: int = 2,
        gram: bool = False,
        preconditioner: torch.optim.Optimizer | None = None,
        eps: float = 1e-8,
        process_group: Any = None,
        bias_correction: bool = True,
    ) -> None:
        super().__init__(
            model,
            parameters=parameters,
            num_splits=num_splits,
            gram=gram,
            preconditioner=preconditioner,
            eps=eps,
            process_group=process_group,
            bias_correction=bias_correction,
        )
        params = [p for _, p in self.named_parameters]
        sharded = [is_dtensor(p) for p in params]
        if any(sharded) and not all(sharded):
            plain = [name for (name, p), s in zip(self.named_parameters, sharded) if not s][:5]
            raise ValueError(
                f"ShardedGradientProbe: some probed parameters are not sharded DTensors ({plain}); "
                "apply fully_shard to the whole model or select sharded parameters (parameters=...)"
            )
        self._replicas = 1  # copies of every gradient shard (HSDP's replicate dimension)
        if all(sharded):
            mesh = params[0].device_mesh  # type: ignore[attr-defined]
            self._replicas = self._check_mesh(params)
            if self.process_group is None and mesh.ndim == 1:  # HSDP: the default group, all ranks
                self.process_group = mesh.get_group()
        elif distributed_active() and dist.get_world_size() > 1:
            raise ValueError(
                "ShardedGradientProbe needs a fully_shard-ed model under torch.distributed; for a DDP "
                "or plain module use gradmix.probe.GradientProbe"
            )
        self._layout = FlatLayout(self.named_parameters, shards=True)  # this rank's shards, end to end
        # the sharded parameters, listed now: after a forward of the root (until its backward) module.parameters()
        # yields the root's unsharded ones; the target gradient saves and restores the sharded ones' .grad
        self._trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.device = local_shard(params[0].detach()).device

    @staticmethod
    def _check_mesh(params: list[nn.Parameter]) -> int:
        """The number of replicas of each gradient shard: 1 on a 1-D FSDP mesh, the replicate dimension's size on a
        2-D HSDP mesh spanning all ranks; anything else is a one-line ``NotImplementedError``."""
        mesh = params[0].device_mesh  # type: ignore[attr-defined]
        placements = tuple(params[0].placements)  # type: ignore[attr-defined]
        kinds = tuple("shard" if pl.is_shard() else "replicate" if pl.is_replicate() else "other" for pl in placements)
        shape = tuple(mesh.shape)
        same = all(
            p.device_mesh is mesh and tuple(p.placements) == placements  # type: ignore[attr-defined]
            for p in params
        )
        spans = not distributed_active() or mesh.size() == dist.get_world_size()
        if same and kinds == ("shard",):
            return 1
        if same and kinds == ("replicate", "shard") and spans:
            return int(shape[0])
        raise NotImplementedError(
            f"ShardedGradientProbe: device mesh of shape {shape} with placements {placements}"
            f"{'' if same else ' (and other meshes/placements among the probed parameters)'}"
            f"{'' if spans else f' over {mesh.size()} of {dist.get_world_size()} ranks'} is not supported; supported: "
            "FSDP on one 1-D mesh (Shard) and HSDP on one 2-D (replicate, shard) mesh spanning all ranks"
        )

    def _new_session(self, num_groups: int, measure: bool) -> ShardedSession:
        return ShardedSession(num_groups, measure)

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this probe (``rebind``)."""
        settings = super().settings()
        del settings["sync_gradients"]  # FSDP reduces the gradients itself
        return settings

    def _target_gradient(self, target_batch, loss_fn, distributed, run) -> tuple[torch.Tensor, float]:
        """This rank's shard of the target gradient (``gradmix.probe.target``), ``.grad`` of the sharded parameters
        saved and put back."""
        return target_gradient(
            self, self._layout, self._dtype, target_batch, loss_fn, run, distributed, trainable=self._trainable
        )

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
        rank, world = rank_and_world(self.process_group)
        ids = groups.detach().to("cpu", torch.long).reshape(-1)
        owner, local_index, global_groups = self._global_order(ids, rank, world)
        session.add_losses(groups, None)
        self._open_accumulators(session)
        numel = self._layout.numel
        session.calls += 1
        work = torch.empty(numel, dtype=self._dtype, device=self.device)
        for k in range(num_groups):
            # group k's examples in global order, cut into P contiguous chunks as split_indices cuts them in one
            # process: global part j may span ranks; this rank runs its own examples of it
            in_group = np.flatnonzero(global_groups == k)
            total = int(in_group.size)
            parts = min(self.num_splits, total)
            begin = 0
            for j in range(parts):
                count = chunk_size(total, parts, j)  # the global part's size
                chunk = in_group[begin : begin + count]
                begin += count
                size = float(count)
                index = torch.from_numpy(local_index[chunk[owner[chunk] == rank]])
                if len(index):
                    part = slice_batch(batch, index, n)
                    losses = per_example_losses(loss_fn, self.model, part, len(index), f"a micro-batch of group {k}")
                    part_loss_sum = float(losses.detach().to(torch.float64).sum())
                    session.loss_sums[k] += part_loss_sum
                    scaled = losses.sum() / divisor
                    if not math.isfinite(part_loss_sum):
                        session.finite[k] = False
                else:  # no example of this global part here: a zero-weighted pass keeps the collectives in step
                    part = slice_batch(batch, torch.zeros(1, dtype=torch.long), n)
                    losses = per_example_losses(loss_fn, self.model, part, 1, "a zero-weighted pass")
                    scaled = losses.sum() * 0.0
                if not session.finite[k]:  # unmeasurable group (here): still train on it, in step with the others
                    run_backward(scaled, run)
                    continue
                self._layout.snapshot_grad(work)
                scale = run_backward(scaled, run)
                with torch.no_grad():
                    # this rank's shard of scale * (sum over ranks of S_r) / (world * divisor)
                    self._layout.grad_minus(work)
                    if not usable_scale(scale):
                        session.finite[k] = False
                        continue
                    work.mul_(world * divisor / (size * scale))  # -> shard of the global part's mean gradient
                    acc = session.accumulators[k]
                    if acc is None:
                        acc = session.accumulators[k] = PartAccumulator(
                            torch.empty(numel, dtype=self._dtype, device=self.device)
                        )
                    session.finite[k] = acc.add(work, size)  # partial (this shard's) cross / spread sums
        if final:
            for k in range(num_groups):
                self._finish_sharded(session, k)

    @staticmethod
    def _finish_sharded(session: ShardedSession, k: int) -> None:
        assert session.accumulators is not None  # set by the first measured call
        acc = session.accumulators[k]
        row = session.sharded[k]
        bad = not session.finite[k] or (acc is not None and not bool(torch.isfinite(acc.mean).all()))
        if acc is not None:
            row[0], row[1] = acc.cross, acc.spread
            row[2] = acc.denominator
            row[3] = acc.num_parts
            if session.g_target is not None:  # this shard's part of <group k's mean gradient, g_target>
                row[5] = float(torch.dot(acc.mean, session.g_target))
            if session.means is not None:
                session.means[k].copy_(acc.mean)
        row[4] = 1.0 if bad else 0.0
        if bad and session.means is not None:
            session.means[k].fill_(float("nan"))
        session.accumulators[k] = None

    def _combine(self, session, distributed: bool):
        if not session.measure:
            return super()._combine(session, distributed)
        # Sums over shards (cross, spread, alignment, Gram): with HSDP every shard is held by each replica, so the sum
        # over all ranks counts it `replicas` times; per-rank sums (losses, counts) add up over all ranks.
        info = session.sharded
        rows = [session.loss_sums, session.counts, info[:, 0], info[:, 1], info[:, 4], info[:, 5]]
        reduced = all_reduce_rows(rows, self.device, self.process_group, distributed)
        loss_sums, counts, cross, spread, bad, align = reduced
        if self._replicas > 1:
            cross, spread, align = (row / self._replicas for row in (cross, spread, align))
        result = Measurement.from_sums(loss_sums, counts)
        sq, var = part_estimates(cross, spread, info[:, 2], info[:, 3])
        result.grad_sq_norm = np.where(bad == 0, sq, np.nan)
        result.grad_var = np.where(bad == 0, var, np.nan)
        if session.g_target is not None:
            result.target_alignment = np.where((bad == 0) & (counts >= 1), align, np.nan)
            assert session.target_loss is not None  # set together with g_target
            result.target_loss = float(session.target_loss)
        if session.means is not None:
            with torch.no_grad():
                gram_t = (session.means @ session.means.T).to(torch.float64)
                if distributed:
                    dist.all_reduce(gram_t, group=self.process_group)
                gram = gram_t.cpu().numpy() / self._replicas
            result.gram = mask_gram(gram, counts < 1, result.grad_sq_norm)
        return result
