"""The micro-batch probe: per-domain gradient statistics from per-group micro-passes of the training step itself.

On a measuring step the probe runs the batch as per-group micro-batches (each group's examples split into a few
disjoint parts), so the accumulated ``.grad`` is still exactly the gradient of the mixed batch's mean loss, and reads
every part's gradient as the change of the probed parameters' ``.grad``. From the part means it derives unbiased
estimates of ||grad L_k||^2 and sigma_k^2 (what PiKE needs, arXiv 2502.06244 Alg. 1), the Gramian
<grad L_i, grad L_j> (diagnostics) and the alignment <grad L_k, grad L_target> with a target gradient (DGA,
arXiv 2410.02498). Memory: a few flat buffers the size of the probed parameters (running sums over parts, never one
copy per part or per group), plus G copies of the probed subset only when ``gram=True``.

Unbiasedness assumes the examples of a group are independent draws from that group (what the sampler does) and that
per-example losses do not interact (no batch norm across examples): micro-batching must not change the loss.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gradmix.probe.checks import check_settings, per_example_losses
from gradmix.probe.coverage import batch_coupled, coupling_now, coverage_report
from gradmix.probe.estimators import PartAccumulator, mask_gram, ratio, weighted
from gradmix.probe.layout import FlatLayout, ParameterSpec, flat_dtype, is_ddp, select_parameters, single_device, unwrap
from gradmix.probe.parts import slice_batch, split_indices
from gradmix.probe.protocol import BackwardFn, LossFn
from gradmix.probe.reduce import all_reduce_rows, average_gradients
from gradmix.probe.scaling import run_backward, setup_call, usable_scale
from gradmix.probe.target import target_gradient
from gradmix.stats import Measurement

__all__ = ["GradientProbe", "Session"]


class Session:
    """What one optimizer step's probe calls have gathered so far (one or several micro-batches)."""

    def __init__(self, num_groups: int, measure: bool) -> None:
        self.num_groups = num_groups
        self.measure = measure
        self.loss_sums = np.zeros(num_groups)
        self.counts = np.zeros(num_groups)
        self.accumulators: list[PartAccumulator | None] | None = None
        self.finite: list[bool] = [True] * num_groups
        self.g_target: torch.Tensor | None = None
        self.target_loss: float | None = None
        self.calls = 0
        self.sq_norm = np.full(num_groups, np.nan)  # finished groups' estimates
        self.variance = np.full(num_groups, np.nan)
        self.alignment = np.full(num_groups, np.nan)
        self.means: torch.Tensor | None = None  # (G, probed) group means, gram=True only

    def add_losses(self, groups: torch.Tensor, losses: torch.Tensor | None) -> None:
        """Count the micro-batch's examples per group (and add its losses, when given as one tensor)."""
        ids = groups.detach().to("cpu", torch.long)
        self.counts += np.bincount(ids.numpy(), minlength=self.num_groups)[: self.num_groups]
        if losses is not None:
            values = losses.detach().to("cpu", torch.float64).numpy()
            self.loss_sums += np.bincount(ids.numpy(), weights=values, minlength=self.num_groups)[: self.num_groups]


