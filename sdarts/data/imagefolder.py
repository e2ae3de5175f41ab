"""What a streaming split holds: the file listing of an ImageFolder tree or of WebDataset shards.

Both loader backends (DALI and the torch fallback) start from the same `Listing`, so they read the
same samples with the same labels and ids, in the same order (see `stream.epoch_order`).

- ImageFolder: `root/<split>/<class>/*.JPEG`. Labels follow a class-index file (ImageNet's
  `classes.tsv`), so a validation tree holding only some class folders is still labelled by the full
  1000-class order and not by its own folder order.
- WebDataset: `root/<split>-*.tar`, samples grouped by key (the name up to the first dot of the
  member's base name) with an image member (`jpg`, `jpeg` or `png`) and a `cls` member of ASCII digits.
  The shards are scanned once with the standard library (`wds.py`: member offsets and labels); the
  DALI backend reads the selected samples through index files written from this scan.

Subsets are chosen from a hash of each sample's key (its path relative to the split, or its
WebDataset key), never from list position or Python's salted `hash`, so they are identical on every
rank, across restarts and after the data moves to another folder:
- `fraction`: a per-class fraction (the paper's half-ImageNet search, PC-DARTS' 10% / 2.5% splits);
- `subset` "a" / "b": the two disjoint halves of bi-level search (w vs. alpha), alternating over the
  samples sorted by (class, key hash), so each half holds every class that has two or more images.

Bad data fails here, before any training step, with one line naming the path: a missing root, split,
or class-index file; an empty class folder; a truncated tar shard; a sample without image or label.
With `on_bad="skip"` the damaged samples are left out and counted in `Listing.skipped` instead.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sdarts.data.wds import WDS_IMAGE_EXTS, parse_label, scan_tar
from sdarts.errors import DataError

log = logging.getLogger("sdarts.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class Listing:
    """The samples of one split, aligned arrays: sample i is (keys[i], labels[i], ids[i]).

    Kept compact (ImageNet has 1.28M samples and every rank holds a listing per loader): file paths
    and tar member names are derived from the keys instead of being stored.
    """
    root: str
    split: str
    kind: str                 # "folder" | "wds"
    keys: list[str]           # folder: "<class>/<file>"; wds: the sample key (hash input for subsets)
    labels: np.ndarray        # int64
    ids: np.ndarray           # int64, from the key
    num_classes: int
    # WebDataset only: the sample's tar, its image member (offset, size, extension index into
    # WDS_IMAGE_EXTS) and its label member (offset, size); keys qualified by the tar name when
    # the shards reuse keys (`qualified`)
    tars: list[str] = field(default_factory=list)
    tar_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    img: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    cls: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    qualified: bool = False
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, idx: np.ndarray) -> "Listing":
        idx = np.asarray(idx, dtype=np.int64)
        wds = self.kind == "wds"
        return replace(self, keys=[self.keys[i] for i in idx], labels=self.labels[idx], ids=self.ids[idx],
                       tar_of=self.tar_of[idx] if wds else self.tar_of, img=self.img[idx] if wds else self.img,
                       cls=self.cls[idx] if wds else self.cls)

    def _member_key(self, i: int) -> str:
        k = self.keys[i]
        return k.split("/", 1)[1] if self.qualified else k

    def image_member(self, i: int) -> tuple[str, int, int, str]:
        """WebDataset: sample i's image member as (ext, offset, size, name)."""
        off, size, e = (int(v) for v in self.img[i])
        ext = WDS_IMAGE_EXTS[e]
        return ext, off, size, f"{self._member_key(i)}.{ext}"

    def cls_member(self, i: int) -> tuple[str, int, int, str]:
        off, size = (int(v) for v in self.cls[i])
        return "cls", off, size, f"{self._member_key(i)}.cls"

    def path(self, i: int) -> str:
        """Where sample i lives, for DALI's file list and for messages: a file, or `<tar>:<member>`."""
        if self.kind == "folder":
            return os.path.join(self.root, self.split, self.keys[i])
        return f"{self.tars[self.tar_of[i]]}:{self.image_member(i)[3]}"

    def read_bytes(self, i: int) -> bytes:
        """The encoded image of sample i (a plain file read, or a seek into its tar)."""
        if self.kind == "folder":
            with open(self.path(i), "rb") as f:
                return f.read()
        _, off, size, _ = self.image_member(i)
        with open(self.tars[self.tar_of[i]], "rb") as f:
            f.seek(off)
            return f.read(size)


