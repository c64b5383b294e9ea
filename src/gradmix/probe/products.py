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
g (n, T, C))`` (padding rows zeroed), already multiplied by the call's factor. Two exact forms give
``M_ij = <g_i, g_j>``: explicit per-example row blocks (``weight_row_blocks`` / ``embedding_row_blocks``, transient
memory bounded by ``chunk_bytes``) or token-level Gram blocks (``add_gram_blocks``); ``gram_form_is_cheaper`` is the
flop model that picks one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad

__all__ = [
    "Term",
    "add_gram_blocks",
    "add_target_products",
    "channel_normalised",
    "contribution_terms",
    "conv_input",
    "conv_row_blocks",
    "element_size",
    "embedding_row_blocks",
    "example_blocks",
    "gram_form_is_cheaper",
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
    factor: float,
    device: torch.device,
) -> list[Term]:
    """The ``terms`` of a weight matrix (Linear weight, Embedding table) from its contributions."""
    terms: list[Term] = []
    for role, saved, grad, module in contribs:
        if role == "linear":
            a = saved.to(dtype).reshape(n, -1, cols)
            terms.append(("linear", a, grad.to(dtype).reshape(n, -1, rows_total) * factor))
        elif role == "linear_t":  # weight (in, out), y = x @ W + b: per-example x^T G, i.e. the linear term swapped
            a = grad.to(dtype).reshape(n, -1, cols)
            terms.append(("linear", a, saved.to(dtype).reshape(n, -1, rows_total) * factor))
        elif role == "embed":
            ids = saved.reshape(n, -1).to(device)
            g = grad.to(dtype).reshape(n, -1, cols) * factor
            padding_idx = cast(nn.Embedding, module).padding_idx  # the embed role is an Embedding's weight
            if padding_idx is not None:
                g = g.masked_fill((ids == padding_idx).unsqueeze(-1), 0.0)
            terms.append(("embed", ids, g))
        else:  # pragma: no cover - roles are fixed by coverage.ROLES
            raise AssertionError(role)
    return terms


def add_target_products(t: torch.Tensor, terms: Sequence[Term], target: torch.Tensor, n: int) -> None:
    """t_i += <g_i, g_target> = sum_t <G_it, g_target A_it>: one matmul, no per-example rows (``target`` is the
    parameter's (rows, cols) slice of the target gradient)."""
    rows_total, cols = target.shape
    for kind, x, g in terms:
        if kind == "linear":
            proj = (x.reshape(-1, cols) @ target.T).view(n, -1, rows_total)
            t.add_((proj * g).sum(dim=(1, 2)).to(torch.float64))
        else:
            t.add_((g * target[x]).sum(dim=(1, 2)).to(torch.float64))


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
    ((n, rows * cols) block, the block's row slice)."""
    step = max(1, chunk_bytes // max(1, n * cols * element_size(dtype)))
    for start in range(0, rows_total, step):
        stop = min(rows_total, start + step)
        rows_block: torch.Tensor | None = None  # the first batched matmul allocates it (no zero fill)
        for kind, x, g in terms:
            if kind == "linear" and x.shape[1] > 1:
                product = g[:, :, start:stop].transpose(1, 2)
                rows_block = torch.bmm(product, x) if rows_block is None else rows_block.baddbmm_(product, x)
                continue
            if rows_block is None:
                rows_block = torch.zeros(n, stop - start, cols, dtype=dtype, device=device)
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
        yield rows_block.reshape(n, -1), slice(start, stop)


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


def gram_form_is_cheaper(
    n: int, terms: Sequence[Term], rows: int, cols: int, blocks: torch.Tensor, target: bool, chunk_bytes: int
) -> bool:
    """Flop model: per-example row blocks (batched matmul + n x n products) vs token-level Gram blocks.

    Everything is counted in flops (a multiply-add is 2): the Gram form used to be counted in multiply-adds against
    the batched matmul in flops, which made it look twice as cheap as it is (it was picked for an 8192 x 256 LM head
    at K = 64: +7% flops and +26% peak memory)."""
    explicit = 0.0
    for kind, x, _ in terms:
        explicit += 2.0 * x.shape[0] * x.shape[1] * rows * cols if kind == "linear" else 0.0
    if all(kind == "embed" for kind, *_ in terms):
        touched = min(rows, sum(x.numel() for _, x, _ in terms))
        explicit += 2.0 * n * n * touched * cols + float(n) * touched * cols
    else:
        explicit += 2.0 * n * n * rows * cols + float(n) * rows * cols
    count, size = blocks.shape
    gram = 0.0
    largest = 0
    for i, (kind1, x1, _) in enumerate(terms):
        for kind2, x2, _ in terms[i:]:
            tokens1, tokens2 = size * x1.shape[1], size * x2.shape[1]
            largest = max(largest, count * tokens1 * tokens2)
            width = (rows + cols) if kind1 == kind2 == "linear" else (cols + 2)
            gram += 2.0 * count * tokens1 * tokens2 * width
    if target:
        explicit += float(n) * rows * cols
        for kind, x, _ in terms:
            gram += (2.0 * rows * cols if kind == "linear" else 2.0 * cols) * x.shape[0] * x.shape[1]
    if 3 * largest * element_size(terms[0][2].dtype) > chunk_bytes:
        return False
    return gram < explicit


def add_gram_blocks(m: torch.Tensor, terms: Sequence[Term], blocks: torch.Tensor, device: torch.device) -> None:
    """M_ij += <g_i, g_j> for i, j in the same block from token-level Gram matrices, all blocks in one batched matmul
    (blocks padded with a zero example): <g_i, g_j> = sum over token pairs of (linear-linear) <a, a'><g, g'>,
    (embed-embed) [id == id'] <g, g'>, (linear-embed) <a, g'> g[id']."""
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
