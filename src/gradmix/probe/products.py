"""The fused probe's per-layer products: per-example gradients of one parameter from the factors its module hooks
captured (Linear activations ``A`` and output gradients ``G``, Embedding ids, normalised LayerNorm/RMSNorm inputs,
convolution inputs), reduced at once to inner products, never stored for the whole model.

Roles of a contribution (see ``gradmix.probe.coverage``): ``linear`` (weight (out, in)), ``linear_t`` (HF Conv1D,
weight (in, out): the same term with the factors swapped), ``bias`` (sum of ``G`` over positions, channels last),
``embed``, ``norm`` / ``rms`` (``G * xhat`` with ``xhat`` recomputed from the saved input), ``scale`` (``G * xhat``
with the normalised input saved by the hook, channels last), ``cscale`` / ``cbias`` (the same over channel
dimension 1: GroupNorm, BatchNorm, convolution bias) and ``conv`` (per-example weight gradients of a convolution,
``conv_row_blocks``).

A parameter's contributions become ``terms``: ``("linear", a (n, T, C), g (n, T, R))`` or ``("embed", ids (n, T),
g (n, T, C))`` (padding rows zeroed), not multiplied by the call's factor (the products are: a scalar on a few
numbers instead of a copy of every output gradient). Three exact forms give what the statistics need (per example
``||g_i||^2``, per group ``||S_k||^2`` or ``<S_k, S_j>``, ``<S_k, g_target>``):

* explicit per-example row blocks (``weight_row_blocks`` / ``embedding_row_blocks``), reduced per block by
  ``explicit_reductions`` (squared norms, per-group sums, column sums);
* per-group sums (``group_row_blocks``: one matmul per group) and the squared norms of the examples that share a
  group (``example_norms``);
* token-level Gram blocks (``add_gram_blocks``), no rows at all.

The first two compute, in their rows, the layer's weight gradient (their column sums): ``gradmix.probe.reroute`` hands
it to autograd, which then skips its own. ``form_costs`` counts each form's extra work over a plain step (matmul
flops, a multiply-add counted as 2 as ``torch.utils.flop_counter`` does, plus memory-bound passes) and its transient
memory; ``choose_form`` takes the cheapest within ``chunk_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad

__all__ = [
    "FORMS",
    "MATMUL_INNER",
    "PASS_FLOPS",
    "FormCost",
    "Grouping",
    "Term",
    "add_gram_blocks",
    "add_target_products",
    "channel_normalised",
    "choose_form",
    "contribution_terms",
    "conv_input",
    "conv_row_blocks",
    "element_size",
    "embedding_row_blocks",
    "example_blocks",
    "example_norms",
    "explicit_block_bytes",
    "explicit_reductions",
    "form_costs",
    "group_row_blocks",
    "normalised",
    "small_parameter_rows",
    "uses_batch_statistics",
    "weight_row_blocks",
]

Term = tuple[str, torch.Tensor, torch.Tensor]
"""(kind, x, g): linear (a (n,T,C), g (n,T,R)); embed (ids (n,T), g (n,T,C), padding zeroed)"""

Contribution = tuple[str, torch.Tensor, torch.Tensor, nn.Module]
"""(role, saved module input, output gradient, module) of one hooked module call"""


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def normalised(module: nn.Module, x: torch.Tensor, role: str) -> torch.Tensor:
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


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a BatchNorm normalises with the statistics of the batch (training mode or no running statistics)."""
    bn = cast(nn.modules.batchnorm._BatchNorm, module)
    return bn.training or bn.running_mean is None or bn.running_var is None or not bn.track_running_stats


def channel_normalised(module: nn.Module, x: torch.Tensor, batch_statistics: bool) -> torch.Tensor:
    """The normalised input a GroupNorm / BatchNorm multiplies by its weight (channel dimension 1), as the module
    normalised it: per example and group (GroupNorm), over the batch (BatchNorm with ``batch_statistics``, as
    ``uses_batch_statistics`` said at its call) or with its running statistics (BatchNorm in eval mode: they do not
    move)."""
    x = x.detach()
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    bn = cast(nn.modules.batchnorm._BatchNorm, module)
    mean, var = bn.running_mean, bn.running_var
    if batch_statistics or mean is None or var is None:
        return F.batch_norm(x, None, None, None, None, True, 0.0, bn.eps)
    return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), None, None, False, 0.0, bn.eps)


