"""Search data: sources (what the images are) and loaders (how batches reach a rank).

`build_search_loaders(cfg.data, ...)` is the one entry the search loop uses; it returns the loaders
for the `train` half (w updates) and the `valid` half (alpha updates in bi-level). Every loader has
the same interface: `len()` (micro-batches per epoch on this rank), `set_epoch`, iteration of
`Batch(x, y, ids)`, `state_dict`/`load_state_dict` (epoch and position, for mid-epoch resume).
"""
from __future__ import annotations

from sdarts.config import DataConfig
from sdarts.data.loader import Batch, TensorLoader
from sdarts.data.sources import DataError, Split, cifar10_search_splits, digits_search_splits, \
    synthetic_search_splits

__all__ = ["Batch", "DataError", "Split", "TensorLoader", "build_search_loaders", "search_splits"]


def search_splits(cfg: DataConfig, num_classes: int, seed: int, skipped: list | None = None
                  ) -> tuple[Split, Split]:
    if cfg.dataset == "cifar10":
        return cifar10_search_splits(cfg.root, cfg.fraction, cfg.max_per_split, cfg.on_bad_sample, skipped)
    if cfg.dataset == "digits":
        return digits_search_splits(cfg.resolution, cfg.fraction, cfg.max_per_split)
    if cfg.dataset == "synthetic":
        return synthetic_search_splits(cfg.synthetic_size, cfg.resolution, num_classes, seed)
    raise DataError(f"data.dataset {cfg.dataset!r} is not available for search with the torch backend yet")


def build_search_loaders(cfg: DataConfig, num_classes: int, seed: int, rank: int, world: int, accum: int,
                         device: str, skipped: list | None = None) -> tuple[TensorLoader, TensorLoader]:
    train, valid = search_splits(cfg, num_classes, seed, skipped)
    common = dict(micro_batch=cfg.micro_batch, rank=rank, world=world, accum=accum, seed=seed,
                  augment=cfg.augment, device=device)
    if cfg.dataset == "digits":
        common.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pad=max(1, cfg.resolution // 8))
    if cfg.dataset == "synthetic":
        common.update(mean=(0.5, 0.5, 0.5), std=(0.29, 0.29, 0.29), augment=False)
    return TensorLoader(train, salt=0, **common), TensorLoader(valid, salt=1, **common)
