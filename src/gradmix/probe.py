"""Per-domain gradient statistics taken from the training step itself.

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gradmix.stats import Measurement

__all__ = [
    "BackwardFn",
    "GradientProbe",
    "LossFn",
    "ParameterSpec",
    "ProbeResult",
    "select_parameters",
    "split_indices",
]

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
"""(model, batch) -> per-example losses, shape (n,). On measuring steps and for the target batch the probe passes
the module inside a DistributedDataParallel wrapper (its micro-passes must not trigger DDP's sync), so a loss
function should only call the model it is given."""

ParameterSpec = None | str | Sequence[str] | Callable[[str, nn.Parameter], bool]

BackwardFn = Callable[[torch.Tensor], Any]
"""loss -> None: runs the backward of ``loss`` the way the training loop does (GradScaler, accelerate, Lightning)."""


def _default_backward(loss: torch.Tensor) -> None:
    loss.backward()


class _Session:
    """What one optimizer step's probe calls have gathered so far (one or several micro-batches)."""

    def __init__(self, num_groups: int, measure: bool) -> None:
        self.num_groups = num_groups
        self.measure = measure
        self.loss_sums = np.zeros(num_groups)
        self.counts = np.zeros(num_groups)
        self.accumulators: list[_PartAccumulator | None] | None = None
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


_BUCKET_BYTES = 32 * 1024 * 1024  # gradient all-reduce bucket size: one collective per ~32 MB, like DDP's 25 MB


ProbeResult = Measurement
"""What one ``GradientProbe.backward`` measured (the library's one measurement type, ``gradmix.stats.Measurement``)."""


# -- parameter selection and batch slicing ------------------------------------------------------------------------


def select_parameters(module: nn.Module, spec: ParameterSpec = None) -> list[tuple[str, nn.Parameter]]:
    """Resolve a parameter spec to ``(name, parameter)`` pairs of trainable parameters, in ``named_parameters`` order.

    ``spec``: None (all trainable parameters); a list of name prefixes (``"head"`` matches ``head.weight`` but not
    ``header.weight``); a predicate ``(name, param) -> bool``; or ``"last:N"`` (the last N trainable parameter
    tensors: the layers nearest the loss, a cheap proxy for big models). Raises ``ValueError`` if a prefix matches
    no parameter or the selection is empty.
    """
    named = list(module.named_parameters())
    trainable = [(name, p) for name, p in named if p.requires_grad]
    if spec is None:
        chosen = trainable
    elif isinstance(spec, str):
        if not spec.startswith("last:"):
            raise ValueError(
                f"parameters={spec!r}: a string must be 'last:N'; pass a list of name prefixes to select by name"
            )
        try:
            count = int(spec[len("last:") :])
        except ValueError:
            raise ValueError(f"parameters={spec!r}: N in 'last:N' must be a positive integer") from None
        if count < 1:
            raise ValueError(f"parameters={spec!r}: N in 'last:N' must be a positive integer")
        chosen = trainable[-count:]
    elif callable(spec):
        chosen = [(name, p) for name, p in trainable if spec(name, p)]
    else:
        prefixes = list(spec)
        if not prefixes or not all(isinstance(prefix, str) for prefix in prefixes):
            raise ValueError(f"parameters={spec!r}: expected a non-empty list of parameter-name prefixes")

        def matches(name: str, prefix: str) -> bool:
            stripped = prefix.rstrip(".")
            return name == stripped or name.startswith(stripped + ".")

        for prefix in prefixes:
            if not any(matches(name, prefix) for name, _ in named):
                known = ", ".join(name for name, _ in named[:8])
                raise ValueError(
                    f"parameters: no parameter is named {prefix!r} or starts with it (model has: {known}"
                    f"{', ...' if len(named) > 8 else ''})"
                )
            if not any(matches(name, prefix) for name, _ in trainable):
                raise ValueError(f"parameters: {prefix!r} selects only frozen parameters (requires_grad=False)")
        chosen = [(name, p) for name, p in trainable if any(matches(name, prefix) for prefix in prefixes)]
    if not chosen:
        raise ValueError(f"parameters={spec!r} selects no trainable parameter of the model")
    return chosen


def split_indices(groups: torch.Tensor, num_groups: int, num_splits: int) -> list[list[torch.Tensor]]:
    """Per group, the batch positions of its parts: the group's positions in batch order cut into
    ``min(num_splits, n_k)`` contiguous chunks whose sizes differ by at most one (larger chunks first).

    The split ignores the data, so parts of i.i.d. examples are independent - all the estimators need.
    """
    groups_cpu = groups.detach().to("cpu", torch.long).reshape(-1)
    order = torch.argsort(groups_cpu, stable=True)
    counts = torch.bincount(groups_cpu, minlength=num_groups).tolist()
    parts: list[list[torch.Tensor]] = []
    start = 0
    for count in counts[:num_groups]:
        members = order[start : start + count]
        start += count
        parts.append(list(torch.tensor_split(members, min(num_splits, count))) if count else [])
    return parts


def _slice_batch(batch: Mapping[str, torch.Tensor], index: torch.Tensor, n: int) -> dict:
    """Rows ``index`` of every tensor with leading dimension n; everything else passes through unchanged."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value.index_select(0, index.to(value.device))
        else:
            out[key] = value
    return out


def _distributed_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_ddp(model: nn.Module) -> TypeGuard[nn.parallel.DistributedDataParallel]:
    return isinstance(model, nn.parallel.DistributedDataParallel)


class _PartAccumulator:
    """Running, cancellation-free sums over one group's part mean gradients (weighted Welford update).

    After all parts: ||mu||^2 = cross / (n^2 - sum m_i^2) and sigma^2 = spread / (s - 1), both unbiased.
    """

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean  # caller-owned buffer, overwritten by the first part
        self.total_weight = 0.0  # examples folded in so far
        self.cross = 0.0  # sum_{i != j} m_i m_j <g_i, g_j>
        self.spread = 0.0  # sum_i m_i ||g_i - gbar||^2
        self.sizes_sq = 0.0
        self.num_parts = 0

    def add(self, part_mean: torch.Tensor, size: float) -> bool:
        """Fold in one part's mean gradient (``part_mean`` is used as scratch). False once sums stop being finite."""
        if self.total_weight == 0.0:
            self.mean.copy_(part_mean)
        else:
            self.cross += 2.0 * self.total_weight * size * float(torch.dot(self.mean, part_mean))
            part_mean.sub_(self.mean)
            self.spread += (
                size * self.total_weight / (self.total_weight + size) * float(torch.dot(part_mean, part_mean))
            )
            self.mean.add_(part_mean, alpha=size / (self.total_weight + size))
        self.total_weight += size
        self.sizes_sq += size * size
        self.num_parts += 1
        return math.isfinite(self.cross) and math.isfinite(self.spread)

    def estimates(self) -> tuple[float, float]:
        """(||mu||^2, sigma^2); NaN with fewer than two parts."""
        if self.num_parts < 2:
            return float("nan"), float("nan")
        # E<g_i,g_j> = ||mu||^2 for disjoint parts, so weights m_i m_j / (n^2 - sum m_i^2) (summing to 1) are
        # unbiased; with single-example parts this is the classic U-statistic. E sum_i m_i ||g_i - gbar||^2 =
        # (s - 1) sigma^2, exact for unequal part sizes (between-part ANOVA sum of squares).
        return (
            self.cross / (self.total_weight * self.total_weight - self.sizes_sq),
            self.spread / (self.num_parts - 1),
        )


# -- the probe ----------------------------------------------------------------------------------------------------


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
        process_group=None,
        bias_correction: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)) or num_splits < 2:
            raise ValueError(f"num_splits must be an integer >= 2 (two parts per group at least), got {num_splits!r}")
        eps = float(eps)
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        if preconditioner is not None and not isinstance(preconditioner, torch.optim.Optimizer):
            raise TypeError(
                f"preconditioner must be a torch.optim.Optimizer (Adam/AdamW), got {type(preconditioner).__name__}"
            )
        self.model = model
        self.module: nn.Module = cast(nn.Module, model.module) if _is_ddp(model) else model
        self.named_parameters = select_parameters(self.module, parameters)
        devices = {p.device for _, p in self.named_parameters}
        if len(devices) > 1:
            raise ValueError(
                f"probed parameters live on several devices {sorted(map(str, devices))}; "
                "select a subset on one device (parameters=...)"
            )
        self.device = devices.pop()
        self.num_splits = int(num_splits)
        self.gram = bool(gram)
        self.preconditioner = preconditioner
        self.eps = eps
        self.bias_correction = bool(bias_correction)
        self.sync_gradients = bool(sync_gradients)
        if process_group is None and _is_ddp(model):
            process_group = model.process_group
        self.process_group = process_group
        self._numel = sum(p.numel() for _, p in self.named_parameters)
        dtypes = {p.dtype for _, p in self.named_parameters}
        self._dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self._session: _Session | None = None

    @property
    def num_probed(self) -> int:
        """Number of scalars in the probed parameters (the size of each flat buffer)."""
        return self._numel

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
    ) -> ProbeResult | None:
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
        n = self._check_inputs(batch, groups, num_groups)
        distributed = _distributed_active()
        world = dist.get_world_size(self.process_group) if distributed else 1
        if global_batch_size is None:
            divisor = float(n)
        else:
            if isinstance(global_batch_size, bool) or not global_batch_size > 0:
                raise ValueError(f"global_batch_size must be a positive number, got {global_batch_size!r}")
            divisor = float(global_batch_size) / world
        run = backward_fn if backward_fn is not None else _default_backward
        session = self._session
        if session is not None and (session.num_groups != num_groups or session.measure != measure):
            raise ValueError(
                f"an accumulation started with measure={session.measure}, num_groups="
                f"{session.num_groups} cannot continue with measure={measure}, num_groups={num_groups}"
            )
        if session is None:
            session = self._session = _Session(num_groups, measure)
            if measure and target_batch is not None:
                session.g_target, session.target_loss = self._target_gradient(target_batch, loss_fn, distributed, run)
        elif target_batch is not None:
            raise ValueError("target_batch goes with the first micro-batch of a measurement, not a later one")
        try:
            sync = final or not _is_ddp(self.model)
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
        if distributed and ((measure and _is_ddp(self.model)) or (self.sync_gradients and not _is_ddp(self.model))):
            self._average_gradients(world)
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
        return type(self)(model, **self.settings())

    @property
    def accumulating(self) -> bool:
        """True between a non-final call and the final one."""
        return self._session is not None

    # -- the two kinds of step ------------------------------------------------------------------------------------
    def _plain_backward(self, session, batch, groups, loss_fn, n, divisor, run, sync) -> None:
        """One forward/backward on the whole micro-batch (through the DDP wrapper; DDP syncs on the last one)."""
        # sync is False only for a DDP-wrapped model (see backward()), so no_sync exists here.
        context = contextlib.nullcontext() if sync else cast(nn.parallel.DistributedDataParallel, self.model).no_sync()
        with context:
            losses = _per_example_losses(loss_fn, self.model, batch, n, "the batch")
            self._run(losses.sum() / divisor, run)
        session.add_losses(groups, losses)

    def _measured_backward(self, session, batch, groups, loss_fn, n, divisor, run, final) -> None:
        num_groups = session.num_groups
        parts_per_group = split_indices(groups, num_groups, self.num_splits)
        session.add_losses(groups, None)
        if session.accumulators is None:
            session.accumulators = [None] * num_groups
            if self.gram:
                session.means = torch.zeros(num_groups, self._numel, dtype=self._dtype, device=self.device)
        # One call per step: groups finish one after another and share one running-mean buffer. Across micro-batches
        # every group keeps its own until the final call.
        single = final and session.calls == 0
        session.calls += 1
        shared = torch.empty(self._numel, dtype=self._dtype, device=self.device) if single else None
        work = torch.empty(self._numel, dtype=self._dtype, device=self.device)  # one part's mean gradient
        deferred: list[torch.Tensor] = []  # parts with a non-finite loss: backwarded last so others stay measurable

        sync_context = self.model.no_sync() if _is_ddp(self.model) else contextlib.nullcontext()
        with sync_context:
            for k, parts in enumerate(parts_per_group):
                for index in parts:
                    size = float(len(index))
                    part = _slice_batch(batch, index, n)
                    losses = _per_example_losses(loss_fn, self.module, part, len(index), f"a micro-batch of group {k}")
                    part_loss_sum = float(losses.detach().to(torch.float64).sum())
                    session.loss_sums[k] += part_loss_sum
                    scaled = losses.sum() / divisor
                    if not math.isfinite(part_loss_sum):
                        deferred.append(scaled)
                        session.finite[k] = False
                        continue
                    if not session.finite[k]:  # the group is already unmeasurable: just train on it
                        self._run(scaled, run)
                        continue
                    self._snapshot_grad(work)
                    scale = self._run(scaled, run)
                    with torch.no_grad():
                        self._grad_minus(work)  # = scale * grad of (part loss sum / divisor)
                        if not (math.isfinite(scale) and scale != 0.0):
                            session.finite[k] = False
                            continue
                        work.mul_(divisor / (size * scale))  # -> unscaled mean per-example gradient of the part
                        acc = session.accumulators[k]
                        if acc is None:
                            acc = session.accumulators[k] = _PartAccumulator(
                                shared
                                if shared is not None
                                else torch.empty(self._numel, dtype=self._dtype, device=self.device)
                            )
                        session.finite[k] = acc.add(work, size)
                if single:
                    self._finish_group(session, k)
            if deferred:
                self._run(torch.stack(deferred).sum(), run)

    def _run(self, loss: torch.Tensor, run: BackwardFn) -> float:
        """``run(loss + anchor)``; returns the factor ``run`` applied to the loss (1.0 for a plain backward)."""
        if run is _default_backward:
            loss.backward()
            return 1.0
        anchor = torch.zeros((), dtype=loss.dtype, device=loss.device, requires_grad=True)
        run(loss + anchor)
        return float(anchor.grad) if anchor.grad is not None else float("nan")

    @staticmethod
    def _finish_group(session: _Session, k: int) -> None:
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
    def _combine(self, session: _Session, distributed: bool) -> ProbeResult:
        """Global statistics, identical on every rank: sums and counts add up; per-rank unbiased estimates are
        averaged with weights = local example counts (a convex mix of unbiased estimates stays unbiased); the
        alignment is exact because g_target is already global (count-weighted mean of per-rank group means)."""
        num_groups = session.num_groups
        loss_sums, counts = session.loss_sums, session.counts
        result_losses_only = not session.measure
        if result_losses_only:
            scalars = torch.tensor(np.concatenate([loss_sums, counts]), dtype=torch.float64, device=self.device)
            if distributed:
                dist.all_reduce(scalars, group=self.process_group)
            loss_sums, counts = scalars.cpu().numpy().reshape(2, num_groups)
            return _loss_result(loss_sums, counts)

        for k in range(num_groups):
            self._finish_group(session, k)
        sq_norm, variance, alignment, means = session.sq_norm, session.variance, session.alignment, session.means
        g_target = session.g_target
        # A rank contributes an estimate where it had >= 2 examples; a non-finite result there poisons the group.
        estimable = counts >= 2
        poisoned_stats = estimable & np.isnan(sq_norm)
        stat_weight = np.where(estimable, counts, 0.0)
        align_weight = np.where(counts >= 1, counts, 0.0)

        def weighted(values: np.ndarray, weights: np.ndarray, poisoned: np.ndarray) -> np.ndarray:
            return np.where(poisoned, np.nan, np.where(weights > 0, np.nan_to_num(values) * weights, 0.0))

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
        scalars = torch.tensor(np.concatenate(rows), dtype=torch.float64, device=self.device)
        if distributed:
            dist.all_reduce(scalars, group=self.process_group)
        (loss_sums, counts, stat_weight, sq_sum, var_sum, align_weight, align_sum) = (
            scalars.cpu().numpy().reshape(len(rows), num_groups)
        )
        result = _loss_result(loss_sums, counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            result.grad_sq_norm = np.where(stat_weight > 0, sq_sum / np.where(stat_weight > 0, stat_weight, 1), np.nan)
            result.grad_var = np.where(stat_weight > 0, var_sum / np.where(stat_weight > 0, stat_weight, 1), np.nan)
            if g_target is not None:
                result.target_alignment = np.where(
                    align_weight > 0, align_sum / np.where(align_weight > 0, align_weight, 1), np.nan
                )
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
        absent = counts_global < 1
        gram[absent, :] = np.nan
        gram[:, absent] = np.nan
        np.fill_diagonal(gram, sq_norm)
        return gram

    # -- target gradient (DGA) ------------------------------------------------------------------------------------
    def _target_gradient(self, target_batch, loss_fn, distributed, run) -> tuple[torch.Tensor, float]:
        """Mean-loss gradient of the target batch over the probed parameters (global under torch.distributed),
        Adam-preconditioned if asked. ``.grad`` is left as it was: with the default backward by autograd.grad, with a
        caller's ``backward_fn`` by saving the gradients, running it, reading the change and putting them back."""
        if not isinstance(target_batch, Mapping):
            raise TypeError(f"target_batch must be a mapping of tensors, got {type(target_batch).__name__}")
        losses = loss_fn(self.module, target_batch)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.shape[0] == 0:
            raise ValueError(
                f"loss_fn must return per-example losses of shape (n,) for the target batch, got "
                f"{getattr(losses, 'shape', type(losses).__name__)}"
            )
        if not losses.requires_grad:
            raise ValueError("the target batch's loss does not depend on any trainable parameter")
        params = [p for _, p in self.named_parameters]
        scale = 1.0
        if run is _default_backward:
            grads: list[torch.Tensor | None] = list(torch.autograd.grad(losses.sum(), params, allow_unused=True))
        else:
            trainable = [p for p in self.module.parameters() if p.requires_grad]
            saved = [p.grad for p in trainable]
            for p in trainable:
                p.grad = None
            try:
                context = self.model.no_sync() if _is_ddp(self.model) else contextlib.nullcontext()
                with context:
                    scale = self._run(losses.sum(), run)
                grads = [p.grad for p in params]
            finally:
                for p, g in zip(trainable, saved):
                    p.grad = g
        # [sum of per-example gradients, example count, loss sum]: one all-reduce makes the global mean.
        buffer = torch.empty(self._numel + 2, dtype=self._dtype, device=self.device)
        with torch.no_grad():
            offset = 0
            for p, grad in zip(params, grads):
                view = buffer[offset : offset + p.numel()]
                if grad is None:
                    view.zero_()
                else:
                    view.copy_(grad.reshape(-1))
                offset += p.numel()
            if scale != 1.0:
                buffer[:-2].div_(scale if math.isfinite(scale) and scale != 0.0 else float("nan"))
            buffer[-2] = float(losses.shape[0])
            buffer[-1] = float(losses.detach().to(torch.float64).sum())
            del grads
            if distributed:
                dist.all_reduce(buffer, group=self.process_group)
            count = float(buffer[-2])
            target_loss = float(buffer[-1]) / count
            g_target = buffer[:-2]
            g_target.div_(count)
            if self.preconditioner is not None:
                self._precondition(g_target)
        return g_target, target_loss

    def _precondition(self, flat: torch.Tensor) -> None:
        """Divide by sqrt(v_hat) + eps per parameter where the optimizer has a second moment (Adam/AdamW)."""
        assert self.preconditioner is not None  # only called when a preconditioner was given
        group_of = {}
        for group in self.preconditioner.param_groups:
            for p in group["params"]:
                group_of[p] = group
        offset = 0
        for name, p in self.named_parameters:
            view = flat[offset : offset + p.numel()]
            offset += p.numel()
            state = self.preconditioner.state.get(p)
            if not state or "exp_avg_sq" not in state:
                continue
            second = state["exp_avg_sq"]
            if second.numel() != p.numel():
                raise ValueError(
                    f"preconditioner state exp_avg_sq of {name!r} has shape {tuple(second.shape)}, "
                    f"parameter has {tuple(p.shape)}; only Adam-style per-element state is supported"
                )
            second = second.detach().reshape(-1).to(flat.dtype)
            betas = group_of.get(p, {}).get("betas")
            step = state.get("step")
            if self.bias_correction and betas is not None and step is not None:
                correction = 1.0 - float(betas[1]) ** float(step)
                if correction > 0:
                    second = second / correction
            view.div_(second.sqrt().add_(self.eps))

    # -- gradient plumbing ----------------------------------------------------------------------------------------
    def _snapshot_grad(self, buffer: torch.Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for _, p in self.named_parameters:
                view = buffer[offset : offset + p.numel()]
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad.reshape(-1))
                offset += p.numel()

    def _grad_minus(self, buffer: torch.Tensor) -> None:
        """buffer <- current .grad - buffer (the snapshot), in place."""
        offset = 0
        for _, p in self.named_parameters:
            view = buffer[offset : offset + p.numel()]
            view.neg_()
            if p.grad is not None:
                view.add_(p.grad.reshape(-1))
            offset += p.numel()

    def _average_gradients(self, world: int) -> None:
        average_gradients(self.module, world, self.device, self.process_group)

    # -- checks ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_inputs(batch, groups, num_groups) -> int:
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a mapping of tensors, got {type(batch).__name__}")
        if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
        if not isinstance(groups, torch.Tensor) or groups.dim() != 1:
            raise ValueError(
                f"groups must be a 1-D tensor of group ids, got {getattr(groups, 'shape', type(groups).__name__)}"
            )
        if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
            raise ValueError(f"groups must hold integer group ids, got dtype {groups.dtype}")
        n = int(groups.shape[0])
        if n == 0:
            raise ValueError("empty batch: groups has no entries")
        low, high = int(groups.min()), int(groups.max())
        if low < 0 or high >= num_groups:
            bad = low if low < 0 else high
            raise ValueError(f"groups contains id {bad}, outside 0..{num_groups - 1} (num_groups={num_groups})")
        if not any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n for v in batch.values()):
            raise ValueError(
                f"no tensor in the batch has leading dimension {n} (= len(groups)); keys: "
                f"{sorted(map(str, batch.keys()))}"
            )
        return n


