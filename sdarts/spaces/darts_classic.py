"""The DARTS search cell op by op (`model.impl: classic`): the reference form and the ground truth.

One `MixedOp` per edge holds every candidate op as its own module and returns the weighted sum of their
outputs, as the reference repos do (DARTS `model_search.py`). The fast cells (`darts_fused`,
`darts_grouped`) compute the same function and are tested against this one; `EDGES` (the edge order of
`SearchCell.edges`, of the architecture weights' rows and of `EDGE_NAMES`) is defined here for all.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sdarts.genotype import DARTS_STEPS, darts_edges
from sdarts.spaces.ops import DARTS_OPS, FactorizedReduce, PoolBN, ReLUConvBN, darts_op

EDGES = darts_edges()
EDGE_NAMES: tuple[str, ...] = tuple(f"{i}<-{j}" for i, j in EDGES)


class MixedOp(nn.Module):
    """All candidate ops of one edge (pools followed by their affine-free BN); the output is the sum of
    their outputs weighted by the edge's architecture weights."""

    def __init__(self, C: int, stride: int, op_names: tuple[str, ...] = DARTS_OPS):
        super().__init__()
        ops = []
        for name in op_names:
            op = darts_op(name, C, stride, affine=False)
            ops.append(PoolBN(op, C) if "pool" in name else op)
        self.ops = nn.ModuleList(ops)
        # `none` contributes exactly zero; skipping it saves an allocation per edge
        self.skip = [k for k, n in enumerate(op_names) if n == "none"]

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(weights[k] * op(x) for k, op in enumerate(self.ops) if k not in self.skip)


class SearchCell(nn.Module):
    """Preprocesses the two inputs to C channels, sums one `MixedOp` per edge into 4 nodes and
    concatenates the nodes."""

    def __init__(self, C_pp: int, C_p: int, C: int, reduction: bool, reduction_prev: bool,
                 op_names: tuple[str, ...] = DARTS_OPS):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = FactorizedReduce(C_pp, C, affine=False) if reduction_prev else \
            ReLUConvBN(C_pp, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(MixedOp(C, 2 if reduction and j < 2 else 1, op_names) for _, j in EDGES)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        e = 0
        for i in range(DARTS_STEPS):
            s = 0
            for j in range(i + 2):
                s = s + self.edges[e](states[j], weights[e])
                e += 1
            states.append(s)
        return torch.cat(states[2:], dim=1)
