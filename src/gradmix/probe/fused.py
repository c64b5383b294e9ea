"""The fused probe: per-group gradient statistics from ONE forward and ONE backward of the mixed batch (cost
flat in K).

``FusedGradientProbe`` has the same ``backward(...)`` signature and result type (``gradmix.stats.Measurement``) as
``GradientProbe``, so the Mixer can use either. Instead of re-running the batch as per-group micro-batches, it runs the
batch once (what a plain step does, so ``.grad`` is the mixed batch's mean-loss gradient: bit for bit, or to float
rounding for the Linear weights whose gradient is summed from the per-example rows, see below) and reads per-example
gradient factors from module hooks:

* forward hooks save each supported module's input (Linear, HF Conv1D, convolutions: activations ``A``; Embedding:
  token ids; LayerNorm / RMSNorm: the input, normalised again when needed; GroupNorm, BatchNorm and behaviour-tested
  norm look-alikes: the normalised input); a MultiheadAttention's hook recomputes its projections' inputs and outputs
  (``gradmix.probe.attention``);
* a pre-hook on the autograd node that produced the module's output captures the output gradient ``G`` (robust to
  in-place ops applied to the output afterwards, e.g. ``ReLU(inplace=True)``).

Per-example gradients factor per layer: Linear weight ``g_i = sum_t G_it^T A_it`` (HF Conv1D, weight (in, out):
``sum_t A_it^T G_it``), bias ``sum_t G_it``, Embedding ``g_i = sum_t onehot(id_it) G_it^T`` (padding rows excluded),
LayerNorm/RMSNorm/GroupNorm/BatchNorm weight ``sum_t G_it * xhat_it``, their bias ``sum_t G_it``, convolution weight
``sum over output positions of G_ip (x) unfold(x_i)_p`` (computed as one convolution weight-gradient with the batch
folded into the groups, in blocks of output channels, so the unfolded input is never materialised), attention
in-projection ``sum_t dP_it^T x_it`` and out-projection ``sum_t G_it^T A_it``. Per layer they are reduced at once,
never stored for the whole model and never as K copies of the gradient, to what the statistics need: per group k
``||S_k||^2`` (or ``<S_k, S_j>`` with the Gramian), per example ``||g_i||^2`` and per group ``<S_k, g_target>``
(n = examples of the micro-batch, summed over layers; under accumulation the per-group sums themselves). A weight
matrix takes the cheapest of three exact forms (``products.form_costs`` / ``choose_form``: flops, a multiply-add
counted as 2, and a memory-bound pass in flop-equivalents; a form whose transient memory exceeds ``chunk_bytes`` is
never chosen; ``layer_forms`` says which each parameter took; convolutions: the explicit rows):

* explicit: per-example gradients of a block of weight rows, ``(n, rows, d_in)`` by one batched matmul (the work of
  the layer's weight gradient), then their squared norms and per-group sums (a pass each) - never the n x n product
  of the rows;
* per group: one matmul per group over its tokens (the gradient of the group's sub-batch, the same work again), plus
  ``||g_i||^2`` of the examples that share a group (token Gram matrices, ``2 T^2 (d_in + d_out)`` flops each) - for
  large groups, where n rows would cost more than the squared norms;
* Gram trick: ``<g_i, g_j> = sum_{t,s} <A_it, A_js> <G_it, G_js>`` within each block of examples (``(nT)^2 (d_in +
  d_out)`` flops), cheaper when ``nT`` is small next to the layer width (MLPs on feature vectors, short sequences) -
  used when no per-group sums are needed (no accumulation).

The weight gradient is not computed twice (``gradmix.probe.reroute``). The forward hook of an ``nn.Linear`` / HF
``Conv1D`` call returns the layer's output through a custom autograd Function whose backward computes the input and
bias gradients and takes the weight gradient from the probe, which sums it from the rows it builds anyway (the
explicit and per-group forms' column sums); the original output is detached, so autograd never runs the layer's own
weight-gradient matmul. Where the Gram form is cheaper, the layer is called twice, the parameter is skipped or the
backward scale is unusable, the Function computes ``G^T A`` itself, as autograd would. A weight tied to another
module, autocast / half precision (the layer's own backward rounds through it) and an output that is not a plain
``x W^T + b`` in its autograd graph (e.g. changed by another forward hook) keep autograd's path entirely. Where a
measuring step so computes a weight gradient beside the rows, it is said once per reason (an INFO record).

Parameters used by several modules (tied embedding / LM head, a layer called twice) are handled: their
contributions are summed into the same per-example rows before any product is taken.

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
held by supported modules (``gradmix.probe.coverage``): ``nn.Linear``, ``nn.Embedding`` (not with
``scale_grad_by_freq``), ``nn.LayerNorm``, ``nn.RMSNorm``, HF ``Conv1D``, ``nn.Conv1d/2d/3d``, ``nn.GroupNorm``,
``nn.BatchNorm*`` and ``nn.MultiheadAttention`` (by class: exactly those classes or subclasses that do not override
``forward``), and LayerNorm / RMSNorm look-alikes of any class, recognised by their behaviour (output =
normalised(input) * weight (+ bias), checked on every hooked call). At run time a parameter also drops out of
coverage when a call of its module does not see the batch as its leading dimension (e.g. a position embedding called
on ``arange(T)``; inside torch Transformer layers built with ``batch_first=False`` the batch is dimension 1), when
a look-alike's output fails the behaviour test, when a MultiheadAttention's recomputation differs from its output or
the loss uses its attention weights, or when the autograd graph shows more uses of it than hooked module calls (a
weight used functionally elsewhere, e.g. ``F.linear(h, embedding.weight)``). What happens to uncovered parameters is
``uncovered=``: ``"skip"`` (statistics over the covered ones; ``skipped`` names the rest, a warning says so once),
``"fallback"`` (the whole measurement goes through a ``GradientProbe`` over all selected parameters, i.e. today's
micro-batch path), ``"error"`` (ValueError/RuntimeError naming them) or ``"auto"`` (default: skip when the uncovered
ones hold at most ``max_skipped_fraction`` of the selected scalars, else fall back). A runtime fallback costs the
wasted forward of that one call. Every skip and fallback is said once and recorded in ``coverage_report``, which
the Mixer writes into its metrics: a fallback (it costs time) and a skip you asked for as a warning naming the
parameters and the reasons, the default's own small skip (``"auto"``, e.g. position embeddings) as an INFO log record
of ``gradmix.probe.fused`` (nothing to act on). A limit that cannot be
detected: a module whose leading dimension is not the batch but happens to have length n (sequence-first layouts
with T == n outside torch's Transformer layers; use batch-first modules). Examples that interact in the loss: batch
normalisation in training mode (or without running statistics) normalises over the batch, so the per-example
gradients the statistics are built from are each example's share of the batch gradient, not its own loss gradient;
the probe still covers BatchNorm's parameters, keeps ``.grad`` exact (one pass over the whole batch, unlike the
micro-batch probe, whose parts see other batch statistics), and says once that the statistics are biased.

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
import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gradmix.probe import attention
from gradmix.probe.checks import per_example_losses
from gradmix.probe.coverage import (
    Normaliser,
    batch_coupled,
    coupling_now,
    coverage_report,
    describe_uncovered,
    match_affine,
    sequence_first,
    static_coverage,
    summary_line,
)
from gradmix.probe.estimators import mask_gram, ratio, u_statistics, weighted
from gradmix.probe.layout import FlatLayout, ParameterSpec, flat_dtype, is_ddp, unwrap
from gradmix.probe.micro import GradientProbe
from gradmix.probe.products import (
    Contribution,
    Grouping,
    Term,
    add_gram_blocks,
    add_target_products,
    channel_normalised,
    choose_form,
    contribution_terms,
    conv_row_blocks,
    element_size,
    embedding_row_blocks,
    example_blocks,
    example_norms,
    explicit_block_bytes,
    explicit_reductions,
    form_costs,
    group_row_blocks,
    small_parameter_rows,
    uses_batch_statistics,
    weight_row_blocks,
)
from gradmix.probe.protocol import BackwardFn, LossFn
from gradmix.probe.reduce import all_reduce_rows, average_gradients
from gradmix.probe.reroute import Reroute, RerouteSite, plain_linear_output
from gradmix.probe.scaling import anchor_for, default_backward, scale_of, setup_call, usable_scale
from gradmix.probe.target import target_gradient
from gradmix.stats import Measurement

__all__ = ["FUSED_ONLY", "UNCOVERED", "FusedGradientProbe"]

UNCOVERED = ("auto", "skip", "fallback", "error")
"""The policies for selected parameters the hooks cannot cover (``uncovered=``)."""

FUSED_ONLY = ("uncovered", "max_skipped_fraction", "exact_global", "chunk_bytes")
"""The settings only the fused probe takes."""


_SMALL_ROLES = {"bias", "norm", "rms", "scale", "cscale", "cbias"}
"""Roles whose per-example gradients are computed at once (vectors the size of a norm weight or a bias)."""

_CPU_BLOCK_BYTES = 4 * 1024 * 1024
"""On CPU, the explicit and per-group forms' row blocks (at most ``chunk_bytes``): small enough to stay in cache
between the matmul that writes a block and the reductions that read it, large enough that the per-block Python
work stays small. On a GPU the blocks take ``chunk_bytes`` (fewer, larger kernels)."""


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
        # the hooks this call puts on autograd nodes, removed when it ends: a hook on a node that reaches the node back
        # (through ``records``) is a cycle through C++ that gc never frees, and it would keep the call (its saved
        # inputs), the probe and the model alive for the rest of the process
        self.node_hooks: list[Any] = []
        self.problems: dict[int, str] = {}  # param id -> reason (found during the forward)
        self.expected: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.contribs: dict[int, list[Contribution]] = {}
        self.m: torch.Tensor | None = None  # (n + 1, n + 1) float64: the Gram form's within-block products
        self.t: torch.Tensor | None = None  # (n,) float64: the Gram form's target products
        self.skip: set[int] = set()  # parameters left out of this call
        self.rng: dict[int, Any] = {}  # attention module id -> RNG state before its call (dropout replay)
        self.stale: set[str] = set()  # modules whose kept input was modified in place before the backward
        self.blocks: torch.Tensor | None = None
        # the explicit form works per group: the call's groups, ||g_i||^2, and per group ||S_k||^2 (or <S_k, S_j>
        # with the Gramian) and <S_k, g_target>
        self.grouping = Grouping(groups_cpu, device)
        self.present = self.grouping.present
        self.d = torch.zeros(n, dtype=torch.float64, device=device)
        self.group_q = torch.zeros(len(self.present), dtype=torch.float64, device=device)
        self.group_cross: torch.Tensor | None = None  # (P, P), gram
        self.group_t = torch.zeros(len(self.present), dtype=torch.float64, device=device)
        # the weight gradient formed from the blocks (gradmix.probe.reroute): rerouted calls per parameter, the
        # parameters whose gradient the probe forms (one reachable, rerouted call), the gradients not yet taken
        self.rerouted: dict[int, int] = {}
        self.owned: set[int] = set()
        self.weight_grads: dict[int, torch.Tensor] = {}
        self.kept: dict[str, list[str]] = {}  # reason -> layers whose weight gradient stays with autograd


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
        if uncovered not in UNCOVERED:
            raise ValueError(f"uncovered must be one of {UNCOVERED}, got {uncovered!r}")
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
        self.module: nn.Module = unwrap(model)
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
        self._dtype = flat_dtype(p for _, p in self.selected)
        self._selected_numel = sum(p.numel() for _, p in self.selected)

        uses, reasons = static_coverage(self.module, self.selected)
        self._uses = uses  # param id -> [(module, role)]
        self.skip_reasons: dict[str, str] = {}
        self._fallback = False
        self._warned = False
        self._uncovered: dict[str, str] = {}  # every reason said so far (the coverage report's)
        self._notes: list[str] = []
        self._report: dict[str, Any] | None = None
        self._coupled = batch_coupled(self.module)
        self._coupling_said = False
        self._affine_forms: dict[int, tuple[str, str, int]] = {}  # module id -> the form its behaviour test found
        self._sequence_first = sequence_first(self.module)
        # the flat layout (target gradient, per-group sums) is over the statically covered parameters
        self._layout = FlatLayout([(name, p) for name, p in self.selected if id(p) in uses])
        self._by_id = {id(p): (name, p, off) for name, p, off in self._layout}
        self._skipped_ids: set[int] = set()
        if not len(self._layout):
            reasons = reasons or {name: "no parameter selected" for name, _ in self.selected}
        self._apply_policy(reasons, at_runtime=False)
        self._session: _Session | None = None
        self._call: _Call | None = None
        self._kept_said: set[str] = set()
        self.layer_forms: dict[str, str] = {}
        """The per-layer form of the last measuring call, by parameter name: ``small`` (vector parameters),
        ``conv``, ``embedding``, ``gram`` (token-level Gram blocks), ``explicit`` (per-example row blocks),
        ``groups`` (per-group sums); ``+grad``: their rows also gave the weight gradient, which autograd skipped."""

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
    def coverage_report(self) -> dict[str, Any]:
        """What a run records about this probe (``gradmix.probe.coverage.coverage_report``): the measuring probe and
        mode (``fused`` / ``fused_fallback``), the hooks' coverage, the uncovered parameters grouped by reason (every
        reason said so far, static or at run time) and notes (batch statistics). The Mixer writes it into the next
        metrics record whenever it changes."""
        if self._report is None:
            mode = "fused_fallback" if self._fallback else "fused"
            probe = "GradientProbe" if self._fallback else "FusedGradientProbe"
            self._report = coverage_report(probe, mode, self.selected, self._uncovered, self._notes)
        return self._report

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
        names = dict(self.selected)
        if len(reasons) <= 6:
            listing = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        else:  # grouped by reason, with counts
            sizes = {name: names[name].numel() for name in reasons if name in names}
            listing = f"{len(reasons)} parameter tensors: " + summary_line(describe_uncovered(reasons, sizes))
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
        self._uncovered.update(reasons)
        self._report = None
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
        message = (
            f"FusedGradientProbe: statistics leave out {len(reasons)} parameter tensor(s) "
            f"({skipped_numel} of {self._selected_numel} selected scalars): {listing}"
        )
        if self.uncovered == "auto":
            # The default's own choice (a small share of the scalars, e.g. position embeddings): nothing for the
            # user to act on, so it is logged once and kept in ``coverage_report``, not raised as a warning.
            logging.getLogger(__name__).info(message)
        else:
            warnings.warn(message, stacklevel=3)

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
        n, distributed, world, divisor, run = setup_call(
            batch, groups, num_groups, global_batch_size, backward_fn, self.process_group
        )
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
        if distributed and (is_ddp(self.model) or self.sync_gradients):
            # the fused pass runs under no_sync (see _fused_call)
            average_gradients(self.module, world, self.device, self.process_group)
        return self._finish(session, distributed)

    # -- one forward/backward ---------------------------------------------------------------------------------------
    def _active_params(self) -> list[tuple[str, nn.Parameter, int]]:
        return [(name, p, off) for name, p, off in self._layout if id(p) not in self._skipped_ids]

    def _fused_call(self, session: _Session, batch, groups, n, loss_fn, divisor, run) -> None:
        """Forward and backward of the whole micro-batch with capture hooks. Under DDP it runs in ``no_sync`` and the
        final call averages ``.grad`` itself (as GradientProbe's measured path does), so that a run-time fallback can
        drop the forward without leaving DDP's reducer waiting for a backward."""
        groups_cpu = groups.detach().to("cpu", torch.long).reshape(-1)
        self._say_coupling()
        call = _Call(n, groups_cpu, self.device)
        active = self._active_params()
        active_ids = {id(p) for _, p, _ in active}
        modules: dict[nn.Module, list[tuple[int, str]]] = {}
        for _, p, _ in active:
            for sub, role in self._uses[id(p)]:
                modules.setdefault(sub, []).append((id(p), role))
        call.m = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=self.device)  # row/col n: padding sink
        call.t = torch.zeros(n, dtype=torch.float64, device=self.device) if session.g_target is not None else None
        if self.gram and not session.buffered:
            call.group_cross = torch.zeros(
                len(call.present), len(call.present), dtype=torch.float64, device=self.device
            )
        self.layer_forms = {}
        self._call = call
        context = self.model.no_sync() if is_ddp(self.model) else contextlib.nullcontext()
        handles = []
        for sub, roles in modules.items():
            if isinstance(sub, nn.MultiheadAttention):  # its projections' factors are recomputed (probe.attention)
                pre, hook = self._make_attention_hooks(call, roles)
                handles.append(sub.register_forward_pre_hook(pre))
                handles.append(sub.register_forward_hook(hook, with_kwargs=True))
            else:
                handles.append(sub.register_forward_hook(self._make_forward_hook(call, roles)))
        try:
            with context:
                try:
                    losses = per_example_losses(loss_fn, self.model, batch, n, "the batch")
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
                # the probe forms the weight gradient of a parameter with exactly one rerouted, reachable call
                call.owned = {
                    pid
                    for pid, count in call.rerouted.items()
                    if count == 1 and call.expected.get(pid, 0) == 1 and pid not in call.skip
                }
                for pid, count in call.rerouted.items():
                    if count > 1 and pid not in call.skip:
                        call.kept.setdefault(f"called {count} times in one forward", []).append(self._by_id[pid][0])
                self._say_kept(call)
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
                if run is default_backward:
                    call.factor = divisor
                    call.scale = 1.0
                    total.backward()
                else:
                    anchored = total + anchor_for(total)

                    def on_scale(grad_outputs, call=call, divisor=divisor):
                        # the anchor's gradient, read as the backward passes it: the hooks need the factor
                        scale = scale_of(grad_outputs[0])
                        call.scale = scale
                        call.factor = divisor / scale if usable_scale(scale) else float("nan")
                        return None

                    call.node_hooks.append(anchored.grad_fn.register_prehook(on_scale))
                    run(anchored)
            # contributions whose other uses never received a gradient (unused outputs) are complete now
            for pid in list(call.contribs):
                if call.contribs[pid]:
                    self._process(call, session, pid)
        finally:
            call.active = False
            self._call = None
            for handle in call.node_hooks:
                handle.remove()
            call.node_hooks.clear()
            call.records.clear()
            call.weight_grads.clear()  # formed for a call the backward never reached
        scale = call.scale
        if call.stale:
            warnings.warn(
                f"FusedGradientProbe: the input of a {', '.join(sorted(call.stale))} was modified in place between "
                "its call and the backward; this measurement's statistics are NaN (.grad is unaffected)",
                stacklevel=4,
            )
        if scale is None or not usable_scale(scale) or not math.isfinite(call.factor) or call.stale:
            session.poisoned |= counts > 0
            return
        self._fold_call(call, session)

    def _make_forward_hook(self, call: _Call, roles: list[tuple[int, str]]):
        def hook(module, args, output):
            if not call.active or not isinstance(output, torch.Tensor):
                return None
            if not output.requires_grad:
                if not torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters(recurse=False)):
                    # Reentrant activation checkpointing runs the forward without autograd and recomputes it inside
                    # the backward, after the hooks are gone: the per-example gradients of this call are never seen.
                    unseen = (
                        f"a call of its {type(module).__name__} ran without autograd during the measured forward "
                        "(reentrant activation checkpointing - torch.utils.checkpoint(use_reentrant=True) or HF "
                        "gradient_checkpointing_kwargs={'use_reentrant': True} - or a no_grad block): its gradient "
                        "is recomputed where the probe cannot see it; use use_reentrant=False"
                    )
                    for pid, _ in roles:
                        call.problems.setdefault(pid, unseen)
                return None
            x = args[0] if args else None
            n = call.n
            problem = None
            bdim = 1 if id(module) in self._sequence_first else 0  # torch Transformer layers, batch_first=False
            where = "leading dimension" if bdim == 0 else "dimension 1 (sequence-first layer)"
            if not isinstance(x, torch.Tensor) or x.dim() <= bdim or x.shape[bdim] != n or output.dim() <= bdim:
                problem = f"a call of its {type(module).__name__} does not see the batch as {where}"
            elif output.shape[bdim] != n:
                problem = f"a call of its {type(module).__name__} does not return the batch as {where}"
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
            # a non-tensor x set ``problem`` above
            call_roles, normaliser, problem = self._prepare(module, cast(torch.Tensor, x), output, roles)
            if problem:
                for pid, _ in roles:
                    call.problems.setdefault(pid, problem)
                return None
            replaced = self._reroute(call, module, cast(torch.Tensor, x), output, call_roles)
            base = output._base if (output._base is not None and output._base.numel() == output.numel()) else output
            strided = None  # a permuted view of the base (e.g. a channels-first norm): read its gradient as such
            if replaced is not None:  # the output is now the Reroute node's: its gradient arrives there
                base = replaced
            elif base is not output and not output.is_contiguous():
                if base.is_contiguous():
                    strided = (output.size(), output.stride(), output.storage_offset() - base.storage_offset())
                else:
                    base = output
            node = base.grad_fn
            if node is None:
                return None
            nr = base.output_nr
            shape = output.shape
            saved = cast(torch.Tensor, x).detach()
            version = saved._version
            if bdim:
                saved = saved.movedim(bdim, 0)
            record = {"node": node, "roles": call_roles}
            call.records.append(record)
            for pid, _ in call_roles:
                call.expected[pid] = call.expected.get(pid, 0) + 1  # corrected by the graph check

            def prehook(grad_outputs):
                if call.active and record.get("reachable", True):
                    grad = grad_outputs[nr] if nr < len(grad_outputs) else None
                    if grad is not None and strided is not None:
                        flat = grad.detach().contiguous()
                        grad = flat.as_strided(strided[0], strided[1], flat.storage_offset() + strided[2])
                    if normaliser is None:
                        self._on_grad(call, module, call_roles, saved, grad, shape, bdim)
                    else:
                        recompute = (normaliser, version)
                        self._on_normalised_grad(call, module, call_roles, saved, grad, shape, bdim, *recompute)
                return None

            call.node_hooks.append(node.register_prehook(prehook))
            return replaced

        return hook

    def _reroute(
        self, call: _Call, module: nn.Module, x: torch.Tensor, output: torch.Tensor, roles: list[tuple[int, str]]
    ) -> torch.Tensor | None:
        """The output of a Linear / HF Conv1D call rerouted through ``reroute.Reroute`` (so that its weight gradient
        can come from the per-example blocks), or None where autograd keeps the layer: another layout, a weight
        tied to another module, autocast / half precision, an output that is not a plain linear map of the input
        (``reroute.plain_linear_output``). The decision depends on the module and its call only, so activation
        checkpointing's recomputation inside the backward takes the same path as the forward (it must save the same
        tensors); a recomputed call adds a use, so the probe then leaves that weight gradient to the Function."""
        linear = [(pid, role) for pid, role in roles if role in ("linear", "linear_t")]
        if len(linear) != 1:
            return None
        pid, role = linear[0]
        weight = module._parameters.get("weight")
        bias = module._parameters.get("bias")
        if weight is None or id(weight) != pid or not weight.requires_grad:
            return None
        name = self._by_id[pid][0]
        if len(self._uses.get(pid, ())) != 1:
            call.kept.setdefault("a weight shared with another module (tied)", []).append(name)
            return None
        why = plain_linear_output(output, x, weight, bias, role == "linear_t")
        if why:
            call.kept.setdefault(why, []).append(name)
            return None
        call.rerouted[pid] = call.rerouted.get(pid, 0) + 1
        site = RerouteSite(call.weight_grads, pid, role == "linear_t")
        return cast(torch.Tensor, Reroute.apply(output.detach(), x, weight, bias, site))

    def _say_kept(self, call: _Call) -> None:
        """Say once per reason (an INFO record of ``gradmix.probe.fused``) which layers keep autograd's weight
        gradient, so that a measuring step computes theirs twice."""
        for why, names in call.kept.items():
            if why in self._kept_said:
                continue
            self._kept_said.add(why)
            unique = list(dict.fromkeys(names))
            shown = ", ".join(unique[:4]) + (f", ... ({len(unique)} layers)" if len(unique) > 4 else "")
            logging.getLogger(__name__).info(
                "FusedGradientProbe: the weight gradient of %s is left to autograd (a measuring step computes it "
                "beside the per-example blocks there): %s; said once",
                shown,
                why,
            )

    def _prepare(
        self, module: nn.Module, x: torch.Tensor, output: torch.Tensor, roles: list[tuple[int, str]]
    ) -> tuple[list[tuple[int, str]], Normaliser | None, str]:
        """(roles of this call, normaliser, "") or ([], None, reason). The hook keeps the input (shared with the
        activations autograd keeps); GroupNorm / BatchNorm and behaviour-tested look-alikes also get the normaliser
        that turns it into the normalised input in the backward (their roles resolve here: ``scale``/``bias`` for
        trailing dimensions, ``cscale``/``cbias`` for channels)."""
        kinds = {role for _, role in roles}
        if kinds & {"affine", "affine_bias"}:
            known = self._affine_forms.get(id(module))
            # A module whose form a full call matched is re-checked on its first slice only: the check reads the
            # whole activation otherwise (5-8% of a Llama measuring step); the normaliser works on any slice.
            sample = known is not None and x.dim() > 1 and x.shape[0] > 1 and output.shape == x.shape
            form, normaliser, why = match_affine(
                module, x[:1] if sample else x, output[:1] if sample else output, known
            )
            if form is None or normaliser is None:
                return [], None, why
            self._affine_forms[id(module)] = form
            channels = form[0] == "channels"
            names = {"affine": "cscale" if channels else "scale", "affine_bias": "cbias" if channels else "bias"}
            return [(pid, names[role]) for pid, role in roles], normaliser, ""
        if isinstance(module, nn.modules.conv._ConvNd):
            dims = len(module.kernel_size)
            if x.dim() != dims + 2:
                return [], None, f"an unbatched call of its {type(module).__name__} (input of {x.dim()} dimensions)"
            return roles, None, ""
        if "cscale" in kinds:
            batch_statistics = isinstance(module, nn.GroupNorm) or uses_batch_statistics(module)
            synced = isinstance(module, nn.SyncBatchNorm) and batch_statistics
            if synced and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                return [], None, "its SyncBatchNorm normalises over every rank's batch (the statistics are global)"

            def normaliser(t: torch.Tensor, module=module, batch_statistics=batch_statistics) -> torch.Tensor:
                return channel_normalised(module, t, batch_statistics)

            return roles, normaliser, ""
        return roles, None, ""

    def _say_coupling(self) -> None:
        """Say once, and note in the coverage report, that batch normalisations couple the examples."""
        if self._coupling_said or not self._coupled:
            return
        names = coupling_now(self._coupled)
        if not names:
            return
        self._coupling_said = True
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        note = (
            f"{len(names)} batch normalisation layer(s) ({shown}) normalise over the batch: one example's loss depends "
            "on the other examples, so the per-example gradients behind grad_sq_norm / grad_var / alignments are "
            "each example's share of the batch gradient, not its own loss gradient, and the per-domain statistics "
            "are biased (.grad is still the mixed batch's exact gradient). Unbiased: BatchNorm in eval mode, or "
            "GroupNorm / LayerNorm"
        )
        self._notes.append(note)
        self._report = None
        warnings.warn(f"FusedGradientProbe: {note}; said once", stacklevel=4)

    def _make_attention_hooks(self, call: _Call, roles: list[tuple[int, str]]):
        """A pre-hook (the RNG state before the call, when dropout is active) and a forward hook (with kwargs) that
        recomputes the call's projections and captures its output gradient (``gradmix.probe.attention``)."""

        def pre(module, args):
            if call.active and module.training and module.dropout > 0.0:
                call.rng[id(module)] = attention.rng_state(self.device)
            return None

        def hook(module, args, kwargs, output):
            rng = call.rng.pop(id(module), None)
            out = output[0] if isinstance(output, tuple) else output
            if not call.active or not isinstance(out, torch.Tensor) or not out.requires_grad:
                return None
            capture, problem = attention.recompute(module, attention.bind(args, kwargs), out, call.n, rng)
            if capture is None:
                for pid, _ in roles:
                    call.problems.setdefault(pid, problem)
                return None
            base = out._base
            if base is None or not base.is_contiguous() or base.grad_fn is None:
                base = out
            node = base.grad_fn
            if node is None:
                return None
            nr = base.output_nr
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            aux = [weights.grad_fn] if isinstance(weights, torch.Tensor) and weights.grad_fn is not None else []
            record = {"node": node, "roles": roles, "aux": aux}
            call.records.append(record)
            for pid, _ in roles:
                call.expected[pid] = call.expected.get(pid, 0) + 1
            size, stride = out.size(), out.stride()
            offset = out.storage_offset() - base.storage_offset()

            def prehook(grad_outputs):
                if call.active and record.get("reachable", True):
                    grad = grad_outputs[nr] if nr < len(grad_outputs) else None
                    if grad is not None and base is not out:  # the base's gradient, read in the output's layout
                        flat = grad.detach().contiguous()
                        grad = flat.as_strided(size, stride, flat.storage_offset() + offset)
                    self._on_attention_grad(call, module, roles, capture, grad)
                return None

            call.node_hooks.append(node.register_prehook(prehook))
            return None

        return pre, hook

    def _on_attention_grad(self, call, module, roles, capture, grad) -> None:
        found: dict[int, list[Contribution]] = {}
        if grad is not None:
            for p, role, saved, g in attention.contributions(module, capture, grad.detach()):
                found.setdefault(id(p), []).append((role, saved, g, module))
        for pid, _ in roles:
            if pid in call.skip:
                continue
            call.received[pid] = call.received.get(pid, 0) + 1
            call.contribs.setdefault(pid, []).extend(found.get(pid, []))
            if call.received[pid] >= call.expected.get(pid, 0):
                self._process(call, cast(_Session, self._session), pid)

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
        problems = {}
        for record in call.records:
            record["reachable"] = record["node"] in visited
            if record["reachable"]:
                for pid, _ in record["roles"]:
                    expected[pid] = expected.get(pid, 0) + 1
            if any(aux in visited for aux in record.get("aux", ())):
                for pid, _ in record["roles"]:
                    if pid not in call.problems:
                        problems[pid] = "the loss uses the attention weights its MultiheadAttention returns"
        for pid in active_ids:
            if pid in call.problems or pid in problems:
                continue
            if edges.get(pid, 0) != expected.get(pid, 0):
                problems[pid] = (
                    f"used {edges.get(pid, 0)} time(s) in the autograd graph but by {expected.get(pid, 0)} hooked "
                    "module call(s) (used outside its module, e.g. tied functionally)"
                )
        call.expected = expected
        return problems

    def _on_normalised_grad(self, call, module, roles, saved, grad, shape, bdim, normaliser, version) -> None:
        """``_on_grad`` for a norm whose weight's factor is the normalised input, recomputed now from the kept input
        (unless that input was modified in place after the call: then the call's statistics are poisoned)."""
        if any(role in ("scale", "cscale") and pid not in call.skip for pid, role in roles):
            if saved._version != version:
                call.stale.add(type(module).__name__)
                grad = None
            else:
                raw = saved.movedim(0, bdim) if bdim else saved
                normalised = normaliser(raw)
                saved = normalised.movedim(bdim, 0) if bdim else normalised
        self._on_grad(call, module, roles, saved, grad, shape, bdim)

    def _on_grad(self, call, module, roles, saved, grad, shape, bdim: int = 0) -> None:
        if grad is not None:
            grad = grad.detach().reshape(shape)
            if bdim:  # a sequence-first layer: batch first, as the products expect
                grad = grad.movedim(bdim, 0)
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
        """Reduce one parameter's captured contributions to the call's products (``gradmix.probe.products``); for a
        parameter the call owns (``reroute``) the explicit form's per-group sums also give its weight gradient."""
        contribs = call.contribs.pop(pid, [])
        if not contribs:
            return
        name, p, offset = self._by_id[pid]
        n = call.n
        dtype = self._cdtype(p)
        factor = call.factor
        gt = None
        if session.g_target is not None:
            gt = session.g_target[offset : offset + p.numel()].to(dtype)
        roles = {role for role, *_ in contribs}
        with torch.no_grad():
            if roles <= _SMALL_ROLES:  # small parameters: per-example gradients at once
                per = small_parameter_rows(contribs, n, p.numel(), dtype, factor, self.device)
                self._sink(call, session, p, offset, per, slice(None), gt, 1.0)
                self.layer_forms[name] = "small"
                return
            rows_total, cols = p.shape[0], p.numel() // p.shape[0]
            if "conv" in roles:  # per-example rows of a convolution weight, blocks of output channels
                for block, span in conv_row_blocks(contribs, n, rows_total, cols, dtype, factor, self.chunk_bytes):
                    self._sink(call, session, p, offset, block, span, gt, 1.0)
                self.layer_forms[name] = "conv"
                return
            terms = contribution_terms(contribs, n, rows_total, cols, dtype, self.device)
            owned = pid in call.owned and call.scale is not None and usable_scale(factor) and p.dtype == dtype
            choice = self._cheapest_form(call, terms, rows_total, cols, gt is not None, owned, not session.buffered)
            if not session.buffered and self._use_gram(call, terms, rows_total, cols, gt is not None, owned, choice):
                add_gram_blocks(cast(torch.Tensor, call.m), terms, self._blocks(call), self.device, factor * factor)
                if gt is not None:
                    # allocated when the session has a target
                    add_target_products(cast(torch.Tensor, call.t), terms, gt.view(rows_total, cols), n, factor)
                self.layer_forms[name] = "gram"
                return
            if all(kind == "embed" for kind, *_ in terms):  # only the rows the batch touches: compact them
                budget = explicit_block_bytes(self._block_bytes(), n, call.grouping.rows)
                for block, rows in embedding_row_blocks(terms, n, cols, dtype, self.device, budget):
                    self._sink(call, session, p, offset, block, rows, gt, factor)
                self.layer_forms[name] = "embedding"
                return
            grouping = call.grouping
            block_bytes = self._block_bytes()
            grad = torch.empty(rows_total, cols, dtype=p.dtype, device=p.device) if owned else None
            form = "explicit"
            if choice == "gram":  # the Gram form not taken (accumulation): the cheaper of the other two
                choice = self._cheapest_form(call, terms, rows_total, cols, gt is not None, owned)
            if grouping.multi.numel() and choice == "groups":
                form = "groups"  # ||g_i||^2 of the examples that share a group, then one matmul per group
                norms = example_norms(terms, grouping.multi, n, rows_total, cols, dtype, self.device, block_bytes)
                call.d.index_add_(0, grouping.multi, norms, alpha=factor * factor)
                blocks = group_row_blocks(terms, grouping, rows_total, cols, dtype, self.device, block_bytes)
                for sums, span in blocks:
                    self._fold_rows(call, session, p, offset, sums, span, gt, factor, grouping.row_slot, True)
                    if grad is not None:  # unscaled per-group sums: their sum is G^T A, what autograd computes
                        torch.sum(sums, dim=0, out=grad[span].view(-1))
            else:
                budget = explicit_block_bytes(block_bytes, n, grouping.rows)
                for per, span in weight_row_blocks(terms, n, rows_total, cols, dtype, self.device, budget):
                    column_sums = self._sink(call, session, p, offset, per, span, gt, factor, grad is not None)
                    if grad is not None:  # unscaled: G^T A, what autograd would compute
                        grad[span].view(-1).copy_(cast(torch.Tensor, column_sums))
            if grad is not None:
                call.weight_grads[pid] = grad.view(p.shape)
            self.layer_forms[name] = form + ("+grad" if owned else "")

    def _block_bytes(self) -> int:
        return self.chunk_bytes if self.device.type == "cuda" else min(self.chunk_bytes, _CPU_BLOCK_BYTES)

    def _blocks(self, call: _Call) -> torch.Tensor:
        """The call's example blocks (``products.example_blocks``), computed once per call."""
        if call.blocks is None:
            call.blocks = example_blocks(call.groups_cpu, call.n, self.gram, self.device)
        return call.blocks

    def _use_gram(
        self,
        call: _Call,
        terms: list[Term],
        rows: int,
        cols: int,
        target: bool = False,
        reroute: bool = False,
        choice: str | None = None,
    ) -> bool:
        """Whether the token-level Gram form is the cheapest for this parameter (``products.form_costs``;
        ``reroute``: the other forms' matmuls would replace autograd's weight gradient; ``choice``: the cheapest
        form, when already known)."""
        if choice is None:
            choice = self._cheapest_form(call, terms, rows, cols, target, reroute, gram=True)
        return choice == "gram"

    def _cheapest_form(
        self, call: _Call, terms: list[Term], rows: int, cols: int, target: bool, reroute: bool, gram: bool = False
    ) -> str:
        """The cheapest form (``products.choose_form``) among the explicit and per-group ones, and the Gram form if
        ``gram``."""
        costs = form_costs(
            call.n,
            terms,
            rows,
            cols,
            self._blocks(call),
            target,
            self.chunk_bytes,
            grouping=call.grouping,
            weight_grad_from_blocks=reroute,
            block_bytes=self._block_bytes(),
        )
        embed_only = all(kind == "embed" for kind, *_ in terms)  # compacted rows: no per-group form
        allowed = ("explicit",) + (() if embed_only else ("groups",)) + (("gram",) if gram else ())
        return choose_form(costs, self.chunk_bytes, allowed)

    def _sink(
        self,
        call: _Call,
        session: _Session,
        p: nn.Parameter,
        offset: int,
        per: torch.Tensor,
        rows,
        gt,
        scale: float,
        total: bool = False,
    ) -> torch.Tensor | None:
        """Fold ``scale`` x per-example gradients (n, width) of a block of ``p`` (rows ``rows``) into the call's
        reductions (``products.explicit_reductions``: squared norms, per-group sums; then ``_fold_rows``) - never
        the n x n product of the rows, whose cost rivals the batched matmul's. With ``total`` returns the block's
        unscaled gradient (the column sums of ``per``)."""
        grouping = call.grouping
        square = scale * scale
        every_group = session.buffered or call.group_cross is not None
        norms, sums, slots, column_sums = explicit_reductions(per, grouping, every_group, total)
        norms.mul_(square)
        call.d.add_(norms)
        if sums is per or len(slots) == grouping.rows:  # every group's sum (the rows themselves when all alone)
            self._fold_rows(
                call, session, p, offset, sums, rows, gt, scale, slots, False, norms if sums is per else None
            )
            return column_sums
        # the examples alone are their groups' sums: their norms and target products; the shared groups' from sums
        call.group_q.index_add_(0, grouping.single_slots, norms.index_select(0, grouping.singles))
        if gt is not None:
            targets = (per @ self._target_block(p, gt, rows)).to(torch.float64)
            call.group_t.index_add_(0, grouping.slot, targets, alpha=scale)
        self._fold_rows(call, session, p, offset, sums, rows, None, scale, slots, False)
        return column_sums

    def _target_block(self, p: nn.Parameter, gt: torch.Tensor, rows) -> torch.Tensor:
        """The target gradient's entries of rows ``rows`` of ``p``, flat."""
        if p.dim() <= 1 or rows == slice(None):
            return gt
        return gt.view(p.shape[0], p.numel() // p.shape[0])[rows].reshape(-1)

    def _fold_rows(
        self, call: _Call, session: _Session, p, offset, sums, rows, gt, scale, slots, singles, norms=None
    ) -> None:
        """Fold ``scale`` x per-group sums (row j: group slot ``slots[j]``) of a block of ``p`` into the call's
        per-group reductions (or the session's running sums when accumulating); ``singles``: the first rows are
        ``grouping.singles``' own gradients, whose squared norms are also their ``||g_i||^2``; ``norms``: the
        rows' scaled squared norms when already computed."""
        square = scale * scale
        if gt is not None:
            call.group_t.index_add_(0, slots, (sums @ self._target_block(p, gt, rows)).to(torch.float64), alpha=scale)
        if norms is None:
            norms = torch.linalg.vector_norm(sums, dim=1).to(torch.float64).square_().mul_(square)
        if singles:
            alone = call.grouping.singles
            call.d.index_add_(0, alone, norms[: len(alone)])
        if session.buffered:
            self._add_sums(call, session, p, offset, sums, rows, scale, slots)
        elif call.group_cross is not None:
            cross = (sums @ sums.T).to(torch.float64).mul_(square)
            call.group_cross.index_put_((slots[:, None], slots[None, :]), cross, accumulate=True)
        else:
            call.group_q.index_add_(0, slots, norms)

    def _add_sums(self, call: _Call, session: _Session, p: nn.Parameter, offset: int, sums, rows, scale, slots) -> None:
        """Add ``scale`` x a block's per-group sums to the session's running gradient sums (accumulation)."""
        cols = p.numel() // p.shape[0] if p.dim() > 1 else 1
        for j, slot in enumerate(call.grouping.slot_list(slots)):
            k = call.present[slot]
            buffer = session.sums.get(k)
            if buffer is None:
                buffer = session.sums[k] = torch.zeros(self._layout.numel, dtype=self._dtype, device=self.device)
            view = buffer[offset : offset + p.numel()]
            row = sums[j].to(view.dtype)
            if p.dim() <= 1 or rows == slice(None):
                view.add_(row, alpha=scale)
            elif isinstance(rows, slice):
                view.view(p.shape[0], cols)[rows].add_(row.view(-1, cols), alpha=scale)
            else:
                view.view(p.shape[0], cols).index_add_(0, rows, row.view(-1, cols), alpha=scale)

    def _fold_call(self, call: _Call, session: _Session) -> None:
        """Per-group sums of the call's products: the Gram form's n x n matrix / vectors and the explicit form's
        per-group numbers (block sums never mix a NaN example into another group)."""
        ids = call.groups_cpu.numpy()
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        present, starts = np.unique(sorted_ids, return_index=True)  # == call.present
        if session.g_target is not None:
            t = call.group_t.cpu().numpy()
            if call.t is not None:
                t = t + np.add.reduceat(call.t.cpu().numpy()[order], starts)
            session.t[present] += t
        d = call.d.cpu().numpy()
        if session.buffered:
            session.d[present] += np.add.reduceat(d[order], starts)
            return
        m = cast(torch.Tensor, call.m)[: call.n, : call.n].cpu().numpy()[np.ix_(order, order)]
        blocks = np.add.reduceat(np.add.reduceat(m, starts, axis=0), starts, axis=1)
        if call.group_cross is not None:
            blocks = blocks + call.group_cross.cpu().numpy()
        else:
            blocks[np.diag_indices_from(blocks)] += call.group_q.cpu().numpy()
        session.q[present] += np.diag(blocks)
        session.d[present] += np.add.reduceat(np.diag(m) + d[order], starts)
        if self.gram:
            cross = np.zeros((session.num_groups, session.num_groups))
            cross[np.ix_(present, present)] = blocks
            session.cross = cross

    # -- statistics ---------------------------------------------------------------------------------------------------
    def _finish(self, session: _Session, distributed: bool) -> Measurement:
        local_counts = session.counts.copy()
        if session.buffered:
            rows = [session.loss_sums, session.counts, session.poisoned.astype(np.float64), session.d, session.t]
            loss_sums, counts, poisoned_sums, d, t = all_reduce_rows(rows, self.device, self.process_group, distributed)
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
        sq, var = u_statistics(session.counts, session.q, session.d)
        estimable = session.counts >= 2
        weight = np.where(estimable & ~session.poisoned, session.counts, 0.0)
        rows = [
            session.loss_sums,
            session.counts,
            session.poisoned.astype(np.float64),
            weight,
            weighted(sq, weight),
            weighted(var, weight),
            (estimable & ~session.poisoned & ~(np.isfinite(sq) & np.isfinite(var))).astype(np.float64),
            session.t,
        ]
        loss_sums, counts, poisoned_sums, weight, sq_sum, var_sum, bad, t = all_reduce_rows(
            rows, self.device, self.process_group, distributed
        )
        result = Measurement.from_sums(loss_sums, counts)
        poisoned = (poisoned_sums > 0) | (bad > 0)
        result.grad_sq_norm = ratio(sq_sum, weight, (weight > 0) & ~poisoned)
        result.grad_var = ratio(var_sum, weight, (weight > 0) & ~poisoned)
        if session.g_target is not None:
            result.target_alignment = ratio(t, counts, (counts >= 1) & ~poisoned)
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
        numel = self._layout.numel
        step = max(1, self.chunk_bytes // max(1, present.size * element_size(self._dtype)))
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
        sq, var = u_statistics(counts, q, d)
        sq = np.where(poisoned, np.nan, sq)
        var = np.where(poisoned, np.nan, var)
        result.grad_sq_norm, result.grad_var = sq, var
        if session.g_target is not None:
            result.target_alignment = ratio(t, counts, (counts >= 1) & ~poisoned)
            result.target_loss = float(session.target_loss)
        if self.gram:
            c = cross if cross is not None else np.full((len(counts), len(counts)), np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                gram = c / np.outer(np.maximum(counts, 1), np.maximum(counts, 1))
            result.gram = mask_gram(gram, (counts < 1) | poisoned | ~np.isfinite(np.diag(c)), sq)
        return result

    # -- target gradient (DGA) ----------------------------------------------------------------------------------------
    def _target_gradient(self, target_batch, loss_fn, distributed, run) -> tuple[torch.Tensor, float]:
        """Mean-loss gradient of the target batch over the covered layout (``gradmix.probe.target``)."""
        return target_gradient(self, self._layout, self._dtype, target_batch, loss_fn, run, distributed)
