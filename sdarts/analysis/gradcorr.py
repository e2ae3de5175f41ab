"""Gradient correlation between the alpha-update batch and the w-update batch (the paper's eq. 8).

What it computes. Take one edge of a cell, its mixed output ō = sum_k p_k o_k(x; w_k) and a parametric
op k on it (NB201: `nor_conv_1x1`, `nor_conv_3x3`). For two batches, A (the batch whose loss gives
alpha's gradient) and W (the batch whose loss updates w), we compute the gradients of the two batch
losses with respect to that op's weights, g_A = dL_A/dw_k and g_W = dL_W/dw_k, at the same weights, and
log their inner product and their cosine:

    dot_k = <g_A, g_W>,        corr_k = <g_A, g_W> / (|g_A| |g_W|)

per op, and per edge over the concatenated weights of the edge's parametric ops. Parameter-free ops
(`none`, `skip_connect`, `avg_pool_3x3`) have no weights and no entry.

Why this quantity (the paper's argument, eq. 6-8). dL/dp_k = <dL/dō, o_k(x)>, and a w-step on batch W
moves w_k by -eta * g_W. To first order the alpha batch's dL_A/dp_k then changes by

    Delta(dL_A/dp_k) ~= -eta / p_k * <g_A, g_W>

so training w makes op k look better to alpha (dL_A/dp_k falls, p_k rises) exactly when the two
batches' weight gradients are positively correlated. Parameter-free ops gain nothing from w-steps.
In single-level search A = W, so the correlation is 1 by construction (dot = |g|^2 >= 0): every w-step
also argues for the parametric ops. In bi-level search A and W are independent batches of two data
halves; if their gradients are uncorrelated the term averages to ~0, the learnable ops "learn noise"
as far as alpha can tell, and the parameter-free ops win: the collapse.

Note on sources: the stored copies of the paper available here gave its abstract and introduction
only, not the body; the formula above is reconstructed from the paper's stated argument (alpha's
gradient is biased because w and alpha are updated on different data alternately) and is documented
as such in docs/results.md. Because the same-step correlation of single-level is 1 by definition,
the hook (`sdarts.analysis.hook`) also logs `prev_w`: the alpha batch of step t against the w batch
of step t-1, i.e. the w-update whose effect the alpha gradient of step t actually sees. That variant
is informative for both strategies.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

Key = tuple[int, str, str]  # (cell index among search cells, edge name "i<-j", op name)


def op_param_slices(cell: nn.Module, edge: str, op: str, op_names: tuple[str, ...],
                    edge_names: tuple[str, ...]) -> list[tuple[torch.Tensor, slice | None]]:
    """The weights of `op` on `edge` of `cell` as (parameter, output-channel slice or None) pairs.

    NB201's FusedCell keeps the convs of all edges leaving node j in one wide conv (edge (j+1)<-j
    first) and the DARTS GroupedSearchCell in grouped convs (its `op_param_slices`), so the op's
    weights are a slice of their output channels; classic and DARTS fused cells have one module per op.
    """
    from sdarts.spaces.darts import GroupedSearchCell
    from sdarts.spaces.nb201 import FusedCell
    if isinstance(cell, GroupedSearchCell):
        return cell.op_param_slices(edge_names.index(edge), op)
    if isinstance(cell, FusedCell):
        i, j = (int(s) for s in edge.split("<-"))
        k = i - j - 1
        sl = slice(k * cell.C, (k + 1) * cell.C)
        if op == "nor_conv_3x3":
            return [(cell.conv3[j].weight, sl)]
        if op == "nor_conv_1x1":
            return [(cell.conv1[j].weight, sl)]
        return []  # none, skip, pool: parameter-free (FusedCell's BNs are affine-free)
    edges = getattr(cell, "edges", None)
    if edges is None:
        raise TypeError(f"cannot locate edge weights in a {type(cell).__name__}")
    mixed = edges[edge.replace("<-", "_")] if isinstance(edges, nn.ModuleDict) else edges[edge_names.index(edge)]
    return [(p, None) for p in mixed.ops[op_names.index(op)].parameters() if p.requires_grad]


def param_map(model: nn.Module, cells: Iterable[int]) -> dict[Key, list[tuple[torch.Tensor, slice | None]]]:
    """Every parametric (cell, edge, op) of the chosen search cells with its weights."""
    search_cells = model.search_cells()
    out = {}
    for c in cells:
        if not 0 <= c < len(search_cells):
            raise ValueError(f"analysis.cells: cell {c} does not exist (the supernet has "
                             f"{len(search_cells)} search cells, 0..{len(search_cells) - 1})")
        for edge in model.edge_names:
            for op in model.op_names:
                ps = op_param_slices(search_cells[c], edge, op, tuple(model.op_names), tuple(model.edge_names))
                if ps:
                    out[(c, edge, op)] = ps
    return out


def weight_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 params: dict[Key, list[tuple[torch.Tensor, slice | None]]]) -> dict[Key, torch.Tensor]:
    """dL/dw_k (flattened, fp32) of the cross-entropy of (x, y) for every key of `params`.

    Uses `torch.autograd.grad`, so nothing accumulates into `.grad` and the search's own gradients
    and optimizer state are untouched.
    """
    unique: list[torch.Tensor] = []
    seen: dict[int, int] = {}
    for ps in params.values():
        for p, _ in ps:
            if id(p) not in seen:
                seen[id(p)] = len(unique)
                unique.append(p)
    logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    grads = torch.autograd.grad(loss, unique, allow_unused=True)
    out = {}
    for key, ps in params.items():
        parts = []
        for p, sl in ps:
            g = grads[seen[id(p)]]
            g = torch.zeros_like(p) if g is None else g
            parts.append((g if sl is None else g[sl]).detach().float().flatten())
        out[key] = torch.cat(parts)
    return out


def _cos(dot: float, na: float, nb: float) -> float | None:
    return None if na == 0.0 or nb == 0.0 else dot / (na * nb)


def correlation(g_alpha: dict[Key, torch.Tensor], g_w: dict[Key, torch.Tensor]) -> dict:
    """Eq. 8 per op and per edge (over the edge's parametric ops), per cell, plus the cell mean.

    Returns {"cells": {cell: {"edges": {edge: {"cos", "dot", "ops": {op: {"cos", "dot"}}}},
    "mean_cos": mean of the edges' cos}}, "mean_cos": mean over cells}. A cosine is None where a
    gradient is exactly zero.
    """
    cells: dict[str, dict] = {}
    by_edge: dict[tuple[int, str], list[Key]] = {}
    for key in g_alpha:
        by_edge.setdefault(key[:2], []).append(key)
    for (c, edge), keys in by_edge.items():
        ops = {}
        for key in keys:
            a, w = g_alpha[key], g_w[key]
            dot = float(a @ w)
            ops[key[2]] = {"cos": _cos(dot, float(a.norm()), float(w.norm())), "dot": dot}
        a = torch.cat([g_alpha[k] for k in keys])
        w = torch.cat([g_w[k] for k in keys])
        dot = float(a @ w)
        cell = cells.setdefault(str(c), {"edges": {}})
        cell["edges"][edge] = {"cos": _cos(dot, float(a.norm()), float(w.norm())), "dot": dot, "ops": ops}
    for cell in cells.values():
        vals = [e["cos"] for e in cell["edges"].values() if e["cos"] is not None]
        cell["mean_cos"] = sum(vals) / len(vals) if vals else None
    means = [c["mean_cos"] for c in cells.values() if c["mean_cos"] is not None]
    return {"cells": cells, "mean_cos": sum(means) / len(means) if means else None}
