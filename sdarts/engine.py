"""DeepSpeed engine for the search: ds_config from our config, initialize, checkpoints.

The supernet (with alpha inside it) and the combined optimizer go to `deepspeed.initialize` together,
so DeepSpeed averages alpha's gradients with the weights', keeps fp32 master copies of both under
bf16/fp16 and saves both in one checkpoint. We do not give DeepSpeed an LR scheduler: learning rates
are a pure function of the epoch (`set_epoch_lr`), which makes resume trivially exact.

Checkpoints are atomic at the directory level (`save_atomic`, shared with the retrain loop): DeepSpeed
writes `checkpoints/<tag>/`, every rank agrees that its part was written, then rank 0 moves
`checkpoints/latest` by writing a temp file and renaming it, and only then deletes checkpoints beyond
`keep`. A kill at any point leaves `latest` naming a complete one; a failed write (disk full) removes
the partial tag and raises `CheckpointSaveError`, naming the checkpoint that is still good.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import torch

from sdarts.config import SearchConfig
from sdarts.distributed import all_agree, barrier
from sdarts.errors import CheckpointError, CheckpointSaveError, NumericalFault  # noqa: F401 - re-exported
from sdarts.optim import CombinedOptimizer, cosine_lr


def ds_config(micro_batch: int, accum: int, world: int, precision: str, autocast: bool, zero_stage: int,
              on_cuda: bool) -> dict:
    """The DeepSpeed config for our settings (gradient clipping is done by CombinedOptimizer)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro_batch * accum * world,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if precision != "fp32":
        dtype = "bfloat16" if precision == "bf16" else "float16"
        if autocast:
            cfg["torch_autocast"] = {"enabled": True, "dtype": dtype}
        elif precision == "bf16":
            cfg["bf16"] = {"enabled": True}
        else:
            cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                           "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return cfg


def check_precision(precision: str, device: torch.device) -> None:
    """Refuses a precision the device cannot run, with one clear line."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16")
    if precision == "fp16" and device.type == "cpu":
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        if "avx512_fp16" not in flags and "amx_fp16" not in flags:
            raise ValueError("precision fp16: this CPU has no fp16 arithmetic (avx512_fp16); use fp32 or bf16")


class SearchEngine:
    """Owns the DeepSpeed engine, the combined optimizer and checkpoint I/O for one search."""

    def __init__(self, cfg: SearchConfig, model: torch.nn.Module, world: int, device: torch.device):
        import deepspeed
        check_precision(cfg.precision, device)
        o = cfg.optim
        self.cfg = cfg
        self.opt = CombinedOptimizer(
            model.get_weights(), model.get_alphas(), w_lr=o.w.lr, w_momentum=o.w.momentum,
            w_weight_decay=o.w.weight_decay, w_nesterov=o.w.nesterov, alpha_rule=o.alpha.optimizer,
            alpha_lr=o.alpha.lr, alpha_betas=o.alpha.betas, alpha_eps=o.alpha.eps,
            alpha_momentum=o.alpha.momentum, alpha_weight_decay=o.alpha.weight_decay, grad_clip=o.w.grad_clip)
        self.opt.partitioned = cfg.engine.zero_stage > 0
        self.ds_config = ds_config(cfg.data.micro_batch, cfg.engine.grad_accum, world, cfg.precision,
                                   cfg.engine.autocast, cfg.engine.zero_stage, device.type == "cuda")
        # DeepSpeed broadcasts parameters as flat byte views, which NHWC (channels_last) weights cannot
        # give; activations stay channels_last because the supernet converts its input
        for p in model.parameters():
            p.data = p.data.clone(memory_format=torch.contiguous_format)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.opt, config=self.ds_config)
        self.device = self.engine.device
        # DeepSpeed's bf16/fp16 modes cast the whole module, so inputs must match; autocast takes fp32 inputs
        self.input_dtype = None
        if cfg.precision != "fp32" and not cfg.engine.autocast:
            self.input_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
            # DeepSpeed casts parameters only; BN running statistics must follow or BN refuses the input
            for b in self.engine.module.buffers():
                if b.is_floating_point():
                    b.data = b.data.to(self.input_dtype)
        dev_type = torch.device(self.device).type
        if cfg.engine.cuda_graphs is True and dev_type != "cuda":
            raise ValueError(f"engine.cuda_graphs needs a CUDA device; this run is on {dev_type} "
                             f"(set it to auto or false)")
        # recorded at the first forward, when the real batch shape is known (sdarts/graphs.py)
        self._graph_pending = cfg.cuda_graphs_on(dev_type)

    # -- the step -----------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_dtype is not None:
            x = x.to(self.input_dtype)
        if self._graph_pending:
            self._graph_pending = False
            from sdarts.graphs import install
            amp = self.cfg.precision == "bf16" and self.cfg.engine.autocast
            install(self.engine.module, x, torch.bfloat16 if amp else None)
        return self.engine(x)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, tags: set[str]) -> None:
        """One optimizer step over the groups in `tags` (DeepSpeed clears all gradients after it)."""
        self.opt.active = tags
        self.engine.step()

    def is_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def set_epoch_lr(self, epoch: int) -> None:
        w = self.cfg.optim.w
        lr = cosine_lr(w.lr, w.lr_min, epoch, self.cfg.epochs) if w.schedule == "cosine" else w.lr
        self.opt.set_lr("w", lr)
        self.opt.set_lr("alpha", self.cfg.optim.alpha.lr)

    def skipped_steps(self) -> int:
        return int(getattr(self.engine, "skipped_steps", 0))

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, ckpt_dir: Path, tag: str, client_state: dict, keep: int) -> None:
        save_atomic(self.engine, ckpt_dir, tag, client_state, keep)

    def load(self, ckpt_dir: Path) -> dict | None:
        """Loads the checkpoint named by `latest`; returns its client state (None when there is none)."""
        space = self.cfg.space
        return load_latest(self.engine, ckpt_dir, "search", lambda c: None if c.get("space") == space else
                           f"checkpoint is from space {c.get('space')!r}, config says {space!r}")


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag `ckpt_dir/latest` names, None when there is no (readable, non-empty) `latest` yet."""
    try:
        return (Path(ckpt_dir) / "latest").read_text().strip() or None
    except OSError:
        return None