def _per_example_losses(loss_fn: LossFn, model: nn.Module, batch: Mapping, n: int, what: str) -> torch.Tensor:
    losses = loss_fn(model, batch)
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n,):
        raise ValueError(
            f"loss_fn must return one loss per example, shape ({n},) for {what}, got "
            f"{getattr(losses, 'shape', type(losses).__name__)}"
        )
    if not losses.dtype.is_floating_point:
        raise ValueError(f"loss_fn returned dtype {losses.dtype} for {what}; losses must be floating point")
    return losses


def _loss_result(loss_sums: np.ndarray, counts: np.ndarray) -> ProbeResult:
    return Measurement.from_sums(loss_sums, counts)


def average_gradients(module: nn.Module, world: int, device: torch.device, process_group: Any = None) -> None:
    """All-reduce-average every trainable parameter's ``.grad`` (bucketed), as DDP would."""
    params = [p for p in module.parameters() if p.requires_grad]
    if any(p.grad is not None and p.grad.is_sparse for p in params):
        raise NotImplementedError("gradmix cannot average sparse gradients")
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has_grad, group=process_group)
    with torch.no_grad():
        for p, flag in zip(params, has_grad.tolist()):
            if flag > 0 and p.grad is None:
                p.grad = torch.zeros_like(p)  # another rank has a gradient here: contribute zero
        grads = [p.grad for p in params if p.grad is not None]
        buckets: list[list[torch.Tensor]] = []
        size = 0
        for grad in grads:
            if (
                not buckets
                or size + grad.numel() * grad.element_size() > _BUCKET_BYTES
                or buckets[-1][0].dtype != grad.dtype
                or buckets[-1][0].device != grad.device
            ):
                buckets.append([])
                size = 0
            buckets[-1].append(grad)
            size += grad.numel() * grad.element_size()
        for bucket in buckets:
            flat = torch.cat([grad.reshape(-1) for grad in bucket])
            dist.all_reduce(flat, group=process_group)
            flat.div_(world)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
