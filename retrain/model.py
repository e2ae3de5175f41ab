"""The final networks built from a found genotype: the DARTS macro for CIFAR and ImageNet, and NB201's.

DARTS-space networks follow the DARTS reference implementation (`model.py` of quark0/darts, reused by
P-DARTS and PC-DARTS), so parameter counts and FLOPs match the published tables:
- a stem (CIFAR: one 3x3 conv to 3C; ImageNet: three stride-2 3x3 convs 3 -> C/2 -> C -> C, 8x down),
- `layers` cells, reductions (stride 2, channels doubled) at cells layers//3 and 2*layers//3,
- each cell preprocesses its two inputs (the two previous cells' outputs) to C channels, builds 4
  nodes as the sum of two ops on earlier states, and concatenates the genotype's `concat` nodes,
- drop-path on every op that is not an identity (an identity carries no parameters to regularise and
  dropping it would only add noise), in training only,
- an auxiliary head on the output of cell 2*layers//3 (the second reduction: 8x8 on CIFAR, 7x7 on
  ImageNet at 224), whose logits are only computed in training.

`forward` always returns `(logits, logits_aux)`; `logits_aux` is None in eval or without a head.
Ops come from `sdarts.spaces.ops` (one definition shared with the search), with `affine=True`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdarts.errors import ConfigError
from sdarts.genotype import NB201_EDGES, DartsGenotype, NB201Genotype
from sdarts.spaces.darts import imagenet_stem
from sdarts.spaces.nb201 import build_tiny_network
from sdarts.spaces.ops import FactorizedReduce, ReLUConvBN, darts_op, nb201_op

__all__ = ["AuxiliaryHeadCIFAR", "AuxiliaryHeadImageNet", "Cell", "NB201Network", "NetworkCIFAR",
           "NetworkImageNet", "build_network", "drop_path", "reduction_indices"]


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zeroes whole samples of a path with probability `drop_prob`, rescaling survivors by 1/keep.

    Out of place (the reference does it in place on a tensor autograd may still need)."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


def reduction_indices(layers: int) -> tuple[int, int]:
    """Cells that reduce: at 1/3 and 2/3 of the depth (DARTS macro)."""
    return layers // 3, 2 * layers // 3


class Cell(nn.Module):
    """One cell of a found genotype: two ops per node, summed; nodes in `concat` concatenated."""

    def __init__(self, genotype: DartsGenotype, C_pp: int, C_p: int, C: int, reduction: bool,
                 reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = FactorizedReduce(C_pp, C) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0)
        pairs = genotype.reduce if reduction else genotype.normal
        self.concat = tuple(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.indices = tuple(j for _, j in pairs)
        self.steps = len(pairs) // 2
        self.multiplier = len(self.concat)
        self.ops = nn.ModuleList(darts_op(name, C, 2 if reduction and j < 2 else 1, affine=True)
                                 for name, j in pairs)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.steps):
            hs = []
            for k in (2 * i, 2 * i + 1):
                op = self.ops[k]
                h = op(states[self.indices[k]])
                if self.training and drop_prob > 0.0 and not isinstance(op, nn.Identity):
                    h = drop_path(h, drop_prob)
                hs.append(h)
            states.append(hs[0] + hs[1])
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """Auxiliary classifier on the 8x8 map after the second reduction (DARTS/NASNet)."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),  # its input is also the next cell's input
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),  # 8x8 -> 2x2
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class AuxiliaryHeadImageNet(nn.Module):
    """Auxiliary classifier on the 7x7 map after the second reduction (224x224 input).

    Without a BN after the 768-channel conv: the DARTS reference omitted it by a typo and every
    published ImageNet result (DARTS, P-DARTS, PC-DARTS) was trained that way."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),  # its input is also the next cell's input
            nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False),  # 7x7 -> 2x2
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class _DartsNetwork(nn.Module):
    """Shared body of the CIFAR and ImageNet networks: the cell stack, the head and drop-path."""

    auxiliary_head: nn.Module | None

    def _build_cells(self, genotype: DartsGenotype, C_pp: int, C_p: int, C: int, layers: int,
                     reduction_prev: bool) -> int:
        if not isinstance(genotype, DartsGenotype):
            raise TypeError(f"a DARTS network needs a DARTS genotype, got space {getattr(genotype, 'space', genotype)!r}")
        self.cells = nn.ModuleList()
        self.aux_index = reduction_indices(layers)[1]
        C_curr, C_aux = C, None
        for i in range(layers):
            reduction = i in reduction_indices(layers)
            if reduction:
                C_curr *= 2
            cell = Cell(genotype, C_pp, C_p, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, cell.multiplier * C_curr
            if i == self.aux_index:
                C_aux = C_p
        self.C_aux = C_aux
        return C_p

    def _run_cells(self, s0: torch.Tensor, s1: torch.Tensor):
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        return s1, logits_aux

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s0, s1 = self._stem(x)
        s1, logits_aux = self._run_cells(s0, s1)
        logits = self.classifier(torch.flatten(F.adaptive_avg_pool2d(s1, 1), 1))
        return logits, logits_aux

    def main_parameters(self) -> list[nn.Parameter]:
        """Parameters without the auxiliary head (what the papers count)."""
        aux = {id(p) for p in self.auxiliary_head.parameters()} if self.auxiliary_head is not None else set()
        return [p for p in self.parameters() if id(p) not in aux]


class NetworkCIFAR(_DartsNetwork):
    """DARTS CIFAR network: 3x3 stem to 3C, `layers` cells, global pool, linear classifier."""

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: DartsGenotype,
                 drop_path_prob: float = 0.0, stem_multiplier: int = 3):
        super().__init__()
        self.drop_path_prob = float(drop_path_prob)
        C_stem = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem))
        C_p = self._build_cells(genotype, C_stem, C_stem, C, layers, reduction_prev=False)
        self.auxiliary_head = AuxiliaryHeadCIFAR(self.C_aux, num_classes) if auxiliary else None
        self.classifier = nn.Linear(C_p, num_classes)

    def _stem(self, x):
        s = self.stem(x)
        return s, s


class NetworkImageNet(_DartsNetwork):
    """DARTS ImageNet network (mobile setting): 8x stem (3 -> C/2 -> C -> C), cells, 7x7 pool, linear.

    The global pool is adaptive (the reference's AvgPool2d(7) equals it at 224x224 and also accepts
    other resolutions)."""

    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: DartsGenotype,
                 drop_path_prob: float = 0.0):
        super().__init__()
        self.drop_path_prob = float(drop_path_prob)
        self.stem0, self.stem1 = imagenet_stem(C)
        C_p = self._build_cells(genotype, C, C, C, layers, reduction_prev=True)
        self.auxiliary_head = AuxiliaryHeadImageNet(self.C_aux, num_classes) if auxiliary else None
        self.classifier = nn.Linear(C_p, num_classes)

    def _stem(self, x):
        s0 = self.stem0(x)
        return s0, self.stem1(s0)


class NB201Cell(nn.Module):
    """NB201 inference cell: node i = sum over j < i of op_{i<-j}(node j); `none` edges are skipped."""

    def __init__(self, genotype: NB201Genotype, C: int):
        super().__init__()
        self.edges = nn.ModuleDict()
        for (i, j), name in zip(NB201_EDGES, genotype.ops):
            if name != "none":
                self.edges[f"{i}_{j}"] = nb201_op(name, C, C, 1, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for i in range(1, 4):
            outs = [self.edges[f"{i}_{j}"](nodes[j]) for j in range(i) if f"{i}_{j}" in self.edges]
            nodes.append(sum(outs) if outs else torch.zeros_like(x))
        return nodes[-1]


class NB201Network(nn.Module):
    """NAS-Bench-201's network for one cell (AutoDL `TinyNetwork`): stem, 3 stages of N cells with
    residual reduction blocks between them, BN + ReLU, global pool, linear. `forward` returns
    `(logits, None)` so training code treats it like the DARTS networks (NB201 has no auxiliary head)."""

    def __init__(self, C: int, N: int, genotype: NB201Genotype, num_classes: int):
        super().__init__()
        if not isinstance(genotype, NB201Genotype):
            raise TypeError(f"NB201Network needs an NB201 genotype, got space {getattr(genotype, 'space', genotype)!r}")
        self.drop_path_prob = 0.0  # accepted for a uniform interface; NB201 trains without drop-path
        self.auxiliary_head = None
        build_tiny_network(self, C, N, num_classes, lambda c: NB201Cell(genotype, c))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        x = self.lastact(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)), None

    def main_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())


def build_network(genotype, dataset: str, C: int, layers: int, num_classes: int, auxiliary: bool = False,
                  drop_path_prob: float = 0.0) -> nn.Module:
    """The network for a genotype and dataset: NB201 genotypes give NB201Network (N = `layers` cells
    per stage; the benchmark's is C=16, N=5, `configs/retrain/nb201_cifar10.yaml`; it has no auxiliary
    head, so `auxiliary` is moot), DARTS genotypes give NetworkImageNet for 'imagenet' and NetworkCIFAR
    otherwise. An NB201 cell on ImageNet is refused: its network is the benchmark's 32x32 CIFAR one."""
    if isinstance(genotype, NB201Genotype):
        if dataset != "cifar10":
            raise ConfigError(f"dataset {dataset}: an NB201 cell builds NAS-Bench-201's 32x32 CIFAR network; "
                              f"retrain it on cifar10 (configs/retrain/nb201_cifar10.yaml)")
        return NB201Network(C, layers, genotype, num_classes)
    if dataset == "imagenet":
        return NetworkImageNet(C, num_classes, layers, auxiliary, genotype, drop_path_prob)
    return NetworkCIFAR(C, num_classes, layers, auxiliary, genotype, drop_path_prob)
