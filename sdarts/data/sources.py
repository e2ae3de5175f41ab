"""Where search images come from: CIFAR-10 WebDataset shards or npz, sklearn digits, synthetic.

Each source returns a `Split` (uint8 images NCHW, int64 labels, stable int ids) for the two halves of
the search data: `train` (updates w) and `valid` (updates alpha in bi-level DARTS). The split follows
the NB201 rule (25k / 25k of the CIFAR-10 training set) and is made deterministically:
- WebDataset shards: by shard, `train-000000..000004` vs `train-000005..000009` (the shards were
  shuffled before sharding, so each half holds all classes);
- arrays (npz, digits, synthetic): alternate samples within each class (never a cut of a
  class-ordered list, which would give the halves disjoint classes).
`fraction` keeps a per-class subset chosen by a hash of the sample id, identical on every rank and
across restarts.
"""
from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdarts.errors import DataError


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    ids: torch.Tensor     # int64 [N], unique across both halves of a search dataset

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, keep: torch.Tensor) -> "Split":
        return Split(self.images[keep], self.labels[keep], self.ids[keep])


def _stable_rank(ids: torch.Tensor, salt: str) -> np.ndarray:
    """A deterministic pseudo-random order key per id (sha1, not Python's salted hash)."""
    return np.array([int.from_bytes(hashlib.sha1(f"{salt}:{int(i)}".encode()).digest()[:8], "little")
                     for i in ids.tolist()], dtype=np.uint64)


