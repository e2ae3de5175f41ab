"""Functions the fast supernet cells are built from: NB201's `FusedCell` (`nb201_fused`), DARTS'
`FusedSearchCell` and `GroupedSearchCell` (`darts_fused`, `darts_grouped`), and the per-cell
checkpointing and deferred BN counters of every `Supernet`.

Each is the same function as the op-by-op form, computed with fewer passes over memory and fewer
tensors kept for backward (measured in docs/performance.md):
- `weighted_bn`: `w * BN(x)` for an affine-free BN is one `batch_norm` call whose affine weight is `w`
  (BN without affine is `(x - mean) * invstd`, so scaling it by w is exactly BN with gamma = w). The
  weighted output is never stored: BN's backward needs only its input, and it already returns the
  gradient of its weight (which is dL/dw, summed per edge).
- `avg_pool_3x3`: on CPU, `avg_pool2d(count_include_pad=False)` in NCHW is slower than a depthwise
  conv of the same size; a depthwise 3x3 conv with a ones kernel times a constant 1/count map
  computes the same average. NHWC and GPU tensors use the native pooling.
- `count_bn_steps`: the BN step counters of a supernet's cells in one op per forward, not one per BN.
- `weighted_mix`: every outgoing edge's weighted sum of a node's parameter-free outputs (pools,
  identity skip) as one matmul, instead of a scalar multiply and an add per (edge, op).
- `dense_grad`: hands dense gradients to the nodes that feed the cell's output concat.
- `channel_split`, `channel_cat`, `weight_pieces`, `batch_norm`, `max_pool_3x3`: `split`, `cat`, BN and
  max pooling as they are on a lone supernet.

Inside `SeedStack`'s vmap (stacked seeds, `seedops.mapped`) each of these calls its counterpart in
`seedops`, which keeps the seed axis next to the channels (where the convolutions put it).
- `recompute_without_stat_updates` + `checkpoint_cell`: activation checkpointing per cell that
  updates BN running statistics once per step, as without checkpointing (the recomputation in
  backward would otherwise apply the momentum a second time).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sdarts.spaces.seedops import (mapped, seed_avg_pool_3x3, seed_batch_norm, seed_channel_cat, seed_channel_split,
                                   seed_dense_grad, seed_max_pool_3x3, seed_split, seed_weighted_mix)

_INV_COUNT: dict[tuple, torch.Tensor] = {}


def weighted_bn(x: torch.Tensor, bn: nn.BatchNorm2d, scale: torch.Tensor, count: bool = True) -> torch.Tensor:
    """`scale * bn(x)` for an affine-free `bn`; `scale` is per channel ([C]) and differentiable.

    Mirrors `nn.BatchNorm2d.forward` (running statistics, momentum, `num_batches_tracked`), so the
    module's buffers evolve exactly as when the module itself is called; `count=False` leaves the
    `num_batches_tracked` step to `count_bn_steps` (see there).
    """
    if bn.affine:
        raise ValueError("weighted_bn folds the edge weight into an affine-free BN only")
    # contiguous: torch 2.14's CPU channels_last BN backward reads the weight as if it were dense; a
    # stride-0 (expanded) weight gave garbage/NaN input gradients (found with MALLOC_PERTURB_)
    return _batch_norm(x, bn, scale.contiguous(), None, count)


def batch_norm(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """`bn(x)` (the module's own forward, counter included), through `_batch_norm`: under `SeedStack`'s
    vmap that is the folded `seed_batch_norm`, not vmap's own rule for BN (see there)."""
    return _batch_norm(x, bn, bn.weight, bn.bias, count=True)


def bn_count_later(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """`bn(x)`, leaving the `num_batches_tracked` step to `count_bn_steps`."""
    return _batch_norm(x, bn, bn.weight, bn.bias, count=False)


def count_bn_steps(bns: list[nn.modules.batchnorm._BatchNorm]) -> None:
    """Steps the `num_batches_tracked` of BNs called with `count=False` (`weighted_bn`, `bn_count_later`):
    all of a supernet's in one foreach op per training forward instead of one add per BN call. Each
    add is a kernel of its own (the default 8-cell DARTS supernet defers 768 BNs), and the counter only
    matters for `momentum=None` BNs, which count at the call (`_batch_norm`) and must not be passed here."""
    counters = [bn.num_batches_tracked for bn in bns]
    if counters:
        torch._foreach_add_(counters, 1)


def deferred_counters(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BNs below `module` that `count_bn_steps` steps: tracking statistics, with a momentum."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.num_batches_tracked is not None and m.momentum is not None]


def _batch_norm(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, weight: torch.Tensor | None,
                bias: torch.Tensor | None, count: bool) -> torch.Tensor:
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if count or bn.momentum is None:
            bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or bn.running_mean is None
    track = not bn.training or bn.track_running_stats
    rm, rv = (bn.running_mean, bn.running_var) if track else (None, None)
    if mapped(x):
        return seed_batch_norm(x, weight, bias, rm, rv, use_batch_stats, factor, bn.eps)
    return F.batch_norm(x, rm, rv, weight, bias, use_batch_stats, factor, bn.eps)


def max_pool_3x3(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """3x3 max pooling, padding 1 (DARTS' max_pool_3x3); over stacked seeds, `seedops.seed_max_pool_3x3`."""
    return seed_max_pool_3x3(x, stride) if mapped(x) else F.max_pool2d(x, 3, stride, 1)


def _inv_count(h: int, w: int, stride: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """1 / (number of non-padding pixels under each 3x3 window), shape [1, 1, H', W']."""
    key = (h, w, stride, str(device), dtype)
    t = _INV_COUNT.get(key)
    if t is None:
        ones = torch.ones(1, 1, h, w, dtype=torch.float64)
        counts = F.avg_pool2d(ones, 3, stride, 1, count_include_pad=True, divisor_override=1)
        t = _INV_COUNT[key] = (1.0 / counts).to(device=device, dtype=dtype)
    return t


def avg_pool_3x3(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """3x3 average pooling, padding 1, count_include_pad=False (NB201's and DARTS' avg_pool_3x3)."""
    if mapped(x):
        return seed_avg_pool_3x3(x, stride)
    if x.device.type != "cpu" or _is_nhwc(x):  # NHWC pooling kernels are fast; NCHW ones are not
        return F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)
    C = x.shape[1]
    kernel = torch.ones(C, 1, 3, 3, dtype=x.dtype, device=x.device)
    s = F.conv2d(x, kernel, stride=stride, padding=1, groups=C)
    return s * _inv_count(x.shape[2], x.shape[3], stride, x.device, s.dtype)


def weighted_mix(frees: list[torch.Tensor], w: torch.Tensor) -> list[torch.Tensor]:
    """`[sum_o w[m, o] * frees[o] for m in range(k)]`: for each of a node's k outgoing edges, the
    weighted sum of the node's o parameter-free outputs (pools after their BN, the identity skip).

    Why: done term by term that is k*o scalar multiplies and adds forward, and in backward k*o more
    multiplies plus k*o full reductions for the weight gradients: on a GPU each is a kernel, and the
    step is bound by the number of kernels, not by their arithmetic. As one `[k, o] @ [o, N]` matmul
    over the tensors' memory order it is a stack, a matmul, and two matmuls in backward (dL/dw is
    `g @ S^T`). The tensors are stacked in memory order (NHWC stays NHWC), and each result is a view
    in the input's layout. The weights take the tensors' dtype (as a scalar multiply would).
    """
    if mapped(frees[0]):
        return list(seed_weighted_mix(frees, w))
    nhwc = _is_nhwc(frees[0])
    to_mem, from_mem = ((0, 2, 3, 1), (0, 3, 1, 2)) if nhwc else ((0, 1, 2, 3), (0, 1, 2, 3))
    s = torch.stack([f.permute(to_mem) for f in frees])  # [o, *memory-order shape], contiguous
    out = torch.mm(w.to(s.dtype), s.reshape(len(frees), -1)).view(w.shape[0], *s.shape[1:])
    return [t.permute(from_mem) for t in out.unbind(0)]


def channel_split(x: torch.Tensor, size: int | list[int]) -> list[torch.Tensor]:
    """`x.split(size, 1)`; inside `SeedStack`'s vmap, `seedops.seed_channel_split` (see there)."""
    if not mapped(x):
        return list(x.split(size, 1))
    sizes = [size] * (x.shape[1] // size) if isinstance(size, int) else list(size)
    if sum(sizes) != x.shape[1]:
        raise ValueError(f"channel_split: {x.shape[1]} channels do not split into {size}")
    return list(seed_channel_split(x, sizes))


def channel_cat(ts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(ts, 1)`; inside `SeedStack`'s vmap, `seedops.seed_channel_cat` (see there)."""
    return seed_channel_cat(ts) if any(mapped(t) for t in ts) else torch.cat(ts, 1)


def weight_pieces(t: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """`t.split(widths)` of a 1-D tensor; inside `SeedStack`'s vmap each piece is laid out [S, width]
    contiguous (`seedops.seed_split`), so that a BN over S x width folded channels takes it as its
    weight without a copy."""
    return list(seed_split(t, widths)) if mapped(t) else list(t.split(widths))


def _is_nhwc(x: torch.Tensor) -> bool:
    return not mapped(x) and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on a dense gradient in the input's memory format."""

    @staticmethod
    def forward(ctx, x):
        ctx.nhwc = _is_nhwc(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous(memory_format=torch.channels_last if ctx.nhwc else torch.contiguous_format)


def dense_grad(x: torch.Tensor) -> torch.Tensor:
    """For tensors that go into a channel concat: the concat's backward hands each input a strided
    slice of its gradient, and in the fused cell that slice flows straight into BN and conv backward
    (no `w * out` multiply in between to make it dense), where oneDNN then takes a slow path
    (measured: BN backward 1.5x, conv backward 1.15x slower). One copy per node is cheaper."""
    if not torch.is_grad_enabled():
        return x
    if mapped(x):  # a tensor inside vmap does not say whether it requires grad; the rule asks its own
        return seed_dense_grad(x)
    return _DenseGrad.apply(x) if x.requires_grad else x


@contextlib.contextmanager
def recompute_without_stat_updates(module: nn.Module):
    """During a checkpoint's recomputation: BN uses batch statistics but leaves its buffers alone."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def checkpoint_cell(cell: nn.Module, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """`fn(*args)` with only its inputs kept for backward; the cell's BN stats update once per step."""
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), recompute_without_stat_updates(cell)))
