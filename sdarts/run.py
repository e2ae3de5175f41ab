"""The run skeleton both training loops share (the search, `sdarts.search.loop`, and the retrain,
`retrain.train`): everything around the steps, so that each loop is only its training logic.

    run = Run(cfg, run_dir)                  # process group, device, seed
    run.prepare(resume, force, subdirs)      # the run directory (refuses to clobber an earlier run)
    run.record_provenance(loader, ...)       # one log line; the `run` block of summary.json
    client = run.resume_or_start(ds_engine, ...)   # checkpoint + RNG + logs cut back, or the fresh files
    with run.training(steps_per_epoch, "search"):  # TensorBoard, profiler, preemption signals, progress
        ... step ...; run.after_step(images, record); run.stop_if_preempted(save)
        if run.checkpoint_due(steps_per_epoch): save(epoch)
    run.finish(summary)                      # summary.json (wall time, images/s, provenance)

`cfg` is a search or a retrain config: both have `seed`, `engine.device`, `log.*` and `checkpoint.*`.
A checkpoint's client state carries the loop's own keys plus `epoch`, `step`, `torch_rng` and, on
CUDA, `cuda_rng` (`Run.save`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sdarts.checkpoint import load_latest, read_latest, save_atomic
from sdarts.config import dump
from sdarts.distributed import barrier, init
from sdarts.errors import NumericalFault
from sdarts.preempt import PreemptionSignals
from sdarts.profiling import StepProfiler
from sdarts.provenance import describe, provenance
from sdarts.runlog import JsonlLog, StepProgress, atomic_write, prepare_run_dir

log = logging.getLogger("sdarts")


class Run:
    """One training run of this process: its directory, logs, checkpoints and step counter."""

    def __init__(self, cfg: Any, run_dir: str | Path):
        self.t_start = time.time()
        self.cfg = cfg
        self.rank, self.local_rank, self.world, self.device = init(cfg.engine.device)
        self.is_main = self.rank == 0
        self.logs_here = self.is_main or cfg.log.all_ranks  # with log.all_ranks every rank logs
        self.dir = Path(run_dir)
        self.ckpt_dir = self.dir / "checkpoints"
        self.metrics = JsonlLog(self.dir / "metrics.jsonl", self.logs_here)
        self.step = 0  # optimizer steps taken, over the whole run (a resumed run starts past 0)
        self.skipped: list[str] = []  # undecodable samples the data loaders skipped
        self.tb = None
        self.provenance: dict = {}

    def prepare(self, resume: bool, force: bool, subdirs: tuple[str, ...]) -> None:
        """The run directory (`--resume` continues it, `--force` starts over), then the seed."""
        prepare_run_dir(self.dir, resume, force, self.rank, subdirs)
        torch.manual_seed(self.cfg.seed)

    def warn_skipped(self) -> None:
        if self.skipped and self.is_main:
            log.warning("skipped %d undecodable samples (data.on_bad_sample=skip); first: %s",
                        len(self.skipped), self.skipped[0])

    def record_provenance(self, loader, precision: str, global_batch: int, lr: dict) -> None:
        """What this run runs on (data backend, device, precision, versions, commit, batch, lr): one log
        line now, the `run` block of summary.json at the end (`sdarts.provenance`)."""
        self.provenance = provenance(loader, self.device, self.world, precision, global_batch, lr)
        if self.is_main:
            log.info(describe(self.provenance))

    def resume_or_start(self, ds_engine, resume: bool, what: str, refuse: Callable[[dict], str | None],
                        logs: list[JsonlLog], ds_config: dict) -> dict | None:
        """With `resume` and a checkpoint: loads it into `ds_engine`, restores the step and the RNG
        states, cuts `logs` back to its step and returns its client state. Otherwise (a fresh start, or
        `--resume` before the first checkpoint, a job requeued early): cuts `logs` back to step 0 and
        writes `config.yaml` and `ds_config.json`; returns None."""
        client = load_latest(ds_engine, self.ckpt_dir, what, refuse) if resume else None
        if client is not None:
            self.step = client["step"]
            torch.set_rng_state(client["torch_rng"])
            if self.device.type == "cuda" and client.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(client["cuda_rng"], self.device)
        for f in [self.metrics] + logs:
            f.truncate_after(self.step)
        if client is not None and self.is_main:
            log.info("resumed from step %d (epoch %d)", self.step, client["epoch"])
        elif client is None and self.is_main:
            atomic_write(self.dir / "config.yaml", dump(self.cfg))
            atomic_write(self.dir / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")
        return client

    def save(self, ds_engine, epoch: int, state: dict) -> None:
        """A checkpoint of this step: the loop's `state` plus epoch, step and RNG states."""
        state = state | {"epoch": epoch, "step": self.step, "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        save_atomic(ds_engine, self.ckpt_dir, f"step{self.step:09d}", state, self.cfg.checkpoint.keep)

    @contextlib.contextmanager
    def training(self, steps_per_epoch: int, tb_prefix: str) -> Iterator[None]:
        """TensorBoard, the per-step progress, the profiler window and the preemption signals for the
        loop inside; all closed however the loop ends."""
        log_cfg = self.cfg.log
        if self.is_main and log_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.dir / "tb"))
        self.progress = StepProgress(self.metrics, self.tb, tb_prefix, log_cfg.every_steps, steps_per_epoch,
                                     self.is_main and log_cfg.progress)
        self.profiler = StepProfiler(self.dir / "profile", log_cfg.profile_warmup, log_cfg.profile_steps,
                                     self.logs_here, self.device.type, self.rank, first_step=self.step)
        self.signals = PreemptionSignals()
        try:
            yield
        finally:
            self.profiler.close()
            self.signals.restore()
            if self.tb:
                self.tb.close()

    def after_step(self, images: int, record: Callable[[float], dict]) -> None:
        """After one optimizer step that took `images` images on this rank: count it, profile it and
        log it (`record(images_per_s)` builds the metrics line, only when one is due)."""
        self.step += 1
        self.profiler.step_done(images)
        self.progress.step(self.step, images * self.world, record)

    def stop_if_preempted(self, save: Callable[[], None]) -> None:
        """At a step boundary: on a preemption signal (to any rank), `save()` and exit (code 124)."""
        self.signals.stop_if_asked(save, self.step, announce=self.is_main)

    def checkpoint_due(self, steps_per_epoch: int) -> bool:
        """A periodic mid-epoch checkpoint (`checkpoint.every_steps`; the epoch end writes its own)."""
        every = self.cfg.checkpoint.every_steps
        return bool(every) and self.step % every == 0 and self.step % steps_per_epoch != 0

    def numerical_fault(self, epoch: int, what: str) -> NumericalFault:
        """The one-line stop for a non-finite loss: the step, what went wrong, and the checkpoint
        `--resume` would continue from."""
        tag = read_latest(self.ckpt_dir)
        last = self.ckpt_dir / tag if tag else "none yet"
        return NumericalFault(f"step {self.step + 1} (epoch {epoch + 1}): {what}; last good checkpoint: {last} "
                              f"(--resume continues from it; consider a lower optim.w.lr)")

    def totals(self) -> dict:
        """What every summary.json ends with: world size, wall time, mean images/s, skipped samples and
        the provenance (`record_provenance`)."""
        ips = [m["images_per_s"] for m in self.metrics.read() if m.get("images_per_s")]
        return {"world_size": self.world, "wall_time_s": time.time() - self.t_start,
                "images_per_s": sum(ips) / len(ips) if ips else None,
                "skipped_samples": len(self.skipped), "run": self.provenance}

    def finish(self, summary: dict, write: bool = True) -> dict:
        """The summary plus `totals()`; rank 0 writes summary.json."""
        summary = summary | self.totals()
        if write and self.is_main:
            atomic_write(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        barrier()
        return summary
