"""Search data: sources (what the images are) and loaders (how batches reach a rank).

`build_search_loaders(cfg.data, ...)` is the one entry the search loop uses; it returns the loaders
for the `train` half (w updates) and the `valid` half (alpha updates in bi-level). Every loader has
the same interface: `len()` (micro-batches per epoch on this rank), `set_epoch`, iteration of
`Batch(x, y, ids)`, `state_dict`/`load_state_dict` (epoch and position, for mid-epoch resume).
"""
from __future__ import annotations

from sdarts.config import DataConfig
from sdarts.data.images import build_image_loader, dali_available
from sdarts.data.loader import Batch, TensorLoader
from sdarts.data.sources import Split, cifar10_search_splits, digits_search_splits, synthetic_search_splits
from sdarts.data.stream import StreamLoader
from sdarts.errors import DataError

__all__ = ["Batch", "Split", "StreamLoader", "TensorLoader", "build_image_loader",
           "build_search_loaders", "search_splits", "shared_splits"]


def shared_splits(cfg: DataConfig, num_classes: int, skipped: list | None = None) -> tuple[Split, Split] | None:
    """The in-memory halves every seed's search reads the same (None where they stream from disk or,
    synthetic, depend on the seed)."""
    if _streams(cfg) or cfg.dataset == "synthetic":
        return None
    return search_splits(cfg, num_classes, 0, skipped)


def search_splits(cfg: DataConfig, num_classes: int, seed: int, skipped: list | None = None
                  ) -> tuple[Split, Split]:
    if cfg.dataset == "cifar10":
        return cifar10_search_splits(cfg.root, cfg.fraction, cfg.max_per_split, cfg.on_bad_sample, skipped)
    if cfg.dataset == "digits":
        return digits_search_splits(cfg.resolution, cfg.fraction, cfg.max_per_split)
    if cfg.dataset == "synthetic":
        return synthetic_search_splits(cfg.synthetic_size, cfg.resolution, num_classes, seed)
    raise DataError(f"data.dataset {cfg.dataset!r} is not available for search with the torch backend yet")


def _streams(cfg: DataConfig) -> bool:
    """Whether the search data streams from disk (DALI or torch DataLoader) instead of memory.

    ImageNet always streams. CIFAR-10 streams through DALI when `backend` is `dali`, or `auto` with
    DALI installed and `root` a folder of WebDataset shards; otherwise it stays in memory
    (TensorLoader, split by shard: see sources.py).
    """
    if cfg.dataset == "imagenet":
        return True
    if cfg.dataset != "cifar10" or cfg.backend == "torch":
        return False
    if cfg.backend == "dali":
        return True
    from pathlib import Path
    return dali_available() and cfg.root is not None and any(Path(cfg.root).glob("train-*.tar"))


def stream_search_loaders(cfg: DataConfig, seed: int, rank: int, world: int, device: str,
                          skipped: list | None = None) -> tuple[StreamLoader, StreamLoader]:
    """The search split streamed from disk: the train split's halves "a" (w) and "b" (alpha), by key hash."""
    from sdarts.data.constants import CIFAR_MEAN, CIFAR_STD
    norm = dict(mean=CIFAR_MEAN, std=CIFAR_STD) if cfg.dataset == "cifar10" else {}
    backend = "dali" if cfg.dataset == "cifar10" else cfg.backend
    common = dict(root=cfg.root, split="train", pipeline="search" if cfg.augment else "eval",
                  micro_batch=cfg.micro_batch, rank=rank, world=world, seed=seed, resolution=cfg.resolution,
                  fraction=cfg.fraction, classes_file=cfg.classes_file, backend=backend,
                  device="auto" if str(device).startswith("cuda") else "cpu", dtype=cfg.dtype,
                  workers=cfg.workers, on_bad_sample=cfg.on_bad_sample, drop_last=True,
                  max_samples=cfg.max_per_split, output_device=device, skipped=skipped, **norm)
    return build_image_loader(subset="a", **common), build_image_loader(subset="b", **common)


def build_search_loaders(cfg: DataConfig, num_classes: int, seed: int, rank: int, world: int, accum: int,
                         device: str, skipped: list | None = None,
                         splits: tuple[Split, Split] | None = None) -> tuple[TensorLoader, TensorLoader]:
    """`splits`: the in-memory halves, when the caller already has them (searches of several seeds
    share one copy of the images; only the synthetic data depends on the seed)."""
    if _streams(cfg):
        return stream_search_loaders(cfg, seed, rank, world, device, skipped)
    train, valid = splits if splits is not None else search_splits(cfg, num_classes, seed, skipped)
    common = dict(micro_batch=cfg.micro_batch, rank=rank, world=world, accum=accum, seed=seed,
                  augment=cfg.augment, device=device)
    if cfg.dataset == "digits":
        common.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pad=max(1, cfg.resolution // 8))
    if cfg.dataset == "synthetic":
        common.update(mean=(0.5, 0.5, 0.5), std=(0.29, 0.29, 0.29), augment=False)
    return TensorLoader(train, salt=0, **common), TensorLoader(valid, salt=1, **common)
