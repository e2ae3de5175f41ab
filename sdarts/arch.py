"""Architecture parameters (alpha): one tensor per cell type, shape [edges, ops].

The single place where alpha becomes edge weights is `activate` (NASLib's hook): softmax over the ops
of an edge (DARTS) or an independent sigmoid per op (Single-DARTS' sigmoid variant, where ops do not
compete, so the `none` op gets no loss gradient and any weight decay alone would move it).
"""
from __future__ import annotations

import math
import re
from typing import Literal

import torch
import torch.nn as nn

Activation = Literal["softmax", "sigmoid"]


def parse_init(value: float | str) -> float:
    """Alpha init as a number, or `-ln N` / `-ln(N)` (so sigmoid starts at 1/(N+1); -ln 7 gives 0.125)."""
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*(-?)\s*ln\s*\(?\s*([0-9.]+)\s*\)?\s*", str(value))
    if not m:
        raise ValueError(f"arch.init must be a number or '-ln N', got {value!r}")
    v = math.log(float(m.group(2)))
    return -v if m.group(1) else v


def activate(alpha: torch.Tensor, activation: Activation) -> torch.Tensor:
    """Edge weights from alpha [edges, ops]: softmax across each edge's ops, or elementwise sigmoid."""
    if activation == "softmax":
        return torch.softmax(alpha, dim=-1)
    if activation == "sigmoid":
        return torch.sigmoid(alpha)
    raise ValueError(f"unknown arch.activation {activation!r}")


class ArchParams(nn.Module):
    """Holds alpha for each cell type (`normal`, and `reduce` in the DARTS space).

    Lives inside the supernet so DeepSpeed reduces its gradients with the weights', but the optimizer
    sees it as its own parameter group (AutoDL's `get_alphas()` / `get_weights()` split).
    """

    def __init__(self, cell_types: dict[str, tuple[int, int]], activation: Activation,
                 init: float = 0.0, init_std: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        self.activation: Activation = activation
        self.alphas = nn.ParameterDict()
        for name, (edges, ops) in cell_types.items():
            a = torch.full((edges, ops), float(init))
            if init_std > 0:
                a += init_std * torch.randn(edges, ops, generator=generator)
            self.alphas[name] = nn.Parameter(a)

    def weights(self) -> dict[str, torch.Tensor]:
        """Activated edge weights, differentiable, one [edges, ops] tensor per cell type."""
        return {k: activate(a, self.activation) for k, a in self.alphas.items()}

    @torch.no_grad()
    def probabilities(self) -> dict[str, torch.Tensor]:
        """Detached fp32 copies of the activated weights (for logging, plots and derivation)."""
        return {k: activate(a.detach().float(), self.activation).cpu() for k, a in self.alphas.items()}
