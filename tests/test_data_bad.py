"""Bad data: each case stops with one line naming the file, or (skip) is counted and left out.

The bad trees are built in tmp_path from copies of a few real ImageNet-sample JPEGs.
"""
import io
import logging
import shutil
import tarfile

import pytest
import torch

from conftest import need_data
from sdarts.data import build_image_loader
from sdarts.errors import DataError
from sdarts.data.imagefolder import list_split

BACKENDS = ["dali", "torch"]


def _backend(b):
    if b == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    return b


@pytest.fixture(scope="module")
def jpegs():
    train = need_data("imagenet-sample", "train")
    return sorted(train.glob("*/*.JPEG"))[:12]


def _tree(tmp_path, jpegs, classes=3, per_class=4):
    """root/train/c<k>/img<j>.JPEG from real JPEGs, plus a classes.tsv."""
    root = tmp_path / "tree"
    for k in range(classes):
        d = root / "train" / f"c{k}"
        d.mkdir(parents=True)
        for j in range(per_class):
            shutil.copy(jpegs[k * per_class + j], d / f"img{j}.JPEG")
    (root / "classes.tsv").write_text("index\twnid\tnames\n" +
                                      "".join(f"{k}\tc{k}\tclass {k}\n" for k in range(classes)))
    return root


def _corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[:300] + bytes(range(256)) * 8)   # header intact, entropy-coded data garbage


