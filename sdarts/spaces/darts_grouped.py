"""The DARTS search cell with the parametric ops of several edges as grouped convs (`model.impl: grouped`).

As `FusedSearchCell` (`darts_fused`), and each conv op runs for all k edges of a node at once, as
grouped convs (`side_by_side`) on the ReLU'd input repeated k times, edge-major, so each edge's
pointwise conv reads its own contiguous channel block (a channel-multiplier depthwise conv would emit
[channel, edge] order and need a transposing copy); one BN over the k*C channels is k per-edge BNs; the
conv ops' outputs are summed per node before the edge split. Fewer than half the kernels per step of
`fused` (`benchmarks/dispatch_count.py`), which is what bounds the step on a GPU (docs/performance.md);
on the CPU it is not faster than `fused` at a real batch (docs/performance.md), so `fused` stays the
default until a GPU says so. Same function as `SearchCell` (`darts_classic`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdarts.genotype import DARTS_STEPS
from sdarts.spaces.darts_classic import EDGES, SearchCell
from sdarts.spaces.darts_pernode import CONV_OPS, PerNodeCell, weighted_conv
from sdarts.spaces.functional import channel_cat, channel_split, dense_grad, weight_pieces, weighted_bn
from sdarts.spaces.ops import DARTS_OPS, FactorizedReduce, darts_op


def side_by_side(op: nn.Module, k: int) -> nn.Module:
    """`k` copies of a DARTS conv op (`SepConv`/`DilConv`), one per edge, as one module of grouped convs.

    Every conv gets k times its channels and groups (depthwise: kC groups; pointwise: k groups of
    C -> C) and every BN k times its channels, so copy m is channel block m throughout: fed the input
    repeated k times (edge-major channels), block m of the output is edge m's op. One call per conv
    for all edges of a node instead of one per edge is the point: the GPU step is bound by the number
    of kernels, not by arithmetic. Parameter names stay the op's (`load_from_classic`,
    `op_param_slices` map by name); default init draws each block as it would the single op (the
    fan-in per group is the single conv's fan-in).
    """
    for parent in list(op.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, nn.Conv2d):
                setattr(parent, name, nn.Conv2d(k * m.in_channels, k * m.out_channels, m.kernel_size, m.stride,
                                                m.padding, m.dilation, groups=k * m.groups, bias=False))
            elif isinstance(m, nn.BatchNorm2d):
                setattr(parent, name, nn.BatchNorm2d(k * m.num_features, affine=m.affine))
    return op


def _rows(t: torch.Tensor, m: int, k: int) -> slice:
    """Edge m's rows (output channels) of a grouped tensor holding k edges' blocks along dim 0."""
    n = t.shape[0] // k
    return slice(m * n, (m + 1) * n)


class GroupedSearchCell(PerNodeCell):
    """The DARTS search cell with the parametric ops of several edges as grouped convs (`impl: grouped`;
    same function as `SearchCell` and `FusedSearchCell`).

    Edges are grouped by source: the cell's two inputs (nodes 0 and 1: same stride, 4 out-edges each)
    form one group of 8 edges, every later node j its own group. Group g's conv ops live in
    `group_ops[g][op]` for all its k edges, edge m of `group_edges[g]` owning the m-th block of rows of
    every tensor (`op_param_slices`, `op_state`): `side_by_side` grouped convs fed the ReLU'd sources
    repeated once per edge (edge-major channels, so no transposing copy), each BN over kC channels (BN is
    per channel: k BNs in one call, running statistics included). The strided skip of a reduction cell
    is per input node j (its two 1x1 paths read that node's input): `skip_ops[str(j)]`, a
    `FactorizedReduce(C, 4C)` whose own forward is not used (`_factorized_reduce` interleaves the two
    paths per edge). `pool_bn[j]` is the pools' BN, one per node (all its edges normalise the same tensor).
    """

    def __init__(self, C_pp: int, C_p: int, C: int, reduction: bool, reduction_prev: bool,
                 op_names: tuple[str, ...] = DARTS_OPS):
        super().__init__(C_pp, C_p, C, reduction, reduction_prev, op_names)
        self.conv_names = [n for n in self.op_names if n in CONV_OPS]
        strided_skip = reduction and "skip_connect" in op_names
        if strided_skip and C % 2:
            raise ValueError(f"the strided skip (FactorizedReduce) needs an even C, got {C}")
        # nodes 0 and 1 share a stride and come first in node-major edge order: one group of 8 edges
        self.groups = [[0, 1]] + [[j] for j in range(2, len(self.out_edges))]
        self.group_of = {j: g for g, js in enumerate(self.groups) for j in js}
        self.group_edges = [[e for j in js for e in self.out_edges[j]] for js in self.groups]
        self.group_ops = nn.ModuleList(
            nn.ModuleDict({n: side_by_side(darts_op(n, C, self._stride(js[0]), affine=False), len(es))
                           for n in self.conv_names})
            for js, es in zip(self.groups, self.group_edges))
        self.skip_ops = nn.ModuleDict(
            {str(j): FactorizedReduce(C, len(self.out_edges[j]) * C, affine=False) for j in (0, 1)}
            if strided_skip else {})
        # edges are cut in source-node order (`node_major`), so a group's edges are one block of rows;
        # per-channel scales (parametric ops, and the strided skip) go into their last BN
        self.scaled = self.conv_names + (["skip_connect"] if strided_skip else [])
        self.widths = [len(es) * C for es in self.group_edges]
        self.register_buffer("scaled_idx", torch.tensor([self.k[n] for n in self.scaled], dtype=torch.long),
                             persistent=False)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        C = self.C
        # Every weight the cell needs is cut once per cell (`index_select` + `split`, one op each, one
        # backward) rather than op by op (a select, a select_backward and a gradient accumulation
        # each); the BN scales of group g are one [ops, k*C] block of a single expanded copy, each edge's
        # weight repeated over its C channels.
        w = weights.index_select(0, self.node_major)
        free_w = self._free_weights(w)
        flat = w.index_select(1, self.scaled_idx).t().unsqueeze(-1).expand(-1, -1, C).contiguous().view(-1)
        pieces = weight_pieces(flat, self.widths * len(self.scaled))  # `split`; seed-blocked under SeedStack
        G = len(self.widths)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        acc: list[torch.Tensor | None] = [None] * (DARTS_STEPS + 2)

        def add(i: int, t: torch.Tensor) -> None:
            acc[i] = t if acc[i] is None else acc[i] + t

        relus: dict[int, torch.Tensor] = {}
        for j, out_edges in enumerate(self.out_edges):
            if j >= 2:
                states.append(acc[j])  # complete: every source before j was processed
            x = states[j]
            relus[j] = F.relu(x)
            mixed = self._free_mix(j, x, free_w[j])  # per edge: pools + identity, weighted
            if mixed is not None:
                for m, e in enumerate(out_edges):
                    add(EDGES[e][0], mixed[m])
            g = self.group_of[j]
            if j != self.groups[g][-1]:
                continue  # the group's conv ops run once all its sources are here
            scale = dict(zip(self.scaled, pieces[g::G]))
            # [B, k*C, H', W'], edge-major: the group's parametric ops, weighted, summed over ops
            grouped = None
            if self.conv_names:
                reps = [relus[i] for i in self.groups[g] for _ in self.out_edges[i]]
                r_rep = reps[0] if len(reps) == 1 else channel_cat(reps)
                for name in self.conv_names:
                    y = weighted_conv(self.group_ops[g][name], r_rep, scale[name])
                    grouped = y if grouped is None else grouped + y
            # the strided skip, per source node (its paths read that node), into the group's channels; a
            # group shares one stride, so its nodes all have one or none
            if str(self.groups[g][0]) in self.skip_ops:
                ks = [len(self.out_edges[i]) for i in self.groups[g]]
                y = channel_cat([self._factorized_reduce(self.skip_ops[str(i)], relus[i], k, sc) for i, k, sc
                               in zip(self.groups[g], ks, scale["skip_connect"].split([k * C for k in ks]))])
                grouped = y if grouped is None else grouped + y
            if grouped is not None:
                for part, e in zip(channel_split(grouped, C), self.group_edges[g]):
                    add(EDGES[e][0], part)
        states.append(acc[-1])
        return channel_cat([dense_grad(s) for s in states[2:]])

    def _factorized_reduce(self, fr: FactorizedReduce, r: torch.Tensor, k: int,
                           scale: torch.Tensor) -> torch.Tensor:
        """The strided skip of all k edges, [B, k*C, H/2, W/2] edge-major, BN scaled by `scale`."""
        a, b = self._strided_skip_paths(fr, r, r[:, :, 1::2, 1::2])
        half = self.C // 2  # edge m's output is [a_m, b_m], as FactorizedReduce's cat
        y = channel_cat([t for ab in zip(channel_split(a, half), channel_split(b, half)) for t in ab])
        return weighted_bn(y, fr.bn, scale, count=False)

    def _grouped(self, edge_index: int, op: str) -> tuple[nn.Module | None, int, int]:
        """The module holding `op` for edge `edge_index` (None if parameter-free), the edge's block m in it
        and the number of blocks k."""
        j = EDGES[edge_index][1]
        if op in self.conv_names:
            g = self.group_of[j]
            mod, edges = self.group_ops[g][op], self.group_edges[g]
        elif op == "skip_connect" and str(j) in self.skip_ops:
            mod, edges = self.skip_ops[str(j)], self.out_edges[j]
        else:
            return None, 0, 1
        return mod, edges.index(edge_index), len(edges)

    def op_param_slices(self, edge_index: int, op: str) -> list[tuple[nn.Parameter, slice]]:
        """`op`'s weights on edge `edge_index` as (grouped parameter, output-channel slice), in the order
        of the classic op's `parameters()`; empty for parameter-free ops (none, pools, identity skip)."""
        mod, m, k = self._grouped(edge_index, op)
        return [] if mod is None else [(p, _rows(p, m, k)) for p in mod.parameters()]

    def op_state(self, edge_index: int, op: str) -> dict[str, torch.Tensor]:
        """Edge `edge_index`'s share of `op`'s parameters and buffers, keyed as the classic op's
        `state_dict()`: views into the grouped tensors (scalar buffers, `num_batches_tracked`, whole)."""
        mod, m, k = self._grouped(edge_index, op)
        if mod is None:
            return {}
        return {key: t if t.dim() == 0 else t[_rows(t, m, k)] for key, t in mod.state_dict().items()}

    def _load_ops_from_classic(self, classic: SearchCell) -> None:
        """Each classic op's state into its edge's block of the grouped tensors (`op_state`)."""
        for e in range(len(EDGES)):
            for name in self.op_names:
                dst = self.op_state(e, name)
                if dst:
                    src = classic.edges[e].ops[self.k[name]].state_dict()
                    if src.keys() != dst.keys():
                        raise ValueError(f"edge {e} {name}: {sorted(src)} vs {sorted(dst)}")
                    for key, t in src.items():
                        dst[key].copy_(t)
