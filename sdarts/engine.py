"""DeepSpeed engine for the search: ds_config from our config, initialize, checkpoints.

The supernet (with alpha inside it) and the combined optimizer go to `deepspeed.initialize` together,
so DeepSpeed averages alpha's gradients with the weights', keeps fp32 master copies of both under
bf16/fp16 and saves both in one checkpoint. We do not give DeepSpeed an LR scheduler: learning rates
are a pure function of the epoch (`set_epoch_lr`), which makes resume trivially exact.

Checkpoints are atomic at the directory level: DeepSpeed writes `checkpoints/<tag>/`, every rank
reaches a barrier, then rank 0 moves `checkpoints/latest` by writing a temp file and renaming it, and
only then deletes checkpoints beyond `keep`. A kill at any point leaves `latest` naming a complete one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sdarts.config import SearchConfig
from sdarts.distributed import barrier
from sdarts.optim import CombinedOptimizer, cosine_lr


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, from another space or not a checkpoint; names the path."""


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

    # -- the step -----------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_dtype is not None:
            x = x.to(self.input_dtype)
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
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        barrier()
        if self.engine.global_rank == 0:
            tmp = ckpt_dir / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, ckpt_dir / "latest")
            tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
            for old in tags[:-keep]:
                if old != tag:
                    shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        barrier()

    def load(self, ckpt_dir: Path) -> dict | None:
        """Loads the checkpoint named by `latest`; returns its client state (None when there is none)."""
        latest = ckpt_dir / "latest"
        if not latest.exists():
            return None
        tag = latest.read_text().strip()
        if not (ckpt_dir / tag).is_dir():
            raise CheckpointError(f"{ckpt_dir / tag}: checkpoint named by {latest} is missing")
        verify_safe(ckpt_dir / tag)
        try:
            _, client = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
        except (RuntimeError, KeyError, EOFError, ValueError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{ckpt_dir / tag}: not a checkpoint of this search ({first[:200]})") from None
        if client is None:
            raise CheckpointError(f"{ckpt_dir / tag}: checkpoint could not be read")
        if client.get("space") != self.cfg.space:
            raise CheckpointError(f"{ckpt_dir / tag}: checkpoint is from space {client.get('space')!r}, "
                                  f"config says {self.cfg.space!r}")
        return client


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
