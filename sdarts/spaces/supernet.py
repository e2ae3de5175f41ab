"""What every supernet shares, whatever its space: the architecture parameters beside the weights,
the activation memory format, per-cell activation checkpointing and the deferred BN step counters.

A space's supernet builds its stem, cells and classifier, then calls `_finish` with its `ArchParams`;
its `forward` starts with `_enter`, which steps the fast cells' BN counters in one op, picks the edge
weights (the analysis passes its own `weights=`), converts the input to the memory format the
parameters are in and says whether this pass checkpoints its cells.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sdarts.arch import ArchParams
from sdarts.spaces.functional import count_bn_steps


class Supernet(nn.Module):
    space: str
    op_names: tuple[str, ...]
    edge_names: tuple[str, ...]

    def _finish(self, arch: ArchParams, op_names: tuple[str, ...], edge_names: tuple[str, ...],
                channels_last: bool, checkpoint_cells: bool) -> None:
        self.arch = arch
        self.op_names, self.edge_names = op_names, edge_names
        self.channels_last = channels_last
        self.checkpoint_cells = checkpoint_cells
        # BNs whose step counters the fast cells leave to one foreach op per training forward
        # (`functional.count_bn_steps`: buffers stay exactly the classic net's)
        self._count_later = [bn for c in self.cells if hasattr(c, "count_later_bns") for bn in c.count_later_bns()]
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def set_checkpointing(self, on: bool) -> None:
        self.checkpoint_cells = on

    def _enter(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
        """(input in the parameters' memory format, edge weights per cell type, checkpoint cells?)."""
        if self.training:
            count_bn_steps(self._count_later)
        w = weights or self.arch.weights()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, w, self.checkpoint_cells and self.training and torch.is_grad_enabled()

    def get_alphas(self) -> list[nn.Parameter]:
        return list(self.arch.parameters())

    def get_weights(self) -> list[nn.Parameter]:
        alpha_ids = {id(p) for p in self.get_alphas()}
        return [p for p in self.parameters() if id(p) not in alpha_ids]