def _load(root, backend, **kw):
    kw.setdefault("micro_batch", 4)
    return build_image_loader(str(root), "train", "search", resolution=16, backend=backend,
                              workers=0 if backend == "torch" else 1, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_jpeg_is_named(tmp_path, jpegs, backend):
    root = _tree(tmp_path, jpegs)
    _corrupt(root / "train" / "c1" / "img2.JPEG")
    with pytest.raises(DataError, match=r"c1/img2\.JPEG: corrupt or unreadable image"):
        for _ in _load(root, _backend(backend)):
            pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_jpeg_is_skipped_counted_and_logged(tmp_path, jpegs, backend, caplog):
    root = _tree(tmp_path, jpegs)
    bad = root / "train" / "c1" / "img2.JPEG"
    _corrupt(bad)
    (root / "train" / "c2" / "img0.JPEG").write_bytes(b"")      # an empty file too
    shared = []
    loader = _load(root, _backend(backend), on_bad_sample="skip", skipped=shared, drop_last=False)
    with caplog.at_level(logging.WARNING, logger="sdarts.data"):
        batches = list(loader)
    ids = [i for b in batches for i in b.ids.tolist() if i >= 0]
    assert len(batches) == 3 and len(ids) == 10            # 12 files, 2 skipped as padding
    assert sorted(loader.skipped) == sorted(shared) == sorted([str(bad), str(root / "train" / "c2" / "img0.JPEG")])
    assert "img2.JPEG" in caplog.text and "2 skipped so far" in caplog.text
    loader.set_epoch(1)                                     # known bad files are not retried
    assert sum(int((b.ids >= 0).sum()) for b in loader) == 10


def test_empty_class_folder_is_named(tmp_path, jpegs):
    root = _tree(tmp_path, jpegs)
    (root / "train" / "c3").mkdir()
    (root / "classes.tsv").write_text("c0\nc1\nc2\nc3\n")      # plain one-name-per-line class file
    with pytest.raises(DataError, match=r"train/c3: empty class folder"):
        build_image_loader(str(root), "train", "eval", micro_batch=4, backend="torch")
    loader = build_image_loader(str(root), "train", "eval", micro_batch=4, backend="torch", on_bad_sample="skip")
    assert loader.num_samples == 12 and loader.skipped == [str(root / "train" / "c3")]


def test_missing_paths_are_named(tmp_path, jpegs):
    root = _tree(tmp_path, jpegs)
    with pytest.raises(DataError, match=r"data.root not found: .*nowhere"):
        build_image_loader(str(tmp_path / "nowhere"), "train", "eval", micro_batch=4, backend="torch")
    with pytest.raises(DataError, match=r"classes file not found: .*nope\.tsv"):
        build_image_loader(str(root), "train", "eval", micro_batch=4, classes_file=str(tmp_path / "nope.tsv"))
    with pytest.raises(DataError, match=r"has neither a val/ folder .* nor val-\*\.tar"):
        build_image_loader(str(root), "val", "eval", micro_batch=4, backend="torch")
    (root / "train" / "zz").mkdir()
    shutil.copy(jpegs[0], root / "train" / "zz" / "a.JPEG")
    with pytest.raises(DataError, match=r"train/zz: class folder not in the class index"):
        build_image_loader(str(root), "train", "eval", micro_batch=4, backend="torch")


def _shard(path, jpegs, n, prefix="", fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tf:
        for j in range(n):
            for ext, data in (("jpg", jpegs[j].read_bytes()), ("cls", str(j % 3).encode())):
                info = tarfile.TarInfo(f"{prefix}s{j:03d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("cut", ["mid_member", "no_end_block"])
def test_truncated_tar_is_named(tmp_path, jpegs, cut):
    root = tmp_path / "wds"
    root.mkdir()
    _shard(root / "train-000000.tar", jpegs, 4)
    _shard(root / "train-000001.tar", jpegs, 6)
    t = root / "train-000001.tar"
    data = t.read_bytes()
    if cut == "mid_member":
        t.write_bytes(data[:len(data) // 2])
    else:   # cut exactly after the last member: tarfile alone would not notice
        last_end = max(m.offset_data + m.size for m in tarfile.open(t).getmembers())
        t.write_bytes(data[:(last_end + 511) // 512 * 512])
    for backend in BACKENDS:
        with pytest.raises(DataError, match=r"train-000001\.tar: truncated tar shard"):
            build_image_loader(str(root), "train", "eval", micro_batch=2, backend=backend)
    ok = list_split(root, "train", on_bad="skip")
    assert 4 < len(ok) < 10 and len(ok.skipped) == 1 and "train-000001.tar" in ok.skipped[0]


def test_webdataset_sample_without_label_is_named(tmp_path, jpegs):
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "val-000000.tar", "w") as tf:
        for name, data in (("a.jpg", jpegs[0].read_bytes()), ("a.cls", b"1"), ("b.jpg", jpegs[1].read_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"val-000000\.tar: sample 'b' lacks a \.cls label"):
        list_split(root, "val")


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_jpeg_inside_a_tar_is_named(tmp_path, jpegs, backend):
    root = tmp_path / "wds"
    root.mkdir()
    bad = list(jpegs)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(jpegs[3].read_bytes()[:300] + bytes(range(256)) * 8)
    bad[3] = broken
    _shard(root / "train-000000.tar", bad, 6)
    with pytest.raises(DataError, match=r"train-000000\.tar:s003\.jpg: corrupt or unreadable image"):
        for _ in build_image_loader(str(root), "train", "eval", micro_batch=2, backend=_backend(backend),
                                    workers=0 if backend == "torch" else 1):
            pass
    loader = build_image_loader(str(root), "train", "eval", micro_batch=2, backend=backend, on_bad_sample="skip",
                                workers=0 if backend == "torch" else 1)
    ids = torch.cat([b.ids for b in loader])
    assert int((ids >= 0).sum()) == 5 and loader.skipped == [f"{root / 'train-000000.tar'}:s003.jpg"]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_member_names_are_read_through_both_backends(tmp_path, jpegs, fmt):
    """Names over 100 bytes: a ustar prefix field (fast scan), or GNU / pax extension headers (tarfile)."""
    root = tmp_path / "wds"
    root.mkdir()
    _shard(root / "train-000000.tar", jpegs, 5, prefix="d" * 120 + "/", fmt=fmt)
    lst = list_split(root, "train")
    assert len(lst) == 5 and lst.labels.tolist() == [0, 1, 2, 0, 1]
    for backend in BACKENDS:
        loader = build_image_loader(str(root), "train", "eval", micro_batch=5, resolution=32,
                                    backend=_backend(backend), workers=0 if backend == "torch" else 1)
        b = next(iter(loader))
        assert b.y.tolist() == [0, 1, 2, 0, 1] and (b.ids >= 0).all() and b.x.std() > 0.3
