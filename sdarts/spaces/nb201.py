"""NAS-Bench-201 search space: the supernet exactly as the benchmark defines it.

Macro (AutoDL `TinyNetworkDarts`): 3x3 stem conv + BN; three stages of N cells at C, 2C, 4C channels,
separated by fixed residual reduction blocks; BN + ReLU, global pooling, linear classifier.
Cell: 4 nodes, node i sums MixedOp_{i<-j}(node j) over j < i (6 edges), 5 candidate ops per edge.

Two implementations of the cell compute the same function:
- `ClassicCell`: every op its own module and a weighted sum per edge (the reference repos' form,
  kept as the baseline and the ground truth for the equivalence test);
- `FusedCell` (default): work that only depends on the source node is done once per node instead of
  once per edge. All edges leaving node j see the same input, so its ReLU, its pooling and its
  identity are shared, the 1x1 and 3x3 convolutions of all outgoing edges run as one wider
  convolution each (BN is per channel, so one BN over the concatenated channels is the same as one
  BN per edge), each edge's weight is folded into that BN as its affine scale (`functional.weighted_bn`),
  and `none` is never computed (its output is zero). On CPU the pooling is a depthwise conv
  (`functional.avg_pool_3x3`). docs/performance.md has the measurements behind each choice.

Options of the supernet (both default off when constructed directly; `ModelConfig` turns
`channels_last` on): `channels_last` (NHWC activations: on CPU about 1.3x faster convs and pools)
and `checkpoint_cells` (keep only each search cell's input for backward and recompute the rest:
less memory for about one extra forward).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdarts.arch import ArchParams
from sdarts.genotype import NB201_EDGES, NB201Genotype, derive_nb201
from sdarts.spaces.functional import (avg_pool_3x3, checkpoint_cell, deferred_counters, weighted_bn,
                                 weighted_mix)
from sdarts.spaces.ops import NB201_OPS, ResNetBasicBlock, nb201_op
from sdarts.spaces.supernet import Supernet

EDGE_NAMES: tuple[str, ...] = tuple(f"{i}<-{j}" for i, j in NB201_EDGES)
NODES = 4


class MixedOp(nn.Module):
    """All candidate ops of one edge; output is the weight-sum of their outputs."""

    def __init__(self, C: int, op_names: tuple[str, ...] = NB201_OPS, affine: bool = False,
                 track_running_stats: bool = True):
        super().__init__()
        self.ops = nn.ModuleList(nb201_op(n, C, C, 1, affine, track_running_stats) for n in op_names)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class ClassicCell(nn.Module):
    """NB201 search cell, op by op (reference formulation)."""

    def __init__(self, C: int, op_names: tuple[str, ...] = NB201_OPS):
        super().__init__()
        self.edges = nn.ModuleDict({name.replace("<-", "_"): MixedOp(C, op_names) for name in EDGE_NAMES})

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for i in range(1, NODES):
            nodes.append(sum(self.edges[f"{i}_{j}"](nodes[j], weights[EDGE_NAMES.index(f"{i}<-{j}")])
                             for j in range(i)))
        return nodes[-1]


class FusedCell(nn.Module):
    """NB201 search cell with per-source-node shared work (same function as `ClassicCell`).

    Parameters: for source node j with k = 3 - j outgoing edges, `conv3[j]` has k*C output channels
    (edge (j+1)<-j first) and `conv1[j]` likewise; `bn3[j]`/`bn1[j]` are their affine-free BNs.
    """

    def __init__(self, C: int, op_names: tuple[str, ...] = NB201_OPS):
        super().__init__()
        if tuple(op_names) != NB201_OPS:
            raise ValueError("FusedCell implements the standard NB201 op set only")
        self.C = C
        self.conv3 = nn.ModuleList(nn.Conv2d(C, (NODES - 1 - j) * C, 3, padding=1, bias=False) for j in range(NODES - 1))
        self.conv1 = nn.ModuleList(nn.Conv2d(C, (NODES - 1 - j) * C, 1, bias=False) for j in range(NODES - 1))
        self.bn3 = nn.ModuleList(nn.BatchNorm2d((NODES - 1 - j) * C, affine=False) for j in range(NODES - 1))
        self.bn1 = nn.ModuleList(nn.BatchNorm2d((NODES - 1 - j) * C, affine=False) for j in range(NODES - 1))
        self.idx = {name: k for k, name in enumerate(NB201_OPS)}
        self.out_edges = [[EDGE_NAMES.index(f"{i}<-{j}") for i in range(j + 1, NODES)] for j in range(NODES - 1)]
        self.ks = [len(rows) for rows in self.out_edges]
        # device-resident indices (a Python-list index would be a host-to-device copy per step, and not
        # CUDA-graph safe): the edges in source-node order, the convs' columns, and the parameter-free
        # ops' columns in `weighted_mix` order (identity, pooled)
        self.register_buffer("node_major", torch.tensor([e for rows in self.out_edges for e in rows]),
                             persistent=False)
        self.register_buffer("conv_idx", torch.tensor([self.idx["nor_conv_3x3"], self.idx["nor_conv_1x1"]]),
                             persistent=False)
        self.register_buffer("free_idx", torch.tensor([self.idx["skip_connect"], self.idx["avg_pool_3x3"]]),
                             persistent=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        C = self.C
        # Every weight the cell needs is cut once per cell (three `index_select`s and one expanded copy
        # of the conv BN scales, then views), not per node and op: each cut is a kernel forward and one
        # or two backward, ~450 of the NB201 step's kernels when done per node, and with CUDA graphs the
        # GPU step is the kernel count (the CPU step time did not change either way).
        wn = weights.index_select(0, self.node_major)  # [6, ops], node 0's edges first
        widths = [k * C for k in self.ks]
        # [2, 6*C]: the 3x3 and 1x1 convs' BN scales, each edge's weight repeated over its C channels
        scales = wn.index_select(1, self.conv_idx).t().unsqueeze(-1).expand(-1, -1, C).contiguous().view(2, -1)
        scale3, scale1 = scales[0].split(widths), scales[1].split(widths)
        frees = wn.index_select(1, self.free_idx).split(self.ks)
        # acc[i] collects the weighted edge outputs flowing into node i; node j is complete once
        # every source before it was processed
        acc: list[torch.Tensor | None] = [None] * NODES
        node = x
        for j in range(NODES - 1):
            if j > 0:
                node = acc[j]
            r = F.relu(node)
            c3 = weighted_bn(self.conv3[j](r), self.bn3[j], scale3[j], count=False).split(C, 1)
            c1 = weighted_bn(self.conv1[j](r), self.bn1[j], scale1[j], count=False).split(C, 1)
            # every outgoing edge's skip and pool terms, weighted, as one matmul (`weighted_mix`)
            mixed = weighted_mix([node, avg_pool_3x3(node)], frees[j])
            for k, i in enumerate(range(j + 1, NODES)):
                out = mixed[k] + c3[k] + c1[k]
                acc[i] = out if acc[i] is None else acc[i] + out
        return acc[NODES - 1]

    def count_later_bns(self) -> list[nn.BatchNorm2d]:
        """The BNs this cell calls without stepping their counters (`functional.count_bn_steps`)."""
        return deferred_counters(self.bn3) + deferred_counters(self.bn1)

    @torch.no_grad()
    def load_from_classic(self, classic: ClassicCell) -> None:
        """Copies a ClassicCell's conv weights and BN statistics into this layout (for equivalence checks)."""
        for j in range(NODES - 1):
            for k, i in enumerate(range(j + 1, NODES)):
                ops = classic.edges[f"{i}_{j}"].ops
                sl = slice(k * self.C, (k + 1) * self.C)
                for conv, bn, name in ((self.conv3[j], self.bn3[j], "nor_conv_3x3"),
                                       (self.conv1[j], self.bn1[j], "nor_conv_1x1")):
                    seq = ops[NB201_OPS.index(name)]
                    conv.weight[sl].copy_(seq[1].weight)
                    bn.running_mean[sl].copy_(seq[2].running_mean)
                    bn.running_var[sl].copy_(seq[2].running_var)


