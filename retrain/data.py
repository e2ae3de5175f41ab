"""Retrain data: the training loader, the holdout (images carved from the training split to select the
checkpoint on; `sdarts.data.holdout`) and an evaluation loader that covers every test image once.

CIFAR-10 keeps the whole split in memory (`sdarts.data.TensorLoader`, pad-4 crop + flip + Cutout on
the training device). Its evaluation loader, `EvalLoader`, gives rank r every world-th batch slot
of the test set and pads the last global batch with copies marked `ids == -1`, so the sums of all
ranks' counts are over exactly the test set (the training loader drops incomplete batches instead).

ImageNet comes from `sdarts.data.build_image_loader` (DALI or torchvision pipelines: "train" =
random-resized crop + flip + ColorJitter(0.4, 0.4, 0.4, 0.2), "eval" = resize + centre crop), which
follows the same loader interface and marks its padding the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from sdarts.data.constants import CIFAR_MEAN, CIFAR_STD
from sdarts.data.holdout import auto_per_class, split_holdout
from sdarts.data.loader import Batch, TensorLoader, on_device
from sdarts.data.sources import Split, cifar10_split
from sdarts.errors import DataError

from retrain.config import RetrainConfig


class EvalLoader:
    """Un-augmented, un-shuffled batches of one split for one rank, padded so no image is dropped."""

    def __init__(self, split: Split, micro_batch: int, rank: int = 0, world: int = 1,
                 device: str | torch.device = "cpu", mean=CIFAR_MEAN, std=CIFAR_STD):
        self.micro_batch, self.rank, self.world = micro_batch, rank, world
        self.device = torch.device(device)
        self.images, self.labels, self.ids, self.mean, self.std = on_device(split, self.device, mean, std)
        self.block = micro_batch * world

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.block)

    def set_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.labels)
        for b in range(len(self)):
            start = b * self.block + self.rank * self.micro_batch
            pos = torch.arange(start, start + self.micro_batch, device=self.device)
            real = pos < n
            idx = torch.where(real, pos, torch.zeros_like(pos))
            x = (self.images[idx].float() - self.mean) / self.std
            ids = torch.where(real, self.ids[idx], torch.full_like(idx, -1))
            yield Batch(x, self.labels[idx], ids)


#: the default holdout's cap, images per class: CIFAR-10 5k (a tenth of train), ImageNet 10k ("minival")
HOLDOUT_CAP = {"cifar10": 500, "imagenet": 10}


@dataclass
class RetrainLoaders:
    train: object
    holdout: object | None      # images removed from training, for selection; None with data.holdout 0
    eval: object                # the test set (CIFAR-10) or val set (ImageNet): reported, never selects
    holdout_per_class: int


def build_loaders(cfg: RetrainConfig, rank: int, world: int, device: torch.device,
                  skipped: list | None = None) -> RetrainLoaders:
    """This rank's training, holdout and eval loaders."""
    d = cfg.data
    data_dev = device if d.device == "auto" else torch.device(d.device)
    eval_mb = d.eval_micro_batch or d.micro_batch
    if d.dataset != "cifar10":
        return _imagenet_loaders(cfg, rank, world, device, skipped)
    train = cifar10_split(d.root, "train", d.fraction, d.max_per_split, d.on_bad_sample, skipped)
    test = cifar10_split(d.root, "test", 1.0, d.max_per_split, d.on_bad_sample, skipped)
    labels = train.labels.numpy()
    per_class = d.holdout if d.holdout is not None else auto_per_class(np.unique(labels, return_counts=True)[1],
                                                                       HOLDOUT_CAP["cifar10"])
    holdout = None
    if per_class:
        keep, held = split_holdout(labels, per_class, cfg.seed, f"{d.root} (train)")
        train, holdout = train.subset(torch.from_numpy(keep)), train.subset(torch.from_numpy(held))
    if len(train) < cfg.global_batch(world):
        raise DataError(f"data: {len(train)} training images are fewer than one global batch of "
                        f"{cfg.global_batch(world)} (data.micro_batch x engine.grad_accum x ranks)")
    return RetrainLoaders(
        TensorLoader(train, d.micro_batch, rank, world, cfg.engine.grad_accum, cfg.seed, augment=True,
                     device=data_dev, cutout=d.cutout),
        EvalLoader(holdout, eval_mb, rank, world, data_dev) if holdout is not None else None,
        EvalLoader(test, eval_mb, rank, world, data_dev), per_class)


def _imagenet_loaders(cfg: RetrainConfig, rank: int, world: int, device: torch.device,
                      skipped: list | None) -> RetrainLoaders:
    from sdarts.data import build_image_loader
    d = cfg.data
    if d.root is None:
        raise DataError("data.root is required for dataset imagenet (an ImageFolder tree or WebDataset shards)")
    common = dict(rank=rank, world=world, seed=cfg.seed, resolution=d.resolution, classes_file=d.classes_file,
                  backend=d.backend, device={"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[d.device],
                  workers=d.workers, on_bad_sample=d.on_bad_sample, output_device=device, skipped=skipped)
    carve = dict(fraction=d.fraction, max_samples=d.max_per_split, holdout=d.holdout,
                 holdout_cap=HOLDOUT_CAP["imagenet"])
    eval_mb = d.eval_micro_batch or d.micro_batch
    train = build_image_loader(d.root, "train", "train", d.micro_batch, holdout_part="rest", **carve, **common)
    holdout = None
    if train.holdout_per_class:
        holdout = build_image_loader(d.root, "train", "eval", eval_mb, holdout_part="holdout", **carve, **common)
    val = build_image_loader(d.root, "val", "eval", eval_mb, max_samples=d.max_per_split, **common)
    return RetrainLoaders(train, holdout, val, train.holdout_per_class)
