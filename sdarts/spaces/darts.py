"""DARTS search space: two-input cells with 4 intermediate nodes, 14 edges, 8 candidate ops.

Macro (DARTS `model_search.py`): CIFAR stem (3x3 conv to 3C) or the ImageNet stem of PC-DARTS, which
downsamples 8x with three stride-2 3x3 convs (3 -> 3C/2 -> 3C, then 3C -> 3C); `layers` cells with
reductions at 1/3 and 2/3 of the depth; each cell preprocesses its two inputs to C channels (a
FactorizedReduce when the previous cell reduced), sums the edges' ops into 4 nodes and concatenates them.
Pools are followed by an affine-free BN, as in DARTS, so their scale is comparable to the convs'.

The cell has three implementations that compute the same function, one per module, picked by
`model.impl` through `DARTS_CELLS`:
- `classic` (`darts_classic.SearchCell`): one `MixedOp` per edge, every op its own module, the weighted
  sum of their outputs (the reference repos' form; the baseline and the equivalence test's ground truth);
- `fused` (`darts_fused.FusedSearchCell`, the default): what only depends on the source node is computed
  once per node for all its outgoing edges (`darts_pernode.PerNodeCell`), and each op's last BN takes
  the edge weight as its scale;
- `grouped` (`darts_grouped.GroupedSearchCell`): as fused, and each conv op runs for all edges of a node
  at once as grouped convs: fewer kernels per step (what bounds a GPU step), not faster on a CPU.
`benchmarks/dispatch_count.py` counts each one's kernels per step; docs/performance.md has the numbers.

Options: `channels_last` (NHWC activations) and `checkpoint_cells` (recompute each cell in backward).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdarts.arch import ArchParams
from sdarts.genotype import DARTS_STEPS, DartsGenotype, derive_darts
from sdarts.spaces.darts_classic import EDGE_NAMES, EDGES, SearchCell
from sdarts.spaces.darts_fused import FusedSearchCell
from sdarts.spaces.darts_grouped import GroupedSearchCell
from sdarts.spaces.functional import checkpoint_cell
from sdarts.spaces.ops import DARTS_OPS
from sdarts.spaces.supernet import Supernet

__all__ = ["DARTS_CELLS", "EDGE_NAMES", "EDGES", "DartsSupernet", "FusedSearchCell", "GroupedSearchCell",
           "SearchCell", "imagenet_stem"]

#: `model.impl` -> the DARTS cell class (`ModelConfig.impl` holds the default)
DARTS_CELLS: dict[str, type[nn.Module]] = {
    "fused": FusedSearchCell,
    "grouped": GroupedSearchCell,
    "classic": SearchCell,
}


def imagenet_stem(C_stem: int) -> tuple[nn.Module, nn.Module]:
    """PC-DARTS ImageNet stem: 8x downsampling by three stride-2 3x3 convs (3 -> C/2 -> C -> C)."""
    stem0 = nn.Sequential(
        nn.Conv2d(3, C_stem // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C_stem // 2),
        nn.ReLU(inplace=True),
        nn.Conv2d(C_stem // 2, C_stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C_stem))
    stem1 = nn.Sequential(nn.ReLU(inplace=True),
                          nn.Conv2d(C_stem, C_stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C_stem))
    return stem0, stem1


class DartsSupernet(Supernet):
    space = "darts"

    def __init__(self, C: int = 16, layers: int = 8, num_classes: int = 10, stem: str = "cifar",
                 activation: str = "softmax", init: float = 0.0, init_std: float = 0.0,
                 stem_multiplier: int = 3, generator: torch.Generator | None = None, impl: str = "fused",
                 channels_last: bool = False, checkpoint_cells: bool = False):
        super().__init__()
        if impl not in DARTS_CELLS:
            raise ValueError(f"model.impl must be one of {', '.join(DARTS_CELLS)}, got {impl!r}")
        cell_cls = DARTS_CELLS[impl]
        self.impl = impl
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
            self.cells.append(cell_cls(C_pp, C_p, C_curr, reduction, reduction_prev))
            reduction_prev = reduction
            C_pp, C_p = C_p, DARTS_STEPS * C_curr
        self.classifier = nn.Linear(C_p, num_classes)
        n = (len(EDGES), len(DARTS_OPS))
        self._finish(ArchParams({"normal": n, "reduce": n}, activation, init, init_std, generator), DARTS_OPS,
                     EDGE_NAMES, channels_last, checkpoint_cells)

    def forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x, w, ckpt = self._enter(x, weights)
        s0 = self.stem0(x)
        s1 = s0 if self.stem1 is None else self.stem1(s0)
        for cell in self.cells:
            cw = w["reduce" if cell.reduction else "normal"]
            s0, s1 = s1, (checkpoint_cell(cell, cell, s0, s1, cw) if ckpt else cell(s0, s1, cw))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(s1, 1), 1))

    def search_cells(self) -> list[nn.Module]:
        return list(self.cells)

    def genotype(self) -> DartsGenotype:
        return derive_darts(self.arch.probabilities(), self.op_names)
