"""The supernet's ops over stacked seeds (`SeedStack`, `seeds: [...]`): custom ops with their own vmap
rules, which the functions of `functional` call on a tensor inside the stack's vmap (`mapped`).

Why: `SeedStack` runs S supernets as one, the seed axis mapped by `torch.func.vmap`. A convolution
whose input and weight both carry the seed axis becomes one grouped convolution over [B, S*C, H, W]:
the seeds sit next to the channels. vmap's own rules for the other ops put the seed axis outermost
([S, B, ...]) in their results or their gradients, so the next convolution or BN copies the tensor
back first: one extra kernel per op, forward or backward. Each rule here folds the seeds into the
channels itself, as the convolution does ([B, S, C, ...] with S and C adjacent in memory), so a
stacked step launches about the kernels of one search (benchmarks/seed_batch.py; docs/performance.md).

Every op's body raises: it only ever runs through its vmap rule, which computes on the physical
tensors (seed axis explicit) with ordinary ATen ops that autograd records as usual.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def mapped(x: torch.Tensor) -> bool:
    """True for a tensor inside `torch.func.vmap` (the seed axis of `SeedStack`): `functional` then
    calls the ops below; its memory layout cannot be queried there."""
    return torch._C._functorch.is_batchedtensor(x)


@torch.library.custom_op("sdarts::seed_batch_norm", mutates_args=())
def seed_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
                    momentum: float, eps: float) -> torch.Tensor:
    """`F.batch_norm` over stacked seeds (`functional._batch_norm` under vmap).

    Why: vmap's own batching rule for batch_norm runs BN with a dummy weight and bias, then applies the
    per-seed weight as separate multiplies forward and backward: 8 more kernels per BN (the NB201 fused
    supernet has ~100 weighted BNs). Folding the seed axis into the channels instead gives one BN over
    S x C channels with the stacked weight as its affine weight: the same arithmetic, per channel, and
    the same kernels as one search."""
    raise RuntimeError("sdarts::seed_batch_norm runs inside SeedStack's vmap only")


@seed_batch_norm.register_vmap
def _seed_batch_norm_folded(info, in_dims, x, weight, bias, running_mean, running_var, training, momentum, eps):
    """The vmap rule: [.., S, C, ..] -> [B, S*C, ...]; running statistics are views of the stacked
    buffers, so BN's in-place update lands in every seed's own slice (hence `mutates_args=()`: the op
    body never runs; this rule mutates the physical buffers exactly as F.batch_norm mutates its own)."""
    xd, wd, bd, md, vd = in_dims[:5]
    S = info.batch_size

    def fold(t, d):
        if t is None:
            return None
        if d is None:
            return t.repeat(S)
        return t.movedim(d, 0).reshape(-1)

    def stats(t, d):
        if t is None:
            return None
        if d is None:
            raise RuntimeError("seed_batch_norm: running statistics must be stacked per seed")
        t = t.movedim(d, 0)
        if not t.is_contiguous():
            raise RuntimeError("seed_batch_norm: stacked running statistics must be contiguous")
        return t.view(-1)

    def bn(folded: torch.Tensor) -> torch.Tensor:
        out = F.batch_norm(folded, stats(running_mean, md), stats(running_var, vd), fold(weight, wd),
                           fold(bias, bd), training, momentum, eps)
        if out.requires_grad:  # BN's CPU backward takes a slow path on a strided gradient (`functional.dense_grad`)
            out.register_hook(_contiguous)
        return out

    return _folded(x, xd, S, bn)


def _contiguous(g: torch.Tensor) -> torch.Tensor:
    return g.contiguous()


@torch.library.custom_op("sdarts::seed_avg_pool_3x3", mutates_args=())
def seed_avg_pool_3x3(x: torch.Tensor, stride: int) -> torch.Tensor:
    """`avg_pool_3x3` over stacked seeds, inside the `SeedStack` vmap only: vmap's own rule moves the
    seed axis into the batch (a copy), and the convolution after it moves it back next to the channels
    (another); pooling is per channel, so the seeds fold into the channels as they are."""
    raise RuntimeError("sdarts::seed_avg_pool_3x3 runs inside SeedStack's vmap only")


@seed_avg_pool_3x3.register_vmap
def _seed_avg_pool_folded(info, in_dims, x, stride):
    return _folded(x, in_dims[0], info.batch_size,
                   lambda t: F.avg_pool2d(t, 3, stride, 1, count_include_pad=False))


@torch.library.custom_op("sdarts::seed_max_pool_3x3", mutates_args=())
def seed_max_pool_3x3(x: torch.Tensor, stride: int) -> torch.Tensor:
    """`max_pool_3x3` over stacked seeds, inside the `SeedStack` vmap only (as `seed_avg_pool_3x3`)."""
    raise RuntimeError("sdarts::seed_max_pool_3x3 runs inside SeedStack's vmap only")


@seed_max_pool_3x3.register_vmap
def _seed_max_pool_folded(info, in_dims, x, stride):
    return _folded(x, in_dims[0], info.batch_size, lambda t: F.max_pool2d(t, 3, stride, 1))


def _folded(x: torch.Tensor, d: int | None, S: int, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A per-channel op (BN, pooling) over stacked seeds, the seeds folded into the channels:
    fn([B, S*C, H, W]) -> [B, S, C, H', W'] (a view), mapped at dim 1."""
    xp = _seeds_at(x, d, S, 1)
    B, C = xp.shape[0], xp.shape[2]
    out = fn(xp.reshape(B, S * C, *xp.shape[3:]))
    return out.view(B, S, C, *out.shape[2:]), 1


