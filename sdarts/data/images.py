"""`build_image_loader(...)`: a rank's streaming loader over an ImageFolder tree or WebDataset shards,
DALI or the torch fallback (the contract is in docs/data.md).

The choice of backend lives here, apart from what the backends share (`stream.py`), so that each
backend module imports the shared base and nothing imports back.
"""
from __future__ import annotations

import numpy as np
import torch

from sdarts.data.constants import IMAGENET_MEAN, IMAGENET_STD
from sdarts.data.holdout import auto_per_class, split_holdout
from sdarts.data.imagefolder import choose, list_split
from sdarts.data.stream import PipelineSpec, StreamLoader
from sdarts.errors import DataError

SUBSET_SALT = {None: 0, "a": 1, "b": 2}


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def build_image_loader(root: str, split: str, pipeline: str, micro_batch: int, rank: int = 0,
                       world: int = 1, seed: int = 0, resolution: int = 224, fraction: float = 1.0,
                       classes_file: str | None = None, backend: str = "auto", device: str = "auto",
                       dtype: str = "fp32", workers: int = 2, on_bad_sample: str = "error",
                       drop_last: bool | None = None, subset: str | None = None, *,
                       max_samples: int = 0, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD,
                       output_device: str | torch.device | None = None, skipped: list | None = None,
                       holdout: int | None = 0, holdout_cap: int = 10, holdout_part: str = "rest"
                       ) -> StreamLoader:
    """A rank's loader over `root`/`split` (ImageFolder tree or `<split>-*.tar` WebDataset shards).

    `pipeline`: "search" | "train" | "eval" (docs/data.md); `backend`: "auto" (DALI if importable,
    else torch), "dali", "torch"; `device` (DALI): "auto" (GPU decoding when CUDA is there), "gpu",
    "cpu". Keyword-only extras: `max_samples` (class-balanced cap after `fraction`), `mean`/`std`
    (in [0, 1] units), `output_device` (batches are moved there), `skipped` (a list that collects
    the names of skipped files, for the caller's log), `holdout` (images per class carved out of the
    listing, `sdarts.data.holdout`; None = the default, at most `holdout_cap`) with `holdout_part`
    "rest" (the listing without them) or "holdout" (only them). The loader's `holdout_per_class` says
    how many were carved.
    """
    if pipeline not in ("search", "train", "eval"):
        raise DataError(f"pipeline must be 'search', 'train' or 'eval', got {pipeline!r}")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise DataError(f"dtype must be fp32, fp16 or bf16, got {dtype!r}")
    if backend not in ("auto", "dali", "torch"):
        raise DataError(f"backend must be auto, dali or torch, got {backend!r}")
    if backend == "dali" and not dali_available():
        raise DataError("backend 'dali' requested but nvidia.dali is not installed "
                        "(pip install nvidia-dali-cuda130, or use backend: torch)")
    use_dali = backend == "dali" or (backend == "auto" and dali_available())
    listing = choose(list_split(root, split, classes_file, on_bad_sample), fraction, subset, max_samples)
    listing, per_class = _carve_holdout(listing, holdout, holdout_cap, holdout_part, seed)
    spec = PipelineSpec(pipeline, resolution, tuple(mean), tuple(std), dtype)
    train = pipeline != "eval"
    common = dict(listing=listing, spec=spec, micro_batch=micro_batch, rank=rank, world=world, seed=seed,
                  shuffle=train, drop_last=train if drop_last is None else drop_last,
                  salt=SUBSET_SALT[subset], on_bad=on_bad_sample, workers=workers,
                  output_device=output_device, skipped=skipped)
    if use_dali:
        from sdarts.data.dali import DaliLoader
        loader = DaliLoader(device=device, **common)
    else:
        from sdarts.data.fallback import TorchLoader
        loader = TorchLoader(**common)
    loader.holdout_per_class = per_class
    return loader


def _carve_holdout(listing, per_class: int | None, cap: int, part: str, seed: int):
    """(listing with or without the holdout, images per class held out)."""
    if part not in ("rest", "holdout"):
        raise DataError(f"holdout_part must be 'rest' or 'holdout', got {part!r}")
    if per_class is None:
        per_class = auto_per_class(np.unique(listing.labels, return_counts=True)[1], cap)
    if not per_class:
        return listing, 0
    rest, held = split_holdout(listing.labels, per_class, seed, f"{listing.root}/{listing.split}")
    return listing.take(held if part == "holdout" else rest), per_class
