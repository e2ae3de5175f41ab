"""The DARTS search cell with per-source-node shared work (`model.impl: fused`, the default).

As `PerNodeCell` (`darts_pernode`): the ReLU, the pools and their BN once per source node, the pools
and the identity skip weighted for all outgoing edges by one matmul. The conv ops and the strided skip
stay one module per edge, the same modules as `MixedOp`'s at the same positions (`edges[e].ops[k]`),
and each one's last BN takes the edge weight as its affine scale (`functional.weighted_bn`), so
weighted outputs are never stored. Same function as `SearchCell` (`darts_classic`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdarts.genotype import DARTS_STEPS
from sdarts.spaces.darts_classic import EDGES, SearchCell
from sdarts.spaces.darts_pernode import CONV_OPS, PerNodeCell, weighted_conv
from sdarts.spaces.functional import channel_cat, dense_grad, weight_pieces, weighted_bn
from sdarts.spaces.ops import DARTS_OPS, FactorizedReduce, darts_op


class FusedEdge(nn.Module):
    """The per-edge (parametric) ops of one edge, at their `op_names` positions.

    Parameter-free ops (none, pools, the identity skip) are computed per source node by
    `FusedSearchCell`; their positions hold an `nn.Identity` placeholder so that `ops[k]` indexes
    the same op as in `MixedOp` (analysis code reads an op's weights as `edges[e].ops[k]`).
    """

    def __init__(self, C: int, stride: int, op_names: tuple[str, ...]):
        super().__init__()
        self.ops = nn.ModuleList(
            darts_op(n, C, stride, affine=False) if n in CONV_OPS or (n == "skip_connect" and stride > 1)
            else nn.Identity() for n in op_names)


class FusedSearchCell(PerNodeCell):
    """The DARTS search cell with per-source-node shared work (same function as `SearchCell`)."""

    def __init__(self, C_pp: int, C_p: int, C: int, reduction: bool, reduction_prev: bool,
                 op_names: tuple[str, ...] = DARTS_OPS):
        super().__init__(C_pp, C_p, C, reduction, reduction_prev, op_names)
        self.edges = nn.ModuleList(FusedEdge(C, 2 if reduction and j < 2 else 1, op_names) for _, j in EDGES)
        # per-channel scales (parametric ops) go into their last BN
        scaled = [n for n in self.op_names if n in CONV_OPS]
        self.scaled_at = {n: i for i, n in enumerate(scaled)}
        self.register_buffer("scaled_idx", torch.tensor([self.k[n] for n in scaled], dtype=torch.long),
                             persistent=False)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        k, C = self.k, self.C
        # Every weight the cell needs is cut once per cell with `index_select` + `split`/`unbind` (one op
        # each, one backward), where indexing weights[e][k] op by op cost a select, a select_backward
        # and a gradient accumulation each, and each BN scale an expand + copy + sum: one expanded copy
        # per cell serves them all.
        free_w = self._free_weights(weights.index_select(0, self.node_major))
        n = len(self.scaled_at)
        scales = weight_pieces(weights.index_select(1, self.scaled_idx).unsqueeze(-1).expand(-1, -1, C)
                             .contiguous().view(-1), [C] * (len(EDGES) * n))  # edge e's op i: [e * n + i]
        fr_rows = None
        if self.reduction and "skip_connect" in k:  # the strided skip (FactorizedReduce) scales its BN
            fr_rows = weight_pieces(weights[:, k["skip_connect"]].unsqueeze(-1).expand(-1, C).contiguous().view(-1),
                                  [C] * len(EDGES))
        ca = self.scaled_at
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        acc: list[torch.Tensor | None] = [None] * (DARTS_STEPS + 2)
        for j, out_edges in enumerate(self.out_edges):
            if j >= 2:
                states.append(acc[j])  # complete: every source before j was processed
            x = states[j]
            stride = self._stride(j)
            r = F.relu(x)
            mixed = self._free_mix(j, x, free_w[j])  # per edge: pools + identity, weighted
            shifted = r[:, :, 1::2, 1::2] if stride > 1 and "skip_connect" in k else None
            for m, e in enumerate(out_edges):
                scale = scales[e * n:(e + 1) * n]
                ops = self.edges[e].ops
                terms = [mixed[m]] if mixed is not None else []
                for name in self.op_names:
                    if name in CONV_OPS:
                        terms.append(weighted_conv(ops[k[name]], r, scale[ca[name]]))
                    elif name == "skip_connect" and stride > 1:
                        terms.append(self._factorized_reduce(ops[k[name]], r, shifted, fr_rows[e]))
                out = terms[0]
                for t in terms[1:]:
                    out = out + t
                i = EDGES[e][0]
                acc[i] = out if acc[i] is None else acc[i] + out
        states.append(acc[-1])
        return channel_cat([dense_grad(s) for s in states[2:]])

    def _factorized_reduce(self, fr: FactorizedReduce, r: torch.Tensor, shifted: torch.Tensor,
                           scale: torch.Tensor) -> torch.Tensor:
        """The strided skip (FactorizedReduce) with its BN scaled by the edge weight (`scale`: [C])."""
        return weighted_bn(channel_cat(list(self._strided_skip_paths(fr, r, shifted))), fr.bn, scale, count=False)

    def _load_ops_from_classic(self, classic: SearchCell) -> None:
        """Per-edge modules: the classic op's state as it is."""
        for e, edge in enumerate(self.edges):
            for op, c_op in zip(edge.ops, classic.edges[e].ops):
                if not isinstance(op, nn.Identity):
                    op.load_state_dict(c_op.state_dict())
