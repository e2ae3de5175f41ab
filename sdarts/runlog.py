"""Run-directory files: append-only JSONL logs that can be cut back to a checkpoint on resume, and the
per-step progress both training loops (search, retrain) write into them.

`metrics.jsonl` and `alphas.jsonl` carry a `step` in every line; on resume, lines written after the
checkpoint being resumed are dropped (temp file + rename), so an interrupted-and-resumed run leaves
the same files as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from sdarts.errors import RunDirError


def prepare_run_dir(run_dir: Path, resume: bool, force: bool, rank: int, subdirs: Iterable[str]) -> None:
    """Refuses to clobber a run: a directory holding an earlier (finished or checkpointed) run needs
    `resume` (continue it) or `force` (delete it and start over). Rank 0 decides and creates the
    directory and its `subdirs`; every rank then waits at a barrier, so no rank writes into a directory
    that is about to be deleted."""
    from sdarts.distributed import barrier  # torch: kept out of this module's import
    if rank == 0:
        if run_dir.exists() and any(run_dir.iterdir()) and not resume:
            if not force:
                what = "finished" if (run_dir / "summary.json").exists() else "existing"
                raise RunDirError(f"run directory {run_dir} holds an {what} run; pass --resume to continue "
                                  f"it or --force to start over")
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for d in subdirs:
            (run_dir / d).mkdir(exist_ok=True)
    barrier()


def atomic_write(path: Path, text: str) -> None:
    # per-process temp name: with log.all_ranks every rank rewrites the shared metrics.jsonl on resume,
    # and a shared temp name let one rank's rename pull the file from under the other's
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def append(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keeps only records with `step` <= step."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a kill
        atomic_write(self.path, "".join(l + "\n" for l in keep))

    def rewrite(self, records: list[dict]) -> None:
        """Replaces the file with exactly these records (atomic)."""
        if self.enabled:
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out


class StepProgress:
    """What the search and retrain loops do after every optimizer step: count images for images/s over
    the logging window, and every `every_steps` steps and at the end of each epoch write a
    `metrics.jsonl` record, its TensorBoard scalars (`<tb_prefix>/loss|acc|lr_w|images_per_s`) and the
    progress bar's postfix.

    The record is built by the loop's callable, given images/s, and only when one is due: reading a
    loss or an accuracy from the device is a host sync, which a GPU step should not pay every step.
    """

    def __init__(self, metrics: JsonlLog, tb: Any, tb_prefix: str, every_steps: int, steps_per_epoch: int,
                 show_bar: bool):
        self.metrics, self.tb, self.tb_prefix = metrics, tb, tb_prefix
        self.every_steps, self.steps_per_epoch, self.show_bar = every_steps, steps_per_epoch, show_bar
        self.bar = None
        self._t, self._images = time.time(), 0

    def start_epoch(self, epoch: int, epochs: int, done: int) -> None:
        """`done`: steps of this epoch already taken (a resumed run starts mid-epoch)."""
        if self.show_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=self.steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{epochs}",
                            leave=False, dynamic_ncols=True)
        self._t, self._images = time.time(), 0

    def step(self, step: int, images: int, record: Callable[[float], dict]) -> None:
        """After optimizer step `step`, which took `images` images over all ranks."""
        self._images += images
        if step % self.every_steps == 0 or step % self.steps_per_epoch == 0:
            ips = self._images / max(time.time() - self._t, 1e-9)
            rec = record(ips)
            self.metrics.append(rec)
            if self.tb:
                for k in ("loss", "acc", "lr_w", "images_per_s"):
                    self.tb.add_scalar(f"{self.tb_prefix}/{k}", rec[k], step)
            if self.bar:
                self.bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", img_s=f"{ips:.0f}")
            self._t, self._images = time.time(), 0
        if self.bar:
            self.bar.update(1)

    def end_epoch(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None
