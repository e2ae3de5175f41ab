"""Helpers shared by the benchmark scripts: real input batches, peak memory, timing, the machine.

Why real images: on this project's CPU machine the same supernet step ran at ~30 img/s on real
CIFAR-10 batches but ~18 img/s on `torch.randn` batches, so every benchmark feeds
decoded JPEGs from `../shared/data` (CIFAR-10 WebDataset shards, ImageNet-sample JPEGs).
"""
from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sdarts.data.constants import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

SHARED_DATA = Path(os.environ.get("SDARTS_SHARED", ROOT.parent / "shared")) / "data"


def pick_cases(text: str, known: tuple[str, ...]) -> list[str]:
    """The cases a comma-separated `--cases` names; an unknown one is one error line and exit code 2."""
    cases = [c for c in text.split(",") if c]
    bad = [c for c in cases if c not in known]
    if bad:
        print(f"error: unknown case {bad[0]!r}; expected one of {', '.join(known)}", file=sys.stderr)
        sys.exit(2)
    return cases


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


def cifar_batches(n_batches: int, batch: int, root: Path | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n_batches` distinct real CIFAR-10 batches (normalized fp32 NCHW, int64 labels) from one shard."""
    from sdarts.data.sources import decode_jpegs, read_wds_shard
    root = root or SHARED_DATA / "cifar10-wds"
    shard = root / "train-000000.tar"
    if not shard.exists():
        raise SystemExit(f"error: {shard} not found (real CIFAR-10 shards are needed; synthetic inputs "
                         "mislead CPU timings)")
    keys, jpgs, labels = read_wds_shard(shard)
    n = n_batches * batch
    images, _ = decode_jpegs(jpgs[:n], keys[:n])
    x = _normalize(images, CIFAR_MEAN, CIFAR_STD)
    y = torch.tensor(labels[:n], dtype=torch.int64)
    return [(x[k * batch:(k + 1) * batch].contiguous(), y[k * batch:(k + 1) * batch].contiguous())
            for k in range(n_batches)]


def imagenet_batches(n_batches: int, batch: int, size: int = 224, root: Path | None = None
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real ImageNet JPEGs (one per class folder of imagenet-sample/train), resized + center-cropped."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as TF
    root = root or SHARED_DATA / "imagenet-sample" / "train"
    if not root.is_dir():
        raise SystemExit(f"error: {root} not found (real ImageNet-sample JPEGs are needed)")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    n = n_batches * batch
    xs, ys = [], []
    for label, d in enumerate(classes):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in (".jpeg", ".jpg"))
        if not files:
            continue
        img = decode_jpeg(read_file(str(files[0])), mode=ImageReadMode.RGB)
        img = TF.resize(img, [int(size * 256 / 224)], antialias=True)
        xs.append(TF.center_crop(img, [size, size]))
        ys.append(label)
        if len(xs) == n:
            break
    if len(xs) < batch:
        raise SystemExit(f"error: {root} holds only {len(xs)} usable JPEGs, at least {batch} needed")
    n_batches = min(n_batches, len(xs) // batch)  # a trimmed copy (the GPU check carries 128) gives fewer
    xs, ys = xs[:n_batches * batch], ys[:n_batches * batch]
    x = _normalize(torch.stack(xs), IMAGENET_MEAN, IMAGENET_STD)
    y = torch.tensor(ys, dtype=torch.int64)
    return [(x[k * batch:(k + 1) * batch].contiguous(), y[k * batch:(k + 1) * batch].contiguous())
            for k in range(n_batches)]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def machine(device: str, threads: int) -> str:
    """One line naming the hardware the numbers came from."""
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}"


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
