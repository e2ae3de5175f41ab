"""The NAS-Bench-201 search cell op by op (`model.impl: classic`): the reference form and the ground
truth of the equivalence test. Every op is its own module and each edge the weighted sum of its ops'
outputs (the reference repos' form); `EDGE_NAMES` (the edge order of the architecture weights' rows) and
`NODES` are defined here for both cells.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sdarts.genotype import NB201_EDGES
from sdarts.spaces.ops import NB201_OPS, nb201_op

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
