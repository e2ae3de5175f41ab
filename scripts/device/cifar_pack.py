"""Carry CIFAR-10 to a GPU machine under a 64 MiB transfer limit, and rebuild the shards there.

The WebDataset shards are 148 MB, but two thirds of that is tar headers and padding around ~0.9 KB
JPEGs. `pack` keeps the JPEG bytes unchanged (46 MB) with keys, labels and shard numbers; `unpack`
writes the same shards back (same names, same members), so the NB201 split by shard is unchanged.

    python scripts/device/cifar_pack.py pack ../shared/data/cifar10-wds .gpu/cifar10_jpeg.npz   # train shards
    python scripts/device/cifar_pack.py unpack .gpu/cifar10_jpeg.npz /tmp/cifar10-wds
"""
from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np


def pack(src: Path, out: Path) -> None:
    keys, shards, labels, blobs = [], [], [], []
    names = sorted(src.glob("train-*.tar"))  # the search uses the training set only
    for s_idx, shard in enumerate(names):
        with tarfile.open(shard) as tf:
            members = {m.name: m for m in tf if m.isfile()}
            for name in sorted(members):
                if name.endswith(".jpg"):
                    key = name[:-4]
                    keys.append(key)
                    shards.append(s_idx)
                    labels.append(int(tf.extractfile(members[key + ".cls"]).read().decode()))
                    blobs.append(tf.extractfile(members[name]).read())
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, data=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets,
             labels=np.array(labels, dtype=np.int16), shards=np.array(shards, dtype=np.int16),
             keys=np.frombuffer("\n".join(keys).encode(), dtype=np.uint8),
             shard_names=np.frombuffer("\n".join(n.name for n in names).encode(), dtype=np.uint8))
    print(f"packed {len(keys)} images from {len(names)} shards into {out} ({out.stat().st_size / 1e6:.1f} MB)")


def unpack(src: Path, out: Path) -> None:
    d = np.load(src)
    data, offsets = d["data"], d["offsets"]
    out.mkdir(parents=True, exist_ok=True)
    tars = {i: tarfile.open(out / str(n), "w", format=tarfile.USTAR_FORMAT)
            for i, n in enumerate(d["shard_names"].tobytes().decode().split("\n"))}
    keys = d["keys"].tobytes().decode().split("\n")
    for k, (key, label, shard) in enumerate(zip(keys, d["labels"].tolist(), d["shards"].tolist())):
        for ext, payload in (("jpg", data[offsets[k]:offsets[k + 1]].tobytes()), ("cls", str(label).encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tars[shard].addfile(info, io.BytesIO(payload))
    for t in tars.values():
        t.close()
    print(f"unpacked {len(keys)} images into {len(tars)} shards in {out}")


if __name__ == "__main__":
    cmd, a, b = sys.argv[1:4]
    {"pack": pack, "unpack": unpack}[cmd](Path(a), Path(b))
