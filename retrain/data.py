"""Retrain data: the training loader and an evaluation loader that covers every test image once.

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
from typing import Iterator

import torch

from sdarts.data.constants import CIFAR_MEAN, CIFAR_STD
from sdarts.data.loader import Batch, TensorLoader
from sdarts.data.sources import Split, cifar10_split

from retrain.config import RetrainConfig


class EvalLoader:
    """Un-augmented, un-shuffled batches of one split for one rank, padded so no image is dropped."""

    def __init__(self, split: Split, micro_batch: int, rank: int = 0, world: int = 1,
                 device: str | torch.device = "cpu", mean=CIFAR_MEAN, std=CIFAR_STD):
        self.micro_batch, self.rank, self.world = micro_batch, rank, world
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.ids = split.ids.to(self.device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
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


def build_loaders(cfg: RetrainConfig, rank: int, world: int, device: torch.device,
                  skipped: list | None = None):
    """(train_loader, eval_loader) for this rank."""
    d = cfg.data
    data_dev = device if d.device == "auto" else torch.device(d.device)
    eval_mb = d.eval_micro_batch or d.micro_batch
    if d.dataset == "cifar10":
        train = cifar10_split(d.root, "train", d.fraction, d.max_per_split, d.on_bad_sample, skipped)
        test = cifar10_split(d.root, "test", 1.0, d.max_per_split, d.on_bad_sample, skipped)
        if len(train) < cfg.global_batch(world):
            raise DataError(f"data: {len(train)} training images are fewer than one global batch of "
                            f"{cfg.global_batch(world)} (data.micro_batch x engine.grad_accum x ranks)")
        return (TensorLoader(train, d.micro_batch, rank, world, cfg.engine.grad_accum, cfg.seed, augment=True,
                             device=data_dev, cutout=d.cutout),
                EvalLoader(test, eval_mb, rank, world, data_dev))
    try:
        from sdarts.data import build_image_loader
    except ImportError:
        raise DataError("data.dataset imagenet needs sdarts.data.build_image_loader, which this checkout "
                        "does not have yet") from None
    if d.root is None:
        raise DataError("data.root is required for dataset imagenet (an ImageFolder tree or WebDataset shards)")
    common = dict(rank=rank, world=world, seed=cfg.seed, resolution=d.resolution, classes_file=d.classes_file,
                  backend=d.backend, device={"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[d.device],
                  workers=d.workers, on_bad_sample=d.on_bad_sample, max_samples=d.max_per_split,
                  output_device=device, skipped=skipped)
    train = build_image_loader(d.root, "train", "train", d.micro_batch, fraction=d.fraction, **common)
    val = build_image_loader(d.root, "val", "eval", eval_mb, **common)
    return train, val