def build_tiny_network(net: nn.Module, C: int, N: int, num_classes: int, make_cell: Callable[[int], nn.Module]
                       ) -> None:
    """NAS-Bench-201's macro (AutoDL `TinyNetwork`), the one both the supernet and the retrained
    network (`retrain/model.py`) use: sets `net.stem` (3x3 conv + BN), `net.cells` (three stages of N
    `make_cell(channels)` at C, 2C, 4C with a residual reduction block between stages), `net.lastact`
    (BN + ReLU) and `net.classifier`, registered in that order (the state_dict keys and the order of
    initialisation both depend on it)."""
    net.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
    layers: list[nn.Module] = []
    C_prev = C
    for stage, mult in enumerate((1, 2, 4)):
        if stage > 0:
            layers.append(ResNetBasicBlock(C_prev, C * mult, 2))
        layers.extend(make_cell(C * mult) for _ in range(N))
        C_prev = C * mult
    net.cells = nn.ModuleList(layers)
    net.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
    net.classifier = nn.Linear(C_prev, num_classes)


class NB201Supernet(Supernet):
    """The NB201 supernet with its architecture parameters (`self.arch`)."""

    space = "nb201"

    def __init__(self, C: int = 16, N: int = 5, num_classes: int = 10, activation: str = "softmax",
                 init: float = 0.0, init_std: float = 0.0, impl: str = "fused",
                 generator: torch.Generator | None = None, channels_last: bool = False,
                 checkpoint_cells: bool = False):
        super().__init__()
        if impl not in ("fused", "classic"):
            raise ValueError(f"model.impl must be fused or classic, got {impl!r}")
        cell_cls = {"fused": FusedCell, "classic": ClassicCell}[impl]
        self.impl = impl
        build_tiny_network(self, C, N, num_classes, cell_cls)
        self._finish(ArchParams({"normal": (len(EDGE_NAMES), len(NB201_OPS))}, activation, init, init_std,
                                generator), NB201_OPS, EDGE_NAMES, channels_last, checkpoint_cells)

    def forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x, w, ckpt = self._enter(x, weights)
        w = w["normal"]
        x = self.stem(x)
        for cell in self.cells:
            if not isinstance(cell, (ClassicCell, FusedCell)):
                x = cell(x)
            elif ckpt:
                x = checkpoint_cell(cell, cell, x, w)
            else:
                x = cell(x, w)
        x = self.lastact(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def search_cells(self) -> list[nn.Module]:
        return [c for c in self.cells if isinstance(c, (ClassicCell, FusedCell))]

    def genotype(self) -> NB201Genotype:
        exclude = ("none",) if self.arch.activation == "sigmoid" else ()
        return derive_nb201(self.arch.probabilities()["normal"], self.op_names, exclude)
