"""Search data: the NB201 split, per-class fractions, rank slots and mid-epoch resume of the loader."""
import torch

from conftest import need_data
from sdarts.data.loader import TensorLoader
from sdarts.data.sources import Split, cifar10_search_splits, digits_search_splits, per_class_subset


def _split(n=96, classes=4):
    labels = torch.arange(n) % classes
    return Split(torch.randint(0, 255, (n, 3, 8, 8), dtype=torch.uint8), labels, torch.arange(n) * 7 + 3)


def test_cifar_wds_nb201_split_is_by_shard_disjoint_and_balanced():
    root = need_data("cifar10-wds")
    a, b = cifar10_search_splits(str(root), fraction=0.02, cap=0)
    assert set(a.ids.tolist()).isdisjoint(b.ids.tolist())
    # 2% of each class of ~2,500 per half (the shards were shuffled, so halves are not exactly balanced)
    assert 490 <= len(a) <= 510 and 490 <= len(b) <= 510
    assert all(45 <= c <= 55 for c in torch.bincount(a.labels).tolist())
    assert a.images.dtype == torch.uint8 and a.images.shape[1:] == (3, 32, 32)
    a2, _ = cifar10_search_splits(str(root), fraction=0.02, cap=0)
    assert torch.equal(a.ids, a2.ids) and torch.equal(a.images, a2.images)  # deterministic across runs


def test_digits_halves_share_classes():
    a, b = digits_search_splits(16, 1.0, 0)
    assert set(a.labels.tolist()) == set(b.labels.tolist()) == set(range(10))
    assert abs(len(a) - len(b)) <= 10


def test_fraction_is_per_class_and_stable():
    s = _split()
    sub = per_class_subset(s, 0.5)
    assert torch.bincount(sub.labels).tolist() == [12] * 4
    assert torch.equal(sub.ids, per_class_subset(s, 0.5).ids)


def test_two_ranks_equal_one_rank_with_accumulation():
    s = _split()
    one = TensorLoader(s, micro_batch=8, world=1, accum=2, seed=3)
    r0 = TensorLoader(s, micro_batch=8, rank=0, world=2, seed=3)
    r1 = TensorLoader(s, micro_batch=8, rank=1, world=2, seed=3)
    micro = list(one)
    assert len(micro) == 2 * len(r0)
    for k, (b0, b1) in enumerate(zip(r0, r1)):
        assert torch.equal(b0.ids, micro[2 * k].ids) and torch.equal(b1.ids, micro[2 * k + 1].ids)
        assert torch.equal(b0.x, micro[2 * k].x)  # same augmentation too
        assert set(b0.ids.tolist()).isdisjoint(b1.ids.tolist())


def test_loader_resumes_mid_epoch():
    s = _split()
    a = TensorLoader(s, micro_batch=8, seed=1)
    a.set_epoch(2)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    expected = next(it)
    b = TensorLoader(s, micro_batch=8, seed=1)
    b.load_state_dict(state)
    got = next(iter(b))
    assert torch.equal(got.x, expected.x) and torch.equal(got.ids, expected.ids)


def test_epochs_reshuffle_and_augmentation_is_real():
    s = _split()
    a = TensorLoader(s, micro_batch=8, seed=1)
    e0 = next(iter(a)).ids
    a.set_epoch(1)
    e1 = next(iter(a)).ids
    assert not torch.equal(e0, e1)
    plain = TensorLoader(s, micro_batch=96, seed=1, augment=False)
    aug = TensorLoader(s, micro_batch=96, seed=1, augment=True)
    assert not torch.equal(next(iter(plain)).x, next(iter(aug)).x)
