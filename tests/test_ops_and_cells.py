"""Ops and cells: shapes, and the two ops whose meaning is exact (`none` = zeros, `skip_connect` = input)."""
import pytest
import torch

from sdarts.genotype import NB201_EDGES
from sdarts.spaces.darts import DartsSupernet
from sdarts.spaces.darts_classic import SearchCell
from sdarts.spaces.nb201 import NB201Supernet
from sdarts.spaces.nb201_classic import ClassicCell
from sdarts.spaces.nb201_fused import FusedCell
from sdarts.spaces.ops import DARTS_OPS, NB201_OPS, PoolBN, ResNetBasicBlock, darts_op, nb201_op


@pytest.mark.parametrize("name", DARTS_OPS)
@pytest.mark.parametrize("stride", [1, 2])
def test_darts_op_shapes(name, stride):
    x = torch.randn(2, 8, 16, 16)
    y = darts_op(name, 8, stride, affine=False)(x)
    assert y.shape == (2, 8, 16 // stride, 16 // stride)


@pytest.mark.parametrize("name", NB201_OPS)
def test_nb201_op_shapes(name):
    x = torch.randn(2, 8, 8, 8)
    assert nb201_op(name, 8, 8, 1, affine=False)(x).shape == x.shape


def test_none_is_zero_and_skip_is_identity():
    x = torch.randn(2, 8, 8, 8)
    for op in (darts_op("none", 8, 1, False), nb201_op("none", 8, 8, 1, False)):
        assert torch.count_nonzero(op(x)) == 0
    for op in (darts_op("skip_connect", 8, 1, False), nb201_op("skip_connect", 8, 8, 1, False)):
        assert torch.equal(op(x), x)
    # strided none keeps the reduced shape (odd sizes round up, like the strided convs)
    assert darts_op("none", 8, 2, False)(torch.randn(1, 8, 7, 7)).shape == (1, 8, 4, 4)


def test_ops_name_their_layers_without_renaming_them():
    """The fast cells call an op's layers by name (`relu`, `depthwise`, `pointwise`, `bn`; a SepConv's
    `first`/`second`); the names are properties over the numeric children, so state_dict keys stay."""
    dil = darts_op("dil_conv_3x3", 8, 2, affine=False)
    assert [dil.relu, dil.depthwise, dil.pointwise, dil.bn] == list(dil)
    assert dil.depthwise.groups == 8 and dil.depthwise.stride == (2, 2) and dil.pointwise.kernel_size == (1, 1)
    sep = darts_op("sep_conv_5x5", 8, 2, affine=False)
    assert [sep.first, sep.second] == list(sep) and sep.first.depthwise.stride == (2, 2)
    assert sep.second.bn is sep[1][3]
    rcb = nb201_op("nor_conv_3x3", 8, 8, 1, affine=False)
    assert [rcb.relu, rcb.conv, rcb.bn] == list(rcb)
    assert list(sep.state_dict())[:2] == ["0.1.weight", "0.2.weight"]
    pool = PoolBN(darts_op("max_pool_3x3", 8, 1, False), 8)  # a search-time pool (`MixedOp`)
    assert [pool.pool, pool.bn] == list(pool) and list(pool.state_dict())[0] == "1.running_mean"
    with pytest.raises(AttributeError):
        dil.bn = torch.nn.Identity()  # read-only: a child is replaced by position, as before


def test_unknown_op_is_named():
    with pytest.raises(ValueError, match="sep_conv_9x9"):
        darts_op("sep_conv_9x9", 8, 1, False)


def test_resnet_block_reduces():
    assert ResNetBasicBlock(8, 16, 2)(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)


@pytest.mark.parametrize("cell_cls", [ClassicCell, FusedCell])
def test_nb201_cell_one_hot_skip_and_none(cell_cls):
    """With every edge one-hot on skip_connect, node 3 = x + (x) + (x + x) = 4x; with `none`, zero."""
    cell = cell_cls(4)
    x = torch.randn(2, 4, 8, 8)
    w = torch.zeros(len(NB201_EDGES), len(NB201_OPS))
    w[:, NB201_OPS.index("skip_connect")] = 1
    assert torch.allclose(cell(x, w), 4 * x, atol=1e-6)
    w = torch.zeros(len(NB201_EDGES), len(NB201_OPS))
    w[:, NB201_OPS.index("none")] = 1
    assert torch.count_nonzero(cell(x, w)) == 0


def test_darts_cell_shapes():
    cell = SearchCell(12, 12, 4, reduction=True, reduction_prev=False)
    w = torch.softmax(torch.zeros(14, len(DARTS_OPS)), -1)
    y = cell(torch.randn(2, 12, 16, 16), torch.randn(2, 12, 16, 16), w)
    assert y.shape == (2, 16, 8, 8)  # 4 nodes x 4 channels, halved resolution


def test_supernet_shapes_and_param_split():
    net = NB201Supernet(C=4, N=1, num_classes=10)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    alphas, weights = net.get_alphas(), net.get_weights()
    assert len(alphas) == 1 and alphas[0].shape == (6, 5)
    assert {id(p) for p in alphas}.isdisjoint({id(p) for p in weights})
    assert len(alphas) + len(weights) == len(list(net.parameters()))
    d = DartsSupernet(C=4, layers=5, num_classes=7)
    assert d(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert {k: tuple(v.shape) for k, v in d.arch.alphas.items()} == {"normal": (14, 8), "reduce": (14, 8)}
    im = DartsSupernet(C=4, layers=3, num_classes=1000, stem="imagenet")
    s0 = im.stem0(torch.randn(1, 3, 64, 64))
    assert im.stem1(s0).shape[-1] == 8  # 8x downsampling by three stride-2 convs
    assert im(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_sigmoid_and_init():
    from sdarts.arch import ArchParams, parse_init
    a = ArchParams({"normal": (6, 5)}, "sigmoid", init=parse_init("-ln 7"))
    assert torch.allclose(a.weights()["normal"], torch.full((6, 5), 0.125))
    s = ArchParams({"normal": (6, 5)}, "softmax", init=0.0)
    assert torch.allclose(s.weights()["normal"].sum(-1), torch.ones(6))
