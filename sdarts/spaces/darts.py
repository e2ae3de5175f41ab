"""DARTS search space: two-input cells with 4 intermediate nodes, 14 edges, 8 candidate ops.

Macro (DARTS `model_search.py`): CIFAR stem (3x3 conv to 3C) or the ImageNet stem of PC-DARTS, which
downsamples 8x with three stride-2 3x3 convs (3 -> 3C/2 -> 3C, then 3C -> 3C); `layers` cells with
reductions at 1/3 and 2/3 of the depth; each cell preprocesses its two inputs to C channels (a
FactorizedReduce when the previous cell reduced), sums MixedOps into 4 nodes and concatenates them.
Pools are followed by an affine-free BN, as in DARTS, so their scale is comparable to the convs'.

Three implementations of the cell compute the same function:
- `SearchCell` (`impl: classic`): one `MixedOp` per edge, every op its own module, the weighted sum of
  their outputs (the reference repos' form; the baseline and the equivalence test's ground truth);
- `FusedSearchCell` (`impl: fused`, default): what only depends on the source node is computed once
  per node for all its outgoing edges (up to 4): the ReLU in front of every conv op and of the strided
  skip (FactorizedReduce), and max/avg pooling with their affine-free BN (same input, same batch
  statistics, same output on every edge). Each op's last BN takes the edge weight as its affine scale
  (`functional.weighted_bn`), so weighted outputs are never stored; the pools and the identity skip are
  weighted for all outgoing edges by one matmul (`functional.weighted_mix`); `none` is never computed. The
  per-edge conv modules are the same as in `MixedOp`, at the same positions (`edges[e].ops[k]`).
- `GroupedSearchCell` (`impl: grouped`, DARTS only): as fused, and each parametric op runs for all k
  edges of a node at once, as grouped convs (`side_by_side`) on the ReLU'd input repeated k times,
  edge-major, so each edge's pointwise conv reads its own contiguous channel block (a channel-multiplier
  depthwise conv would emit [channel, edge] order and need a transposing copy); one BN over the k*C
  channels is k per-edge BNs; the conv ops' outputs are summed per node before the edge split. About
  half the kernels per step of `fused` (3.3k vs 6.8k), which is what bounds the step on a GPU
  (docs/performance.md); on the CPU it is 10-15% slower than `fused` at CIFAR size (oneDNN's depthwise
  backward over k*C channels is slower than k of them over C), so `fused` stays the default until a
  GPU says so.

Options: `channels_last` (NHWC activations) and `checkpoint_cells` (recompute each cell in backward).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdarts.arch import ArchParams
from sdarts.genotype import DARTS_STEPS, DartsGenotype, darts_edges, derive_darts
from sdarts.spaces.functional import (avg_pool_3x3, bn_count_later, checkpoint_cell, deferred_counters,
                                 dense_grad, weighted_bn, weighted_mix)
from sdarts.spaces.ops import DARTS_OPS, FactorizedReduce, ReLUConvBN, darts_op
from sdarts.spaces.supernet import Supernet

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


CONV_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


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


class _PerNodeCell(nn.Module):
    """What the two fast DARTS cells share: op-name checks, the inputs' preprocessing, which edges leave
    each source node, the pools' BN per node and the scalar edge weights (pools, identity skip).

    Edge weights are cut once per cell; index buffers keep the cut on the device (a Python-list index
    would be a host-to-device copy per step, and not CUDA-graph safe).
    """

    def __init__(self, C_pp: int, C_p: int, C: int, reduction: bool, reduction_prev: bool,
                 op_names: tuple[str, ...]):
        super().__init__()
        unknown = [n for n in op_names if n not in DARTS_OPS]
        if unknown:
            raise ValueError(f"unknown DARTS op {unknown[0]!r}; expected one of {', '.join(DARTS_OPS)}")
        self.reduction = reduction
        self.C = C
        self.op_names = tuple(op_names)
        self.preprocess0 = FactorizedReduce(C_pp, C, affine=False) if reduction_prev else \
            ReLUConvBN(C_pp, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0, affine=False)
        sources = range(DARTS_STEPS + 1)  # node 5 (the last) feeds no edge
        self.out_edges = [[e for e, (_, j) in enumerate(EDGES) if j == src] for src in sources]
        # one affine-free BN per pool kind per source node, shared by its outgoing edges
        self.pool_bn = nn.ModuleList(
            nn.ModuleDict({n: nn.BatchNorm2d(C, affine=False) for n in op_names if "pool" in n}) for _ in sources)
        self.k = {n: k for k, n in enumerate(op_names)}
        # the parameter-free ops weighted by a scalar per edge (`weighted_mix`): pools and the identity
        # skip (stride 1); a strided skip is a FactorizedReduce, parametric
        self.free_names = [n for n in self.op_names if "pool" in n or n == "skip_connect"]
        self.ks = [len(es) for es in self.out_edges]
        self.register_buffer("node_major", torch.tensor([e for es in self.out_edges for e in es]), persistent=False)
        self.register_buffer("free_idx", torch.tensor([self.k[n] for n in self.free_names], dtype=torch.long),
                             persistent=False)
        self.register_buffer("pool_cols", torch.tensor([i for i, n in enumerate(self.free_names) if "pool" in n],
                                                       dtype=torch.long), persistent=False)

    def count_later_bns(self) -> list[nn.BatchNorm2d]:
        """The BNs this cell calls without stepping their counters (the supernet steps them all at once:
        `functional.count_bn_steps`): all but the preprocessing modules', which are called as modules."""
        own = {id(m) for p in (self.preprocess0, self.preprocess1) for m in p.modules()}
        return [bn for bn in deferred_counters(self) if id(bn) not in own]

    def _stride(self, j: int) -> int:
        return 2 if self.reduction and j < 2 else 1

    def _free_weights(self, node_major: torch.Tensor) -> list[torch.Tensor]:
        """Per source node j, the [k_j, o_j] weights of its outgoing edges (rows, in `out_edges` order)
        on its parameter-free ops (columns, in `_free_mix` order), from the cell's weights in node-major
        edge order (`weights.index_select(0, self.node_major)`): cut once per cell."""
        rows = list(node_major.index_select(1, self.free_idx).split(self.ks))
        if "skip_connect" in self.k and self.reduction:  # strided nodes: the pools only
            for j in range(2):
                rows[j] = rows[j].index_select(1, self.pool_cols)
        return rows

    def _free_mix(self, j: int, x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor] | None:
        """Per outgoing edge of node j, its parameter-free ops weighted by `w` (`_free_weights`[j]) and
        summed (`weighted_mix`); None when the op set has none. The pools + their BN are computed once
        per node for all its edges (same input, same batch statistics); the identity only at stride 1."""
        stride, frees = self._stride(j), []
        for n in self.free_names:
            if n == "max_pool_3x3":
                frees.append(bn_count_later(F.max_pool2d(x, 3, stride, 1), self.pool_bn[j][n]))
            elif n == "avg_pool_3x3":
                frees.append(bn_count_later(avg_pool_3x3(x, stride), self.pool_bn[j][n]))
            elif stride == 1:
                frees.append(x)
        return weighted_mix(frees, w) if frees else None

    @staticmethod
    def _strided_skip_paths(fr: FactorizedReduce, r: torch.Tensor, shifted: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """FactorizedReduce's two paths on the ReLU'd input `r`, before their concat and BN. The offset
        path conv_2(pad(r[1:, 1:])) with a stride-2 1x1 conv reads r[2a+1, 2b+1], zero past the edge:
        the same as a 1x1 conv of `shifted` = r[:, :, 1::2, 1::2] (cut once per node by the caller),
        padded at the end for odd sizes."""
        a = fr.conv_1(r)
        b = F.conv2d(shifted, fr.conv_2.weight)
        if b.shape[-2:] != a.shape[-2:]:  # odd input size: the offset path lacks the last row/column
            b = F.pad(b, (0, a.shape[-1] - b.shape[-1], 0, a.shape[-2] - b.shape[-2]))
        return a, b

    @torch.no_grad()
    def load_from_classic(self, classic: "SearchCell") -> None:
        """Copies a `SearchCell`'s weights and BN statistics into this layout (for equivalence checks).

        Pool BNs: the classic cell has one per edge; all edges leaving node j normalise the same
        tensor, so their statistics agree after the same steps; the first outgoing edge's are taken.
        """
        self.preprocess0.load_state_dict(classic.preprocess0.state_dict())
        self.preprocess1.load_state_dict(classic.preprocess1.state_dict())
        self._load_ops_from_classic(classic)
        for j, out_edges in enumerate(self.out_edges):
            for name, bn in self.pool_bn[j].items():
                bn.load_state_dict(classic.edges[out_edges[0]].ops[self.k[name]][1].state_dict())

    def _load_ops_from_classic(self, classic: "SearchCell") -> None:
        raise NotImplementedError


class FusedSearchCell(_PerNodeCell):
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
        # and a gradient accumulation each (~2700 ops per step in the 8-cell supernet), and each BN
        # scale an expand + copy + sum: one expanded copy per cell now serves them all.
        free_w = self._free_weights(weights.index_select(0, self.node_major))
        scale_rows = weights.index_select(1, self.scaled_idx).unsqueeze(-1).expand(-1, -1, C).contiguous().unbind(0)
        fr_rows = None
        if self.reduction and "skip_connect" in k:  # the strided skip (FactorizedReduce) scales its BN
            fr_rows = weights[:, k["skip_connect"]].unsqueeze(-1).expand(-1, C).contiguous().unbind(0)
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
                scale = scale_rows[e].unbind(0)
                ops = self.edges[e].ops
                terms = [mixed[m]] if mixed is not None else []
                for name in self.op_names:
                    if name in CONV_OPS:
                        op = ops[k[name]]
                        last = op[1] if name.startswith("sep") else op  # the DilConv ending in the BN
                        h = r
                        if name.startswith("sep"):
                            first = op[0]
                            h = F.relu(bn_count_later(first[2](first[1](h)), first[3]))
                        h = last[2](last[1](h))
                        terms.append(weighted_bn(h, last[3], scale[ca[name]], count=False))
                    elif name == "skip_connect" and stride > 1:
                        terms.append(self._factorized_reduce(ops[k[name]], r, shifted, fr_rows[e]))
                out = terms[0]
                for t in terms[1:]:
                    out = out + t
                i = EDGES[e][0]
                acc[i] = out if acc[i] is None else acc[i] + out
        states.append(acc[-1])
        return torch.cat([dense_grad(s) for s in states[2:]], dim=1)

    def _factorized_reduce(self, fr: FactorizedReduce, r: torch.Tensor, shifted: torch.Tensor,
                           scale: torch.Tensor) -> torch.Tensor:
        """The strided skip (FactorizedReduce) with its BN scaled by the edge weight (`scale`: [C])."""
        return weighted_bn(torch.cat(self._strided_skip_paths(fr, r, shifted), dim=1), fr.bn, scale, count=False)

    def _load_ops_from_classic(self, classic: "SearchCell") -> None:
        """Per-edge modules: the classic op's state as it is."""
        for e, edge in enumerate(self.edges):
            for op, c_op in zip(edge.ops, classic.edges[e].ops):
                if not isinstance(op, nn.Identity):
                    op.load_state_dict(c_op.state_dict())


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


class GroupedSearchCell(_PerNodeCell):
    """The DARTS search cell with the parametric ops of several edges as grouped convs (`impl: grouped`;
    same function as `SearchCell` and `FusedSearchCell`, about 0.45x the kernels of `FusedSearchCell`).

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
        scales = w.index_select(1, self.scaled_idx).t().unsqueeze(-1).expand(-1, -1, C).contiguous() \
            .view(len(self.scaled), -1).split(self.widths, 1)
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
            scale = dict(zip(self.scaled, scales[g].unbind(0)))
            # [B, k*C, H', W'], edge-major: the group's parametric ops, weighted, summed over ops
            grouped = None
            if self.conv_names:
                reps = [relus[i] for i in self.groups[g] for _ in self.out_edges[i]]
                r_rep = reps[0] if len(reps) == 1 else torch.cat(reps, dim=1)
                for name in self.conv_names:
                    y = self._conv_op(self.group_ops[g][name], name.startswith("sep"), r_rep, scale[name])
                    grouped = y if grouped is None else grouped + y
            # the strided skip, per source node (its paths read that node), into the group's channels; a
            # group shares one stride, so its nodes all have one or none
            if str(self.groups[g][0]) in self.skip_ops:
                ks = [len(self.out_edges[i]) for i in self.groups[g]]
                y = torch.cat([self._factorized_reduce(self.skip_ops[str(i)], relus[i], k, sc) for i, k, sc
                               in zip(self.groups[g], ks, scale["skip_connect"].split([k * C for k in ks]))], dim=1)
                grouped = y if grouped is None else grouped + y
            if grouped is not None:
                for part, e in zip(grouped.split(C, 1), self.group_edges[g]):
                    add(EDGES[e][0], part)
        states.append(acc[-1])
        return torch.cat([dense_grad(s) for s in states[2:]], dim=1)

    @staticmethod
    def _conv_op(op: nn.Module, sep: bool, r_rep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """A `side_by_side` SepConv/DilConv on the repeated ReLU'd input, its last BN scaled by `scale`."""
        h = r_rep
        if sep:
            first, op = op[0], op[1]
            h = F.relu(bn_count_later(first[2](first[1](h)), first[3]))
        return weighted_bn(op[2](op[1](h)), op[3], scale, count=False)

    def _factorized_reduce(self, fr: FactorizedReduce, r: torch.Tensor, k: int,
                           scale: torch.Tensor) -> torch.Tensor:
        """The strided skip of all k edges, [B, k*C, H/2, W/2] edge-major, BN scaled by `scale`."""
        a, b = self._strided_skip_paths(fr, r, r[:, :, 1::2, 1::2])
        half = self.C // 2  # edge m's output is [a_m, b_m], as FactorizedReduce's cat
        y = torch.cat([t for ab in zip(a.split(half, 1), b.split(half, 1)) for t in ab], dim=1)
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

    def _load_ops_from_classic(self, classic: "SearchCell") -> None:
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
        cells = {"fused": FusedSearchCell, "grouped": GroupedSearchCell, "classic": SearchCell}
        if impl not in cells:
            raise ValueError(f"model.impl must be one of {', '.join(cells)}, got {impl!r}")
        cell_cls = cells[impl]
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
