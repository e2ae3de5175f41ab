"""What the two fast DARTS cells (`darts_fused`, `darts_grouped`) share: `PerNodeCell`, the work done
once per source node, and `weighted_conv`, a conv op with its edge weight folded into its last BN.

All edges leaving a node see the same input, so what only depends on that input is computed once per
node: the ReLU in front of every conv op and of the strided skip (FactorizedReduce), and max/avg pooling
with their affine-free BN (same input, same batch statistics, same output on every edge). The pools and
the identity skip are weighted for all outgoing edges by one matmul (`functional.weighted_mix`); `none`
is never computed (its output is zero).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdarts.genotype import DARTS_STEPS
from sdarts.spaces.darts_classic import EDGES, SearchCell
from sdarts.spaces.functional import (avg_pool_3x3, bn_count_later, deferred_counters, max_pool_3x3, weighted_bn,
                                      weighted_mix)
from sdarts.spaces.ops import DARTS_OPS, DilConv, FactorizedReduce, ReLUConvBN, SepConv

#: the parametric ops whose last BN takes the edge weight as its scale (`weighted_conv`)
CONV_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


def weighted_conv(op: SepConv | DilConv, r: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`scale * op(x)` for a DARTS conv op given `r` = relu(x) (the op's leading ReLU, shared per node),
    its last BN scaled by `scale` (`weighted_bn`; [C], or [kC] for a `side_by_side` op on the input
    repeated k times)."""
    h = r
    if isinstance(op, SepConv):
        first, op = op.first, op.second
        h = F.relu(bn_count_later(first.pointwise(first.depthwise(h)), first.bn))
    return weighted_bn(op.pointwise(op.depthwise(h)), op.bn, scale, count=False)


class PerNodeCell(nn.Module):
    """What the two fast DARTS cells share: op-name checks, the inputs' preprocessing, which edges leave
    each source node, the pools' BN per node and the scalar edge weights (pools, identity skip).

    Edge weights are cut once per cell; index buffers keep the cut on the device (a Python-list index
    would be a host-to-device copy per step, and not CUDA-graph safe).
    """

    def __init__(self, C_pp: int, C_p: int, C: int, reduction: bool, reduction_prev: bool,
                 op_names: tuple[str, ...]):
        super().__init__()
        unknown = [n for n in op_names if n not in DARTS_OPS]
        if unknown:
            raise ValueError(f"unknown DARTS op {unknown[0]!r}; expected one of {', '.join(DARTS_OPS)}")
        self.reduction = reduction
        self.C = C
        self.op_names = tuple(op_names)
        self.preprocess0 = FactorizedReduce(C_pp, C, affine=False) if reduction_prev else \
            ReLUConvBN(C_pp, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0, affine=False)
        sources = range(DARTS_STEPS + 1)  # node 5 (the last) feeds no edge
        self.out_edges = [[e for e, (_, j) in enumerate(EDGES) if j == src] for src in sources]
        # one affine-free BN per pool kind per source node, shared by its outgoing edges
        self.pool_bn = nn.ModuleList(
            nn.ModuleDict({n: nn.BatchNorm2d(C, affine=False) for n in op_names if "pool" in n}) for _ in sources)
        self.k = {n: k for k, n in enumerate(op_names)}
        # the parameter-free ops weighted by a scalar per edge (`weighted_mix`): pools and the identity
        # skip (stride 1); a strided skip is a FactorizedReduce, parametric
        self.free_names = [n for n in self.op_names if "pool" in n or n == "skip_connect"]
        self.ks = [len(es) for es in self.out_edges]
        self.register_buffer("node_major", torch.tensor([e for es in self.out_edges for e in es]), persistent=False)
        self.register_buffer("free_idx", torch.tensor([self.k[n] for n in self.free_names], dtype=torch.long),
                             persistent=False)
        self.register_buffer("pool_cols", torch.tensor([i for i, n in enumerate(self.free_names) if "pool" in n],
                                                       dtype=torch.long), persistent=False)

    def count_later_bns(self) -> list[nn.BatchNorm2d]:
        """The BNs this cell calls without stepping their counters (the supernet steps them all at once:
        `functional.count_bn_steps`): all but the preprocessing modules', which are called as modules."""
        own = {id(m) for p in (self.preprocess0, self.preprocess1) for m in p.modules()}
        return [bn for bn in deferred_counters(self) if id(bn) not in own]

    def _stride(self, j: int) -> int:
        return 2 if self.reduction and j < 2 else 1

    def _free_weights(self, node_major: torch.Tensor) -> list[torch.Tensor]:
        """Per source node j, the [k_j, o_j] weights of its outgoing edges (rows, in `out_edges` order)
        on its parameter-free ops (columns, in `_free_mix` order), from the cell's weights in node-major
        edge order (`weights.index_select(0, self.node_major)`): cut once per cell."""
        rows = list(node_major.index_select(1, self.free_idx).split(self.ks))
        if "skip_connect" in self.k and self.reduction:  # strided nodes: the pools only
            for j in range(2):
                rows[j] = rows[j].index_select(1, self.pool_cols)
        return rows

    def _free_mix(self, j: int, x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor] | None:
        """Per outgoing edge of node j, its parameter-free ops weighted by `w` (`_free_weights`[j]) and
        summed (`weighted_mix`); None when the op set has none. The pools + their BN are computed once
        per node for all its edges (same input, same batch statistics); the identity only at stride 1."""
        stride, frees = self._stride(j), []
        for n in self.free_names:
            if n == "max_pool_3x3":
                frees.append(bn_count_later(max_pool_3x3(x, stride), self.pool_bn[j][n]))
            elif n == "avg_pool_3x3":
                frees.append(bn_count_later(avg_pool_3x3(x, stride), self.pool_bn[j][n]))
            elif stride == 1:
                frees.append(x)
        return weighted_mix(frees, w) if frees else None

    @staticmethod
    def _strided_skip_paths(fr: FactorizedReduce, r: torch.Tensor, shifted: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """FactorizedReduce's two paths on the ReLU'd input `r`, before their concat and BN. The offset
        path conv_2(pad(r[1:, 1:])) with a stride-2 1x1 conv reads r[2a+1, 2b+1], zero past the edge:
        the same as a 1x1 conv of `shifted` = r[:, :, 1::2, 1::2] (cut once per node by the caller),
        padded at the end for odd sizes."""
        a = fr.conv_1(r)
        b = F.conv2d(shifted, fr.conv_2.weight)
        if b.shape[-2:] != a.shape[-2:]:  # odd input size: the offset path lacks the last row/column
            b = F.pad(b, (0, a.shape[-1] - b.shape[-1], 0, a.shape[-2] - b.shape[-2]))
        return a, b

    @torch.no_grad()
    def load_from_classic(self, classic: SearchCell) -> None:
        """Copies a `SearchCell`'s weights and BN statistics into this layout (for equivalence checks).

        Pool BNs: the classic cell has one per edge; all edges leaving node j normalise the same
        tensor, so their statistics agree after the same steps; the first outgoing edge's are taken.
        """
        self.preprocess0.load_state_dict(classic.preprocess0.state_dict())
        self.preprocess1.load_state_dict(classic.preprocess1.state_dict())
        self._load_ops_from_classic(classic)
        for j, out_edges in enumerate(self.out_edges):
            for name, bn in self.pool_bn[j].items():
                bn.load_state_dict(classic.edges[out_edges[0]].ops[self.k[name]].bn.state_dict())

    def _load_ops_from_classic(self, classic: SearchCell) -> None:
        raise NotImplementedError
