"""NVIDIA DALI pipelines: decoding and augmentation off the Python thread, on the CPU or the GPU.

Why DALI: searching directly on ImageNet is data-bound, and a Python worker pool decoding JPEGs with
PIL cannot keep a GPU busy (on this project's 2-core CPU machine DALI's CPU pipeline alone ran the
train augmentation ~2.5-3x faster than a torchvision DataLoader with the same thread count, see
benchmarks/data_throughput.py). With CUDA present the JPEGs are decoded by the `mixed` (nvJPEG)
decoder on the rank's own GPU (`device_id` = local rank); without it every operator runs on the CPU
(`device_id=None`).

How the epoch plan reaches DALI: every epoch builds a fresh pipeline whose reader gets the epoch's
order (`stream.epoch_order`) and this rank's `shard_id`/`num_shards`, `stick_to_shard=True`,
`pad_last_batch=True`, no reader shuffling. ImageFolder trees go through `fn.readers.file` with the
file list; WebDataset shards through `fn.readers.webdataset` with index files written from our own
scan, listing only the chosen samples in the epoch's order (so `fraction` and the bi-level halves
never decode a skipped image). Each returned image's `source_info` is checked against the plan.

Resume: the pipeline is built with `enable_checkpointing=True`; after every batch its checkpoint
(reader position and every random operator's state, a few hundred bytes) is kept, and
`state_dict()` carries it as a base64 string. Loading it rebuilds the epoch's pipeline from that
checkpoint, so the next batch (images and augmentation draws) equals the uninterrupted run's.

Bad images: DALI stops the whole pipeline on an undecodable file. The loader then finds the culprit
among the batch's files (DALI's message, else a PIL decode of each), and either raises one line
naming it (`on_bad_sample: error`) or swaps it for a placeholder that comes out as padding (id -1),
rebuilds the pipeline from the last checkpoint and carries on (`skip`, logged and counted).
"""
from __future__ import annotations

import base64
import io
import logging
import os
import shutil
import tempfile
import weakref
from typing import Iterator

import numpy as np
import torch

from sdarts.data.imagefolder import WDS_IMAGE_EXTS
from sdarts.data.loader import Batch
from sdarts.data.stream import PipelineSpec, StreamLoader
from sdarts.errors import DataError

log = logging.getLogger("sdarts.data")


def resolve_device(device: str) -> str:
    """'auto' -> 'gpu' when CUDA is usable, else 'cpu'."""
    if device not in ("auto", "gpu", "cpu", "cuda"):
        raise DataError(f"data device must be auto, gpu or cpu, got {device!r}")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if device == "cuda" else device


def local_device_id(output_device: torch.device | None) -> int:
    """The rank's GPU: the output device's index, else LOCAL_RANK, else the current device."""
    if output_device is not None and output_device.type == "cuda" and output_device.index is not None:
        return output_device.index
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return torch.cuda.current_device()


def augment(jpegs, spec: PipelineSpec, on_gpu: bool):
    """The DALI graph of one recipe (the torchvision twin is `fallback.transforms`)."""
    from nvidia.dali import fn, types
    dec = "mixed" if on_gpu else "cpu"
    dtype = types.FLOAT16 if spec.dtype == "fp16" else types.FLOAT
    norm = dict(mean=[255 * m for m in spec.mean], std=[255 * s for s in spec.std], dtype=dtype,
                output_layout="CHW")
    r = spec.resolution
    if spec.name in ("train", "search") and not (spec.name == "search" and spec.low_res):
        # random resized crop (area 8-100%, aspect 3/4-4/3), fused with decoding: only the crop is decoded
        img = fn.decoders.image_random_crop(jpegs, device=dec, output_type=types.RGB,
                                            random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                            num_attempts=10)
        img = fn.resize(img, size=[r, r], antialias=True)
        if spec.name == "train":  # ColorJitter(0.4, 0.4, 0.4, 0.2); hue 0.2 of the circle = 72 degrees
            img = fn.color_twist(img, brightness=fn.random.uniform(range=[0.6, 1.4]),
                                 contrast=fn.random.uniform(range=[0.6, 1.4]),
                                 saturation=fn.random.uniform(range=[0.6, 1.4]),
                                 hue=fn.random.uniform(range=[-72.0, 72.0]))
        return fn.crop_mirror_normalize(img, mirror=fn.random.coin_flip(), **norm)
    img = fn.decoders.image(jpegs, device=dec, output_type=types.RGB)
    if spec.low_res:
        # ImageNet16/32/64-style: the whole image downsampled (antialiased) to r x r
        img = fn.resize(img, size=[r, r], antialias=True)
        if spec.name == "eval":
            return fn.crop_mirror_normalize(img, **norm)
        # then pad + random crop + flip, as CIFAR (pad 4 at 32) and NB201's ImageNet16 (pad 2 at 16)
        p = spec.pad
        img = fn.crop(img, crop=[r + 2 * p, r + 2 * p], out_of_bounds_policy="pad", fill_values=0)
        steps = [i / (2 * p) for i in range(2 * p + 1)]
        return fn.crop_mirror_normalize(img, crop=[r, r], crop_pos_x=fn.random.uniform(values=steps),
                                        crop_pos_y=fn.random.uniform(values=steps),
                                        mirror=fn.random.coin_flip(), **norm)
    # eval: resize the shorter side to 256/224 * r, center crop r
    img = fn.resize(img, resize_shorter=spec.eval_resize, antialias=True)
    return fn.crop_mirror_normalize(img, crop=[r, r], **norm)


