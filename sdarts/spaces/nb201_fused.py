"""The NAS-Bench-201 search cell with per-source-node shared work (`model.impl: fused`, the default).

All edges leaving node j see the same input, so its ReLU, its pooling and its identity are shared, the
1x1 and 3x3 convolutions of all outgoing edges run as one wider convolution each (BN is per channel, so
one BN over the concatenated channels is the same as one BN per edge), each edge's weight is folded into
that BN as its affine scale (`functional.weighted_bn`), and `none` is never computed (its output is
zero). On CPU the pooling is a depthwise conv (`functional.avg_pool_3x3`). Same function as
`ClassicCell` (`nb201_classic`); docs/performance.md has the measurements behind each choice.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdarts.spaces.functional import (avg_pool_3x3, channel_split, deferred_counters, weight_pieces, weighted_bn,
                                      weighted_mix)
from sdarts.spaces.nb201_classic import EDGE_NAMES, NODES, ClassicCell
from sdarts.spaces.ops import NB201_OPS


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
        # or two backward, and with CUDA graphs the GPU step is the kernel count (the CPU step time did
        # not change either way).
        wn = weights.index_select(0, self.node_major)  # [6, ops], node 0's edges first
        widths = [k * C for k in self.ks]
        # [2 * 6C]: the 3x3 convs' BN scales, then the 1x1 convs', each edge's weight repeated over its C channels
        scales = wn.index_select(1, self.conv_idx).t().unsqueeze(-1).expand(-1, -1, C).contiguous().view(-1)
        pieces = weight_pieces(scales, widths + widths)  # `split`; seed-blocked under SeedStack
        scale3, scale1 = pieces[:NODES - 1], pieces[NODES - 1:]
        frees = wn.index_select(1, self.free_idx).split(self.ks)
        # acc[i] collects the weighted edge outputs flowing into node i; node j is complete once
        # every source before it was processed
        acc: list[torch.Tensor | None] = [None] * NODES
        node = x
        for j in range(NODES - 1):
            if j > 0:
                node = acc[j]
            r = F.relu(node)
            c3 = channel_split(weighted_bn(self.conv3[j](r), self.bn3[j], scale3[j], count=False), C)
            c1 = channel_split(weighted_bn(self.conv1[j](r), self.bn1[j], scale1[j], count=False), C)
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
                    op = ops[NB201_OPS.index(name)]  # a ReLUConvBN
                    conv.weight[sl].copy_(op.conv.weight)
                    bn.running_mean[sl].copy_(op.bn.running_mean)
                    bn.running_var[sl].copy_(op.bn.running_var)
