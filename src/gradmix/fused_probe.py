"""Per-group gradient statistics from ONE forward and ONE backward of the mixed batch (cost flat in K).

``FusedGradientProbe`` has the same ``backward(...)`` signature and result type (``gradmix.stats.Measurement``) as
``GradientProbe``, so the Mixer can use either. Instead of re-running the batch as per-group micro-batches, it runs the
batch once (exactly what a plain step does, so ``.grad`` is the mixed batch's mean-loss gradient, bit for bit) and
reads per-example gradient factors from module hooks:

* forward hooks save each supported module's input (Linear: activations ``A``; Embedding: token ids; LayerNorm /
  RMSNorm: the input, normalised again when needed);
* a pre-hook on the autograd node that produced the module's output captures the output gradient ``G`` (robust to
  in-place ops applied to the output afterwards, e.g. ``ReLU(inplace=True)``).

Per-example gradients factor per layer: Linear weight ``g_i = sum_t G_it^T A_it``, bias ``sum_t G_it``, Embedding
``g_i = sum_t onehot(id_it) G_it^T`` (padding rows excluded), LayerNorm/RMSNorm weight ``sum_t G_it * xhat_it``,
LayerNorm bias ``sum_t G_it``. Per layer they are reduced at once, never stored for the whole model and never as K
copies of the gradient, to the n x n matrix ``M_ij = <g_i, g_j>`` (n = examples of the micro-batch, summed over layers)
and the vector ``t_i = <g_i, g_target>``. Per layer the cheaper of two exact forms is used:

* explicit: per-example gradients of a block of weight rows, ``(n, rows, d_in)`` by one batched matmul
  (``2 n T d_in d_out`` flops, the cost of the layer's weight gradient, transient memory <= ``chunk_bytes``);
* Gram trick: ``M_ij = sum_{t,s} <A_it, A_js> <G_it, G_js>`` (``(nT)^2 (d_in + d_out)`` flops), cheaper when
  ``nT`` is small next to the layer width (MLPs on feature vectors, short sequences) - used when no target and no
  per-group sums are needed.

Parameters used by several modules (tied embedding / LM head, a layer called twice) are handled: their
contributions are summed into the same per-example block before any product is taken.

Statistics (per group k with members I_k, n_k = |I_k|, S_k = sum_{i in I_k} g_i, Q_k = ||S_k||^2,
D_k = sum_{i in I_k} ||g_i||^2):

* ``grad_sq_norm``: the U-statistic ``(Q_k - D_k) / (n_k (n_k - 1))`` = mean of ``<g_i, g_j>`` over ordered pairs
  ``i != j`` of the group: unbiased for ``||grad L_k||^2``;
* ``grad_var``: ``(D_k - Q_k / n_k) / (n_k - 1)`` = ``sum_i ||g_i - mean||^2 / (n_k - 1)``: unbiased for sigma_k^2;
* ``target_alignment``: ``<S_k / n_k, g_target>`` with the target's mean gradient over the same parameters
  (Adam-preconditioned if ``preconditioner`` is given, as in GradientProbe);
* ``gram``: ``<S_k / n_k, S_j / n_j>`` off the diagonal, ``grad_sq_norm`` on it.

These are exactly GradientProbe's estimators with one example per part, i.e. ``GradientProbe(num_splits >= n_k)``
gives the same values; with GradientProbe's default two parts per group they are the lower-variance versions (all
n_k (n_k - 1) example pairs instead of one pair of half-means; sigma^2 from n_k - 1 degrees of freedom instead of 1),
at no extra cost. A group with one example has NaN ``grad_sq_norm`` / ``grad_var`` (but an alignment); an absent
group is NaN everywhere; a group whose loss is not finite in a micro-batch has NaN statistics (its training gradient
is untouched), like GradientProbe.

Coverage. Statistics are computed over the selected parameters (``parameters=``, see ``select_parameters``) that are
held only by supported modules - ``nn.Linear`` (weight, bias), ``nn.Embedding`` (weight; not with
``scale_grad_by_freq``), ``nn.LayerNorm`` (weight, bias), ``nn.RMSNorm`` (weight) - of exactly those classes or
subclasses that do not override ``forward``. At run time a parameter also drops out of coverage when a call of its
module does not see the batch as its leading dimension (e.g. a position embedding called on ``arange(T)``), or when
the autograd graph shows more uses of it than hooked module calls (a weight used functionally elsewhere, e.g.
``F.linear(h, embedding.weight)``, or ``MultiheadAttention``'s ``out_proj``). What happens to uncovered parameters is
``uncovered=``: ``"skip"`` (statistics over the covered ones; ``skipped`` names the rest, a warning says so once),
``"fallback"`` (the whole measurement goes through a ``GradientProbe`` over all selected parameters, i.e. today's
micro-batch path), ``"error"`` (ValueError/RuntimeError naming them) or ``"auto"`` (default: skip when the uncovered
ones hold at most ``max_skipped_fraction`` of the selected scalars, else fall back). A runtime fallback costs the
wasted forward of that one call. Limits that cannot be detected: a module whose leading dimension is not the batch
but happens to have length n (sequence-first layouts with T == n; use batch-first modules), and losses in which
examples interact (batch norm) - the latter is GradientProbe's assumption too.

Accumulation (``final=False``) and torch.distributed. With one call per measurement the probe keeps only the n x n
matrix. When a measurement spans micro-batches, pairs across micro-batches need the per-group gradient sums: the
probe then keeps one running sum per present group over the covered parameters (``G_present x num_probed``, the same
memory GradientProbe uses for accumulation) and pools exactly - the estimates equal one call over the concatenated
batch. Under torch.distributed, by default each rank computes its unbiased estimates and they are combined
count-weighted with one scalar all-reduce (as GradientProbe does): a convex mix of unbiased estimates is unbiased,
communication is O(K) scalars, and the cross-rank pairs are the only thing lost (a group with one example on every
rank stays NaN). With ``exact_global=True`` (or ``gram=True``, whose off-diagonal needs them anyway) the per-group
sums are all-reduced (``G_present x num_probed`` floats, sent in column chunks of ``chunk_bytes``) and the statistics
equal one process over the global batch. Alignments are exact in both modes (per-example dot products add up).
Every rank returns the same Measurement.
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
import torch.nn.functional as F
from torch import nn

from gradmix.probe import (
    BackwardFn,
    GradientProbe,
    LossFn,
    ParameterSpec,
    _default_backward,
    _distributed_active,
    _is_ddp,
    average_gradients,
    select_parameters,
)
from gradmix.stats import Measurement

__all__ = ["FusedGradientProbe", "fused_coverage", "make_probe"]

_RMSNorm = getattr(nn, "RMSNorm", None)

# module class -> {parameter attribute: role}
_ROLES: dict[type[nn.Module], dict[str, str]] = {
    nn.Linear: {"weight": "linear", "bias": "bias"},
    nn.Embedding: {"weight": "embed"},
    nn.LayerNorm: {"weight": "norm", "bias": "bias"},
}
if _RMSNorm is not None:
    _ROLES[_RMSNorm] = {"weight": "rms"}

_BUCKET_BYTES = 32 * 1024 * 1024
_UNCOVERED = ("auto", "skip", "fallback", "error")


def _module_roles(module: nn.Module) -> tuple[dict[str, str] | None, str | None]:
    """(attribute -> role) for a supported module, else (None, reason)."""
    for cls, roles in _ROLES.items():
        if isinstance(module, cls):
            if type(module).forward is not cls.forward:
                return None, f"{type(module).__name__} overrides {cls.__name__}.forward"
            if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
                return None, "Embedding(scale_grad_by_freq=True) couples the examples of a batch"
            return roles, None
    return None, f"held by an unsupported module ({type(module).__name__})"


def _static_coverage(module: nn.Module, named: list[tuple[str, nn.Parameter]]):
    """For each selected parameter: the (module, role) pairs that hold it, or the reason it is not covered."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for _, sub in module.named_modules():
        for attr, p in sub._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((sub, attr, type(sub).__name__))
    covered: dict[int, list[tuple[nn.Module, str]]] = {}
    reasons: dict[str, str] = {}
    for name, p in named:
        uses = []
        reason = None
        for sub, attr, _ in owners.get(id(p), []):
            roles, why = _module_roles(sub)
            if roles is None:
                reason = why
                break
            if attr not in roles:
                reason = f"attribute {attr!r} of {type(sub).__name__} is not a supported role"
                break
            uses.append((sub, roles[attr]))
        if reason is None and not uses:
            reason = "not held by any module"
        if reason is None:
            covered[id(p)] = uses
        else:
            reasons[name] = reason
    return covered, reasons