def small_parameter_rows(
    contribs: Sequence[Contribution], n: int, numel: int, dtype: torch.dtype, factor: float, device: torch.device
) -> torch.Tensor:
    """(n, numel) per-example gradients of a bias / norm weight, all at once."""
    per = torch.zeros(n, numel, dtype=dtype, device=device)
    for role, saved, grad, module in contribs:
        if role in ("cbias", "cscale"):  # channel dimension 1: (n, C, *spatial)
            gc = grad.to(dtype).reshape(n, numel, -1)
            per.add_(gc.sum(2) if role == "cbias" else (gc * saved.to(dtype).reshape(n, numel, -1)).sum(2))
            continue
        g = grad.to(dtype).reshape(n, -1, numel)
        if role == "bias":
            per.add_(g.sum(1))
        elif role == "scale":
            per.add_((g * saved.to(dtype).reshape(n, -1, numel)).sum(1))
        else:
            per.add_((g * normalised(module, saved, role).to(dtype).reshape(n, -1, numel)).sum(1))
    per.mul_(factor)
    return per


def contribution_terms(
    contribs: Sequence[Contribution],
    n: int,
    rows_total: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[Term]:
    """The ``terms`` of a weight matrix (Linear weight, Embedding table) from its contributions, unscaled: the
    call's factor is applied to the products (a scalar on n x n / per-group numbers), not to a copy of every output
    gradient."""
    terms: list[Term] = []
    for role, saved, grad, module in contribs:
        if role == "linear":
            a = saved.to(dtype).reshape(n, -1, cols)
            terms.append(("linear", a, grad.to(dtype).reshape(n, -1, rows_total)))
        elif role == "linear_t":  # weight (in, out), y = x @ W + b: per-example x^T G, i.e. the linear term swapped
            a = grad.to(dtype).reshape(n, -1, cols)
            terms.append(("linear", a, saved.to(dtype).reshape(n, -1, rows_total)))
        elif role == "embed":
            ids = saved.reshape(n, -1).to(device)
            g = grad.to(dtype).reshape(n, -1, cols)
            padding_idx = cast(nn.Embedding, module).padding_idx  # the embed role is an Embedding's weight
            if padding_idx is not None:
                g = g.masked_fill((ids == padding_idx).unsqueeze(-1), 0.0)
            terms.append(("embed", ids, g))
        else:  # pragma: no cover - roles are fixed by coverage.ROLES
            raise AssertionError(role)
    return terms


def add_target_products(
    t: torch.Tensor, terms: Sequence[Term], target: torch.Tensor, n: int, scale: float = 1.0
) -> None:
    """t_i += scale * <g_i, g_target> = scale * sum_t <G_it, g_target A_it>: one matmul, no per-example rows
    (``target`` is the parameter's (rows, cols) slice of the target gradient)."""
    rows_total, cols = target.shape
    for kind, x, g in terms:
        if kind == "linear":
            proj = (x.reshape(-1, cols) @ target.T).view(n, -1, rows_total)
            t.add_((proj * g).sum(dim=(1, 2)).to(torch.float64), alpha=scale)
        else:
            t.add_((g * target[x]).sum(dim=(1, 2)).to(torch.float64), alpha=scale)


def embedding_row_blocks(
    terms: Sequence[Term], n: int, cols: int, dtype: torch.dtype, device: torch.device, chunk_bytes: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per-example gradients of an embedding table over only the rows the batch touches (compacted), in blocks of
    rows: yields ((n, rows * cols) block, the block's row ids)."""
    uniq, inverse = torch.unique(torch.cat([ids.reshape(-1) for _, ids, _ in terms]), return_inverse=True)
    splits = torch.split(inverse, [ids.numel() for _, ids, _ in terms])
    count = uniq.numel()
    step = max(1, chunk_bytes // max(1, n * cols * element_size(dtype)))
    for start in range(0, count, step):
        stop = min(count, start + step)
        width = stop - start
        block = torch.zeros(n * width, cols, dtype=dtype, device=device)
        for inv, (_, ids, g) in zip(splits, terms):
            ex = torch.arange(n, device=ids.device).repeat_interleave(ids.shape[1])
            keep = (inv >= start) & (inv < stop)
            block.index_add_(0, ex[keep] * width + (inv[keep] - start), g.reshape(-1, cols)[keep])
        yield block.view(n, -1), uniq[start:stop]


def weight_row_blocks(
    terms: Sequence[Term],
    n: int,
    rows_total: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device,
    chunk_bytes: int,
) -> Iterator[tuple[torch.Tensor, slice]]:
    """Per-example gradients of a weight matrix in blocks of rows (one batched matmul per Linear term): yields
    ((n, rows * cols) block, the block's row slice). Every block is a view of one buffer, written in place (no
    allocation, no page faults per block): use a block before asking for the next."""
    step = min(rows_total, max(1, chunk_bytes // max(1, n * cols * element_size(dtype))))
    buffer = torch.empty(n * step * cols, dtype=dtype, device=device)
    for start in range(0, rows_total, step):
        stop = min(rows_total, start + step)
        block = buffer[: n * (stop - start) * cols].view(n, stop - start, cols)
        written = False  # the first batched matmul writes the block (no zero fill), the others add to it
        for kind, x, g in terms:
            if kind == "linear" and x.shape[1] > 1:
                product = g[:, :, start:stop].transpose(1, 2)
                if written:
                    block.baddbmm_(product, x)
                else:
                    torch.bmm(product, x, out=block)
                written = True
                continue
            if not written:
                block.zero_()
                written = True
            if kind == "linear":
                block.add_(g[:, 0, start:stop, None] * x[:, 0, None, :])
            else:
                ex = torch.arange(n, device=x.device).repeat_interleave(x.shape[1])
                ids = x.reshape(-1)
                keep = (ids >= start) & (ids < stop)
                block.view(-1, cols).index_add_(
                    0, ex[keep] * (stop - start) + (ids[keep] - start), g.reshape(-1, cols)[keep]
                )
        yield block.view(n, -1), slice(start, stop)


class Grouping:
    """A call's examples laid out by group for the per-group form: the examples alone in their group first (in batch
    order), then each group of several examples contiguously. Row j of a per-group block (``group_row_blocks``) is
    the sum over group ``present[row_slot[j]]``; its first ``len(singles)`` rows are single examples' gradients."""

    def __init__(self, groups_cpu: torch.Tensor, device: torch.device) -> None:
        present, slot = torch.unique(groups_cpu, return_inverse=True)
        counts = torch.bincount(slot)
        alone = counts[slot] == 1
        members = [torch.nonzero(slot == k).reshape(-1) for k in torch.nonzero(counts > 1).reshape(-1).tolist()]
        singles = torch.nonzero(alone).reshape(-1)
        multi = torch.cat(members) if members else singles.new_zeros(0)
        perm = torch.cat([singles, multi])
        row_of = torch.empty_like(slot)  # example -> its group's row
        row_of[singles] = torch.arange(len(singles))
        spans: list[tuple[int, int]] = []
        start = len(singles)
        for j, m in enumerate(members):
            row_of[m] = len(singles) + j
            spans.append((start, start + len(m)))
            start += len(m)
        self.n = int(groups_cpu.numel())
        self.present: list[int] = present.tolist()
        self.slot = slot.to(device)  # (n,) example -> slot in ``present``
        self.singles = singles.to(device)  # examples alone in their group, batch order
        self.multi = multi.to(device)  # examples of larger groups, in layout order
        self.spans = spans  # layout ranges of the larger groups
        self.perm = perm.to(device)  # layout -> example
        self.identity = bool(torch.equal(perm, torch.arange(self.n)))
        self.row_of = row_of.to(device)
        self.row_slot = torch.cat([slot[singles], slot[[int(m[0]) for m in members]]]).to(device)
        self.single_slots = self.row_slot[: len(singles)]  # slots of the groups of one example
        self.shared_slots = self.row_slot[len(singles) :]  # slots of the groups of several
        self.shared_group = (row_of[multi] - len(singles)).to(device)  # example of ``multi`` -> its shared group
        self._summing: dict[tuple[torch.dtype, bool, bool], torch.Tensor] = {}
        self._lists = {
            id(self.slot): slot.tolist(),
            id(self.row_slot): self.row_slot.tolist() if device.type == "cpu" else self.row_slot.cpu().tolist(),
        }

    @property
    def rows(self) -> int:
        return len(self.present)

    def slot_list(self, slots: torch.Tensor) -> list[int]:
        """``slots`` (``slot`` or ``row_slot``) as a list, without a device sync."""
        known = self._lists.get(id(slots))
        return known if known is not None else slots.tolist()

    def summing(self, dtype: torch.dtype, every: bool = True, total: bool = False) -> torch.Tensor:
        """0/1 matrix whose product with per-example rows gives the per-group sums in row order (one pass): of
        every group, or (``every=False``) of the groups of several examples only; ``total`` puts a row of ones
        (the column sums) first."""
        key = (dtype, every, total)
        matrix = self._summing.get(key)
        if matrix is None:
            device = self.slot.device
            first = 0 if every else len(self.singles)
            count = (self.rows - first) + int(total)
            matrix = torch.zeros(count, self.n, dtype=dtype, device=device)
            members = torch.arange(self.n, device=device) if every else self.multi
            matrix[self.row_of[members] - first + int(total), members] = 1.0
            if total:
                matrix[0] = 1.0
            self._summing[key] = matrix
        return matrix


def group_row_blocks(
    terms: Sequence[Term],
    grouping: Grouping,
    rows_total: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device,
    block_bytes: int,
) -> Iterator[tuple[torch.Tensor, slice]]:
    """Per-group sums of the per-example gradients of a weight matrix, in blocks of rows: yields ((P, rows * cols)
    block in ``grouping``'s row order, the row slice). Single examples by one batched matmul, each larger group by
    one matmul over its tokens (the gradient of the group's sub-batch): together the work of the weight gradient,
    and the per-example rows of a larger group are never materialised."""
    singles = len(grouping.singles)
    ordered = []
    for kind, x, g in terms:
        if not grouping.identity:
            x, g = x.index_select(0, grouping.perm), g.index_select(0, grouping.perm)
        ordered.append((kind, x, g))
    row_of = grouping.row_of.index_select(0, grouping.perm)  # layout position -> row
    count = grouping.rows
    step = max(1, block_bytes // max(1, count * cols * element_size(dtype)))
    for start in range(0, rows_total, step):
        stop = min(rows_total, start + step)
        width = stop - start
        block = torch.empty(count, width, cols, dtype=dtype, device=device)
        written = False  # the first term writes the block (no zero fill), the others add to it
        for kind, x, g in ordered:
            if kind == "embed":
                if not written:
                    block.zero_()
                    written = True
                ex = row_of.repeat_interleave(x.shape[1])
                ids = x.reshape(-1)
                keep = (ids >= start) & (ids < stop)
                block.view(-1, cols).index_add_(0, ex[keep] * width + (ids[keep] - start), g.reshape(-1, cols)[keep])
                continue
            if singles:
                product = g[:singles, :, start:stop].transpose(1, 2)
                if written:
                    block[:singles].baddbmm_(product, x[:singles])
                else:
                    torch.bmm(product, x[:singles], out=block[:singles])
            for j, (a, b) in enumerate(grouping.spans):
                gk = g[a:b, :, start:stop].reshape(-1, width)
                xk = x[a:b].reshape(-1, cols)
                if written:
                    block[singles + j].addmm_(gk.T, xk)
                else:
                    torch.mm(gk.T, xk, out=block[singles + j])
            written = True
        yield block.view(count, -1), slice(start, stop)


def explicit_block_bytes(block_bytes: int, n: int, groups: int) -> int:
    """The budget of one block of per-example rows, so that the block and its per-group sums (and column sums)
    together stay within ``block_bytes`` (``groups`` = n: every example alone, the rows are the sums)."""
    return block_bytes if groups >= n else max(1, block_bytes * n // (n + groups + 1))


def explicit_reductions(
    per: torch.Tensor, grouping: Grouping, every_group: bool = False, total: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(squared norms of the rows, float64 (n,); per-group sums; the group slot of each sum's row; with ``total``
    the column sums of ``per``, i.e. the block's gradient) of a block of per-example rows.

    One pass for the norms; then the sums: none when every group has one example (the rows are the sums: ``per``
    itself); every group's with ``every_group`` or when no example is alone; otherwise only the groups of several
    examples (an example alone is its own group's sum: its norm is that group's). The sums (and the total) take one
    pass: on CPU a matmul with a 0/1 matrix (a row of ones for the total), unless a row is not finite - a NaN would
    leak through the zeros into every group - then ``index_add`` of the rows (gathered when only some groups)."""
    norms = torch.linalg.vector_norm(per, dim=1).to(torch.float64).square_()
    alone = len(grouping.singles)
    if alone == grouping.n:
        return norms, per, grouping.slot, per.sum(dim=0) if total else None
    every = every_group or alone == 0
    if per.device.type == "cpu" and bool(torch.isfinite(norms).all()):
        out = grouping.summing(per.dtype, every, total) @ per
        if total:
            return norms, out[1:], grouping.row_slot if every else grouping.shared_slots, out[0]
        return norms, out, grouping.row_slot if every else grouping.shared_slots, None
    if every:
        sums = torch.zeros(grouping.rows, per.shape[1], dtype=per.dtype, device=per.device)
        sums.index_add_(0, grouping.row_of, per)
        return norms, sums, grouping.row_slot, sums.sum(dim=0) if total else None
    sums = torch.zeros(len(grouping.shared_slots), per.shape[1], dtype=per.dtype, device=per.device)
    sums.index_add_(0, grouping.shared_group, per.index_select(0, grouping.multi))
    return norms, sums, grouping.shared_slots, per.sum(dim=0) if total else None


def example_norms(
    terms: Sequence[Term],
    examples: torch.Tensor,
    n: int,
    rows: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device,
    block_bytes: int,
) -> torch.Tensor:
    """(len(examples),) float64 ``||g_i||^2`` of the given examples: from token-level Gram matrices (``sum_{t,s}
    <a_t, a_s><g_t, g_s>``, ``2 T^2 (rows + cols)`` flops per example) or, where that costs more than the example's
    gradient itself (``2 T rows cols``: long sequences, small layers), from its explicit rows."""
    m = examples.numel()
    if m == 0:
        return torch.zeros(0, dtype=torch.float64, device=device)
    sub = [(kind, x.index_select(0, examples), g.index_select(0, examples)) for kind, x, g in terms]
    tokens = sum(x.shape[1] for _, x, _ in terms)
    if tokens * (rows + cols) <= rows * cols:
        scratch = torch.zeros(m + 1, m + 1, dtype=torch.float64, device=device)
        add_gram_blocks(scratch, sub, torch.arange(m, device=device)[:, None], device)
        return scratch.diagonal()[:m].clone()
    total = torch.zeros(m, dtype=torch.float64, device=device)
    for block, _ in weight_row_blocks(sub, m, rows, cols, dtype, device, block_bytes):
        total.add_(torch.linalg.vector_norm(block, dim=1).to(torch.float64).square_())
    return total


def example_blocks(groups_cpu: torch.Tensor, n: int, gram: bool, device: torch.device) -> torch.Tensor:
    """(B, b_max) example indices of the sets whose pairwise products the single-call statistics need - one row
    per present group, or one row of all examples when the Gramian (cross-group pairs) is asked for - padded
    with n (a zero example)."""
    if gram:
        return torch.arange(n, device=device)[None, :]
    members = [torch.nonzero(groups_cpu == k).reshape(-1) for k in torch.unique(groups_cpu).tolist()]
    width = max(len(m) for m in members)
    index = torch.full((len(members), width), n, dtype=torch.long)
    for row, m in enumerate(members):
        index[row, : len(m)] = m
    return index.to(device)


PASS_FLOPS = 12.0
"""Flop-equivalents of one element of a memory-bound pass (a norm, a sum, a copy, a small-inner-dimension matmul)
in the cost model: one CPU core reads about 12e9 float32 elements/s in such a pass and does about 130e9 flop/s in
the weight gradient's matmul. ``benchmarks/bench_probe_cost.py --layers`` prints the model beside measurements."""

MATMUL_INNER = 16.0
"""A matmul whose inner (summed) dimension is k runs at about k / (k + MATMUL_INNER) of the speed of one with a
large one (the weight gradient's is n T): per-example rows (k = T) cost more than the weight gradient they replace."""

FORMS = ("explicit", "groups", "gram")
"""The per-layer forms of a weight matrix's products: per-example row blocks, per-group sums (plus the squared norms
of the examples that share a group), token-level Gram blocks."""


class FormCost(NamedTuple):
    """What one per-layer form costs beyond a plain step: ``flops`` (matmul flops - a multiply-add counted as 2, the
    unit ``torch.utils.flop_counter`` uses - plus ``PASS_FLOPS`` per element of the memory-bound passes),
    ``matmul`` (the matmul flops alone, as ``FlopCounterMode`` counts them) and ``bytes`` (its transient buffers
    alive at once; the captured factors every form reads are not counted)."""

    flops: float
    matmul: float
    bytes: float


def form_costs(
    n: int,
    terms: Sequence[Term],
    rows: int,
    cols: int,
    blocks: torch.Tensor,
    target: bool,
    chunk_bytes: int,
    *,
    grouping: Grouping | None = None,
    weight_grad_from_blocks: bool = False,
    block_bytes: int | None = None,
) -> dict[str, FormCost]:
    """The cost of each form (``FORMS``) of one parameter's products, in flops and bytes.

    ``blocks``: the call's example blocks (``example_blocks``, the Gram form's); ``grouping``: the call's groups
    (default: the rows of ``blocks``, every example in a group of its own unless a block has several);
    ``weight_grad_from_blocks``: the explicit and per-group forms' matmuls replace autograd's weight gradient
    (``reroute``), so they cost nothing extra; ``block_bytes``: their row blocks (default ``chunk_bytes``)."""
    size = element_size(terms[0][2].dtype)
    count, width = blocks.shape
    block_bytes = chunk_bytes if block_bytes is None else block_bytes
    if grouping is not None:
        groups, shared = grouping.rows, int(grouping.multi.numel())
    else:
        groups = count
        shared = int(sum(int((blocks[j] < n).sum()) for j in range(count) if int((blocks[j] < n).sum()) > 1))
    embed_only = all(kind == "embed" for kind, *_ in terms)
    touched = min(rows, sum(x.numel() for _, x, _ in terms)) if embed_only else rows
    numel = float(touched) * cols
    tokens = sum(x.shape[1] for _, x, _ in terms)
    factors = float(n) * sum(x.shape[1] * ((rows + cols) if kind == "linear" else (cols + 2)) for kind, x, _ in terms)
    weight_grad = sum(2.0 * n * x.shape[1] * rows * cols for kind, x, _ in terms if kind == "linear")
    index_adds = sum(2.0 * n * x.shape[1] * cols for kind, x, _ in terms if kind == "embed")
    paid = 0.0 if weight_grad_from_blocks else weight_grad
    # the matmuls' slowdown over the weight gradient's: inner dimension T per example, n_k T per group
    per_example_slowdown = sum(
        2.0 * n * x.shape[1] * rows * cols * MATMUL_INNER / x.shape[1] for kind, x, _ in terms if kind == "linear"
    )
    group_tokens = float(n) / max(1, groups)
    per_group_slowdown = per_example_slowdown / group_tokens

    def per_group(rows_of_sums: float) -> float:
        """Flop-equivalents of the per-group form's passes over its sums: squared norms, target products, the
        weight gradient as their column sums."""
        work = PASS_FLOPS + (2.0 if target else 0.0) + (PASS_FLOPS if weight_grad_from_blocks else 0.0)
        return rows_of_sums * numel * work

    # explicit (``explicit_reductions``): per-example rows and their squared norms (a pass); when groups are shared,
    # one pass (a 0/1 matmul) for their sums and the column sums; the norms of the shared groups' sums
    step = min(touched, max(1, explicit_block_bytes(block_bytes, n, groups) // max(1, n * cols * size)))
    alone = n - shared
    shared_groups = groups - alone
    if not shared:
        rows_read = n * (2.0 if weight_grad_from_blocks else 1.0)
    else:
        rows_read = 2.0 * n + shared_groups
    targets = 2.0 * (groups if not alone else n) * numel if target else 0.0
    explicit = FormCost(
        paid + per_example_slowdown + index_adds + rows_read * numel * PASS_FLOPS + targets,
        paid,
        float(n + (shared_groups + 1 if shared else 0)) * step * cols * size,
    )

    # per group: the examples in layout order (a copy: read and write), one matmul per group, the shared examples'
    # squared norms (``example_norms``: their factors gathered, then token Gram matrices or explicit rows)
    step = min(touched, max(1, block_bytes // max(1, groups * cols * size)))
    copies = 0.0 if grouping is None or grouping.identity else factors
    shared_factors = factors * shared / max(1, n)
    gram_norms = 2.0 * shared * tokens * tokens * (rows + cols) + 3.0 * shared_factors * 2.0 * PASS_FLOPS
    explicit_norms = (
        2.0 * shared * tokens * rows * cols + shared * numel * PASS_FLOPS + shared_factors * 2.0 * PASS_FLOPS
    )
    by_gram = gram_norms <= explicit_norms
    group_form = FormCost(
        paid
        + per_group_slowdown
        + index_adds
        + copies * 2.0 * PASS_FLOPS
        + min(gram_norms, explicit_norms)
        + per_group(groups),
        paid + 2.0 * shared * tokens * (tokens * (rows + cols) if by_gram else rows * cols),
        (copies + 2.0 * shared_factors) * size + float(groups) * step * cols * size,
    )

    # token-level Gram blocks (autograd keeps its weight gradient)
    matmul = 0.0
    elementwise = 0.0
    gathered = 0.0
    concatenated = 0.0
    largest = 0.0
    for i, (kind1, x1, _) in enumerate(terms):
        length = x1.shape[1]
        factor_width = (rows + cols) if kind1 == "linear" else (cols + 2)  # ids are int64: two float32 columns
        gathered += float(count) * width * length * factor_width * size
        concatenated = max(concatenated, float(n + 1) * length * factor_width * size)
        for kind2, x2, _ in terms[i:]:
            pairs = float(count) * (width * x1.shape[1]) * (width * x2.shape[1])
            largest = max(largest, pairs)
            pair_width = (rows + cols) if kind1 == kind2 == "linear" else (cols + 2)
            matmul += 2.0 * pairs * pair_width
            elementwise += 2.0 * pairs
        if target:
            matmul += 2.0 * n * length * rows * cols if kind1 == "linear" else 0.0
            elementwise += 2.0 * n * length * (rows if kind1 == "linear" else cols)
    elementwise += (4.0 * gathered + 2.0 * concatenated) / size  # copies (read, write); the gather indexes too
    gram = FormCost(
        matmul + elementwise * PASS_FLOPS,
        matmul,
        gathered + concatenated + 2.0 * largest * size + float(count) * width * width * 8,
    )
    return {"explicit": explicit, "groups": group_form, "gram": gram}


def choose_form(costs: Mapping[str, FormCost], chunk_bytes: int, allowed: Sequence[str] = FORMS) -> str:
    """The form of least ``flops`` among the ``allowed`` ones whose transient memory fits ``chunk_bytes`` (the
    explicit form always fits: its row blocks are sized to). Memory is a bound, not a price: within it, time
    decides."""
    fits = [form for form in allowed if form == "explicit" or costs[form].bytes <= chunk_bytes]
    return min(fits, key=lambda form: costs[form].flops)


def add_gram_blocks(
    m: torch.Tensor, terms: Sequence[Term], blocks: torch.Tensor, device: torch.device, scale: float = 1.0
) -> None:
    """M_ij += scale * <g_i, g_j> for i, j in the same block from token-level Gram matrices, all blocks in one
    batched matmul (blocks padded with a zero example): <g_i, g_j> = sum over token pairs of (linear-linear)
    <a, a'><g, g'>, (embed-embed) [id == id'] <g, g'>, (linear-embed) <a, g'> g[id']."""
    count, size = blocks.shape
    flat: list[tuple[str, Any, torch.Tensor, int]] = []
    for kind, x, g in terms:
        length = x.shape[1]
        g_pad = torch.cat([g, g.new_zeros(1, *g.shape[1:])])[blocks].reshape(count, size * length, -1)
        if kind == "linear":
            x_pad = torch.cat([x, x.new_zeros(1, *x.shape[1:])])[blocks].reshape(count, size * length, -1)
        else:
            x_pad = torch.cat([x, x.new_zeros(1, length)])[blocks].reshape(count, size * length)
        flat.append((kind, x_pad, g_pad, length))
    total = torch.zeros(count, size, size, dtype=torch.float64, device=device)
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
    if scale != 1.0:
        total.mul_(scale)
    rows = blocks[:, :, None].expand(-1, -1, size)
    cols = blocks[:, None, :].expand(-1, size, -1)
    m.index_put_((rows.reshape(-1), cols.reshape(-1)), total.reshape(-1), accumulate=True)


# -- convolutions ---------------------------------------------------------------------------------------------------


def conv_input(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(input as the convolution sees it, numeric padding): a padding mode other than zeros and ``"same"`` padding
    (asymmetric for even kernels, as torch pads it) are applied to the input, so the weight gradient needs only
    numbers."""
    conv = cast(nn.modules.conv._ConvNd, module)
    dims = len(conv.kernel_size)
    if conv.padding_mode != "zeros":
        pads = conv._reversed_padding_repeated_twice
        return F.pad(x, pads, mode=conv.padding_mode), (0,) * dims
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x, (0,) * dims
        pads = []
        for d in reversed(range(dims)):  # F.pad lists the last dimension first
            total = conv.dilation[d] * (conv.kernel_size[d] - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * dims
    return x, tuple(int(p) for p in conv.padding)


_WEIGHT_GRAD = {1: nn_grad.conv1d_weight, 2: nn_grad.conv2d_weight, 3: nn_grad.conv3d_weight}


def _conv_rows(
    module: nn.Module, x: torch.Tensor, padding: tuple[int, ...], grad: torch.Tensor, start: int, stop: int, n: int
) -> torch.Tensor:
    """(n, stop - start, cols) per-example gradients of output channels [start, stop) of a convolution weight from its
    (prepared: ``conv_input``) input: one convolution weight-gradient with the batch folded into the groups (example
    i's channels form groups of their own), so no unfolded input is materialised. [start, stop) is aligned to the
    module's groups."""
    conv = cast(nn.modules.conv._ConvNd, module)
    groups = conv.groups
    per_group_out = conv.out_channels // groups
    in_per_group = conv.in_channels // groups
    first, last = (0, 1) if groups == 1 else (start // per_group_out, -(-stop // per_group_out))
    xs = x[:, first * in_per_group : last * in_per_group] if groups > 1 else x
    gs = grad[:, start:stop]
    width = stop - start
    weight_size = (n * width, in_per_group, *conv.kernel_size)
    rows = _WEIGHT_GRAD[len(conv.kernel_size)](
        xs.reshape(1, -1, *xs.shape[2:]),
        weight_size,
        gs.reshape(1, -1, *gs.shape[2:]),
        conv.stride,
        padding,
        conv.dilation,
        n * (last - first),
    )
    return rows.view(n, width, -1)


def conv_row_blocks(
    contribs: Sequence[Contribution],
    n: int,
    rows_total: int,
    cols: int,
    dtype: torch.dtype,
    factor: float,
    chunk_bytes: int,
) -> Iterator[tuple[torch.Tensor, slice]]:
    """Per-example gradients of a convolution weight (rows = output channels) in blocks of rows aligned to the
    convolution groups, transient memory about ``chunk_bytes``: yields ((n, rows * cols) block, the row slice)."""
    unit = 1
    prepared = []
    for _, saved, grad, module in contribs:
        groups = cast(nn.modules.conv._ConvNd, module).groups
        if groups > 1:
            unit = math.lcm(unit, rows_total // groups)
        x, padding = conv_input(module, saved.to(dtype))
        prepared.append((module, x, padding, grad.to(dtype)))
    step = max(1, chunk_bytes // max(1, n * cols * element_size(dtype)))
    step = max(unit, step // unit * unit)
    for start in range(0, rows_total, step):
        stop = min(rows_total, start + step)
        block: torch.Tensor | None = None
        for module, x, padding, grad in prepared:
            part = _conv_rows(module, x, padding, grad, start, stop, n)
            block = part if block is None else block.add_(part)
        assert block is not None  # contribs is never empty
        block.mul_(factor)
        yield block.reshape(n, -1), slice(start, stop)
