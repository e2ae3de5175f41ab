"""sdarts/spaces/seedops.py: each op over stacked seeds gives, seed by seed, what the lone function gives
(values and gradients, float64), and keeps the seed axis next to the channels in memory (the layout
the stacked convolutions use; a seed-outermost result is the copy these ops exist to avoid)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.func import vmap

from sdarts.spaces import functional as Fn

S, B, C, H, W = 3, 2, 4, 5, 5


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _seed_next_to_channels(out: torch.Tensor) -> bool:
    """vmap returns [S, B, C, ...] as a view of the rule's physical result: seed stride C*H*W and batch
    stride S*C*H*W when the seeds sit next to the channels, the reverse when they are outermost."""
    return out.stride(0) < out.stride(1)


def _same_values_and_grads(stacked, lone, inputs):
    """stacked: [S, ...] results of the vmapped call; lone: the per-seed calls stacked; both as lists."""
    for a, b in zip(stacked, lone):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    gs = [torch.randn_like(a) for a in stacked]
    ga = torch.autograd.grad(stacked, inputs, gs, allow_unused=True)
    gb = torch.autograd.grad(lone, inputs, gs, allow_unused=True)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def _per_seed(fn, *args):
    """fn applied to each seed's slices, results stacked along a new seed axis."""
    outs = [fn(*(a[k] for a in args)) for k in range(S)]
    if isinstance(outs[0], torch.Tensor):
        return [torch.stack(outs)]
    return [torch.stack([o[i] for o in outs]) for i in range(len(outs[0]))]


def _stacked(fn, *args):
    out = vmap(fn)(*args)
    return [out] if isinstance(out, torch.Tensor) else list(out)


def test_weighted_mix_matches_per_seed_and_keeps_seeds_next_to_channels():
    frees, w = [_rand(S, B, C, H, W) for _ in range(3)], _rand(S, 2, 3)
    fn = lambda a, b, c, ww: tuple(Fn.weighted_mix([a, b, c], ww))  # noqa: E731
    stacked = _stacked(fn, *frees, w)
    _same_values_and_grads(stacked, _per_seed(fn, *frees, w), [*frees, w])
    assert all(_seed_next_to_channels(t) for t in stacked)


@pytest.mark.parametrize("op", ["avg", "max"])
@pytest.mark.parametrize("stride", [1, 2])
def test_pools_match_per_seed_and_keep_seeds_next_to_channels(op, stride):
    x = _rand(S, B, C, H, W)
    fn = (lambda t: Fn.avg_pool_3x3(t, stride)) if op == "avg" else (lambda t: Fn.max_pool_3x3(t, stride))
    stacked = _stacked(fn, x)
    _same_values_and_grads(stacked, _per_seed(fn, x), [x])
    assert _seed_next_to_channels(stacked[0])


def test_channel_split_and_cat_match_per_seed_and_keep_seeds_next_to_channels():
    # x as a stacked conv or BN leaves it: [B, S, 3C, H, W] in memory
    x = torch.randn(B, S, 3 * C, H, W, dtype=torch.float64).transpose(0, 1).requires_grad_()
    y = _rand(S, B, C, H, W)
    split = lambda t: tuple(Fn.channel_split(t, C))  # noqa: E731
    stacked = _stacked(split, x)
    _same_values_and_grads(stacked, _per_seed(split, x), [x])
    assert len(stacked) == 3 and all(_seed_next_to_channels(t) for t in stacked)
    seen = {}
    x.register_hook(lambda g: seen.setdefault("g", g))
    sum((t * t).sum() for t in _stacked(split, x)).backward()
    assert seen["g"].transpose(0, 1).is_contiguous()  # the pieces' gradients joined as x is laid out
    uneven = lambda t: tuple(Fn.channel_split(t, [C, 2 * C]))  # noqa: E731
    _same_values_and_grads(_stacked(uneven, x), _per_seed(uneven, x), [x])
    cat = lambda a, b: Fn.channel_cat([a, b])  # noqa: E731
    stacked = _stacked(cat, x, y)
    _same_values_and_grads(stacked, _per_seed(cat, x, y), [x, y])
    assert _seed_next_to_channels(stacked[0])


def test_channel_split_refuses_sizes_that_do_not_add_up():
    with pytest.raises(ValueError, match="do not split"):
        vmap(lambda t: tuple(Fn.channel_split(t, [C, C])))(_rand(S, B, 3 * C, H, W))


def test_weight_pieces_are_contiguous_seed_blocks_with_the_split_values():
    t = _rand(S, 12)
    fn = lambda v: tuple(Fn.weight_pieces(v, [6, 4, 2]))  # noqa: E731
    stacked = _stacked(fn, t)
    _same_values_and_grads(stacked, _per_seed(fn, t), [t])
    # each piece, as BN's folded weight over S x width channels, must be one dense block (a view)
    assert all(p.is_contiguous() for p in stacked)


def test_batch_norm_module_folds_seeds_and_updates_each_seeds_running_stats():
    """A BN module of a SeedStack (`_StackedBatchNorm`, through `functional.batch_norm`): per-seed weight,
    bias and running statistics, the statistics updated in each seed's own slice, as S separate BNs."""
    from sdarts.spaces.seedstack import _StackedBatchNorm
    x = _rand(S, B, C, H, W)
    bns = [nn.BatchNorm2d(C).double() for _ in range(S)]
    with torch.no_grad():
        for k, bn in enumerate(bns):
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.fill_(k), bn.running_var.fill_(k + 1)
    weight = torch.stack([b.weight.detach() for b in bns]).requires_grad_()
    bias = torch.stack([b.bias.detach() for b in bns]).requires_grad_()
    stats = {n: torch.stack([getattr(b, n) for b in bns]).clone() for n in ("running_mean", "running_var")}
    stacked_bn = _StackedBatchNorm(C).double()

    def fn(w, b, stat, xs):
        return torch.func.functional_call(stacked_bn, {"weight": w, "bias": b, **stat}, (xs,), strict=False)

    out = vmap(fn)(weight, bias, stats, x)
    ref = torch.stack([bn(x[k]) for k, bn in enumerate(bns)])  # each BN updates its own statistics
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12) and _seed_next_to_channels(out)
    for n in ("running_mean", "running_var"):
        assert torch.allclose(stats[n], torch.stack([getattr(b, n) for b in bns]), rtol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, weight, bias], g)
    want = torch.autograd.grad(ref, [x] + [b.weight for b in bns] + [b.bias for b in bns], g)
    assert torch.allclose(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(got[1], torch.stack(want[1:1 + S]), rtol=1e-10)
    assert torch.allclose(got[2], torch.stack(want[1 + S:]), rtol=1e-10)


def test_dense_grad_hands_back_a_seed_next_to_channels_gradient():
    """A gradient that vmap's own rules hand back (here a per-image sum's: stride 0 over C, H, W) comes
    out of `dense_grad` dense, laid out [B, S, C, H, W] as the stacked convolutions and BNs read it."""
    x = _rand(S, B, C, H, W)
    seen = {}
    out = vmap(lambda t: Fn.dense_grad(t * 1.0).sum((1, 2, 3)))(x)
    x.register_hook(lambda g: seen.setdefault("g", g))
    scale = torch.arange(1.0, S * B + 1, dtype=torch.float64).view(S, B)
    (out * scale).sum().backward()
    g = seen["g"]
    assert torch.equal(g, scale.view(S, B, 1, 1, 1).expand_as(x))
    assert g.permute(1, 0, 2, 3, 4).is_contiguous()  # [B, S, C, H, W] in memory