def fused_coverage(model: nn.Module, parameters: ParameterSpec = None) -> tuple[list[str], dict[str, str]]:
    """Static coverage of ``FusedGradientProbe``: (names of selected parameters its hooks cover, {name: reason} for
    the others). Run-time checks (batch-first inputs, no functional reuse) can still drop covered ones."""
    module: nn.Module = cast(nn.Module, model.module) if _is_ddp(model) else model
    named = select_parameters(module, parameters)
    covered, reasons = _static_coverage(module, named)
    return [name for name, p in named if id(p) in covered], reasons


_FUSED_ONLY = ("uncovered", "max_skipped_fraction", "exact_global", "chunk_bytes")


def _sharded(model: nn.Module) -> bool:
    """FSDP (flat parameters) or DTensor parameters: per-example factors of module hooks do not apply."""
    if "FullyShardedDataParallel" in type(model).__name__:
        return True
    for p in model.parameters():
        if type(p).__name__ in ("FlatParameter", "DTensor") or getattr(p, "_is_flat_param", False):
            return True
    return False


def make_probe(model: nn.Module, *, fused: bool | str = "auto", **params: Any):
    """The probe a Mixer builds: ``FusedGradientProbe`` where the model allows it, else ``GradientProbe``.

    ``fused``: ``"auto"`` (default) - the fused probe unless the model is sharded (FSDP2 / DTensor parameters: the
    ``ShardedGradientProbe``; FSDP1 flat parameters: the micro-batch probe) or
    its hooks statically cover too little of the selected parameters (more than ``max_skipped_fraction`` of the
    scalars uncovered), in which case the micro-batch probe; ``True`` - always the fused probe (which still falls back
    at run time according to ``uncovered``); ``False`` - always the micro-batch probe. ``params`` go to the probe
    (``parameters``, ``num_splits``, ``gram``, ``preconditioner``, ...; the fused-only ``uncovered``,
    ``max_skipped_fraction``, ``exact_global``, ``chunk_bytes`` are ignored when the micro-batch probe is chosen by
    ``"auto"`` and rejected with ``fused=False``).
    """
    if fused not in (True, False, "auto"):
        raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
    fused_only = {key: params.pop(key) for key in _FUSED_ONLY if key in params}
    if fused is False:
        if fused_only:
            raise ValueError(f"{sorted(fused_only)} apply to the fused probe only (fused=False was asked for)")
        return GradientProbe(model, **params)
    if fused == "auto":
        module: nn.Module = cast(nn.Module, model.module) if _is_ddp(model) else model
        if _sharded(module):
            if any(type(p).__name__ == "DTensor" for p in module.parameters()):  # FSDP2: statistics from shards
                from gradmix.integrations.fsdp import ShardedGradientProbe

                return ShardedGradientProbe(model, **params)
            return GradientProbe(model, **params)
        named = select_parameters(module, params.get("parameters"))
        _, reasons = _static_coverage(module, named)
        total = sum(p.numel() for _, p in named)
        uncovered = sum(p.numel() for name, p in named if name in reasons)
        if uncovered > float(fused_only.get("max_skipped_fraction", 0.05)) * total:
            return GradientProbe(model, **params)
    return FusedGradientProbe(model, **params, **fused_only)


class _FallBack(Exception):
    """Raised inside a call when run-time checks decide to hand the measurement to the micro-batch probe."""


class _Session:
    """One optimizer step's measurement (one or several micro-batches)."""

    def __init__(self, num_groups: int, buffered: bool) -> None:
        self.num_groups = num_groups
        self.buffered = buffered
        self.loss_sums = np.zeros(num_groups)
        self.counts = np.zeros(num_groups)
        self.poisoned = np.zeros(num_groups, dtype=bool)  # non-finite loss or backward scale
        self.calls = 0
        # single-call mode: statistics of the one call; buffered: D and T accumulate, Q and C come from S at the end
        self.q = np.zeros(num_groups)
        self.d = np.zeros(num_groups)
        self.t = np.zeros(num_groups)
        self.cross: np.ndarray | None = None  # (G, G) <S_k, S_j>, single-call gram only
        self.sums: dict[int, torch.Tensor] = {}  # buffered: group -> running gradient sum over the covered layout
        self.g_target: torch.Tensor | None = None
        self.target_loss: float | None = None


