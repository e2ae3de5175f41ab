"""Streaming image loaders: what DALI and the torch fallback share (order, shards, padding, state).

`sdarts.data.images.build_image_loader(...)` is the one entry (contract in docs/data.md). Both backends read the same
`Listing` in the same per-epoch order and split it over ranks with DALI's own shard rule, so for a
given (seed, epoch, rank, world) they yield the same sample ids in the same batches; only the random
augmentation draws differ.

- Order: evaluation reads the listing as it is. Training reads a permutation seeded by
  (seed, epoch, subset): a global one for ImageFolder trees; for WebDataset shards, a permutation of
  the shards and of the samples within each shard (a tar is read front to back, so a global
  permutation across shards would turn every read into a seek; the shards are shuffled when made).
- Shards: rank r of w reads positions [n*r//w, n*(r+1)//w) of the epoch's order (DALI's
  `shard_id`/`num_shards` rule), a fixed range per epoch (`stick_to_shard`). Shards differ by at most
  one sample, so every rank gets the same `len()`: training drops the tail past the smallest shard
  (`drop_last`), evaluation pads every rank to the largest shard and marks padding with id -1 and
  label -100 (torch's cross-entropy `ignore_index`), so no sample is dropped or counted twice.
- State: (epoch, position, skipped files) plus the DALI pipeline checkpoint, all plain ints and
  strings, so DeepSpeed's checkpoint holds it and `torch.load(weights_only=True)` reads it back.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from sdarts.data.constants import IMAGENET_MEAN, IMAGENET_STD
from sdarts.data.imagefolder import Listing
from sdarts.data.loader import Batch
from sdarts.errors import DataError

log = logging.getLogger("sdarts.data")

PAD_LABEL = -100   # torch.nn.functional.cross_entropy's default ignore_index
PAD_ID = -1
LOW_RES = 64       # search inputs at or below this size are whole images box-downsampled (ImageNet16-style)


@dataclass(frozen=True)
class PipelineSpec:
    """The augmentation recipe, identical for both backends (docs/data.md lists each step)."""
    name: str                      # "search" | "train" | "eval"
    resolution: int = 224
    mean: tuple = IMAGENET_MEAN    # in [0, 1] units
    std: tuple = IMAGENET_STD
    dtype: str = "fp32"

    @property
    def low_res(self) -> bool:
        return self.resolution <= LOW_RES

    @property
    def pad(self) -> int:
        """Padding of the low-resolution random crop (CIFAR: 4 at 32; NB201's ImageNet16: 2 at 16)."""
        return max(1, self.resolution // 8)

    @property
    def eval_resize(self) -> int:
        return int(round(self.resolution * 256 / 224))

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """DALI's reader shard rule: shard r of w is [n*r//w, n*(r+1)//w)."""
    return n * rank // world, n * (rank + 1) // world


def epoch_order(listing: Listing, seed: int, epoch: int, salt: int, shuffle: bool) -> np.ndarray:
    """Positions into `listing` in the order epoch `epoch` reads them (before sharding)."""
    n = len(listing)
    if not shuffle:
        return np.arange(n)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, salt])
    if listing.kind != "wds":
        return rng.permutation(n)
    out = []
    for t in rng.permutation(len(listing.tars)):
        members = np.nonzero(listing.tar_of == t)[0]
        out.append(members[rng.permutation(len(members))])
    return np.concatenate(out) if out else np.arange(0)


