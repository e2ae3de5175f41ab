"""The fused supernets (the default) compute the same function as the classic op-by-op formulation.

Train mode (batch-statistic BN), weights mapped across layouts with `load_from_classic`: logits, the
loss gradient of every weight and of alpha, the gradient of the activated weights passed in through
`forward(x, weights=...)` (what dL/dp analysis reads), and the BN running statistics after the step
must agree. Float64 makes the comparison tight; one fp32 channels_last case checks the layout the
product runs by default. Small sizes: seconds on one core.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sdarts.spaces.darts import DartsSupernet
from sdarts.spaces.darts_classic import SearchCell
from sdarts.spaces.darts_fused import FusedSearchCell
from sdarts.spaces.darts_grouped import GroupedSearchCell
from sdarts.spaces.functional import weighted_mix
from sdarts.spaces.nb201 import NB201Supernet
from sdarts.spaces.nb201_classic import ClassicCell
from sdarts.spaces.nb201_fused import FusedCell
from sdarts.spaces.ops import DARTS_OPS, NB201_OPS


def _nb201(impl, **kw):
    return NB201Supernet(C=4, N=1, num_classes=10, init_std=0.5, impl=impl,
                         generator=torch.Generator().manual_seed(3), **kw)


def _darts(impl, stem, **kw):
    return DartsSupernet(C=4, layers=5, num_classes=10, stem=stem, init_std=0.5,
                         generator=torch.Generator().manual_seed(3), impl=impl, **kw)


def _make(space, impl, **kw):
    torch.manual_seed(0)
    if space == "nb201":
        return _nb201(impl, **kw)
    return _darts(impl, "cifar" if space == "darts_cifar" else "imagenet", **kw)


def _pair(space, dtype=torch.float64, **fused_kw):
    """(classic, fast) supernets with the same weights; `space` may name the fast impl: "darts_cifar/grouped"."""
    space, _, impl = space.partition("/")
    classic = _make(space, "classic").to(dtype)
    fused = _make(space, impl or "fused", **fused_kw).to(dtype)
    load_classic_into(fused, classic)
    return classic, fused


def load_classic_into(fused: nn.Module, classic: nn.Module) -> None:
    """Everything outside the search cells by name; the cells through their `load_from_classic`."""
    cell_prefixes = tuple(f"cells.{i}." for i, c in enumerate(classic.cells) if isinstance(c, (ClassicCell, SearchCell)))
    state = {k: v for k, v in classic.state_dict().items() if not k.startswith(cell_prefixes)}
    missing, unexpected = fused.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(k.startswith(cell_prefixes) for k in missing)
    for c, f in zip(classic.search_cells(), fused.search_cells()):
        f.load_from_classic(c)


def _inputs(space, B=6, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    size = 32 if space.startswith("darts_imagenet") else 8
    return torch.randn(B, 3, size, size, generator=g).to(dtype), torch.randint(0, 10, (B,), generator=g)


def _op_weight_pairs(classic, fused):
    """(classic parameter, fused parameter, output-channel slice of the fused one) for every cell op."""
    pairs = []
    for c, f in zip(classic.search_cells(), fused.search_cells()):
        if isinstance(f, FusedCell):
            for j in range(3):
                for k, i in enumerate(range(j + 1, 4)):
                    sl = slice(k * f.C, (k + 1) * f.C)
                    ops = c.edges[f"{i}_{j}"].ops
                    pairs.append((ops[NB201_OPS.index("nor_conv_3x3")].conv.weight, f.conv3[j].weight, sl))
                    pairs.append((ops[NB201_OPS.index("nor_conv_1x1")].conv.weight, f.conv1[j].weight, sl))
        else:
            for name in ("preprocess0", "preprocess1"):
                for pc, pf in zip(getattr(c, name).parameters(), getattr(f, name).parameters()):
                    pairs.append((pc, pf, slice(None)))
            if isinstance(f, GroupedSearchCell):
                for e, ce in enumerate(c.edges):
                    for name, co in zip(f.op_names, ce.ops):
                        grouped = f.op_param_slices(e, name)
                        assert len(grouped) == len(list(co.parameters()))
                        for pc, (pf, sl) in zip(co.parameters(), grouped):
                            assert pf[sl].shape == pc.shape
                            pairs.append((pc, pf, sl))
                continue
            for ce, fe in zip(c.edges, f.edges):
                for co, fo in zip(ce.ops, fe.ops):
                    for pc, pf in zip(co.parameters(), fo.parameters()):
                        pairs.append((pc, pf, slice(None)))
    return pairs


def _bn_stat_pairs(classic, fused):
    pairs = []
    for c, f in zip(classic.search_cells(), fused.search_cells()):
        if isinstance(f, FusedCell):
            for j in range(3):
                for k, i in enumerate(range(j + 1, 4)):
                    sl = slice(k * f.C, (k + 1) * f.C)
                    ops = c.edges[f"{i}_{j}"].ops
                    for bn, name in ((f.bn3[j], "nor_conv_3x3"), (f.bn1[j], "nor_conv_1x1")):
                        cb = ops[NB201_OPS.index(name)].bn
                        pairs += [(cb.running_mean, bn.running_mean[sl]), (cb.running_var, bn.running_var[sl])]
        else:
            for j, out_edges in enumerate(f.out_edges):
                for name, bn in f.pool_bn[j].items():
                    for e in out_edges:  # every classic copy equals the one shared BN
                        cb = c.edges[e].ops[DARTS_OPS.index(name)].bn  # the pool's BN
                        pairs += [(cb.running_mean, bn.running_mean), (cb.running_var, bn.running_var)]
            if isinstance(f, GroupedSearchCell):
                for e, ce in enumerate(c.edges):
                    for name, co in zip(f.op_names, ce.ops):
                        if "pool" in name:
                            continue  # the shared pool BNs, above
                        state = f.op_state(e, name)
                        buffers = dict(co.named_buffers())
                        assert buffers.keys() <= state.keys()
                        pairs += [(b, state[n]) for n, b in buffers.items()]
                continue
            for ce, fe in zip(c.edges, f.edges):
                for co, fo in zip(ce.ops, fe.ops):
                    for (n1, b1), (n2, b2) in zip(co.named_buffers(), fo.named_buffers()):
                        assert n1 == n2
                        pairs.append((b1, b2))
    return pairs


def _step(model, x, y, weights=None):
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(x, weights)
    F.cross_entropy(logits, y).backward()
    return logits.detach()


def _close(a, b, rtol, atol):
    """Elementwise closeness; with rtol=None (fp32) the error relative to the tensor's norm instead,
    since fp32 sums in a different order drift by ~1e-6 of the gradient's scale, not of each element
    (tensors near zero, like the running mean of a normalised input, are compared at scale 1e-3)."""
    if rtol is None:
        err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-3 * b.numel() ** 0.5)
        assert err < atol, f"relative error {err:.2e} >= {atol}"
    else:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _assert_same(classic, fused, x, y, rtol, atol):
    lc = _step(classic, x, y)
    lf = _step(fused, x, y)
    _close(lf, lc, rtol, atol)
    for (pc, pf) in zip(classic.get_alphas(), fused.get_alphas()):
        assert pc.grad is not None and pc.grad.abs().sum() > 0
        _close(pf.grad, pc.grad, rtol, atol)
    pairs = _op_weight_pairs(classic, fused)
    assert pairs
    for pc, pf, sl in pairs:
        _close(pf.grad[sl], pc.grad, rtol, atol)
    # outside the cells (stem, reduction blocks, classifier): same names, same gradients
    fused_params = dict(fused.named_parameters())
    for name, pc in classic.named_parameters():
        if not name.startswith("cells.") or name.split(".")[2] not in ("edges", "preprocess0", "preprocess1"):
            if name in fused_params and pc.grad is not None:
                _close(fused_params[name].grad, pc.grad, rtol, atol)
    for bc, bf in _bn_stat_pairs(classic, fused):
        _close(bf, bc, rtol, atol)


SPACES = ["nb201", "darts_cifar", "darts_imagenet", "darts_cifar/grouped", "darts_imagenet/grouped"]


@pytest.mark.parametrize("space", SPACES)
def test_fused_equals_classic_float64(space):
    classic, fused = _pair(space)
    x, y = _inputs(space)
    _assert_same(classic, fused, x, y, rtol=1e-9, atol=1e-10)
    # a second step sees the running statistics and alpha of the first (no optimizer: same weights)
    x, y = _inputs(space, seed=2)
    _assert_same(classic, fused, x, y, rtol=1e-9, atol=1e-10)
    # every BN stepped its counter once per training forward, as in the classic net, also where the fast
    # cells leave the counting to one foreach op (`functional.count_bn_steps`)
    counts = [{m.num_batches_tracked.item() for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
              for model in (classic, fused)]
    assert counts[1] == counts[0] and len(counts[0]) == 1, counts


@pytest.mark.parametrize("space", SPACES)
def test_activated_weights_gradient(space):
    """dL/dp through `forward(x, weights=...)` (what the dL/dp analysis reads) is the same in both."""
    classic, fused = _pair(space)
    x, y = _inputs(space)
    grads = []
    for model in (classic, fused):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in model.arch.weights().items()}
        _step(model, x, y, p)
        grads.append({k: v.grad for k, v in p.items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("space", SPACES)
def test_channels_last_fp32(space):
    """The product's default layout (NHWC, fp32) agrees with classic NCHW to float tolerance."""
    classic, fused = _pair(space, dtype=torch.float32, channels_last=True)
    x, y = _inputs(space, dtype=torch.float32)
    _assert_same(classic, fused, x, y, rtol=None, atol=1e-4)