@torch.library.custom_op("sdarts::seed_weighted_mix", mutates_args=())
def seed_weighted_mix(frees: list[torch.Tensor], w: torch.Tensor) -> list[torch.Tensor]:
    """`functional.weighted_mix` over stacked seeds: vmap's own rules stack the
    tensors seed-outermost and run one matmul per seed, so each result reaches the convolutions and BNs
    after it (which fold the seeds into the channels) with the seed axis outermost: a copy in front of
    every one of them, and another for its gradient. Here the results keep the seeds next to the
    channels, as the conv and BN rules produce them."""
    raise RuntimeError("sdarts::seed_weighted_mix runs inside SeedStack's vmap only")


@seed_weighted_mix.register_vmap
def _seed_weighted_mix_folded(info, in_dims, frees, w):
    """[B, S, o, M] (the o tensors stacked next to the seeds, M = C*H*W) times each seed's [k, o]
    weights: one batched matmul over (B, S) -> [B, S, k, M]; result m is [B, S, C, H, W]."""
    S = info.batch_size
    fs = [_seeds_at(f, d, S, 1) for f, d in zip(frees, in_dims[0])]
    st = torch.stack(fs, dim=2)  # [B, S, o, C, H, W], one copy, as `weighted_mix`'s stack
    B, shape = st.shape[0], fs[0].shape
    wp = _seeds_at(w, in_dims[1], S, 0).to(st.dtype)  # [S, k, o]
    out = torch.matmul(wp, st.view(B, S, len(fs), -1))  # [B, S, k, M]
    return [t.view(shape) for t in out.unbind(2)], [1] * wp.shape[1]


def _seeds_at(t: torch.Tensor, d: int | None, S: int, at: int) -> torch.Tensor:
    """The physical tensor of a vmapped argument with its seed axis (`d`, None: unmapped) at `at`."""
    return t.unsqueeze(at).expand(*t.shape[:at], S, *t.shape[at:]) if d is None else t.movedim(d, at)


@torch.library.custom_op("sdarts::seed_channel_split", mutates_args=())
def seed_channel_split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """`functional.channel_split` over stacked seeds: vmap's own rule is right forward, but its backward (a concat)
    lays the gradient out seed-outermost, and every BN or conv that folds the seeds into the channels
    copies it first. Here the pieces and their gradient's concat keep the seeds next to the channels."""
    raise RuntimeError("sdarts::seed_channel_split runs inside SeedStack's vmap only")


@seed_channel_split.register_vmap
def _seed_channel_split_rule(info, in_dims, x, sizes):
    parts = _seeds_at(x, in_dims[0], info.batch_size, 1).split(sizes, 2)
    return [p.view(p.shape) for p in parts], [1] * len(parts)


@torch.library.custom_op("sdarts::seed_channel_cat", mutates_args=())
def seed_channel_cat(ts: list[torch.Tensor]) -> torch.Tensor:
    """`functional.channel_cat` over stacked seeds: vmap's own rule concatenates seed-outermost ([S, B, C, ...]),
    and the convolution or BN after it copies it back to the seeds next to the channels."""
    raise RuntimeError("sdarts::seed_channel_cat runs inside SeedStack's vmap only")


@seed_channel_cat.register_vmap
def _seed_channel_cat_rule(info, in_dims, ts):
    return torch.cat([_seeds_at(t, d, info.batch_size, 1) for t, d in zip(ts, in_dims[0])], 2), 1


@torch.library.custom_op("sdarts::seed_split", mutates_args=())
def seed_split(t: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """`functional.weight_pieces` over stacked seeds: see there."""
    raise RuntimeError("sdarts::seed_split runs inside SeedStack's vmap only")


@seed_split.register_vmap
def _seed_split_blocks(info, in_dims, t, widths):
    """[S, W] -> one gather into the pieces' [S, w_p] blocks, end to end (where a copy per piece was
    one kernel each)."""
    tp = _seeds_at(t, in_dims[0], info.batch_size, 0).contiguous()
    S, W = tp.shape
    flat = tp.view(-1).index_select(0, _block_order(S, W, tuple(widths), tp.device))
    return [b.view(S, w) for b, w in zip(flat.split([S * w for w in widths]), widths)], [0] * len(widths)


_BLOCK_ORDER: dict[tuple, torch.Tensor] = {}


def _block_order(S: int, W: int, widths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The index that gathers [S, W] (seed-major) into consecutive [S, w_p] blocks."""
    key = (S, W, widths, str(device))
    if key not in _BLOCK_ORDER:
        if sum(widths) != W:
            raise ValueError(f"weight_pieces: widths {list(widths)} do not add up to {W}")
        grid = torch.arange(S * W).view(S, W)
        _BLOCK_ORDER[key] = torch.cat([b.reshape(-1) for b in grid.split(list(widths), dim=1)]).to(device)
    return _BLOCK_ORDER[key]


@torch.library.custom_op("sdarts::seed_dense_grad", mutates_args=())
def seed_dense_grad(x: torch.Tensor) -> torch.Tensor:
    """`functional.dense_grad` over stacked seeds: the gradient laid out [B, S, C, ...], the seeds next to
    the channels, as the conv and BN rules fold them (see `_seed_dense_grad_rule`)."""
    raise RuntimeError("sdarts::seed_dense_grad runs inside SeedStack's vmap only")


@seed_dense_grad.register_vmap
def _seed_dense_grad_rule(info, in_dims, x):
    """The gradient of a stacked tensor takes the layout of whichever op made it first: the classifier's
    batched matmul makes it seed-outermost ([S, B, ...]), and from there on every BN, pooling and conv
    backward that folds the seeds into the channels would copy it first. One copy here instead."""
    xp = _seeds_at(x, in_dims[0], info.batch_size, 1).contiguous()
    out = xp.view(xp.shape)
    if out.requires_grad:
        out.register_hook(_contiguous)
    return out, 1
