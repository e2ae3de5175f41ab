"""dL/dp_i per op per edge (the paper's Figure 3): how the loss pulls on each op's activated weight.

p = activate(alpha) is what multiplies each op's output, so dL/dp_i = <dL/dō, o_i(x)> says, for the
current batch and weights, whether more of op i would lower the loss (negative) or raise it
(positive). `none` contributes a zero output, so its dL/dp is exactly 0: under sigmoid (no
competition between ops) nothing but weight decay can move it, which is why the paper sets alpha's
weight decay to 0. Under softmax, alpha's gradient is p_i (dL/dp_i - sum_j p_j dL/dp_j), so the ops
compete through these values.

All search cells of a type share one alpha, so the supernet hands every cell the same weight tensor.
To get the value per cell, a forward pre-hook gives each chosen cell its own leaf copy of the weights
(same values); its `.grad` after backward is that cell's dL/dp. The sum over all cells is the dL/dp
that alpha's gradient is built from.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F


def dl_dp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cells: Iterable[int] | None = None
          ) -> dict[str, torch.Tensor]:
    """dL/dp [edges, ops] (fp32, CPU) of the cross-entropy on (x, y): one entry per chosen cell
    (key = its index among the search cells) and `"total"`, summed over every normal (non-reduction)
    search cell: the dL/dp that the `normal` alpha's gradient is built from.

    The model's parameters receive no `.grad`: only the per-cell leaves are differentiated.
    """
    search_cells = model.search_cells()
    chosen = set(range(len(search_cells)) if cells is None else cells)
    for c in chosen:
        if not 0 <= c < len(search_cells):
            raise ValueError(f"analysis.cells: cell {c} does not exist (the supernet has "
                             f"{len(search_cells)} search cells, 0..{len(search_cells) - 1})")
    leaves: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(idx: int):
        def hook(module, args):
            w = args[-1].detach().float().clone().requires_grad_(True)
            leaves[idx] = w
            return (*args[:-1], w.to(args[-1].dtype))
        return hook

    for idx, cell in enumerate(search_cells):
        handles.append(cell.register_forward_pre_hook(make_hook(idx)))
    try:
        with torch.no_grad():
            weights = model.arch.weights()
        logits = model(x, {k: v.detach() for k, v in weights.items()})
        loss = F.cross_entropy(logits.float(), y)
        order = sorted(leaves)
        grads = torch.autograd.grad(loss, [leaves[i] for i in order], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    per_cell = {i: (torch.zeros_like(leaves[i]) if g is None else g).detach().cpu()
                for i, g in zip(order, grads)}
    normal = [i for i in order if not getattr(search_cells[i], "reduction", False)]
    total = sum((per_cell[i] for i in normal), torch.zeros(per_cell[normal[0]].shape))
    out = {str(i): per_cell[i] for i in sorted(chosen)}
    out["total"] = total
    return out
