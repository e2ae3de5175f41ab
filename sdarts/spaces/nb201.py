"""NAS-Bench-201 search space: the supernet exactly as the benchmark defines it.

Macro (AutoDL `TinyNetworkDarts`): 3x3 stem conv + BN; three stages of N cells at C, 2C, 4C channels,
separated by fixed residual reduction blocks; BN + ReLU, global pooling, linear classifier.
Cell: 4 nodes, node i sums MixedOp_{i<-j}(node j) over j < i (6 edges), 5 candidate ops per edge.

The cell has two implementations that compute the same function, one per module, picked by
`model.impl` through `NB201_CELLS`:
- `classic` (`nb201_classic.ClassicCell`): every op its own module and a weighted sum per edge (the
  reference repos' form, kept as the baseline and the ground truth for the equivalence test);
- `fused` (`nb201_fused.FusedCell`, the default): work that only depends on the source node is done
  once per node instead of once per edge, the convs of all edges leaving a node as one wider conv each.

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
from sdarts.genotype import NB201Genotype, derive_nb201
from sdarts.spaces.functional import checkpoint_cell, dense_grad
from sdarts.spaces.nb201_classic import EDGE_NAMES, ClassicCell
from sdarts.spaces.nb201_fused import FusedCell
from sdarts.spaces.ops import NB201_OPS, ResNetBasicBlock
from sdarts.spaces.supernet import Supernet

__all__ = ["EDGE_NAMES", "NB201_CELLS", "ClassicCell", "FusedCell", "NB201Supernet",
           "build_tiny_network"]

#: `model.impl` -> the NB201 cell class (`ModelConfig.impl` holds the default; `grouped` is DARTS only)
NB201_CELLS: dict[str, type[nn.Module]] = {
    "fused": FusedCell,
    "classic": ClassicCell,
}
SEARCH_CELLS = tuple(NB201_CELLS.values())


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
        if impl not in NB201_CELLS:
            raise ValueError(f"model.impl must be {' or '.join(NB201_CELLS)}, got {impl!r}")
        cell_cls = NB201_CELLS[impl]
        self.impl = impl
        build_tiny_network(self, C, N, num_classes, cell_cls)
        self._finish(ArchParams({"normal": (len(EDGE_NAMES), len(NB201_OPS))}, activation, init, init_std,
                                generator), NB201_OPS, EDGE_NAMES, channels_last, checkpoint_cells)

    def forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x, w, ckpt = self._enter(x, weights)
        w = w["normal"]
        x = self.stem(x)
        for cell in self.cells:
            if not isinstance(cell, SEARCH_CELLS):
                x = cell(x)
            elif ckpt:
                x = checkpoint_cell(cell, cell, x, w)
            else:
                x = cell(x, w)
        x = self.lastact(dense_grad(x))  # under SeedStack: the head's gradient seed-next-to-channels
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def search_cells(self) -> list[nn.Module]:
        return [c for c in self.cells if isinstance(c, SEARCH_CELLS)]

    def genotype(self) -> NB201Genotype:
        exclude = ("none",) if self.arch.activation == "sigmoid" else ()
        return derive_nb201(self.arch.probabilities()["normal"], self.op_names, exclude)