class GradientProbe:
    """Run a training step's backward so that it also yields per-group gradient statistics.

    Args:
        model: the model (a plain module or a ``DistributedDataParallel``).
        parameters: which parameters the statistics are computed over (see ``select_parameters``); the optimizer
            still gets gradients for all of them.
        num_splits: parts per group on measuring steps (>= 2, capped at the group's local example count;
            a large value gives per-sample statistics). More parts: lower-variance sigma^2, more micro-passes.
        gram: also return the Gramian (stores one mean gradient per group over the probed parameters).
        preconditioner: an Adam-type optimizer; the target gradient is divided by sqrt(v) + eps (DGA's
            Adam-preconditioned alignment). Parameters without optimizer state yet stay unpreconditioned.
        eps: the epsilon of that preconditioner.
        sync_gradients: plain module under torch.distributed: average ``.grad`` across ranks after each backward
            (what DDP would do). Ignored for DDP models, which are synced anyway.
        process_group: group for the collectives (default: the DDP model's group, else the world).
        bias_correction: divide v by 1 - beta2^t as Adam's own step does, so the alignment's scale does not drift
            during the first ~1/(1 - beta2) steps (choice left open by DGA; ``False`` uses raw ``exp_avg_sq``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        parameters: ParameterSpec = None,
        num_splits: int = 2,
        gram: bool = False,
        preconditioner: torch.optim.Optimizer | None = None,
        eps: float = 1e-8,
        sync_gradients: bool = False,
        process_group: Any = None,
        bias_correction: bool = True,
    ) -> None:
        eps = check_settings(model, num_splits, eps, preconditioner)
        self.model = model
        self.module: nn.Module = unwrap(model)
        self.named_parameters = select_parameters(self.module, parameters)
        self.device = single_device(self.named_parameters)
        self.num_splits = int(num_splits)
        self.gram = bool(gram)
        self.preconditioner = preconditioner
        self.eps = eps
        self.bias_correction = bool(bias_correction)
        self.sync_gradients = bool(sync_gradients)
        if process_group is None and is_ddp(model):
            process_group = model.process_group
        self.process_group = process_group
        self._layout = FlatLayout(self.named_parameters)
        self._dtype = flat_dtype(p for _, p in self.named_parameters)
        self._session: Session | None = None
        self._coupled = batch_coupled(self.module)
        self._notes: list[str] = []
        self.coverage_report: dict[str, Any] = coverage_report(
            type(self).__name__, "micro", self.named_parameters, {}, self._notes
        )
        """What a run records about this probe (``gradmix.probe.coverage.coverage_report``); ``make_probe`` replaces
        it when it chose this probe because the fused hooks cover too little."""

    @property
    def num_probed(self) -> int:
        """Number of scalars in the probed parameters (the size of each flat buffer)."""
        return self._layout.numel

    # -- public entry point ---------------------------------------------------------------------------------------
    def backward(
        self,
        batch: Mapping[str, torch.Tensor],
        groups: torch.Tensor,
        num_groups: int,
        loss_fn: LossFn,
        *,
        measure: bool,
        target_batch: Mapping[str, torch.Tensor] | None = None,
        global_batch_size: int | None = None,
        backward_fn: BackwardFn | None = None,
        final: bool = True,
    ) -> Measurement | None:
        """Accumulate into ``.grad`` the gradient of the batch's mean loss and return per-group statistics.

        The loss is sum(per-example losses) / (global_batch_size / world_size); by default global_batch_size is this
        rank's n times the world size, i.e. the local mean, which DDP's averaging turns into the global mean. Pass
        it when ranks hold unequal shares or when accumulating several micro-batches into one optimizer step.
        ``measure=False``: one forward/backward, losses per group only. ``measure=True``: per-group micro-passes and
        gradient statistics; ``target_batch`` (first call of a measurement) adds DGA's target alignment. Every rank
        must call this with the same ``measure``, ``num_groups``, ``final`` and presence of ``target_batch``.

        ``backward_fn(loss)`` runs every backward (default ``loss.backward()``): pass ``accelerator.backward``,
        ``lambda l: scaler.scale(l).backward()`` or Lightning's ``manual_backward``. Whatever constant factor it
        applies to the loss (a GradScaler's scale, accelerate's 1/accumulation) is measured on a zero-valued anchor
        added to the loss, and the statistics are divided by it: they always describe the unscaled loss.

        Gradient accumulation: call once per micro-batch with ``final=False`` and ``final=True`` on the last one of
        the optimizer step. Losses and (when measuring) the per-group parts of all micro-batches are pooled, so one
        example of a group per micro-batch still gives an estimate; collectives and DDP's gradient sync happen on
        the final call only; non-final calls return None. A measurement spanning micro-batches keeps one running
        mean per group over the probed parameters (G x probed size; bound it with ``parameters=``).
        """
        n, distributed, world, divisor, run = setup_call(
            batch, groups, num_groups, global_batch_size, backward_fn, self.process_group
        )
        session = self._session
        if session is not None and (session.num_groups != num_groups or session.measure != measure):
            raise ValueError(
                f"an accumulation started with measure={session.measure}, num_groups="
                f"{session.num_groups} cannot continue with measure={measure}, num_groups={num_groups}"
            )
        if session is None:
            session = self._session = self._new_session(num_groups, measure)
            if measure and target_batch is not None:
                session.g_target, session.target_loss = self._target_gradient(target_batch, loss_fn, distributed, run)
        elif target_batch is not None:
            raise ValueError("target_batch goes with the first micro-batch of a measurement, not a later one")
        try:
            sync = final or not is_ddp(self.model)
            if measure:
                self._measured_backward(session, batch, groups, loss_fn, n, divisor, run, final)
            else:
                self._plain_backward(session, batch, groups, loss_fn, n, divisor, run, sync)
        except BaseException:
            self._session = None  # a failed micro-batch ends the accumulation; the caller zeroes .grad
            raise
        if not final:
            return None
        self._session = None
        if distributed and ((measure and is_ddp(self.model)) or (self.sync_gradients and not is_ddp(self.model))):
            average_gradients(self.module, world, self.device, self.process_group)
        return self._combine(session, distributed)

    def reset(self) -> None:
        """Drop a half-done accumulation (e.g. after skipping a step)."""
        self._session = None

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this probe (``rebind``)."""
        return {
            "parameters": [name for name, _ in self.named_parameters],
            "num_splits": self.num_splits,
            "gram": self.gram,
            "preconditioner": self.preconditioner,
            "eps": self.eps,
            "sync_gradients": self.sync_gradients,
            "process_group": self.process_group,
            "bias_correction": self.bias_correction,
        }

    def rebind(self, model: nn.Module) -> GradientProbe:
        """The same probe for another wrapper of the same module (a framework's DDP wrapper built after the probe)."""
        probe = type(self)(model, **self.settings())
        probe.coverage_report = self.coverage_report
        return probe

    @property
    def accumulating(self) -> bool:
        """True between a non-final call and the final one."""
        return self._session is not None

    def _new_session(self, num_groups: int, measure: bool) -> Session:
        return Session(num_groups, measure)

    def _open_accumulators(self, session: Session) -> None:
        """On a measurement's first call: one accumulator slot per group (and the group means, ``gram=True``)."""
        if session.accumulators is None:
            session.accumulators = [None] * session.num_groups
            if self.gram:
                session.means = torch.zeros(
                    session.num_groups, self._layout.numel, dtype=self._dtype, device=self.device
                )

    # -- the two kinds of step ------------------------------------------------------------------------------------
    def _plain_backward(self, session, batch, groups, loss_fn, n, divisor, run, sync) -> None:
        """One forward/backward on the whole micro-batch (through the DDP wrapper; DDP syncs on the last one)."""
        # sync is False only for a DDP-wrapped model (see backward()), so no_sync exists here.
        context = contextlib.nullcontext() if sync else cast(nn.parallel.DistributedDataParallel, self.model).no_sync()
        with context:
            losses = per_example_losses(loss_fn, self.model, batch, n, "the batch")
            run_backward(losses.sum() / divisor, run)
        session.add_losses(groups, losses)

    def _say_coupling(self) -> None:
        """Say once (and note in the coverage report) that batch normalisations see each part, not the batch."""
        names = coupling_now(self._coupled) if self._coupled and not self._notes else []
        if not names:
            return
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        note = (
            f"{len(names)} batch normalisation layer(s) ({shown}) normalise over the batch: the micro-batch passes "
            "normalise over each part instead, so .grad is not the mixed batch's gradient and the per-domain "
            "statistics are biased (examples are not independent). make_probe's fused probe keeps the batch whole; "
            "BatchNorm in eval mode, GroupNorm or LayerNorm keep the examples independent"
        )
        self._notes.append(note)
        self.coverage_report = {**self.coverage_report, "notes": list(self._notes)}
        warnings.warn(f"{type(self).__name__}: {note}; said once", stacklevel=4)

    def _measured_backward(self, session, batch, groups, loss_fn, n, divisor, run, final) -> None:
        self._say_coupling()
        num_groups = session.num_groups
        parts_per_group = split_indices(groups, num_groups, self.num_splits)
        session.add_losses(groups, None)
        self._open_accumulators(session)
        numel = self._layout.numel
        # One call per step: groups finish one after another and share one running-mean buffer. Across micro-batches
        # every group keeps its own until the final call.
        single = final and session.calls == 0
        session.calls += 1
        shared = torch.empty(numel, dtype=self._dtype, device=self.device) if single else None
        work = torch.empty(numel, dtype=self._dtype, device=self.device)  # one part's mean gradient
        deferred: list[torch.Tensor] = []  # parts with a non-finite loss: backwarded last so others stay measurable

        sync_context = self.model.no_sync() if is_ddp(self.model) else contextlib.nullcontext()
        with sync_context:
            for k, parts in enumerate(parts_per_group):
                for index in parts:
                    size = float(len(index))
                    part = slice_batch(batch, index, n)
                    losses = per_example_losses(loss_fn, self.module, part, len(index), f"a micro-batch of group {k}")
                    part_loss_sum = float(losses.detach().to(torch.float64).sum())
                    session.loss_sums[k] += part_loss_sum
                    scaled = losses.sum() / divisor
                    if not math.isfinite(part_loss_sum):
                        deferred.append(scaled)
                        session.finite[k] = False
                        continue
                    if not session.finite[k]:  # the group is already unmeasurable: just train on it
                        run_backward(scaled, run)
                        continue
                    self._layout.snapshot_grad(work)
                    scale = run_backward(scaled, run)
                    with torch.no_grad():
                        self._layout.grad_minus(work)  # = scale * grad of (part loss sum / divisor)
                        if not usable_scale(scale):
                            session.finite[k] = False
                            continue
                        work.mul_(divisor / (size * scale))  # -> unscaled mean per-example gradient of the part
                        acc = session.accumulators[k]
                        if acc is None:
                            acc = session.accumulators[k] = PartAccumulator(
                                shared
                                if shared is not None
                                else torch.empty(numel, dtype=self._dtype, device=self.device)
                            )
                        session.finite[k] = acc.add(work, size)
                if single:
                    self._finish_group(session, k)
            if deferred:
                run_backward(torch.stack(deferred).sum(), run)

    @staticmethod
    def _finish_group(session: Session, k: int) -> None:
        """Turn group k's running sums into its estimates (once) and free its buffer."""
        acc = session.accumulators[k] if session.accumulators is not None else None
        with torch.no_grad():
            if not session.finite[k] or (acc is not None and not bool(torch.isfinite(acc.mean).all())):
                if session.means is not None:
                    session.means[k].fill_(float("nan"))  # poison this group's Gram row on every rank
            elif acc is not None:  # statistics of a poisoned group stay NaN; its training gradient is complete
                session.sq_norm[k], session.variance[k] = acc.estimates()
                if session.g_target is not None:
                    session.alignment[k] = float(torch.dot(acc.mean, session.g_target))
                if session.means is not None:
                    session.means[k].copy_(acc.mean)
        if session.accumulators is not None:
            session.accumulators[k] = None

    # -- statistics across ranks ----------------------------------------------------------------------------------
    def _combine(self, session: Session, distributed: bool) -> Measurement:
        """Global statistics, identical on every rank: sums and counts add up; per-rank unbiased estimates are
        averaged with weights = local example counts (a convex mix of unbiased estimates stays unbiased); the
        alignment is exact because g_target is already global (count-weighted mean of per-rank group means)."""
        loss_sums, counts = session.loss_sums, session.counts
        if not session.measure:
            loss_sums, counts = all_reduce_rows([loss_sums, counts], self.device, self.process_group, distributed)
            return Measurement.from_sums(loss_sums, counts)

        for k in range(session.num_groups):
            self._finish_group(session, k)
        sq_norm, variance, alignment, means = session.sq_norm, session.variance, session.alignment, session.means
        g_target = session.g_target
        # A rank contributes an estimate where it had >= 2 examples; a non-finite result there poisons the group.
        estimable = counts >= 2
        poisoned_stats = estimable & np.isnan(sq_norm)
        stat_weight = np.where(estimable, counts, 0.0)
        align_weight = np.where(counts >= 1, counts, 0.0)
        local_counts = counts
        rows = [
            loss_sums,
            counts,
            stat_weight,
            weighted(sq_norm, stat_weight, poisoned_stats),
            weighted(variance, stat_weight, poisoned_stats),
            align_weight,
            weighted(alignment, align_weight, (counts >= 1) & np.isnan(alignment)),
        ]
        (loss_sums, counts, stat_weight, sq_sum, var_sum, align_weight, align_sum) = all_reduce_rows(
            rows, self.device, self.process_group, distributed
        )
        result = Measurement.from_sums(loss_sums, counts)
        result.grad_sq_norm = ratio(sq_sum, stat_weight, stat_weight > 0)
        result.grad_var = ratio(var_sum, stat_weight, stat_weight > 0)
        if g_target is not None:
            result.target_alignment = ratio(align_sum, align_weight, align_weight > 0)
            assert session.target_loss is not None  # set together with g_target in _target_gradient
            result.target_loss = float(session.target_loss)
        if means is not None:
            result.gram = self._gram(
                means,
                counts_local=local_counts,
                counts_global=counts,
                sq_norm=result.grad_sq_norm,
                distributed=distributed,
            )
        return result

    def _gram(
        self,
        means: torch.Tensor,
        counts_local: np.ndarray,
        counts_global: np.ndarray,
        sq_norm: np.ndarray,
        distributed: bool,
    ) -> np.ndarray:
        """<gbar_i, gbar_j> of the global group means off the diagonal (unbiased: groups are independent), the
        unbiased ||grad L_k||^2 on it. Under torch.distributed the G mean buffers are all-reduced (gram=True only)."""
        with torch.no_grad():
            if distributed:
                weights = torch.tensor(counts_local, dtype=means.dtype, device=means.device)
                means.mul_(weights[:, None])
                dist.all_reduce(means, group=self.process_group)
                safe = torch.tensor(np.maximum(counts_global, 1.0), dtype=means.dtype, device=means.device)
                means.div_(safe[:, None])
            gram = (means @ means.T).to(torch.float64).cpu().numpy()
        return mask_gram(gram, counts_global < 1, sq_norm)

    # -- target gradient (DGA) ------------------------------------------------------------------------------------
    def _target_gradient(self, target_batch, loss_fn, distributed, run) -> tuple[torch.Tensor, float]:
        """Mean-loss gradient of the target batch over the probed parameters (``gradmix.probe.target``)."""
        return target_gradient(self, self._layout, self._dtype, target_batch, loss_fn, run, distributed)
