"""DARTS search space: two-input cells with 4 intermediate nodes, 14 edges, 8 candidate ops.

Macro (DARTS `model_search.py`): CIFAR stem (3x3 conv to 3C) or the ImageNet stem of PC-DARTS, which
downsamples 8x with three stride-2 3x3 convs (3 -> 3C/2 -> 3C, then 3C -> 3C); `layers` cells with
reductions at 1/3 and 2/3 of the depth; each cell preprocesses its two inputs to C channels (a
FactorizedReduce when the previous cell reduced), sums MixedOps into 4 nodes and concatenates them.
Pools are followed by an affine-free BN, as in DARTS, so their scale is comparable to the convs'.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdarts.arch import ArchParams
from sdarts.genotype import DARTS_STEPS, DartsGenotype, darts_edges, derive_darts
from sdarts.spaces.ops import DARTS_OPS, FactorizedReduce, ReLUConvBN, darts_op

EDGES = darts_edges()
EDGE_NAMES: tuple[str, ...] = tuple(f"{i}<-{j}" for i, j in EDGES)


class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int, op_names: tuple[str, ...] = DARTS_OPS):
        super().__init__()
        ops = []
        for name in op_names:
            op = darts_op(name, C, stride, affine=False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)
        # `none` contributes exactly zero; skipping it saves an allocation per edge
        self.skip = [k for k, n in enumerate(op_names) if n == "none"]

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(weights[k] * op(x) for k, op in enumerate(self.ops) if k not in self.skip)


class SearchCell(nn.Module):
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


def imagenet_stem(C_stem: int) -> tuple[nn.Module, nn.Module]:
    """PC-DARTS ImageNet stem: 8x downsampling by three stride-2 3x3 convs (3 -> C/2 -> C -> C)."""
    stem0 = nn.Sequential(
        nn.Conv2d(3, C_stem // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C_stem // 2),
        nn.ReLU(inplace=True),
        nn.Conv2d(C_stem // 2, C_stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C_stem))
    stem1 = nn.Sequential(nn.ReLU(inplace=True),
                          nn.Conv2d(C_stem, C_stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C_stem))
    return stem0, stem1


class DartsSupernet(nn.Module):
    space = "darts"

    def __init__(self, C: int = 16, layers: int = 8, num_classes: int = 10, stem: str = "cifar",
                 activation: str = "softmax", init: float = 0.0, init_std: float = 0.0,
                 stem_multiplier: int = 3, generator: torch.Generator | None = None, impl: str = "classic"):
        super().__init__()
        C_curr = stem_multiplier * C
        self.stem_kind = stem
        if stem == "cifar":
            self.stem0 = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
            self.stem1 = None
            reduction_prev = False
        else:
            self.stem0, self.stem1 = imagenet_stem(C_curr)
            reduction_prev = True
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            self.cells.append(SearchCell(C_pp, C_p, C_curr, reduction, reduction_prev))
            reduction_prev = reduction
            C_pp, C_p = C_p, DARTS_STEPS * C_curr
        self.classifier = nn.Linear(C_p, num_classes)
        n = (len(EDGES), len(DARTS_OPS))
        self.arch = ArchParams({"normal": n, "reduce": n}, activation, init, init_std, generator)
        self.op_names = DARTS_OPS
        self.edge_names = EDGE_NAMES

    def forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        w = weights or self.arch.weights()
        s0 = self.stem0(x)
        s1 = s0 if self.stem1 is None else self.stem1(s0)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w["reduce" if cell.reduction else "normal"])
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(s1, 1), 1))

    def search_cells(self) -> list[nn.Module]:
        return list(self.cells)

    def get_alphas(self) -> list[nn.Parameter]:
        return list(self.arch.parameters())

    def get_weights(self) -> list[nn.Parameter]:
        alpha_ids = {id(p) for p in self.get_alphas()}
        return [p for p in self.parameters() if id(p) not in alpha_ids]

    def genotype(self) -> DartsGenotype:
        return derive_darts(self.arch.probabilities(), self.op_names)
