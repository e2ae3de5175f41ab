"""Streaming image loaders (DALI CPU pipelines and the torch DataLoader fallback) on real JPEGs.

Both backends read the same plan (order, shards, padding), so most tests run on each backend and some
compare the two directly: same ids batch by batch, same pixels where the recipe has no randomness.
"""
import csv
import io

import numpy as np
import pytest
import torch

from conftest import need_data
from sdarts.config import DataConfig
from sdarts.data import StreamLoader, build_image_loader, build_search_loaders
from sdarts.data.imagefolder import choose, key_id, list_split
from sdarts.data.stream import PAD_ID, PAD_LABEL, shard_bounds

BACKENDS = ["dali", "torch"]


def _dali():
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")


def _backend(b):
    if b == "dali":
        _dali()
    return b


@pytest.fixture(scope="module")
def sample():
    return need_data("imagenet-sample")


@pytest.fixture(scope="module")
def truth(sample):
    """id -> class index from files.csv (the sample's own record of each file's ILSVRC2012 label)."""
    with open(sample / "files.csv") as f:
        rows = list(csv.DictReader(f))
    return {key_id(r["path"].split("/", 1)[1]): int(r["class_index"]) for r in rows}


def _load(sample, backend, pipeline, split="val", **kw):
    kw.setdefault("micro_batch", 8)
    kw.setdefault("workers", 0 if backend == "torch" else 2)
    return build_image_loader(str(sample), split, pipeline, backend=backend,
                              classes_file=str(sample / "classes.tsv"), **kw)


def _real(b):
    keep = b.ids >= 0
    return b.ids[keep], b.y[keep]


# --------------------------------------------------------------------------- real JPEGs, both paths

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pipeline,res,dtype", [("train", 224, "fp32"), ("eval", 224, "bf16"),
                                                ("search", 16, "fp16"), ("search", 112, "fp32")])
def test_real_jpegs_shapes_dtypes_ranges_and_labels(sample, truth, backend, pipeline, res, dtype):
    loader = _load(sample, _backend(backend), pipeline, resolution=res, dtype=dtype)
    assert isinstance(loader, StreamLoader) and loader.backend == backend
    want = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    lo, hi = (0 - 0.485) / 0.229 - 0.01, (1 - 0.406) / 0.225 + 0.01   # normalised [0, 1] pixels
    seen = 0
    for k, b in enumerate(loader):
        assert b.x.shape == (8, 3, res, res) and b.x.dtype == want
        assert b.y.dtype == torch.int64 and b.ids.dtype == torch.int64
        x = b.x.float()
        assert torch.isfinite(x).all() and lo <= x.min() and x.max() <= hi
        assert x.std() > 0.3   # real images, not zeros
        ids, y = _real(b)
        # val/ has 100 of the 1000 class folders: labels come from classes.tsv, not from folder order
        assert y.tolist() == [truth[i] for i in ids.tolist()]
        seen += len(ids)
        if k == 2:
            break
    assert seen == 24


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_labels_follow_classes_tsv_not_folder_order(sample, truth, backend):
    loader = _load(sample, _backend(backend), "eval", resolution=32, micro_batch=50)
    labels = {}
    for b in loader:
        labels.update(zip(*(t.tolist() for t in _real(b))))
    assert len(labels) == 100 and labels == {i: truth[i] for i in labels}
    assert max(labels.values()) > 99   # folder order would have numbered them 0..99


def test_eval_pixels_agree_across_backends(sample):
    """No randomness in eval: DALI and torchvision make the same 224 crops (up to resampling)."""
    _dali()
    a = next(iter(_load(sample, "dali", "eval")))
    b = next(iter(_load(sample, "torch", "eval")))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.y, b.y)
    assert (a.x - b.x).abs().mean() < 0.02


# --------------------------------------------------------------------------- sharding and padding

