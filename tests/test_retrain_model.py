"""Retrain networks: shapes with and without the auxiliary head, drop-path, NB201 network."""
import pytest
import torch

from retrain.model import Cell, NB201Network, NetworkCIFAR, NetworkImageNet, build_network, drop_path
from sdarts.genotype import from_json
from sdarts.genotype import LITERATURE

DARTS_V2 = LITERATURE["darts_v2"]
ALL_SKIP = from_json({"space": "darts", "normal": [["skip_connect", k % 2] for k in range(8)],
                      "normal_concat": [2, 3, 4, 5], "reduce": [["max_pool_3x3", k % 2] for k in range(8)],
                      "reduce_concat": [2, 3, 4, 5]})


@pytest.mark.parametrize("aux", [True, False])
def test_cifar_shapes(aux):
    torch.manual_seed(0)
    net = NetworkCIFAR(8, 10, 5, aux, DARTS_V2)
    x = torch.randn(3, 3, 32, 32)
    logits, logits_aux = net.train()(x)
    assert logits.shape == (3, 10)
    assert (logits_aux.shape == (3, 10)) if aux else logits_aux is None
    logits, logits_aux = net.eval()(x)
    assert logits.shape == (3, 10) and logits_aux is None  # the head only runs in training
    assert (net.auxiliary_head is not None) == aux


@pytest.mark.parametrize("aux", [True, False])
def test_imagenet_shapes_aux_on_the_7x7_map(aux):
    torch.manual_seed(0)
    net = NetworkImageNet(8, 1000, 5, aux, DARTS_V2)
    seen = {}
    net.cells[net.aux_index].register_forward_hook(lambda m, i, o: seen.update(hw=tuple(o.shape[-2:])))
    logits, logits_aux = net.train()(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 1000) and seen["hw"] == (7, 7)
    assert (logits_aux.shape == (2, 1000)) if aux else logits_aux is None


def test_reductions_at_one_and_two_thirds():
    net = NetworkCIFAR(8, 10, 20, False, DARTS_V2)
    assert [i for i, c in enumerate(net.cells) if c.reduction] == [6, 13]


def test_drop_path_function():
    torch.manual_seed(0)
    y = drop_path(torch.ones(400, 2, 3, 3), 0.25)
    per_sample = y.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1])                   # whole samples are dropped
    assert set(per_sample[:, 0].unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}   # survivors rescaled by 1/keep
    assert drop_path(torch.ones(4, 1, 1, 1), 0.0).equal(torch.ones(4, 1, 1, 1))


def test_drop_path_is_identity_in_eval_and_active_in_training():
    torch.manual_seed(0)
    net = NetworkCIFAR(8, 10, 5, True, DARTS_V2, drop_path_prob=0.5)
    x = torch.randn(4, 3, 32, 32)
    net.eval()
    a, _ = net(x)
    net.drop_path_prob = 0.0
    b, _ = net(x)
    assert torch.equal(a, b)
    net.train()
    net.drop_path_prob = 0.0
    c1, _ = net(x)
    c2, _ = net(x)
    assert torch.equal(c1, c2)  # same batch, same BN batch statistics: deterministic without drop-path
    net.drop_path_prob = 0.5
    d1, _ = net(x)
    d2, _ = net(x)
    assert not torch.equal(d1, d2)


def test_drop_path_never_touches_identity_edges():
    torch.manual_seed(0)
    cell = Cell(ALL_SKIP, 8, 8, 8, reduction=False, reduction_prev=False).train()
    s0, s1 = torch.randn(4, 8, 8, 8), torch.randn(4, 8, 8, 8)
    assert all(isinstance(op, torch.nn.Identity) for op in cell.ops)
    assert torch.equal(cell(s0, s1, 0.9), cell(s0, s1, 0.0))


def test_nb201_network_and_dispatch():
    g = LITERATURE["nb201_single_darts"]
    net = build_network(g, "cifar10", 8, 1, 10)
    assert isinstance(net, NB201Network)
    logits, aux = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and aux is None
    assert isinstance(build_network(DARTS_V2, "imagenet", 8, 5, 1000), NetworkImageNet)
    assert isinstance(build_network(DARTS_V2, "cifar10", 8, 5, 10), NetworkCIFAR)
    with pytest.raises(TypeError, match="DARTS genotype"):
        NetworkCIFAR(8, 10, 5, False, g)


def test_ops_are_the_shared_definitions():
    from sdarts.spaces.ops import DilConv, SepConv
    net = NetworkCIFAR(8, 10, 3, False, DARTS_V2)
    kinds = {type(op) for c in net.cells for op in c.ops}
    assert SepConv in kinds and DilConv in kinds
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bn.affine for bn in bns)  # retrain ops are affine, unlike the search's