def numerical_fault(ckpt_dir: Path, step: int, epoch: int, what: str) -> NumericalFault:
    """The one-line stop for a non-finite loss (both loops): the step, what went wrong, and the
    checkpoint `--resume` would continue from."""
    tag = read_latest(ckpt_dir)
    last = ckpt_dir / tag if tag else "none yet"
    return NumericalFault(f"step {step + 1} (epoch {epoch + 1}): {what}; last good checkpoint: {last} "
                          f"(--resume continues from it; consider a lower optim.w.lr)")


def load_latest(engine, ckpt_dir: Path, what: str,
                refuse: Callable[[dict], str | None] = lambda client: None) -> dict | None:
    """Loads the checkpoint named by `latest` into `engine` and returns its client state (None when
    there is no `latest`: a fresh start). Every file is checked with `verify_safe` first, because
    DeepSpeed's loader unpickles arbitrary objects; a missing tag, a foreign network, an unreadable
    file or a client state `refuse` objects to (it returns the reason) is one CheckpointError naming
    the tag directory (`what` says whose checkpoint was expected)."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    tag = read_latest(ckpt_dir)
    if tag is None:  # written by temp file + rename, so never empty on its own: refuse, do not start afresh
        raise CheckpointError(f"{latest}: empty or unreadable (it should name a checkpoint tag)")
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{ckpt_dir / tag}: checkpoint named by {ckpt_dir / 'latest'} is missing")
    verify_safe(ckpt_dir / tag)
    try:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
    except (RuntimeError, KeyError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt_dir / tag}: not a checkpoint of this {what} ({first[:200]})") from None
    if client is None:
        raise CheckpointError(f"{ckpt_dir / tag}: checkpoint could not be read")
    reason = refuse(client)
    if reason:
        raise CheckpointError(f"{ckpt_dir / tag}: {reason}")
    return client


def save_atomic(engine, ckpt_dir: Path, tag: str, client_state: dict, keep: int) -> None:
    """Writes `ckpt_dir/<tag>/` on every rank, then rank 0 moves `latest` to it, then prunes old tags.

    The order is the crash-safety argument: `latest` only ever names a tag that every rank finished
    writing, so a kill -9 at any instant leaves a loadable checkpoint. A write that fails on any rank
    (ENOSPC, quota, I/O error) is agreed on by all ranks (no rank waits forever in a barrier), the
    partial tag is removed and `CheckpointSaveError` names the checkpoint that is still good.
    """
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag
    rank0 = engine.global_rank == 0
    error = None
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        fault_point("save.begin", tag_dir)
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        fault_point("save.written", tag_dir)
    except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as a bare RuntimeError
        error = _save_failure(e, tag_dir)
    if not all_agree(error is not None):  # an all-reduce: also the barrier after every rank's write
        if rank0:
            try:
                from sdarts.runlog import atomic_write
                atomic_write(ckpt_dir / "latest", tag)
            except OSError as e:
                error = _save_failure(e, ckpt_dir / "latest")
        if not all_agree(error is not None):
            fault_point("save.committed", tag_dir)
            if rank0:
                _prune(ckpt_dir, tag, keep)
            barrier()
            return
    previous = read_latest(ckpt_dir)
    if rank0:
        if previous != tag:
            shutil.rmtree(tag_dir, ignore_errors=True)
        for tmp in ckpt_dir.glob("latest.tmp*"):  # a pointer write that failed half-way
            tmp.unlink(missing_ok=True)
    barrier()
    kept = f"{ckpt_dir / previous} is kept" if previous else "no earlier checkpoint exists"
    raise CheckpointSaveError(f"checkpoint {tag_dir} not saved: {error or 'another rank could not write its part'}"
                              f"; `latest` still names the last complete one, {kept} (--resume continues from it)")


def _prune(ckpt_dir: Path, tag: str, keep: int) -> None:
    """Deletes tags beyond the newest `keep` up to `tag`, and any tag newer than `tag`: those are left
    over from a timeline that was killed and resumed from an earlier checkpoint, never committed."""
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
    older = [t for t in tags if t <= tag]
    stale = [t for t in tags if t > tag] + older[:-keep]
    for old in stale:
        if old != tag:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def _save_failure(e: BaseException, where: Path) -> str:
    """One line for a failed write; a full device is named as such even when torch hides the errno."""
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(x)
        x = x.__cause__ or x.__context__
    os_err = next((x for x in chain if isinstance(x, OSError) and x.errno), None)
    if os_err is not None:
        return f"{os_err.strerror or os.strerror(os_err.errno)} ({os_err.filename or where})"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    if free is not None and free < (1 << 20):
        return f"{os.strerror(errno.ENOSPC)} ({free} bytes free under {probe})"
    return first


#: test-only fault injection, see `fault_point` and docs/reliability.md
FAULT_ENV = "SDARTS_TEST_FAULT"
_fault_hits: dict[str, int] = {}


def fault_point(point: str, tag_dir: Path) -> None:
    """Test-only: injects a fault at one of the checkpoint writer's crash-relevant instants.

    Does nothing unless the environment has SDARTS_TEST_FAULT="<point>:<action>[:<n>|*]" (several
    separated by commas), which fires at the n-th time (default 1; `*` every time) this process reaches
    <point>: `save.begin` (nothing written yet), `save.written` (the tag is complete, `latest` not yet
    moved), `save.committed` (`latest` moved, old tags not yet pruned). Actions: `kill` (SIGKILL
    itself: a kill -9 at exactly that instant), `torn` (cut the tag's files to half, then SIGKILL: a
    kill mid-write), `enospc` (cut to half, then raise ENOSPC: a disk that fills mid-write), `term`
    (send itself SIGTERM: a preemption signal arriving during the save). The reliability tests use it
    because such instants last microseconds and cannot be hit reliably from outside the process.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, action, *nth = item.strip().split(":")
        if name != point:
            continue
        hit = _fault_hits[item] = _fault_hits.get(item, 0) + 1
        when = nth[0] if nth else "1"
        if when != "*" and hit != int(when):
            continue
        if action in ("torn", "enospc") and tag_dir.is_dir():
            for f in tag_dir.iterdir():
                if f.is_file():
                    os.truncate(f, f.stat().st_size // 2)
        if action in ("kill", "torn"):
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" ({FAULT_ENV})", str(tag_dir))
        else:
            raise ValueError(f"{FAULT_ENV}: unknown action {action!r} in {item!r}")


def verify_safe(tag_dir: Path) -> None:
    """Refuses checkpoint files that need arbitrary unpickling.

    DeepSpeed's loader calls `torch.load(weights_only=False)`, which runs any code a crafted pickle
    carries. Every file is first opened with `weights_only=True` (tensors, containers and plain types
    only); what fails that is refused before DeepSpeed touches it.
    """
    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir}: no checkpoint files in it")
    for f in files:
        try:
            torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means we will not unpickle it unsafely
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{f}: refused, not a plain-tensor checkpoint ({first[:160]})") from None


def write_ds_config(path: Path, cfg: dict) -> None:
    path.write_text(json.dumps(cfg, indent=2) + "\n")