@pytest.mark.parametrize("space", ["nb201", "darts_cifar", "darts_cifar/grouped"])
def test_checkpointed_cells_same_gradients_and_stats(space):
    """Checkpointing recomputes each cell in backward: same gradients, BN statistics updated once."""
    classic, fused = _pair(space, checkpoint_cells=True)
    x, y = _inputs(space)
    _assert_same(classic, fused, x, y, rtol=1e-9, atol=1e-10)
    nbt = [m.num_batches_tracked.item() for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert set(nbt) == {1}


def test_eval_mode_uses_running_stats():
    classic, fused = _pair("darts_cifar")
    x, y = _inputs("darts_cifar")
    _step(classic, x, y), _step(fused, x, y)
    classic.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), classic(x), rtol=1e-9, atol=1e-10)


def test_fused_darts_cell_keeps_op_positions():
    """Analysis code reads an op's weights as `edges[e].ops[k]`: parametric ops sit where MixedOp has them."""
    cell = FusedSearchCell(8, 8, 4, reduction=True, reduction_prev=False)
    sep = DARTS_OPS.index("sep_conv_3x3")
    skip = DARTS_OPS.index("skip_connect")
    assert sum(p.numel() for p in cell.edges[0].ops[sep].parameters()) > 0
    assert sum(p.numel() for p in cell.edges[0].ops[skip].parameters()) > 0  # strided: FactorizedReduce
    assert sum(p.numel() for p in cell.edges[-1].ops[skip].parameters()) == 0  # stride 1: identity
    assert sum(p.numel() for p in cell.edges[0].ops[DARTS_OPS.index("max_pool_3x3")].parameters()) == 0


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="turbo"):
        NB201Supernet(C=4, N=1, impl="turbo")
    with pytest.raises(ValueError, match="turbo"):
        DartsSupernet(C=4, layers=5, impl="turbo")