class StreamLoader:
    """Iterates micro-batches of one split for one rank; subclasses fetch the images (`_batches`)."""

    backend = "base"

    def __init__(self, listing: Listing, spec: PipelineSpec, micro_batch: int, rank: int, world: int,
                 seed: int, shuffle: bool, drop_last: bool, salt: int, on_bad: str, workers: int,
                 output_device: str | torch.device | None = None, skipped: list | None = None):
        if micro_batch <= 0 or world <= 0 or not 0 <= rank < world:
            raise DataError(f"bad sharding: micro_batch {micro_batch}, rank {rank}, world {world}")
        if on_bad not in ("error", "skip"):
            raise DataError(f"on_bad_sample must be 'error' or 'skip', got {on_bad!r}")
        self.listing, self.spec = listing, spec
        self.micro_batch, self.rank, self.world, self.seed = micro_batch, rank, world, seed
        self.shuffle, self.drop_last, self.salt, self.on_bad = shuffle, drop_last, salt, on_bad
        self.workers = max(0, int(workers))   # DALI threads (at least 1) or DataLoader worker processes
        self.output_device = torch.device(output_device) if output_device is not None else None
        self.skipped: list[str] = list(listing.skipped)      # every file left out, for the log
        self._shared_skipped = skipped
        if skipped is not None:
            skipped.extend(listing.skipped)
        self.bad: set[int] = set()                            # listing positions of undecodable samples
        self.epoch, self.position = 0, 0
        n = len(listing)
        if drop_last and (n // world) // micro_batch == 0:
            raise DataError(f"{listing.root}/{listing.split}: {n} images, fewer than one batch of "
                            f"{micro_batch} on each of {world} ranks")

    # ---------------------------------------------------------------- interface
    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (the same on every rank)."""
        n = len(self.listing)
        if self.drop_last:
            return (n // self.world) // self.micro_batch
        return math.ceil(math.ceil(n / self.world) / self.micro_batch)

    @property
    def num_samples(self) -> int:
        return len(self.listing)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
            self._on_new_epoch()

    def state_dict(self) -> dict:
        """The loader's position, as plain data; with world > 1 a collective (see `_gather`).

        DeepSpeed stores the client state of rank 0 only, and every rank loads that one copy; so the
        per-rank parts (each rank's DALI checkpoint, the bad files each rank found) are gathered here
        into `per_rank` and `bad`, and `load_state_dict` picks out this rank's part.
        """
        local = {"version": 1, "backend": self.backend, "epoch": self.epoch, "position": self.position,
                 "world": self.world, "rank": self.rank, "num_samples": len(self.listing),
                 "bad": sorted(self.listing.keys[i] for i in self.bad), "resume": self._resume_token()}
        parts = self._gather(local)
        state = {k: v for k, v in local.items() if k != "resume"}
        state["bad"] = sorted({k for part in parts for k in part["bad"]})
        state["per_rank"] = [part["resume"] for part in parts]
        return state

    def _gather(self, local: dict) -> list[dict]:
        """Every rank's local state, in rank order. Every rank calls state_dict at the same step (a
        checkpoint is written by all ranks), which is what makes this all-gather safe."""
        import torch.distributed as dist
        if self.world == 1 or not (dist.is_available() and dist.is_initialized()) \
                or dist.get_world_size() != self.world:
            return [local]
        parts: list = [None] * self.world
        dist.all_gather_object(parts, local)
        return parts

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        key_pos = {k: i for i, k in enumerate(self.listing.keys)}
        self.bad = {key_pos[k] for k in state.get("bad", []) if k in key_pos}
        same = (int(state.get("world", self.world)) == self.world
                and int(state.get("num_samples", len(self.listing))) == len(self.listing))
        if not same and self.position:
            log.warning("data loader state was saved with world %s and %s samples (now %d and %d): "
                        "epoch %d resumes at batch %d of a new sharding, not the exact next batch",
                        state.get("world"), state.get("num_samples"), self.world, len(self.listing),
                        self.epoch, self.position)
        per_rank = state.get("per_rank") or []
        # without this rank's own part (or after a change of world), the stream is replayed instead
        self._on_load(per_rank[self.rank] if same and len(per_rank) == self.world else "")

    def _resume_token(self) -> str:
        """Backend state beyond (epoch, position) needed for an exact resume ('' = none)."""
        return ""

    def __iter__(self) -> Iterator[Batch]:
        order = epoch_order(self.listing, self.seed, self.epoch, self.salt, self.shuffle)
        start, end = shard_bounds(len(order), self.rank, self.world)
        mine = order[start:end]
        for batch in self._batches(order, mine):
            self.position += 1
            yield self._to_output(batch)

    def cycle(self) -> Iterator[Batch]:
        """Endless iteration across epochs (the bi-level validation stream)."""
        while True:
            yield from self
            self.set_epoch(self.epoch + 1)

    # ---------------------------------------------------------------- helpers for the backends
    def batch_positions(self, mine: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """Listing positions of micro-batch k on this rank, and how many of them are real."""
        pos = mine[k * self.micro_batch:(k + 1) * self.micro_batch]
        return pos, len(pos)

    def finish(self, x: torch.Tensor, pos: np.ndarray, real: int) -> Batch:
        """Labels and ids for a batch whose first `real` rows are the samples `pos`; the rest is padding."""
        B = self.micro_batch
        y = torch.full((B,), PAD_LABEL, dtype=torch.int64)
        ids = torch.full((B,), PAD_ID, dtype=torch.int64)
        if real:
            y[:real] = torch.from_numpy(self.listing.labels[pos[:real]])
            ids[:real] = torch.from_numpy(self.listing.ids[pos[:real]])
        pad = torch.ones(B, dtype=torch.bool)
        pad[:real] = False
        for j, p in enumerate(pos[:real].tolist()):
            if p in self.bad:
                pad[j] = True
        if pad.any():
            y[pad], ids[pad] = PAD_LABEL, PAD_ID
            x[pad.to(x.device)] = 0
        return Batch(x, y, ids)

    def empty_batch(self) -> Batch:
        """A batch that is all padding (a rank whose shard is one sample short at the end)."""
        r = self.spec.resolution
        x = torch.zeros(self.micro_batch, 3, r, r, dtype=self.spec.torch_dtype)
        return self.finish(x, np.zeros(0, np.int64), 0)

    def mark_bad(self, p: int, reason: str) -> None:
        """Records an undecodable sample: an error naming it, or (skip) padding plus a log line."""
        name = self.listing.path(p)
        if self.on_bad != "skip":
            raise DataError(f"{name}: {reason}") from None
        self.bad.add(p)
        self.skipped.append(name)
        if self._shared_skipped is not None:
            self._shared_skipped.append(name)
        log.warning("skipped %s (%s); %d skipped so far", name, reason, len(self.skipped))

    def _to_output(self, b: Batch) -> Batch:
        dev = self.output_device
        if dev is None or b.x.device == dev:
            return b if dev is None else Batch(b.x, b.y.to(dev), b.ids.to(dev))
        nb = dev.type == "cuda"
        return Batch(b.x.to(dev, non_blocking=nb), b.y.to(dev, non_blocking=nb), b.ids.to(dev, non_blocking=nb))

    # ---------------------------------------------------------------- backend hooks
    def _batches(self, order: np.ndarray, mine: np.ndarray) -> Iterator[Batch]:
        raise NotImplementedError

    def _on_new_epoch(self) -> None:
        pass

    def _on_load(self, token: str) -> None:
        pass

