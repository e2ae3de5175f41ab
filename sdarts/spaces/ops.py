"""Candidate operations of the NAS-Bench-201 and DARTS spaces, defined once.

Both the search supernets (`sdarts.spaces.nb201`, `sdarts.spaces.darts`) and the retrained networks
(`retrain.model`) build their ops from the factories here, so an op means the same thing in search and
in retrain. Names are exactly the papers' names. `affine=False` is the search-time convention (the
architecture weight, not a BN scale, decides an op's contribution); retrain uses `affine=True`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from sdarts.spaces.candidates import DARTS_OPS, NB201_OPS, PARAMETER_FREE  # noqa: F401 - the names, re-exported
from sdarts.spaces.functional import channel_cat


class Zero(nn.Module):
    """`none`: the edge is absent. Returns zeros of the output shape without touching the input graph."""

    def __init__(self, C_in: int, C_out: int, stride: int):
        super().__init__()
        self.C_out, self.stride = C_out, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.stride > 1:
            h, w = (h + self.stride - 1) // self.stride, (w + self.stride - 1) // self.stride
        return x.new_zeros(n, self.C_out, h, w)


def _layer(i: int, what: str) -> property:
    """A read-only name for child `i` of a `_NamedLayers` op, so that code outside the op (the fast
    cells call an op's layers one by one) never indexes it by position. The children keep their
    numeric names: state_dict keys ("1.weight", ...) are those of checkpoints and exported weights."""
    return property(lambda self: self[i], doc=f"layer {i}: {what}")


class _NamedLayers(nn.Sequential):
    """An `nn.Sequential` whose layers also have names (`_layer` properties, defined by each subclass
    next to its layer order). Assigning to a name is refused: `nn.Module.__setattr__` would register a
    new child under it (a new state_dict key) instead of replacing the layer."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(getattr(type(self), name, None), property):
            raise AttributeError(f"{type(self).__name__}.{name} names a layer by position; replace the layer "
                                 f"by its index")
        super().__setattr__(name, value)


class ReLUConvBN(_NamedLayers):
    """ReLU -> Conv -> BN: NB201's `nor_conv_kxk` and DARTS' 1x1 preprocessing."""

    relu = _layer(0, "the ReLU in front")
    conv = _layer(1, "the convolution")
    bn = _layer(2, "the BN")

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int,
                 dilation: int = 1, affine: bool = True, track_running_stats: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(C_out, affine=affine, track_running_stats=track_running_stats),
        )


class DilConv(_NamedLayers):
    """ReLU -> depthwise dilated conv -> pointwise conv -> BN (DARTS `dil_conv_kxk`)."""

    relu = _layer(0, "the ReLU in front")
    depthwise = _layer(1, "the depthwise (dilated, maybe strided) conv")
    pointwise = _layer(2, "the 1x1 conv")
    bn = _layer(3, "the BN")

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel, stride=stride, padding=padding, dilation=dilation,
                      groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class SepConv(_NamedLayers):
    """Two stacked DilConv with dilation 1 (DARTS `sep_conv_kxk`); only the first may stride."""

    first = _layer(0, "the first DilConv (strided in a reduction)")
    second = _layer(1, "the second DilConv")

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            DilConv(C_in, C_in, kernel, stride, padding, 1, affine),
            DilConv(C_in, C_out, kernel, 1, padding, 1, affine),
        )


class FactorizedReduce(nn.Module):
    """Halves the resolution with two offset stride-2 1x1 convs (DARTS' strided `skip_connect`)."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even C_out, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        # The one-pixel offset path; padding at the end changes nothing for even sizes and keeps
        # odd sizes (ImageNet's 7x7 head input) aligned with conv_1's output.
        y = nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(channel_cat([self.conv_1(x), self.conv_2(y)]))


class Pool(nn.Module):
    """3x3 average or max pooling; NB201 pads with count_include_pad=False, DARTS likewise."""

    def __init__(self, kind: str, stride: int):
        super().__init__()
        if kind == "avg":
            self.pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        else:
            self.pool = nn.MaxPool2d(3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


class PoolBN(_NamedLayers):
    """A search-time pool followed by its affine-free BN (DARTS wraps the pools so that their scale
    is comparable to the convs'; the retrained network uses the bare pool)."""

    pool = _layer(0, "the pool")
    bn = _layer(1, "the affine-free BN")

    def __init__(self, pool: nn.Module, C: int):
        super().__init__(pool, nn.BatchNorm2d(C, affine=False))


OpFactory = Callable[[int, int, bool], nn.Module]

#: DARTS space: factory(C, stride, affine) -> module. Search wraps pools with BN(affine=False).
DARTS_FACTORIES: dict[str, OpFactory] = {
    "none": lambda C, stride, affine: Zero(C, C, stride),
    "avg_pool_3x3": lambda C, stride, affine: Pool("avg", stride),
    "max_pool_3x3": lambda C, stride, affine: Pool("max", stride),
    "skip_connect": lambda C, stride, affine: (
        nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine)),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
}


def darts_op(name: str, C: int, stride: int, affine: bool) -> nn.Module:
    """Builds one DARTS-space op; an unknown name is a ValueError naming it."""
    try:
        return DARTS_FACTORIES[name](C, stride, affine)
    except KeyError:
        raise ValueError(f"unknown DARTS op {name!r}; expected one of {', '.join(DARTS_OPS)}") from None


def nb201_op(name: str, C_in: int, C_out: int, stride: int, affine: bool,
             track_running_stats: bool = True) -> nn.Module:
    """Builds one NAS-Bench-201 op exactly as the benchmark defines it (AutoDL `OPS`)."""
    if name == "none":
        return Zero(C_in, C_out, stride)
    if name == "skip_connect":
        if stride == 1 and C_in == C_out:
            return nn.Identity()
        return FactorizedReduce(C_in, C_out, affine=affine)
    if name == "nor_conv_1x1":
        return ReLUConvBN(C_in, C_out, 1, stride, 0, 1, affine, track_running_stats)
    if name == "nor_conv_3x3":
        return ReLUConvBN(C_in, C_out, 3, stride, 1, 1, affine, track_running_stats)
    if name == "avg_pool_3x3":
        if C_in != C_out:
            return nn.Sequential(ReLUConvBN(C_in, C_out, 1, 1, 0, 1, affine, track_running_stats),
                                 Pool("avg", stride))
        return Pool("avg", stride)
    raise ValueError(f"unknown NB201 op {name!r}; expected one of {', '.join(NB201_OPS)}")


class ResNetBasicBlock(nn.Module):
    """NB201's fixed reduction block between stages: two 3x3 ReLUConvBN plus an avg-pool + 1x1 shortcut."""

    def __init__(self, C_in: int, C_out: int, stride: int, affine: bool = True,
                 track_running_stats: bool = True):
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, stride, 1, 1, affine, track_running_stats)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1, 1, affine, track_running_stats)
        if stride == 2:
            self.downsample: nn.Module | None = nn.Sequential(
                nn.AvgPool2d(2, stride=2, padding=0), nn.Conv2d(C_in, C_out, 1, bias=False))
        elif C_in != C_out:
            self.downsample = ReLUConvBN(C_in, C_out, 1, 1, 0, 1, affine, track_running_stats)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return residual + self.conv_b(self.conv_a(x))
