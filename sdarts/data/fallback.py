"""The torch fallback: a DataLoader with torchvision transforms, for machines without DALI.

Same interface, same listing, same per-epoch order and shards as the DALI loader (`stream.py`), and
the same recipes (`transforms`). Only the random draws differ: each sample's augmentation is seeded
by (seed, epoch, subset, sample id), so a batch does not depend on which worker made it, and
mid-epoch resume needs only (epoch, position). WebDataset shards are read with the standard library:
a seek to the member offset found by the listing scan. The global torch RNG of the training process
is never touched (the draws run under `torch.random.fork_rng`).
"""
from __future__ import annotations

import hashlib
import io
from typing import Iterator

import numpy as np
import torch

from sdarts.data.imagefolder import Listing
from sdarts.data.loader import Batch
from sdarts.data.stream import PipelineSpec, StreamLoader


def transforms(spec: PipelineSpec):
    """torchvision twin of `dali.augment` (PIL image in, normalised float CHW tensor out)."""
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode
    r = spec.resolution
    tail = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    if spec.name == "train" or (spec.name == "search" and not spec.low_res):
        steps = [T.RandomResizedCrop(r, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                 T.RandomHorizontalFlip()]
        if spec.name == "train":
            steps.append(T.ColorJitter(0.4, 0.4, 0.4, 0.2))
        return T.Compose(steps + tail)
    if spec.low_res:
        # ImageNet16-120's recipe: box-downsample the whole image, then (search) pad + random crop + flip
        steps = [T.Resize((r, r), interpolation=InterpolationMode.BOX)]
        if spec.name == "search":
            steps += [T.RandomCrop(r, padding=spec.pad), T.RandomHorizontalFlip()]
        return T.Compose(steps + tail)
    return T.Compose([T.Resize(spec.eval_resize, antialias=True), T.CenterCrop(r)] + tail)


class _Samples(torch.utils.data.Dataset):
    """Listing position -> (image tensor, position, decoded?). Bad images become zeros + False."""

    def __init__(self, listing: Listing, spec: PipelineSpec, seed: int, epoch: int, salt: int):
        self.listing, self.spec = listing, spec
        self.base = f"{seed}:{epoch}:{salt}"
        self.tf = transforms(spec)

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, p: int):
        from PIL import Image
        r = self.spec.resolution
        try:
            data = self.listing.read_bytes(p)
            with Image.open(io.BytesIO(data)) as im:
                img = im.convert("RGB")
        except Exception:  # noqa: BLE001 - any decode failure is reported by the main process
            return torch.zeros(3, r, r), p, False
        sid = int(self.listing.ids[p])
        s = int.from_bytes(hashlib.sha1(f"{self.base}:{sid}".encode()).digest()[:8], "little") >> 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            return self.tf(img), p, True


class TorchLoader(StreamLoader):
    backend = "torch"

    def _batches(self, order: np.ndarray, mine: np.ndarray) -> Iterator[Batch]:
        mb = self.micro_batch
        with_data = min(len(self), -(-len(mine) // mb))
        plan = [mine[k * mb:(k + 1) * mb].tolist() for k in range(self.position, with_data)]
        if plan:
            ds = _Samples(self.listing, self.spec, self.seed, self.epoch, self.salt)
            pin = self.output_device is not None and self.output_device.type == "cuda"
            dl = torch.utils.data.DataLoader(ds, batch_sampler=plan, num_workers=self.workers,
                                             pin_memory=pin, persistent_workers=False)
            for x, pos, ok in dl:
                for p in pos[~ok].tolist():
                    if p not in self.bad:
                        self.mark_bad(p, "corrupt or unreadable image (PIL cannot decode it)")
                real = len(pos)
                full = torch.zeros((mb,) + tuple(x.shape[1:]), dtype=self.spec.torch_dtype)
                full[:real] = x
                yield self.finish(full, pos.numpy(), real)
        while self.position < len(self):
            yield self.empty_batch()