def key_id(key: str) -> int:
    """A sample's int64 id from its key (the same function as the in-memory CIFAR path)."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:7], "little")


def _key_rank(keys: list[str], salt: str) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.sha1(f"{salt}:{k}".encode()).digest()[:8], "little")
                     for k in keys], dtype=np.uint64)


# ----------------------------------------------------------------------------------------- classes

def read_classes(path: str | Path) -> list[str]:
    """Class names in label order from a class-index file.

    Accepted: a TSV with a header naming a `wnid` (or `class`) column and optionally an `index`
    column (ImageNet's `classes.tsv`), or plain text with one class name per line (line = label).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"classes file not found: {p}")
    lines = [ln.rstrip("\n") for ln in p.read_text().splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{p}: classes file is empty")
    head = [h.strip().lower() for h in lines[0].split("\t")]
    name_col = next((head.index(c) for c in ("wnid", "class", "name") if c in head), None)
    if name_col is None:
        return [ln.split("\t")[0].strip() for ln in lines]
    idx_col = head.index("index") if "index" in head else None
    out: dict[int, str] = {}
    for n, ln in enumerate(lines[1:], start=2):
        cols = ln.split("\t")
        try:
            idx = int(cols[idx_col]) if idx_col is not None else n - 2
            out[idx] = cols[name_col].strip()
        except (ValueError, IndexError):
            raise DataError(f"{p}: line {n} is not '<index>\\t<class>...'") from None
    if sorted(out) != list(range(len(out))):
        raise DataError(f"{p}: class indices must be 0..{len(out) - 1} without gaps")
    return [out[i] for i in range(len(out))]


def resolve_classes(root: Path, split_dir: Path, classes_file: str | None) -> list[str]:
    """The class order: `classes_file`, else `root/classes.tsv`, else the folders of `root/train`,
    else the folders of the split itself (the last is only right when the split has every class)."""
    if classes_file:
        return read_classes(classes_file)
    if (root / "classes.tsv").is_file():
        return read_classes(root / "classes.tsv")
    source = root / "train" if (root / "train").is_dir() else split_dir
    return sorted(d.name for d in os.scandir(source) if d.is_dir())


# ------------------------------------------------------------------------------------ ImageFolder

def list_imagefolder(root: Path, split: str, classes_file: str | None, on_bad: str = "error") -> Listing:
    split_dir = root / split
    classes = resolve_classes(root, split_dir, classes_file)
    index = {c: i for i, c in enumerate(classes)}
    keys, labels, skipped = [], [], []
    folders = sorted(d.name for d in os.scandir(split_dir) if d.is_dir())
    if not folders:
        raise DataError(f"{split_dir}: no class folders")
    for c in folders:
        if c not in index:
            raise DataError(f"{split_dir / c}: class folder not in the class index "
                            f"({classes_file or 'folders of ' + str(root / 'train')})")
        files = sorted(e.name for e in os.scandir(split_dir / c)
                       if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            if on_bad == "skip":
                skipped.append(str(split_dir / c))
                log.warning("%s: empty class folder, skipped", split_dir / c)
                continue
            raise DataError(f"{split_dir / c}: empty class folder (no .jpg/.jpeg/.png files)")
        for f in files:
            keys.append(f"{c}/{f}")
            labels.append(index[c])
    if not keys:
        raise DataError(f"{split_dir}: no images")
    return Listing(str(root), split, "folder", keys, np.array(labels, np.int64),
                   np.array([key_id(k) for k in keys], np.int64), len(classes), skipped=skipped)


# ------------------------------------------------------------------------------------- WebDataset

def _tar_signature(tars: list[Path]) -> tuple:
    return tuple((str(t), t.stat().st_size, t.stat().st_mtime_ns) for t in tars)


@functools.lru_cache(maxsize=8)
def _list_wds_cached(signature: tuple, root: str, split: str, num_classes: int, on_bad: str) -> Listing:
    tars = [s[0] for s in signature]
    keys, labels, tar_of, img_m, cls_m, skipped = [], [], [], [], [], []
    for t, tar in enumerate(tars):
        samples, raw_cls, bad = scan_tar(tar, on_bad)
        skipped += bad
        for key, ms in samples:
            img = [m for m in ms if m[0] in WDS_IMAGE_EXTS]
            cls = [m for m in ms if m[0] == "cls"]
            if not img or not cls:
                what = "an image (.jpg/.jpeg/.png)" if not img else "a .cls label"
                if on_bad == "skip":
                    skipped.append(f"{tar}:{key}")
                    continue
                raise DataError(f"{tar}: sample {key!r} lacks {what}")
            label = parse_label(tar, cls[0][3], raw_cls[key])
            if num_classes and not 0 <= label < num_classes:
                raise DataError(f"{tar}:{cls[0][3]}: label {label} outside the {num_classes} classes")
            keys.append(key)
            labels.append(label)
            tar_of.append(t)
            img_m.append((img[0][1], img[0][2], WDS_IMAGE_EXTS.index(img[0][0])))
            cls_m.append((cls[0][1], cls[0][2]))
    if not keys:
        raise DataError(f"{root}: no samples in {split}-*.tar")
    qualified = len(set(keys)) != len(keys)
    if qualified:  # keys local to each shard: qualify them with the shard name
        keys = [f"{Path(tars[t]).name}/{k}" for t, k in zip(tar_of, keys)]
    n_cls = num_classes or int(max(labels)) + 1
    return Listing(root, split, "wds", keys, np.array(labels, np.int64),
                   np.array([key_id(k) for k in keys], np.int64), n_cls, tars=tars,
                   tar_of=np.array(tar_of, np.int64), img=np.array(img_m, np.int64).reshape(-1, 3),
                   cls=np.array(cls_m, np.int64).reshape(-1, 2), qualified=qualified, skipped=skipped)


def list_webdataset(root: Path, split: str, classes_file: str | None, on_bad: str = "error") -> Listing:
    tars = sorted(root.glob(f"{split}-*.tar"))
    num_classes = len(read_classes(classes_file)) if classes_file else 0
    lst = _list_wds_cached(_tar_signature(tars), str(root), split, num_classes, on_bad)
    return replace(lst, skipped=list(lst.skipped))


# ------------------------------------------------------------------------------------------- entry

def list_split(root: str | Path | None, split: str, classes_file: str | None = None,
               on_bad: str = "error") -> Listing:
    """The listing of `split` under `root` (an ImageFolder tree or a folder of WebDataset shards)."""
    if not root:
        raise DataError("data.root is required (an ImageFolder tree or a folder of WebDataset shards)")
    r = Path(root)
    if not r.exists():
        raise DataError(f"data.root not found: {r}")
    if classes_file and not Path(classes_file).is_file():
        raise DataError(f"classes file not found: {classes_file}")
    if (r / split).is_dir():
        return list_imagefolder(r, split, classes_file, on_bad)
    if r.is_dir() and any(r.glob(f"{split}-*.tar")):
        return list_webdataset(r, split, classes_file, on_bad)
    raise DataError(f"{r}: has neither a {split}/ folder (ImageFolder) nor {split}-*.tar shards (WebDataset)")


def choose(listing: Listing, fraction: float = 1.0, subset: str | None = None, max_samples: int = 0
           ) -> Listing:
    """Applies the per-class `fraction`, then the bi-level half `subset`, then a class-balanced cap."""
    if not 0 < fraction <= 1:
        raise DataError(f"fraction must be in (0, 1], got {fraction}")
    if subset not in (None, "a", "b"):
        raise DataError(f"subset must be 'a', 'b' or None, got {subset!r}")
    idx = np.arange(len(listing))
    labels = listing.labels
    if fraction < 1:
        rank = _key_rank(listing.keys, "fraction")
        keep = []
        for c in np.unique(labels):
            members = idx[labels == c]
            members = members[np.argsort(rank[members], kind="stable")]
            keep.append(members[:max(1, int(round(len(members) * fraction)))])
        idx = np.sort(np.concatenate(keep))
    if subset is not None:
        rank = _key_rank([listing.keys[i] for i in idx], "half")
        order = idx[np.lexsort((rank, labels[idx]))]
        idx = np.sort(order[0::2] if subset == "a" else order[1::2])
    if max_samples and len(idx) > max_samples:
        # round robin over the classes (each class's images in hash order): exactly max_samples,
        # class-balanced to within one image even when there are more classes than max_samples
        rank = _key_rank([listing.keys[i] for i in idx], "cap")
        by_hash = np.argsort(rank, kind="stable")
        turn = np.empty(len(idx), np.int64)
        seen: dict[int, int] = {}
        for j in by_hash.tolist():
            c = int(labels[idx[j]])
            turn[j] = seen.get(c, 0)
            seen[c] = turn[j] + 1
        pick = np.lexsort((rank, turn))[:max_samples]
        idx = np.sort(idx[pick])
    if len(idx) == 0:
        raise DataError(f"{listing.root}/{listing.split}: subset {subset!r} with fraction {fraction} is empty")
    return listing.take(idx) if len(idx) != len(listing) else listing