class _Call:
    """What one forward/backward of a micro-batch captures."""

    def __init__(self, n: int, groups_cpu: torch.Tensor, device: torch.device) -> None:
        self.n = n
        self.groups_cpu = groups_cpu
        self.active = True
        self.factor = 1.0  # divisor / backward scale: turns captured gradients into per-example loss gradients
        self.scale: float | None = None
        self.records: list[dict[str, Any]] = []  # one per hooked module call
        self.problems: dict[int, str] = {}  # param id -> reason (found during the forward)
        self.expected: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.contribs: dict[int, list[tuple[str, Any, torch.Tensor, nn.Module]]] = {}
        self.m: torch.Tensor | None = None  # (n, n) float64
        self.d: torch.Tensor | None = None  # (n,) float64, buffered mode
        self.t: torch.Tensor | None = None  # (n,) float64
        self.present: list[int] = []
        self.slot: torch.Tensor | None = None  # (n,) slot of each example in ``present`` (on the device)
        self.skip: set[int] = set()  # parameters left out of this call
        self.blocks: torch.Tensor | None = None


class FusedGradientProbe:
    """One forward + one backward of the mixed batch, per-group gradient statistics from module hooks.

    Args:
        model: the model (a plain module or a ``DistributedDataParallel``).
        parameters: which parameters the statistics are computed over (``select_parameters``); those not covered by
            the hooks follow ``uncovered``.
        num_splits: parts per group for the micro-batch fallback (and for nothing else).
        gram: also return the Gramian between group means.
        preconditioner, eps, bias_correction: Adam-preconditioned target gradient (DGA), as in GradientProbe.
        sync_gradients: plain module under torch.distributed: average ``.grad`` across ranks after the final call.
        process_group: group for the collectives (default: the DDP model's group, else the world).
        uncovered: ``"auto"`` | ``"skip"`` | ``"fallback"`` | ``"error"`` (module docstring).
        max_skipped_fraction: ``"auto"`` skips uncovered parameters holding at most this fraction of the selected
            scalars, else falls back.
        exact_global: under torch.distributed, all-reduce per-group gradient sums so that the statistics equal one
            process over the global batch (default: per-rank estimates combined count-weighted, scalars only).
        chunk_bytes: bound on the transient per-layer buffers (per-example weight-row blocks, Gram matrices,
            all-reduce chunks).
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
        uncovered: str = "auto",
        max_skipped_fraction: float = 0.05,
        exact_global: bool = False,
        chunk_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if uncovered not in _UNCOVERED:
            raise ValueError(f"uncovered must be one of {_UNCOVERED}, got {uncovered!r}")
        if not 0.0 <= float(max_skipped_fraction) <= 1.0:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}")
        if int(chunk_bytes) < 1024:
            raise ValueError(f"chunk_bytes must be at least 1024, got {chunk_bytes}")
        # The micro-batch probe validates the shared arguments and serves plain steps and fallbacks.
        self._delegate = GradientProbe(
            model,
            parameters=parameters,
            num_splits=num_splits,
            gram=gram,
            preconditioner=preconditioner,
            eps=eps,
            sync_gradients=sync_gradients,
            process_group=process_group,
            bias_correction=bias_correction,
        )
        self.model = model
        self.module: nn.Module = cast(nn.Module, model.module) if _is_ddp(model) else model
        self.selected = list(self._delegate.named_parameters)
        self.device = self._delegate.device
        self.gram = bool(gram)
        self.preconditioner = preconditioner
        self.eps = float(eps)
        self.bias_correction = bool(bias_correction)
        self.sync_gradients = bool(sync_gradients)
        self.process_group = self._delegate.process_group
        self.uncovered = uncovered
        self.max_skipped_fraction = float(max_skipped_fraction)
        self.exact_global = bool(exact_global)
        self.chunk_bytes = int(chunk_bytes)
        dtypes = {p.dtype for _, p in self.selected}
        self._dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self._selected_numel = sum(p.numel() for _, p in self.selected)

        uses, reasons = _static_coverage(self.module, self.selected)
        self._uses = uses  # param id -> [(module, role)]
        self.skip_reasons: dict[str, str] = {}
        self._fallback = False
        self._warned = False
        # the flat layout (target gradient, per-group sums) is over the statically covered parameters
        self._layout: list[tuple[str, nn.Parameter, int]] = []
        offset = 0
        for name, p in self.selected:
            if id(p) in uses:
                self._layout.append((name, p, offset))
                offset += p.numel()
        self._layout_numel = offset
        self._by_id = {id(p): (name, p, off) for name, p, off in self._layout}
        self._skipped_ids: set[int] = set()
        if not self._layout:
            reasons = reasons or {name: "no parameter selected" for name, _ in self.selected}
        self._apply_policy(reasons, at_runtime=False)
        self._session: _Session | None = None
        self._call: _Call | None = None

    # -- views ----------------------------------------------------------------------------------------------------
    @property
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the statistics are computed over (all selected ones when falling back)."""
        if self._fallback:
            return list(self.selected)
        return [(name, p) for name, p, _ in self._layout if id(p) not in self._skipped_ids]

    @property
    def num_probed(self) -> int:
        return sum(p.numel() for _, p in self.named_parameters)

    @property
    def skipped(self) -> list[str]:
        """Selected parameters left out of the statistics (``uncovered="skip"``/``"auto"``)."""
        return [] if self._fallback else list(self.skip_reasons)

    @property
    def fused(self) -> bool:
        """True while measurements use the fused path (False once it fell back to the micro-batch probe)."""
        return not self._fallback

    @property
    def accumulating(self) -> bool:
        return self._session is not None or self._delegate.accumulating

    def reset(self) -> None:
        """Drop a half-done accumulation (e.g. after skipping a step)."""
        self._session = None
        self._delegate.reset()

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this probe (``rebind``)."""
        return {
            **self._delegate.settings(),
            "parameters": [name for name, _ in self.selected],
            "uncovered": self.uncovered,
            "max_skipped_fraction": self.max_skipped_fraction,
            "exact_global": self.exact_global,
            "chunk_bytes": self.chunk_bytes,
        }

    def rebind(self, model: nn.Module) -> FusedGradientProbe:
        """The same probe for another wrapper of the same module (a framework's DDP wrapper built after the probe)."""
        return FusedGradientProbe(model, **self.settings())

    # -- coverage policy ------------------------------------------------------------------------------------------
    def _apply_policy(self, reasons: dict[str, str], at_runtime: bool) -> None:
        if not reasons:
            return
        listing = "; ".join(f"{name}: {why}" for name, why in list(reasons.items())[:6])
        if len(reasons) > 6:
            listing += f"; ... ({len(reasons)} in all)"
        names = dict(self.selected)
        skipped_numel = sum(names[n].numel() for n in set(reasons) | set(self.skip_reasons) if n in names)
        policy = self.uncovered
        if policy == "auto":
            covered_left = any(id(p) not in self._skipped_ids and name not in reasons for name, p, _ in self._layout)
            small = skipped_numel <= self.max_skipped_fraction * self._selected_numel
            policy = "skip" if (small and covered_left) else "fallback"
        if policy == "skip" and not any(
            id(p) not in self._skipped_ids and name not in reasons for name, p, _ in self._layout
        ):
            raise ValueError(f"FusedGradientProbe covers none of the selected parameters ({listing})")
        if policy == "error":
            error = RuntimeError if at_runtime else ValueError
            raise error(f"FusedGradientProbe cannot cover these parameters: {listing}")
        if policy == "fallback":
            self._fallback = True
            warnings.warn(
                f"FusedGradientProbe: falling back to the micro-batch GradientProbe ({listing})", stacklevel=3
            )
            if at_runtime:
                raise _FallBack()
            return
        for name, why in reasons.items():
            self.skip_reasons[name] = why
            if name in names:
                self._skipped_ids.add(id(names[name]))
        warnings.warn(
            f"FusedGradientProbe: statistics leave out {len(reasons)} parameter tensor(s) "
            f"({skipped_numel} of {self._selected_numel} selected scalars): {listing}",
            stacklevel=3,
        )

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
        """Same contract as ``GradientProbe.backward``: accumulate into ``.grad`` the gradient of the batch's mean
        loss (sum of per-example losses / (global_batch_size / world_size)) with one forward and one backward through
        ``backward_fn`` (default ``loss.backward()``), and return per-group statistics on the final call.

        ``measure=False`` steps are plain steps (served by the micro-batch probe's plain path). ``backward_fn``'s
        constant factor (GradScaler, 1/accumulation) is measured on a zero anchor added to the loss and divided out:
        the statistics describe the unscaled loss. ``target_batch`` (first call of a measurement) adds DGA's target
        alignment. Non-final calls return None; collectives and DDP's sync happen on the final call only.
        """
        kwargs: dict[str, Any] = dict(
            measure=measure,
            target_batch=target_batch,
            global_batch_size=global_batch_size,
            backward_fn=backward_fn,
            final=final,
        )
        if not measure or self._fallback:
            if self._session is not None:
                raise ValueError(
                    f"an accumulation started with measure=True, num_groups={self._session.num_groups} cannot "
                    f"continue with measure={measure}, num_groups={num_groups}"
                )
            return self._delegate.backward(batch, groups, num_groups, loss_fn, **kwargs)
        if self._delegate.accumulating:
            raise ValueError(
                f"an accumulation started with measure=False cannot continue with measure=True, num_groups={num_groups}"
            )
        n = _check_inputs(batch, groups, num_groups)
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
        if session is not None and session.num_groups != num_groups:
            raise ValueError(
                f"an accumulation started with measure=True, num_groups={session.num_groups} cannot continue with "
                f"measure=True, num_groups={num_groups}"
            )
        fresh = session is None
        if session is None:
            buffered = (not final) or (distributed and (self.exact_global or self.gram))
            session = self._session = _Session(num_groups, buffered)
            try:
                if target_batch is not None:
                    session.g_target, session.target_loss = self._target_gradient(
                        target_batch, loss_fn, distributed, run
                    )
            except BaseException:
                self._session = None
                raise
        elif target_batch is not None:
            raise ValueError("target_batch goes with the first micro-batch of a measurement, not a later one")
        elif final is False and not session.buffered:  # pragma: no cover - a session starts buffered if not final
            raise AssertionError("unbuffered session cannot accumulate")
        try:
            self._fused_call(session, batch, groups, n, loss_fn, divisor, run)
        except _FallBack:
            self._session = None
            if not fresh:
                raise RuntimeError(
                    "FusedGradientProbe: a later micro-batch of a measurement uncovered parameters the first one "
                    "covered; the model's structure changed mid-accumulation"
                ) from None
            return self._delegate.backward(batch, groups, num_groups, loss_fn, **kwargs)
        except BaseException:
            self._session = None
            raise
        if not final:
            return None
        self._session = None
        if distributed and (_is_ddp(self.model) or self.sync_gradients):
            self._average_gradients(world)  # the fused pass runs under no_sync (see _fused_call)
        return self._finish(session, distributed)

    # -- one forward/backward ---------------------------------------------------------------------------------------
    def _active_params(self) -> list[tuple[str, nn.Parameter, int]]:
        return [(name, p, off) for name, p, off in self._layout if id(p) not in self._skipped_ids]

    def _fused_call(self, session: _Session, batch, groups, n, loss_fn, divisor, run) -> None:
        """Forward and backward of the whole micro-batch with capture hooks. Under DDP it runs in ``no_sync`` and the
        final call averages ``.grad`` itself (as GradientProbe's measured path does), so that a run-time fallback can
        drop the forward without leaving DDP's reducer waiting for a backward."""
        groups_cpu = groups.detach().to("cpu", torch.long).reshape(-1)
        call = _Call(n, groups_cpu, self.device)
        active = self._active_params()
        active_ids = {id(p) for _, p, _ in active}
        modules: dict[nn.Module, list[tuple[int, str]]] = {}
        for _, p, _ in active:
            for sub, role in self._uses[id(p)]:
                modules.setdefault(sub, []).append((id(p), role))
        call.m = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=self.device)  # row/col n: padding sink
        call.t = torch.zeros(n, dtype=torch.float64, device=self.device) if session.g_target is not None else None
        if session.buffered:
            call.d = torch.zeros(n, dtype=torch.float64, device=self.device)
            present, slot = torch.unique(groups_cpu, return_inverse=True)
            call.present = present.tolist()
            call.slot = slot.to(self.device)
        self._call = call
        context = self.model.no_sync() if _is_ddp(self.model) else contextlib.nullcontext()
        handles = [sub.register_forward_hook(self._make_forward_hook(call, roles)) for sub, roles in modules.items()]
        try:
            with context:
                try:
                    losses = _per_example_losses(loss_fn, self.model, batch, n)
                finally:
                    for handle in handles:
                        handle.remove()
                problems = dict(call.problems)
                if losses.requires_grad and losses.grad_fn is not None:
                    problems.update(self._graph_check(call, losses, active_ids))
                if problems:
                    reasons = {self._by_id[pid][0]: why for pid, why in problems.items()}
                    if session.calls > 0 and self.uncovered != "error":
                        raise (
                            _FallBack()
                            if self.uncovered == "fallback"
                            else RuntimeError(
                                f"FusedGradientProbe: parameters became uncovered mid-accumulation: {reasons}"
                            )
                        )
                    self._apply_policy(reasons, at_runtime=True)  # skip: marks them; fallback: raises _FallBack
                    for pid in problems:
                        call.expected.pop(pid, None)
                        call.contribs.pop(pid, None)
                call.skip = set(problems) | self._skipped_ids
                values = losses.detach().to("cpu", torch.float64)
                ids = groups_cpu.numpy()
                num_groups = session.num_groups
                counts = np.bincount(ids, minlength=num_groups)[:num_groups].astype(np.float64)
                sums = np.bincount(ids, weights=values.numpy(), minlength=num_groups)[:num_groups]
                session.counts += counts
                session.loss_sums += sums
                session.poisoned |= (counts > 0) & ~np.isfinite(sums)
                session.calls += 1
                total = losses.sum() / divisor
                if run is _default_backward:
                    call.factor = divisor
                    call.scale = 1.0
                    total.backward()
                else:
                    anchor = torch.zeros((), dtype=total.dtype, device=total.device, requires_grad=True)
                    anchored = total + anchor

                    def on_scale(grad_outputs, call=call, divisor=divisor):
                        grad = grad_outputs[0]
                        scale = float(grad) if grad is not None else float("nan")
                        call.scale = scale
                        call.factor = divisor / scale if (math.isfinite(scale) and scale != 0.0) else float("nan")
                        return None

                    anchored.grad_fn.register_prehook(on_scale)
                    run(anchored)
            # contributions whose other uses never received a gradient (unused outputs) are complete now
            for pid in list(call.contribs):
                if call.contribs[pid]:
                    self._process(call, session, pid)
        finally:
            call.active = False
            self._call = None
        scale = call.scale
        if scale is None or not math.isfinite(scale) or scale == 0.0 or not math.isfinite(call.factor):
            session.poisoned |= counts > 0
            return
        self._fold_call(call, session)

    def _make_forward_hook(self, call: _Call, roles: list[tuple[int, str]]):
        def hook(module, args, output):
            if not call.active or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            x = args[0] if args else None
            n = call.n
            problem = None
            if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != n or output.dim() == 0:
                problem = f"a call of its {type(module).__name__} does not see the batch as leading dimension"
            elif output.shape[0] != n:
                problem = f"a call of its {type(module).__name__} does not return the batch as leading dimension"
            elif (
                isinstance(module, nn.Embedding)
                and x.dim() == 1
                and n > 1
                and int(x[0]) == 0
                and bool((x[1:] - x[:-1] == 1).all())
            ):
                problem = "its Embedding is called on consecutive positions (arange), not per example"
            if problem is not None:
                for pid, _ in roles:
                    call.problems.setdefault(pid, problem)
                return None
            base = output._base if (output._base is not None and output._base.numel() == output.numel()) else output
            node = base.grad_fn
            if node is None:
                return None
            nr = base.output_nr
            shape = output.shape
            saved = cast(torch.Tensor, x).detach()  # a non-tensor x set ``problem`` above
            record = {"node": node, "roles": roles}
            call.records.append(record)
            for pid, _ in roles:
                call.expected[pid] = call.expected.get(pid, 0) + 1  # corrected by the graph check

            def prehook(grad_outputs):
                if call.active and record.get("reachable", True):
                    grad = grad_outputs[nr] if nr < len(grad_outputs) else None
                    self._on_grad(call, module, roles, saved, grad, shape)
                return None

            node.register_prehook(prehook)
            return None

        return hook

    def _graph_check(self, call: _Call, losses: torch.Tensor, active_ids: set[int]) -> dict[int, str]:
        """Count the autograd uses of each covered parameter reachable from the loss; they must equal the hooked module
        calls reachable from it (a weight used outside its module breaks the factorisation)."""
        root = losses.grad_fn
        assert root is not None  # the caller checks losses.grad_fn
        visited = {root}
        stack = [root]
        edges: dict[int, int] = {}
        while stack:
            node = stack.pop()
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                var = getattr(nxt, "variable", None)
                if var is not None:
                    if id(var) in active_ids:
                        edges[id(var)] = edges.get(id(var), 0) + 1
                    continue
                if nxt not in visited:
                    visited.add(nxt)
                    stack.append(nxt)
        expected: dict[int, int] = {}
        for record in call.records:
            record["reachable"] = record["node"] in visited
            if record["reachable"]:
                for pid, _ in record["roles"]:
                    expected[pid] = expected.get(pid, 0) + 1
        problems = {}
        for pid in active_ids:
            if pid in call.problems:
                continue
            if edges.get(pid, 0) != expected.get(pid, 0):
                problems[pid] = (
                    f"used {edges.get(pid, 0)} time(s) in the autograd graph but by {expected.get(pid, 0)} hooked "
                    "module call(s) (used outside its module, e.g. tied functionally)"
                )
        call.expected = expected
        return problems

    def _on_grad(self, call, module, roles, saved, grad, shape) -> None:
        if grad is not None:
            grad = grad.detach().reshape(shape)
        for pid, role in roles:
            if pid in call.skip:
                continue
            call.received[pid] = call.received.get(pid, 0) + 1
            if grad is not None:
                call.contribs.setdefault(pid, []).append((role, saved, grad, module))
            if call.received[pid] >= call.expected.get(pid, 0):
                self._process(call, cast(_Session, self._session), pid)  # set while a call runs

    # -- per-parameter reduction ------------------------------------------------------------------------------------
    def _cdtype(self, p: nn.Parameter) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _process(self, call: _Call, session: _Session, pid: int) -> None:
        contribs = call.contribs.pop(pid, [])
        if not contribs:
            return
        _, p, offset = self._by_id[pid]
        n = call.n
        dtype = self._cdtype(p)
        factor = call.factor
        gt = None
        if session.g_target is not None:
            gt = session.g_target[offset : offset + p.numel()].to(dtype)
        roles = {role for role, *_ in contribs}
        with torch.no_grad():
            if roles <= {"bias", "norm", "rms"}:  # small parameters: per-example gradients at once
                per = torch.zeros(n, p.numel(), dtype=dtype, device=self.device)
                for role, saved, grad, module in contribs:
                    g = grad.to(dtype).reshape(n, -1, p.numel())
                    if role == "bias":
                        per.add_(g.sum(1))
                    else:
                        per.add_((g * _normalised(module, saved, role).to(dtype).reshape(n, -1, p.numel())).sum(1))
                per.mul_(factor)
                self._sink(call, session, p, offset, per, slice(None), gt)
                return
            rows_total, cols = p.shape[0], p.numel() // p.shape[0]
            terms = []  # (kind, x, g): linear (a (n,T,C), g (n,T,R)); embed (ids (n,T), g (n,T,C), padding zeroed)
            for role, saved, grad, module in contribs:
                if role == "linear":
                    a = saved.to(dtype).reshape(n, -1, cols)
                    terms.append(("linear", a, grad.to(dtype).reshape(n, -1, rows_total) * factor))
                elif role == "embed":
                    ids = saved.reshape(n, -1).to(self.device)
                    g = grad.to(dtype).reshape(n, -1, cols) * factor
                    if module.padding_idx is not None:
                        g = g.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0.0)
                    terms.append(("embed", ids, g))
                else:  # pragma: no cover - roles are fixed by _ROLES
                    raise AssertionError(role)
            if not session.buffered and self._use_gram(call, terms, rows_total, cols, gt is not None):
                self._gram_blocks(call, terms)
                if gt is not None:  # <g_i, g_target> = sum_t <G_it, g_target A_it>: one matmul, no per-example rows
                    call_t = cast(torch.Tensor, call.t)  # allocated when the session has a target
                    target = gt.view(rows_total, cols)
                    for kind, x, g in terms:
                        if kind == "linear":
                            proj = (x.reshape(-1, cols) @ target.T).view(n, -1, rows_total)
                            call_t.add_((proj * g).sum(dim=(1, 2)).to(torch.float64))
                        else:
                            call_t.add_((g * target[x]).sum(dim=(1, 2)).to(torch.float64))
                return
            if all(kind == "embed" for kind, *_ in terms):
                # only the rows the batch touches: compact them
                uniq, inverse = torch.unique(torch.cat([ids.reshape(-1) for _, ids, _ in terms]), return_inverse=True)
                splits = torch.split(inverse, [ids.numel() for _, ids, _ in terms])
                count = uniq.numel()
                step = max(1, self.chunk_bytes // max(1, n * cols * _size(dtype)))
                for start in range(0, count, step):
                    stop = min(count, start + step)
                    width = stop - start
                    block = torch.zeros(n * width, cols, dtype=dtype, device=self.device)
                    for inv, (_, ids, g) in zip(splits, terms):
                        ex = torch.arange(n, device=ids.device).repeat_interleave(ids.shape[1])
                        keep = (inv >= start) & (inv < stop)
                        block.index_add_(0, ex[keep] * width + (inv[keep] - start), g.reshape(-1, cols)[keep])
                    self._sink(call, session, p, offset, block.view(n, -1), uniq[start:stop], gt)
                return
            step = max(1, self.chunk_bytes // max(1, n * cols * _size(dtype)))
            for start in range(0, rows_total, step):
                stop = min(rows_total, start + step)
                rows_block: torch.Tensor | None = None  # the first batched matmul allocates it (no zero fill)
                for kind, x, g in terms:
                    if kind == "linear" and x.shape[1] > 1:
                        product = g[:, :, start:stop].transpose(1, 2)
                        rows_block = torch.bmm(product, x) if rows_block is None else rows_block.baddbmm_(product, x)
                        continue
                    if rows_block is None:
                        rows_block = torch.zeros(n, stop - start, cols, dtype=dtype, device=self.device)
                    block = rows_block
                    if kind == "linear":
                        block.add_(g[:, 0, start:stop, None] * x[:, 0, None, :])
                    else:
                        ex = torch.arange(n, device=x.device).repeat_interleave(x.shape[1])
                        ids = x.reshape(-1)
                        keep = (ids >= start) & (ids < stop)
                        block.view(-1, cols).index_add_(
                            0, ex[keep] * (stop - start) + (ids[keep] - start), g.reshape(-1, cols)[keep]
                        )
                assert rows_block is not None  # terms is never empty
                self._sink(call, session, p, offset, rows_block.reshape(n, -1), slice(start, stop), gt)

    def _blocks(self, call: _Call) -> torch.Tensor:
        """(B, b_max) example indices of the sets whose pairwise products the single-call statistics need - one row
        per present group, or one row of all examples when the Gramian (cross-group pairs) is asked for - padded
        with n (a zero example)."""
        if call.blocks is None:
            if self.gram:
                call.blocks = torch.arange(call.n, device=self.device)[None, :]
            else:
                ids = call.groups_cpu
                members = [torch.nonzero(ids == k).reshape(-1) for k in torch.unique(ids).tolist()]
                width = max(len(m) for m in members)
                index = torch.full((len(members), width), call.n, dtype=torch.long)
                for row, m in enumerate(members):
                    index[row, : len(m)] = m
                call.blocks = index.to(self.device)
        return call.blocks

    def _use_gram(self, call: _Call, terms, rows: int, cols: int, target: bool = False) -> bool:
        """Flop model: per-example row blocks (batched matmul + n x n products) vs token-level Gram blocks."""
        n = call.n
        explicit = 0.0
        for kind, x, _ in terms:
            explicit += 2.0 * x.shape[0] * x.shape[1] * rows * cols if kind == "linear" else 0.0
        if all(kind == "embed" for kind, *_ in terms):
            touched = min(rows, sum(x.numel() for _, x, _ in terms))
            explicit += float(n) * touched * cols * (n + 1)
        else:
            explicit += float(n) * n * rows * cols + float(n) * rows * cols
        blocks = self._blocks(call)
        count, size = blocks.shape
        gram = 0.0
        largest = 0
        for i, (kind1, x1, _) in enumerate(terms):
            for kind2, x2, _ in terms[i:]:
                tokens1, tokens2 = size * x1.shape[1], size * x2.shape[1]
                largest = max(largest, count * tokens1 * tokens2)
                width = (rows + cols) if kind1 == kind2 == "linear" else (cols + 2)
                gram += float(count) * tokens1 * tokens2 * width
        if target:
            explicit += float(n) * rows * cols
            for kind, x, _ in terms:
                gram += (2.0 * rows * cols if kind == "linear" else 2.0 * cols) * x.shape[0] * x.shape[1]
        if 3 * largest * _size(terms[0][2].dtype) > self.chunk_bytes:
            return False
        return gram < explicit

    def _gram_blocks(self, call: _Call, terms) -> None:
        """M_ij for i, j in the same block from token-level Gram matrices, all blocks in one batched matmul (blocks
        padded with a zero example): <g_i, g_j> = sum over token pairs of (linear-linear) <a, a'><g, g'>,
        (embed-embed) [id == id'] <g, g'>, (linear-embed) <a, g'> g[id']."""
        blocks = self._blocks(call)
        count, size = blocks.shape
        flat = []
        for kind, x, g in terms:
            length = x.shape[1]
            g_pad = torch.cat([g, g.new_zeros(1, *g.shape[1:])])[blocks].reshape(count, size * length, -1)
            if kind == "linear":
                x_pad = torch.cat([x, x.new_zeros(1, *x.shape[1:])])[blocks].reshape(count, size * length, -1)
            else:
                x_pad = torch.cat([x, x.new_zeros(1, length)])[blocks].reshape(count, size * length)
            flat.append((kind, x_pad, g_pad, length))
        total = torch.zeros(count, size, size, dtype=torch.float64, device=self.device)
        for i, (kind1, x1, g1, t1) in enumerate(flat):
            for j in range(i, len(flat)):
                kind2, x2, g2, t2 = flat[j]
                if kind1 == "linear" and kind2 == "linear":
                    prod = torch.bmm(x1, x2.transpose(1, 2)).mul_(torch.bmm(g1, g2.transpose(1, 2)))
                elif kind1 == "embed" and kind2 == "embed":
                    prod = torch.bmm(g1, g2.transpose(1, 2)).mul_(x1[:, :, None] == x2[:, None, :])
                elif kind1 == "linear":  # g1[token a, id of token b]
                    gathered = torch.gather(g1, 2, x2[:, None, :].expand(-1, g1.shape[1], -1))
                    prod = torch.bmm(x1, g2.transpose(1, 2)).mul_(gathered)
                else:  # g2[token b, id of token a]
                    gathered = torch.gather(g2, 2, x1[:, None, :].expand(-1, g2.shape[1], -1)).transpose(1, 2)
                    prod = torch.bmm(g1, x2.transpose(1, 2)).mul_(gathered)
                pair = prod.view(count, size, t1, size, t2).sum(dim=(2, 4)).to(torch.float64)
                total.add_(pair)
                if j != i:
                    total.add_(pair.transpose(1, 2))
        rows = blocks[:, :, None].expand(-1, -1, size)
        cols = blocks[:, None, :].expand(-1, size, -1)
        cast(torch.Tensor, call.m).index_put_((rows.reshape(-1), cols.reshape(-1)), total.reshape(-1), accumulate=True)

    def _sink(self, call: _Call, session: _Session, p: nn.Parameter, offset: int, per: torch.Tensor, rows, gt) -> None:
        """Fold per-example gradients of a block of ``p`` (rows ``rows``) into the call's reductions."""
        cols = p.numel() // p.shape[0] if p.dim() > 1 else 1
        if gt is not None:
            gt_block = gt if p.dim() <= 1 or rows == slice(None) else gt.view(p.shape[0], cols)[rows].reshape(-1)
            cast(torch.Tensor, call.t).add_((per @ gt_block).to(torch.float64))
        if not session.buffered:
            cast(torch.Tensor, call.m)[: call.n, : call.n].add_((per @ per.T).to(torch.float64))
            return
        cast(torch.Tensor, call.d).add_((per * per).sum(dim=1).to(torch.float64))
        sums = torch.zeros(len(call.present), per.shape[1], dtype=per.dtype, device=per.device)
        sums.index_add_(0, cast(torch.Tensor, call.slot), per)
        for j, k in enumerate(call.present):
            buffer = session.sums.get(k)
            if buffer is None:
                buffer = session.sums[k] = torch.zeros(self._layout_numel, dtype=self._dtype, device=self.device)
            view = buffer[offset : offset + p.numel()]
            if p.dim() <= 1 or rows == slice(None):
                view.add_(sums[j].to(view.dtype))
            elif isinstance(rows, slice):
                view.view(p.shape[0], cols)[rows].add_(sums[j].view(-1, cols).to(view.dtype))
            else:
                view.view(p.shape[0], cols).index_add_(0, rows, sums[j].view(-1, cols).to(view.dtype))

    def _fold_call(self, call: _Call, session: _Session) -> None:
        """Per-group sums of the call's n x n matrix / vectors (block sums never mix a NaN example into another
        group)."""
        ids = call.groups_cpu.numpy()
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        present, starts = np.unique(sorted_ids, return_index=True)
        if call.t is not None:
            t = call.t.cpu().numpy()[order]
            session.t[present] += np.add.reduceat(t, starts)
        if session.buffered:
            d = cast(torch.Tensor, call.d).cpu().numpy()[order]
            session.d[present] += np.add.reduceat(d, starts)
            return
        m = cast(torch.Tensor, call.m)[: call.n, : call.n].cpu().numpy()[np.ix_(order, order)]
        blocks = np.add.reduceat(np.add.reduceat(m, starts, axis=0), starts, axis=1)
        session.q[present] += np.diag(blocks)
        session.d[present] += np.add.reduceat(np.diag(m), starts)
        if self.gram:
            cross = np.zeros((session.num_groups, session.num_groups))
            cross[np.ix_(present, present)] = blocks
            session.cross = cross

    # -- statistics ---------------------------------------------------------------------------------------------------
    def _finish(self, session: _Session, distributed: bool) -> Measurement:
        g = session.num_groups
        local_counts = session.counts.copy()
        if session.buffered:
            rows = [session.loss_sums, session.counts, session.poisoned.astype(np.float64), session.d, session.t]
            if distributed:
                flat = torch.tensor(np.concatenate(rows), dtype=torch.float64, device=self.device)
                dist.all_reduce(flat, group=self.process_group)
                rows = list(flat.cpu().numpy().reshape(len(rows), g))
            loss_sums, counts, poisoned_sums, d, t = rows
            poisoned = poisoned_sums > 0
            q, cross = self._sums_products(session, counts, local_counts, distributed)
            return self._result(loss_sums, counts, poisoned, q, d, t, cross, session)
        if not distributed:
            return self._result(
                session.loss_sums,
                session.counts,
                session.poisoned,
                session.q,
                session.d,
                session.t,
                session.cross,
                session,
            )
        # per-rank unbiased estimates, combined count-weighted (scalars only)
        sq, var = _estimates(session.counts, session.q, session.d)
        estimable = session.counts >= 2
        weight = np.where(estimable & ~session.poisoned, session.counts, 0.0)
        rows = [
            session.loss_sums,
            session.counts,
            session.poisoned.astype(np.float64),
            weight,
            np.where(weight > 0, np.nan_to_num(sq, nan=0.0) * weight, 0.0),
            np.where(weight > 0, np.nan_to_num(var, nan=0.0) * weight, 0.0),
            (estimable & ~session.poisoned & ~(np.isfinite(sq) & np.isfinite(var))).astype(np.float64),
            session.t,
        ]
        flat = torch.tensor(np.concatenate(rows), dtype=torch.float64, device=self.device)
        dist.all_reduce(flat, group=self.process_group)
        loss_sums, counts, poisoned_sums, weight, sq_sum, var_sum, bad, t = flat.cpu().numpy().reshape(len(rows), g)
        result = Measurement.from_sums(loss_sums, counts)
        poisoned = (poisoned_sums > 0) | (bad > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            result.grad_sq_norm = np.where((weight > 0) & ~poisoned, sq_sum / np.maximum(weight, 1e-300), np.nan)
            result.grad_var = np.where((weight > 0) & ~poisoned, var_sum / np.maximum(weight, 1e-300), np.nan)
            if session.g_target is not None:
                result.target_alignment = np.where((counts >= 1) & ~poisoned, t / np.maximum(counts, 1), np.nan)
                result.target_loss = float(cast(float, session.target_loss))  # set with g_target
        return result

    def _sums_products(self, session, counts, local_counts, distributed):
        """(Q_k = ||S_k||^2, cross <S_k, S_j>) from the per-group sums (all-reduced in column chunks if needed)."""
        g = session.num_groups
        present = np.flatnonzero(counts > 0)
        q = np.zeros(g)
        cross = np.zeros((g, g)) if self.gram else None
        if present.size == 0:
            return q, cross
        numel = self._layout_numel
        step = max(1, self.chunk_bytes // max(1, present.size * _size(self._dtype)))
        total = torch.zeros(present.size, present.size, dtype=torch.float64, device=self.device)
        for start in range(0, max(numel, 1), step):
            stop = min(numel, start + step)
            if stop <= start:
                break
            block = torch.zeros(present.size, stop - start, dtype=self._dtype, device=self.device)
            for j, k in enumerate(present.tolist()):
                buffer = session.sums.get(k)
                if buffer is not None:
                    block[j].copy_(buffer[start:stop])
            if distributed:
                dist.all_reduce(block, group=self.process_group)
            total.add_((block @ block.T).to(torch.float64))
        products = total.cpu().numpy()  # entry (j, l) reads rows j and l only: a NaN sum stays in its group
        q[present] = np.diag(products)
        if cross is not None:
            cross[np.ix_(present, present)] = products
        return q, cross

    def _result(self, loss_sums, counts, poisoned, q, d, t, cross, session) -> Measurement:
        result = Measurement.from_sums(loss_sums, counts)
        sq, var = _estimates(counts, q, d)
        sq = np.where(poisoned, np.nan, sq)
        var = np.where(poisoned, np.nan, var)
        result.grad_sq_norm, result.grad_var = sq, var
        with np.errstate(invalid="ignore", divide="ignore"):
            if session.g_target is not None:
                result.target_alignment = np.where((counts >= 1) & ~poisoned, t / np.maximum(counts, 1), np.nan)
                result.target_loss = float(session.target_loss)
            if self.gram:
                c = cross if cross is not None else np.full((len(counts), len(counts)), np.nan)
                gram = c / np.outer(np.maximum(counts, 1), np.maximum(counts, 1))
                bad = (counts < 1) | poisoned | ~np.isfinite(np.diag(c))
                gram[bad, :] = np.nan
                gram[:, bad] = np.nan
                np.fill_diagonal(gram, sq)
                result.gram = gram
        return result

    # -- target gradient (DGA) ----------------------------------------------------------------------------------------
    def _target_gradient(self, target_batch, loss_fn, distributed, run) -> tuple[torch.Tensor, float]:
        """Mean-loss gradient of the target batch over the covered layout (global under torch.distributed),
        Adam-preconditioned if asked; ``.grad`` is left as it was (as GradientProbe does)."""
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
        params = [p for _, p, _ in self._layout]
        scale = 1.0
        grads: list[torch.Tensor | None]
        if run is _default_backward:
            grads = list(torch.autograd.grad(losses.sum(), params, allow_unused=True))
        else:
            trainable = [p for p in self.module.parameters() if p.requires_grad]
            saved = [p.grad for p in trainable]
            for p in trainable:
                p.grad = None
            try:
                anchor = torch.zeros((), dtype=losses.dtype, device=losses.device, requires_grad=True)
                context = self.model.no_sync() if _is_ddp(self.model) else contextlib.nullcontext()
                with context:
                    run(losses.sum() + anchor)
                scale = float(anchor.grad) if anchor.grad is not None else float("nan")
                grads = [p.grad for p in params]
            finally:
                for p, g in zip(trainable, saved):
                    p.grad = g
        buffer = torch.empty(self._layout_numel + 2, dtype=self._dtype, device=self.device)
        with torch.no_grad():
            for (_, p, offset), grad in zip(self._layout, grads):
                view = buffer[offset : offset + p.numel()]
                if grad is None:
                    view.zero_()
                else:
                    view.copy_(grad.reshape(-1))
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
        optimizer = self.preconditioner
        assert optimizer is not None  # called only with a preconditioner
        group_of = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                group_of[p] = group
        for name, p, offset in self._layout:
            view = flat[offset : offset + p.numel()]
            state = optimizer.state.get(p)
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

    def _average_gradients(self, world: int) -> None:
        average_gradients(self.module, world, self.device, self.process_group)


# -- helpers ----------------------------------------------------------------------------------------------------------


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _normalised(module: nn.Module, x: torch.Tensor, role: str) -> torch.Tensor:
    """The normalised input a LayerNorm / RMSNorm multiplies by its weight (recomputed from the saved input)."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    shape = tuple(cast(tuple[int, ...], module.normalized_shape))
    module_eps = cast("float | None", module.eps)
    if role == "norm":
        return F.layer_norm(x, shape, None, None, cast(float, module_eps))
    eps = module_eps if module_eps is not None else torch.finfo(x.dtype).eps
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, shape, None, eps)
    dims = tuple(range(-len(shape), 0))  # pragma: no cover - torch without F.rms_norm
    return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)


def _estimates(counts: np.ndarray, q: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """U-statistic ||mu||^2 = (Q - D) / (n (n - 1)) and sigma^2 = (D - Q / n) / (n - 1); NaN below two examples."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = counts >= 2
        safe = np.where(ok, counts, 2.0)
        sq = np.where(ok, (q - d) / (safe * (safe - 1.0)), np.nan)
        var = np.where(ok, (d - q / safe) / (safe - 1.0), np.nan)
    return sq, var


def _per_example_losses(loss_fn: LossFn, model: nn.Module, batch: Mapping, n: int) -> torch.Tensor:
    losses = loss_fn(model, batch)
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n,):
        raise ValueError(
            f"loss_fn must return one loss per example, shape ({n},) for the batch, got "
            f"{getattr(losses, 'shape', type(losses).__name__)}"
        )
    if not losses.dtype.is_floating_point:
        raise ValueError(f"loss_fn returned dtype {losses.dtype} for the batch; losses must be floating point")
    return losses


_check_inputs = GradientProbe._check_inputs  # the same input checks as the micro-batch probe