_PLACEHOLDER: dict[str, str] = {}


def _placeholder_jpeg(tmp: str) -> str:
    """A tiny valid JPEG that stands in for a skipped file (it comes out as padding)."""
    if tmp not in _PLACEHOLDER:
        from PIL import Image
        path = os.path.join(tmp, "placeholder.jpg")
        Image.new("RGB", (8, 8), (128, 128, 128)).save(path, "JPEG")
        _PLACEHOLDER[tmp] = path
    return _PLACEHOLDER[tmp]


def decodes(data: bytes) -> bool:
    """Whether PIL can fully decode an encoded image (used to find the culprit of a DALI failure)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
        return True
    except Exception:  # noqa: BLE001 - any decoder error means "bad image"
        return False


def _dali_reason(err: Exception) -> str:
    """The informative line of a DALI pipeline error (after 'encountered:')."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("encountered:") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[0] if lines else type(err).__name__


class DaliLoader(StreamLoader):
    backend = "dali"

    def __init__(self, device: str = "auto", **kw):
        super().__init__(**kw)
        self.device = resolve_device(device)
        self.device_id = local_device_id(self.output_device) if self.device == "gpu" else None
        self._tmp = tempfile.mkdtemp(prefix="sdarts-dali-")
        weakref.finalize(self, shutil.rmtree, self._tmp, True)
        self._pipe = None
        self._ckpt: tuple[int, int, bytes] | None = None   # (epoch, position, DALI checkpoint)

    # ------------------------------------------------------------------ state
    def _resume_token(self) -> str:
        """This rank's DALI checkpoint after the last batch handed out, base64 (JSON/torch-safe)."""
        ck = self._ckpt
        if ck is None or ck[0] != self.epoch or ck[1] != self.position or self.position == 0:
            return ""
        return base64.b64encode(ck[2]).decode("ascii")

    def _on_load(self, token: str) -> None:
        self._close()
        self._ckpt = (self.epoch, self.position, base64.b64decode(token)) if token else None

    def _on_new_epoch(self) -> None:
        self._close()
        self._ckpt = None

    def _close(self) -> None:
        self._pipe = None

    # ------------------------------------------------------------------ pipeline
    def _reader(self, order: np.ndarray):
        """The reader over the epoch's order, with skipped samples swapped for a placeholder."""
        from nvidia.dali import fn
        L = self.listing
        shard = dict(shard_id=self.rank, num_shards=self.world, stick_to_shard=True, pad_last_batch=True,
                     random_shuffle=False, name="reader")
        if L.kind == "folder":
            files = [L.path(p) if p not in self.bad else _placeholder_jpeg(self._tmp) for p in order.tolist()]
            jpegs, _ = fn.readers.file(files=files, **shard)
            return jpegs
        paths, index_paths = [], []
        runs = np.split(order, np.nonzero(np.diff(L.tar_of[order]))[0] + 1) if len(order) else []
        for n, run in enumerate(runs):
            t = int(L.tar_of[run[0]])
            good = [p for p in run.tolist() if p not in self.bad]
            idx = os.path.join(self._tmp, f"{n}.idx")
            with open(idx, "w") as f:
                f.write(f"v1.2 {len(run)}\n")
                for p in run.tolist():
                    img = L.image_member(p if p not in self.bad or not good else good[0])
                    cls = L.cls_member(p)
                    f.write(" ".join(f"{e} {o} {s} {nm}" for e, o, s, nm in (img, cls)) + "\n")
            paths.append(L.tars[t])
            index_paths.append(idx)
        jpegs, _ = fn.readers.webdataset(paths=paths, index_paths=index_paths,
                                         ext=[";".join(WDS_IMAGE_EXTS), "cls"], **shard)
        return jpegs

    def _build(self, order: np.ndarray, checkpoint: bytes | None):
        from nvidia.dali import pipeline_def
        seed = int(np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, self.salt, self.rank])
                   .integers(0, 2**31 - 1))

        @pipeline_def(batch_size=self.micro_batch, num_threads=max(1, self.workers), device_id=self.device_id,
                      seed=seed, enable_checkpointing=True, prefetch_queue_depth=2)
        def pipe():
            return augment(self._reader(order), self.spec, self.device == "gpu")

        p = pipe(checkpoint=checkpoint)
        p.build()
        return p

    def _open(self, order: np.ndarray, k: int):
        """A pipeline positioned before micro-batch k: from the checkpoint, or replayed from the start."""
        ck = self._ckpt
        if k == 0:
            return self._build(order, None)
        if ck is not None and ck[0] == self.epoch and ck[1] == k:
            return self._build(order, ck[2])
        log.info("no DALI checkpoint for epoch %d batch %d: replaying %d batches", self.epoch, k, k)
        p = self._build(order, None)
        for _ in range(k):
            p.run()
        return p

    # ------------------------------------------------------------------ iteration
    def _batches(self, order: np.ndarray, mine: np.ndarray) -> Iterator[Batch]:
        with_data = -(-len(mine) // self.micro_batch)  # batches holding at least one real sample
        at, failures = None, 0
        while self.position < len(self):
            k = self.position
            if k >= with_data:
                yield self.empty_batch()
                continue
            if self._pipe is None:
                self._pipe = self._open(order, k)
            try:
                (out,) = self._pipe.run()
            except RuntimeError as e:
                self._pipe = None
                failures = failures + 1 if at == (self.epoch, k) else 1
                at = (self.epoch, k)
                if failures > self.micro_batch:
                    raise DataError(f"{self.listing.path(mine[k * self.micro_batch])}: DALI keeps failing on "
                                    f"the batch starting at this file: {_dali_reason(e)}") from None
                self._find_bad(e, mine, k)   # raises (error mode) or marks the culprits (skip mode)
                continue
            self._ckpt = (self.epoch, k + 1, self._pipe.checkpoint())
            pos, real = self.batch_positions(mine, k)
            self._check_identity(out, pos[:real])
            yield self.finish(self._to_torch(out), pos, real)

    def _to_torch(self, out) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        t = out.as_tensor()
        dt = torch.float16 if self.spec.dtype == "fp16" else torch.float32
        dev = torch.device("cuda", self.device_id) if self.device == "gpu" else torch.device("cpu")
        x = torch.empty(t.shape(), dtype=dt, device=dev)
        feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(dev) if dev.type == "cuda" else None)
        return x.to(torch.bfloat16) if self.spec.dtype == "bf16" else x

    def _check_identity(self, out, pos: np.ndarray) -> None:
        """Each image's DALI source must be the planned sample (catches any shard-rule drift)."""
        L = self.listing
        for j, p in enumerate(pos.tolist()):
            if p in self.bad:
                continue
            src = out[j].source_info()
            if L.kind == "folder":
                want = L.path(p)
            else:
                _, off, _, name = L.image_member(p)
                want = f"{L.tars[L.tar_of[p]]}:{off}:{name}"
            if src != want:
                raise RuntimeError(f"DALI returned {src!r} where the plan has {want!r} "
                                   f"(rank {self.rank}/{self.world}, epoch {self.epoch}, batch {self.position})")

    def _find_bad(self, err: Exception, mine: np.ndarray, k: int) -> None:
        pos, real = self.batch_positions(mine, k)
        candidates = [p for p in pos[:real].tolist() if p not in self.bad]
        reason = _dali_reason(err)
        msg = str(err)
        # DALI names some culprits (an unreadable file) but not others (nvImageCodec errors): check all
        culprits = [p for p in candidates if not decodes(self._safe_read(p))]
        culprits.sort(key=lambda p: os.path.basename(self.listing.path(p).rsplit(":", 1)[-1]) not in msg)
        if not culprits:
            first = self.listing.path(pos[0]) if real else self.listing.root
            raise DataError(f"{first}: DALI failed on the batch starting at this file ({reason})") from None
        for p in culprits:
            self.mark_bad(p, f"corrupt or unreadable image ({reason})")

    def _safe_read(self, p: int) -> bytes:
        try:
            return self.listing.read_bytes(p)
        except OSError:
            return b""