@pytest.mark.parametrize("channels_last", [False, True])
def test_weighted_bn_is_scaled_bn_even_for_an_expanded_scale(channels_last):
    """`weighted_bn(x, bn, s)` == `s * bn(x)` in value and gradients, also for a stride-0 scale (an
    expanded edge weight), which torch's CPU channels_last BN backward misreads unless made dense."""
    from sdarts.spaces.functional import weighted_bn
    torch.manual_seed(0)
    x = torch.randn(6, 4, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    row = torch.tensor([0.1, 0.2, 0.7, 0.3, 0.5], requires_grad=True)  # an edge's weights
    w = row[2:3]  # one op's weight, as a view into the row
    bn_a, bn_b = nn.BatchNorm2d(4, affine=False), nn.BatchNorm2d(4, affine=False)
    g = torch.randn(6, 4, 8, 8).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    out = weighted_bn(x, bn_a, w.expand(4))
    ga = torch.autograd.grad(out, (x, row), g)
    ref = w * bn_b(x)
    gb = torch.autograd.grad(ref, (x, row), g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn_a.running_var, bn_b.running_var)
    assert bn_a.num_batches_tracked.item() == bn_b.num_batches_tracked.item() == 1


@pytest.mark.parametrize("ops", [("skip_connect", "dil_conv_3x3", "avg_pool_3x3", "sep_conv_3x3"),
                                 ("avg_pool_3x3", "sep_conv_5x5", "max_pool_3x3", "skip_connect")])
@pytest.mark.parametrize("cell_cls", [FusedSearchCell, GroupedSearchCell])
@pytest.mark.parametrize("reduction", [False, True])
def test_fused_darts_cell_with_a_reordered_op_subset(reduction, cell_cls, ops):
    """The fused cells cut edge weights by op name (the parameter-free ops' columns for `weighted_mix`,
    BN scales for convs; at stride 2 the pools' columns only), so an op list in another order, without
    `none` or one pool, must still match the classic cell."""
    torch.manual_seed(0)
    classic = SearchCell(8, 8, 4, reduction, False, ops).double()
    fused = cell_cls(8, 8, 4, reduction, False, ops).double()
    fused.load_from_classic(classic)
    g = torch.Generator().manual_seed(5)
    s0, s1 = (torch.randn(3, 8, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.softmax(torch.randn(14, len(ops), generator=g, dtype=torch.float64), -1)
    outs, grads = [], []
    for cell in (classic, fused):
        wi = w.clone().requires_grad_(True)
        out = cell(s0, s1, wi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        outs.append(out.detach()), grads.append(wi.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_weighted_mix_is_the_term_by_term_sum(channels_last):
    """One matmul over memory order == sum_o w[m, o] * frees[o] per edge m: values, both gradients, and
    each result in its inputs' layout (an NCHW result would drag the NHWC cell into slow kernels)."""
    g = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    frees = [torch.randn(2, 5, 4, 3, generator=g, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
             for _ in range(3)]
    w = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(4, 2, 5, 4, 3, generator=g, dtype=torch.float64)
    out = weighted_mix(frees, w)
    assert all(t.is_contiguous(memory_format=fmt) for t in out)
    ref = [sum(w[m, o] * frees[o] for o in range(3)) for m in range(4)]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(sum((t * probe[m]).sum() for m, t in enumerate(ts)), [w, *frees])
             for ts in (out, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_grouped_darts_cell_op_param_slices():
    """Analysis code reads an op's weights on an edge of the grouped cell as (grouped parameter, output-
    channel slice): the slices have the classic op's shapes, parametric ops have weights, parameter-free
    ops none, and the edges of one source node own disjoint blocks of the same parameters."""
    torch.manual_seed(0)
    classic = SearchCell(8, 8, 4, reduction=True, reduction_prev=False)
    grouped = GroupedSearchCell(8, 8, 4, reduction=True, reduction_prev=False)
    for e, edge in enumerate(classic.edges):
        for name, co in zip(DARTS_OPS, edge.ops):
            slices = grouped.op_param_slices(e, name)
            assert [pf[sl].shape for pf, sl in slices] == [pc.shape for pc in co.parameters()]
            strided_skip = name == "skip_connect" and e in grouped.out_edges[0] + grouped.out_edges[1]
            assert bool(slices) == ("conv" in name or strided_skip), (e, name)
    sep = [grouped.op_param_slices(e, "sep_conv_3x3") for e in grouped.out_edges[0]]
    assert len({id(p) for s in sep for p, _ in s}) == len(sep[0])  # the same grouped parameters
    assert sorted(s[0][1].start for s in sep) == [m * 4 for m in range(len(sep))]  # edge m: rows m*C:(m+1)*C


@pytest.mark.parametrize("space", ["darts_cifar", "darts_cifar/grouped"])
def test_gradcorr_reads_the_same_op_weights_as_in_the_classic_cell(space):
    """Eq. 8 analysis (`gradcorr.param_map` + `weight_grads`) sees every parametric (edge, op) of a
    normal and a reduction cell with the same gradient as in the classic cell."""
    from sdarts.analysis.gradcorr import param_map, weight_grads
    classic, fast = _pair(space)
    assert [c.reduction for c in fast.search_cells()[:2]] == [False, True]
    x, y = _inputs(space)
    pc, pf = param_map(classic, [0, 1]), param_map(fast, [0, 1])
    assert pc.keys() == pf.keys() and any(k[2] == "skip_connect" for k in pc)  # the strided skip
    gc, gf = weight_grads(classic, x, y, pc), weight_grads(fast, x, y, pf)
    for key in gc:  # float64 models, gradients handed out in fp32
        torch.testing.assert_close(gf[key], gc[key], rtol=1e-6, atol=1e-12)