def per_class_subset(split: Split, fraction: float, cap: int = 0, salt: str = "fraction") -> Split:
    """Keeps `fraction` of each class (and at most `cap` images in all, class-balanced), by id hash."""
    if fraction >= 1.0 and (cap <= 0 or cap >= len(split)):
        return split
    keys = _stable_rank(split.ids, salt)
    labels = split.labels.numpy()
    classes = np.unique(labels)
    per_class_cap = None if cap <= 0 else max(1, cap // len(classes))
    keep = []
    for c in classes:
        idx = np.nonzero(labels == c)[0]
        idx = idx[np.argsort(keys[idx], kind="stable")]
        n = max(1, int(round(len(idx) * fraction)))
        if per_class_cap is not None:
            n = min(n, per_class_cap)
        keep.append(idx[:n])
    keep_t = torch.from_numpy(np.sort(np.concatenate(keep)))
    return split.subset(keep_t)


def alternate_within_class(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the two halves: within each class, even positions vs odd positions."""
    a, b = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        a.append(idx[0::2])
        b.append(idx[1::2])
    return torch.sort(torch.cat(a)).values, torch.sort(torch.cat(b)).values


def read_wds_shard(path: Path, on_bad: str = "error", skipped: list | None = None
                   ) -> tuple[list[str], list[bytes], list[int]]:
    """Reads (key, jpeg bytes, label) triples from one WebDataset tar with the standard library."""
    keys, jpgs, labels = [], [], []
    pending: dict[str, dict[str, bytes]] = {}
    if on_bad != "skip":  # tarfile alone stops silently when a shard is cut at a member boundary
        from sdarts.data.wds import scan_tar
        scan_tar(str(path), on_bad)
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rpartition(".")
                pending.setdefault(key, {})[ext] = tf.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: unreadable or truncated tar shard ({e})") from None
    for key in sorted(pending):
        parts = pending[key]
        if "jpg" not in parts or "cls" not in parts:
            if on_bad == "skip":
                if skipped is not None:
                    skipped.append(f"{path}:{key}")
                continue
            raise DataError(f"{path}: sample {key!r} lacks a .jpg or .cls member")
        keys.append(key)
        jpgs.append(parts["jpg"])
        labels.append(int(parts["cls"].decode().strip()))
    return keys, jpgs, labels


def decode_jpegs(blobs: list[bytes], names: list[str], on_bad: str = "error",
                 skipped: list | None = None) -> tuple[torch.Tensor, list[int]]:
    """Decodes JPEG bytes to uint8 RGB [N, 3, H, W]; returns the tensor and the kept positions."""
    from torchvision.io import ImageReadMode, decode_jpeg
    out, kept = [], []
    for k, (b, name) in enumerate(zip(blobs, names)):
        try:
            out.append(decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB))
            kept.append(k)
        except RuntimeError:
            if on_bad == "skip":
                if skipped is not None:
                    skipped.append(name)
                continue
            raise DataError(f"{name}: corrupt JPEG (cannot decode)") from None
    if not out:
        raise DataError(f"no decodable images in {names[0] if names else 'the data'}")
    return torch.stack(out), kept


def _key_id(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:7], "little")


def load_cifar_wds(root: Path, shards: list[Path], fraction: float, cap: int, on_bad: str,
                   skipped: list) -> Split:
    keys, jpgs, labels = [], [], []
    for s in shards:
        k, j, l = read_wds_shard(s, on_bad, skipped)
        keys += k
        jpgs += j
        labels += l
    ids = torch.tensor([_key_id(k) for k in keys], dtype=torch.int64)
    labels_t = torch.tensor(labels, dtype=torch.int64)
    # choose the subset before decoding: only decode what is used
    meta = per_class_subset(Split(torch.empty(len(keys), 0), labels_t, ids), fraction, cap)
    pos = {int(i): n for n, i in enumerate(ids.tolist())}
    sel = [pos[int(i)] for i in meta.ids.tolist()]
    images, kept = decode_jpegs([jpgs[i] for i in sel], [f"{root}/{keys[i]}.jpg" for i in sel], on_bad, skipped)
    sel_t = torch.tensor(sel)[torch.tensor(kept)]
    return Split(images, labels_t[sel_t], ids[sel_t])


def cifar10_search_splits(root: str | None, fraction: float, cap: int, on_bad: str = "error",
                          skipped: list | None = None) -> tuple[Split, Split]:
    """The NB201 search split of CIFAR-10 train: shards 0-4 vs 5-9, or alternating within class for npz."""
    if root is None:
        raise DataError("data.root is required for dataset cifar10 (a folder of train-*.tar shards or an .npz)")
    p = Path(root)
    skipped = [] if skipped is None else skipped
    if p.is_file() and p.suffix == ".npz":
        d = np.load(p)
        if "x_train" not in d or "y_train" not in d:
            raise DataError(f"{p}: npz lacks x_train / y_train")
        images = torch.from_numpy(d["x_train"]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(d["y_train"].astype(np.int64))
        whole = Split(images, labels, torch.arange(len(labels)))
        a, b = alternate_within_class(labels)
        return (per_class_subset(whole.subset(a), fraction, cap), per_class_subset(whole.subset(b), fraction, cap))
    if not p.is_dir():
        raise DataError(f"data.root not found: {p}")
    shards = sorted(p.glob("train-*.tar"))
    if len(shards) < 2:
        raise DataError(f"{p}: needs at least two train-*.tar shards for the search split, found {len(shards)}")
    half = len(shards) // 2
    return (load_cifar_wds(p, shards[:half], fraction, cap, on_bad, skipped),
            load_cifar_wds(p, shards[half:], fraction, cap, on_bad, skipped))


def digits_search_splits(resolution: int, fraction: float, cap: int) -> tuple[Split, Split]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download), upsampled to RGB."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = x.clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(d.target.astype(np.int64))
    whole = Split(images, labels, torch.arange(len(labels)))
    a, b = alternate_within_class(labels)
    return per_class_subset(whole.subset(a), fraction, cap), per_class_subset(whole.subset(b), fraction, cap)


def synthetic_search_splits(n: int, resolution: int, num_classes: int, seed: int) -> tuple[Split, Split]:
    """Random images whose label is a fixed linear function of the pixels: learnable, for smoke runs."""
    g = torch.Generator().manual_seed(seed + 12345)
    images = torch.randint(0, 256, (2 * n, 3, resolution, resolution), generator=g, dtype=torch.uint8)
    proj = torch.randn(3 * resolution * resolution, num_classes, generator=g)
    labels = (images.flatten(1).float() / 255 - 0.5).matmul(proj).argmax(1)
    whole = Split(images, labels, torch.arange(2 * n))
    return whole.subset(torch.arange(0, 2 * n, 2)), whole.subset(torch.arange(1, 2 * n, 2))


def cifar10_split(root: str | None, split: str = "train", fraction: float = 1.0, cap: int = 0,
                  on_bad: str = "error", skipped: list | None = None) -> Split:
    """One whole CIFAR-10 split for retraining: `train` (all 50k) or `test` (10k).

    From `train-*.tar` / `test-*.tar` WebDataset shards, or an npz with `x_train`/`y_train` and
    `x_test`/`y_test`. `fraction` and `cap` keep a class-balanced subset chosen by id hash (the
    same on every rank), for short runs."""
    if split not in ("train", "test"):
        raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    if root is None:
        raise DataError("data.root is required for dataset cifar10 (a folder of train-*.tar / test-*.tar "
                        "shards or an .npz)")
    p = Path(root)
    skipped = [] if skipped is None else skipped
    if p.is_file() and p.suffix == ".npz":
        d = np.load(p)
        xk, yk = f"x_{split}", f"y_{split}"
        if xk not in d or yk not in d:
            raise DataError(f"{p}: npz lacks {xk} / {yk}")
        images = torch.from_numpy(d[xk]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(d[yk].astype(np.int64))
        return per_class_subset(Split(images, labels, torch.arange(len(labels))), fraction, cap)
    if not p.is_dir():
        raise DataError(f"data.root not found: {p}")
    shards = sorted(p.glob(f"{split}-*.tar"))
    if not shards:
        raise DataError(f"{p}: no {split}-*.tar shards")
    return load_cifar_wds(p, shards, fraction, cap, on_bad, skipped)
