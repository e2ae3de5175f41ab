"""In-memory batch loader: deterministic, rank-sharded, resumable, augmented on the training device.

Why not a DataLoader: CIFAR-sized search data fits in memory (50k x 3 x 32 x 32 uint8 = 150 MB), and
a search step on a GPU is faster than a worker pool can collate. Keeping the uint8 tensor on the
device and augmenting whole batches there (pad-4 random crop + flip, normalise) removes the input
pipeline from the step time.

Determinism: epoch e's order is a permutation seeded by (seed, e), and each sample's crop offset and
flip are drawn per (seed, e, sample position), so the batch a rank sees depends only on its slot,
not on the world size. A global step takes `micro_batch * world * accum` samples; micro-step k of
rank r takes slot `k * world + r` of that block. Hence 2 ranks x 1 micro-batch and 1 rank x 2
accumulated micro-batches see the same samples with the same augmentation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from sdarts.data.constants import CIFAR_MEAN, CIFAR_STD
from sdarts.data.sources import Split


@dataclass
class Batch:
    x: torch.Tensor      # float [B, 3, H, W], normalised
    y: torch.Tensor      # int64 [B]
    ids: torch.Tensor    # int64 [B]: sample identities (the bi-level test asserts on them)


def on_device(split: Split, device: torch.device, mean, std) -> tuple[torch.Tensor, ...]:
    """(images, labels, ids, mean, std) of `split` on `device`; mean/std in uint8 units, [1, 3, 1, 1]."""
    scale = lambda v: torch.tensor(v, device=device).view(1, 3, 1, 1) * 255  # noqa: E731
    return (split.images.to(device), split.labels.to(device), split.ids.to(device), scale(mean), scale(std))


class TensorLoader:
    """Iterates micro-batches of one split for one rank; `state_dict` holds epoch and position."""
    #: the data path `sdarts.provenance` records: images held in memory, augmented on the training device
    backend = "memory"

    def __init__(self, split: Split, micro_batch: int, rank: int = 0, world: int = 1, accum: int = 1,
                 seed: int = 0, augment: bool = True, device: str | torch.device = "cpu",
                 mean=CIFAR_MEAN, std=CIFAR_STD, salt: int = 0, pad: int = 4, cutout: int = 0):
        self.micro_batch, self.rank, self.world, self.accum = micro_batch, rank, world, accum
        self.seed, self.salt, self.augment, self.pad = seed, salt, augment, pad
        #: side of the Cutout square (DARTS retrain: 16); 0 = off. Applied only with `augment`.
        self.cutout = cutout
        self._cutout_epoch, self._cutout_centers = None, None
        self.device = torch.device(device)
        self.images, self.labels, self.ids, self.mean, self.std = on_device(split, self.device, mean, std)
        self.block = micro_batch * world * accum
        if len(split) < self.block:
            raise ValueError(f"split has {len(split)} images, fewer than one global batch of {self.block}")
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        """Micro-batches per epoch for this rank (incomplete global batches are dropped, as in DARTS)."""
        return (len(self.labels) // self.block) * self.accum

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _epoch_plan(self):
        g = torch.Generator().manual_seed(hash((self.seed, self.salt, self.epoch)) & 0x7FFFFFFFFFFF)
        n = len(self.labels)
        perm = torch.randperm(n, generator=g)
        offs = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        return perm, offs, flips

    def __iter__(self) -> Iterator[Batch]:
        # the plan goes to the device once per epoch: each batch is then indexed there, with no
        # host-to-device copy per step (on a GPU the NB201 step is short enough for that to show)
        perm, offs, flips = (t.to(self.device) for t in self._epoch_plan())
        while self.position < len(self):
            k = self.position
            step, micro = divmod(k, self.accum)
            slot = micro * self.world + self.rank
            start = step * self.block + slot * self.micro_batch
            idx = perm[start:start + self.micro_batch]
            self.position += 1
            yield self._make(idx, offs[idx], flips[idx])

    def _make(self, idx: torch.Tensor, offs: torch.Tensor, flips: torch.Tensor) -> Batch:
        x = self.images[idx].float()
        if self.augment:
            x = self._crop_flip(x, offs, flips)
        x = (x - self.mean) / self.std
        if self.augment and self.cutout > 0:
            x = self._apply_cutout(x, idx)
        return Batch(x, self.labels[idx], self.ids[idx])

    def _crop_flip(self, x: torch.Tensor, offs: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Per-sample pad-4 random crop and horizontal flip, vectorised with one gather."""
        B, C, H, W = x.shape
        p = self.pad
        xp = F.pad(x, (p, p, p, p))
        rows = (offs[:, 0].view(B, 1) + torch.arange(H, device=x.device).view(1, H))  # [B,H]
        cols = (offs[:, 1].view(B, 1) + torch.arange(W, device=x.device).view(1, W))  # [B,W]
        cols = torch.where(flips.view(B, 1), cols.flip(1), cols)
        xp = xp.gather(2, rows.view(B, 1, H, 1).expand(B, C, H, W + 2 * p))
        return xp.gather(3, cols.view(B, 1, 1, W).expand(B, C, H, W))

    def _apply_cutout(self, x: torch.Tensor, dev_idx: torch.Tensor) -> torch.Tensor:
        """Cutout (DeVries & Taylor; DARTS' retrain): zeroes a `cutout`-sided square, clipped at the
        border, around a uniform random centre, after normalisation. Centres are drawn per sample from
        their own generator seeded by (seed, salt, epoch), so the crop/flip stream is unchanged."""
        B, _, H, W = x.shape
        if self._cutout_epoch != self.epoch:
            g = torch.Generator().manual_seed(hash((self.seed, self.salt, self.epoch, 7919)) & 0x7FFFFFFFFFFF)
            self._cutout_centers = torch.stack([torch.randint(0, H, (len(self.labels),), generator=g),
                                                torch.randint(0, W, (len(self.labels),), generator=g)], 1
                                               ).to(x.device)
            self._cutout_epoch = self.epoch
        c = self._cutout_centers[dev_idx]
        half = self.cutout // 2
        rows = torch.arange(H, device=x.device).view(1, H)
        cols = torch.arange(W, device=x.device).view(1, W)
        in_r = (rows >= (c[:, :1] - half).clamp(0, H)) & (rows < (c[:, :1] + half).clamp(0, H))
        in_c = (cols >= (c[:, 1:] - half).clamp(0, W)) & (cols < (c[:, 1:] + half).clamp(0, W))
        keep = ~(in_r.view(B, 1, H, 1) & in_c.view(B, 1, 1, W))
        return x * keep

    def cycle(self) -> Iterator[Batch]:
        """Endless iteration across epochs (the bi-level validation stream)."""
        while True:
            yield from self
            self.set_epoch(self.epoch + 1)