@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_read_disjoint_shards_whose_union_is_the_set(sample, backend):
    backend = _backend(backend)
    ranks = [_load(sample, backend, "search", resolution=16, rank=r, world=2, micro_batch=16, drop_last=False)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4        # 50 images each: 4 batches, the last one padded
    got = [[b for b in r] for r in ranks]
    ids = [torch.cat([_real(b)[0] for b in g]).tolist() for g in got]
    assert set(ids[0]).isdisjoint(ids[1]) and len(ids[0]) == len(set(ids[0])) == 50
    every = set(list_split(sample, "val").ids.tolist())
    assert set(ids[0]) | set(ids[1]) == every
    for b in got[0][-1:]:   # padding: id -1 and the ignore label, so a plain cross-entropy skips it
        pad = b.ids == PAD_ID
        assert pad.sum() == 14 and (b.y[pad] == PAD_LABEL).all() and (b.x[pad] == 0).all()


def test_backends_follow_the_same_plan(sample):
    """Same (seed, epoch, rank, world): the same samples in the same batches on DALI and torch."""
    _dali()
    for rank in range(2):
        d = _load(sample, "dali", "search", resolution=16, rank=rank, world=2, seed=5)
        t = _load(sample, "torch", "search", resolution=16, rank=rank, world=2, seed=5)
        for loader in (d, t):
            loader.set_epoch(3)
        assert [b.ids.tolist() for b in d] == [b.ids.tolist() for b in t]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_on_three_ranks_neither_drops_nor_duplicates(sample, backend):
    backend = _backend(backend)
    n = 100   # 33 / 33 / 34 per rank with DALI's shard rule; 5 batches of 8 on every rank
    loaders = [_load(sample, backend, "eval", resolution=32, rank=r, world=3) for r in range(3)]
    assert {len(loader) for loader in loaders} == {5}
    ids = [i for loader in loaders for b in loader for i in b.ids.tolist() if i != PAD_ID]
    assert len(ids) == len(set(ids)) == n
    assert [shard_bounds(n, r, 3) for r in range(3)] == [(0, 33), (33, 66), (66, 100)]


def test_epochs_reshuffle_and_train_drops_the_tail(sample):
    loader = _load(sample, "torch", "search", resolution=16, micro_batch=16)
    assert len(loader) == 6   # 100 // 16: incomplete batches are dropped in training
    e0 = [b.ids.tolist() for b in loader]
    loader.set_epoch(1)
    e1 = [b.ids.tolist() for b in loader]
    assert e0 != e1 and all(PAD_ID not in ids for ids in e0 + e1)


# --------------------------------------------------------------------------- bi-level halves, fraction

def test_bilevel_halves_are_disjoint_and_cover_the_split(sample):
    whole = list_split(sample, "train")
    a, b = choose(whole, subset="a"), choose(whole, subset="b")
    assert set(a.ids.tolist()).isdisjoint(b.ids.tolist())
    assert set(a.ids.tolist()) | set(b.ids.tolist()) == set(whole.ids.tolist())
    assert len(a) == len(b) == 500
    assert np.array_equal(choose(list_split(sample, "train"), subset="a").ids, a.ids)   # stable
    small = choose(whole, subset="b", max_samples=256)   # more classes (500) than images kept
    assert len(small) == 256 and len(set(small.labels.tolist())) == 256
    assert set(small.ids.tolist()) <= set(b.ids.tolist())


def test_bilevel_halves_stay_disjoint_on_every_rank(sample):
    cfg = DataConfig(dataset="imagenet", root=str(sample), resolution=16, micro_batch=32,
                     backend="dali" if _has_dali() else "torch")
    seen = {}
    for rank in range(2):
        w, alpha = build_search_loaders(cfg, 1000, seed=0, rank=rank, world=2, accum=1, device="cpu")
        assert isinstance(w, StreamLoader) and len(w) == len(alpha) == 7     # 250 per rank and half
        seen[rank, "w"] = {i for bt in w for i in bt.ids.tolist()}
        seen[rank, "alpha"] = {i for bt in alpha for i in bt.ids.tolist()}
    for r in range(2):
        for q in range(2):
            assert seen[r, "w"].isdisjoint(seen[q, "alpha"])
    assert seen[0, "w"].isdisjoint(seen[1, "w"]) and seen[0, "alpha"].isdisjoint(seen[1, "alpha"])


def _has_dali():
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def test_fraction_is_per_class_and_stable_on_webdataset_shards():
    root = need_data("cifar10-wds")
    whole = list_split(root, "test")
    assert len(whole) == 10000 and whole.kind == "wds"
    sub = choose(whole, fraction=0.1)
    assert np.bincount(sub.labels).tolist() == [100] * 10
    assert np.array_equal(sub.ids, choose(list_split(root, "test"), fraction=0.1).ids)
    a, b = choose(whole, fraction=0.1, subset="a"), choose(whole, fraction=0.1, subset="b")
    assert np.bincount(a.labels).tolist() == np.bincount(b.labels).tolist() == [50] * 10
    assert set(a.ids.tolist()).isdisjoint(b.ids.tolist())


# --------------------------------------------------------------------------- WebDataset through both

def test_cifar_webdataset_through_both_backends():
    root = need_data("cifar10-wds")
    _dali()
    from sdarts.data.constants import CIFAR_MEAN, CIFAR_STD
    got = {}
    for backend in BACKENDS:
        loader = build_image_loader(str(root), "test", "eval", micro_batch=64, resolution=32, backend=backend,
                                    fraction=0.05, mean=CIFAR_MEAN, std=CIFAR_STD,
                                    workers=0 if backend == "torch" else 2)
        assert len(loader) == 8   # 500 images: 7 full batches and one of 52 + 12 padding
        got[backend] = list(loader)
    whole = list_split(root, "test")
    label_of = dict(zip(whole.ids.tolist(), whole.labels.tolist()))
    for d, t in zip(got["dali"], got["torch"]):
        assert torch.equal(d.ids, t.ids) and torch.equal(d.y, t.y)
        ids, y = _real(d)
        assert y.tolist() == [label_of[i] for i in ids.tolist()]   # labels from the ASCII .cls members
        assert d.x.shape == (64, 3, 32, 32)
        assert (d.x - t.x).abs().mean() < 0.05   # same JPEG decoded by two libraries
    search = build_image_loader(str(root), "test", "search", micro_batch=64, resolution=32, backend="dali",
                                fraction=0.05, subset="a")
    b = next(iter(search))
    assert b.x.shape == (64, 3, 32, 32) and (b.ids >= 0).all()


# --------------------------------------------------------------------------- mid-epoch resume

@pytest.mark.parametrize("backend,with_dali_checkpoint", [("dali", True), ("dali", False), ("torch", True)])
def test_resume_mid_epoch_yields_the_same_next_batch(sample, backend, with_dali_checkpoint):
    backend = _backend(backend)
    make = lambda: _load(sample, backend, "train", resolution=96, seed=7)  # noqa: E731
    a = make()
    a.set_epoch(1)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    if not with_dali_checkpoint:
        state["per_rank"] = [""]          # e.g. written by the torch fallback: replayed instead
    buf = io.BytesIO()
    torch.save({"train_loader": state}, buf)   # as DeepSpeed's client_state would
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["train_loader"]
    expected = [next(it), next(it)]
    b = make()
    b.load_state_dict(state)
    b.set_epoch(1)             # the search loop calls this after loading; it must keep the position
    assert b.position == 2
    got = iter(b)
    for e in expected:
        g = next(got)
        assert torch.equal(g.ids, e.ids) and torch.equal(g.x, e.x)


def test_state_dict_is_plain_data(sample):
    _dali()
    loader = _load(sample, "dali", "search", resolution=16)
    it = iter(loader)
    next(it)
    state = loader.state_dict()

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return isinstance(v, (int, float, str))
    assert plain(state) and state["position"] == 1 and state["per_rank"][0]


# --------------------------------------------------------------------------- search-loop routing

def test_search_loaders_route_imagenet_and_cifar_webdataset(sample, tmp_path):
    cfg = DataConfig(dataset="imagenet", root=str(sample), resolution=16, micro_batch=32, backend="torch")
    w, alpha = build_search_loaders(cfg, 1000, seed=0, rank=0, world=1, accum=1, device="cpu")
    assert w.backend == "torch" and w.num_samples == alpha.num_samples == 500
    b = next(iter(w))
    assert b.x.shape == (32, 3, 16, 16)
    _dali()
    (tmp_path / "train-000000.tar").symlink_to(need_data("cifar10-wds", "test-000001.tar"))  # 5,000 real
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), resolution=32, micro_batch=32, backend="dali",
                     max_per_split=320)
    w, alpha = build_search_loaders(cfg, 10, seed=0, rank=0, world=1, accum=1, device="cpu")
    assert w.backend == "dali" and len(w) == 10 and set(w.listing.ids).isdisjoint(alpha.listing.ids)
    assert np.bincount(w.listing.labels).tolist() == [32] * 10
    b = next(iter(alpha))
    assert b.x.shape == (32, 3, 32, 32) and b.y.max() < 10


def _two_rank_worker(rank, port, root, out):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    make = lambda: build_image_loader(root, "val", "train", 8, rank=rank, world=2, seed=3,  # noqa: E731
                                      resolution=64, backend="dali", workers=1)
    a = make()
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()          # collective: both ranks at the same step
    expected = next(it)
    if rank == 0:
        torch.save(state, f"{out}/client_state.pt")   # DeepSpeed keeps rank 0's client state only
    dist.barrier()
    b = make()
    b.load_state_dict(torch.load(f"{out}/client_state.pt", weights_only=True))
    got = next(iter(b))
    torch.save({"same": torch.equal(got.x, expected.x) and torch.equal(got.ids, expected.ids),
                "own_checkpoints": len(state["per_rank"]) == 2 and all(state["per_rank"])}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_resume_on_two_ranks_from_rank0_client_state(sample, tmp_path):
    """Every rank resumes its own DALI stream exactly from the one client state that rank 0 saved."""
    _dali()
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(sample), str(tmp_path)), nprocs=2)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert res["same"] and res["own_checkpoints"], f"rank {r}: {res}"
