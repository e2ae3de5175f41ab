"""The search engine: our config as a DeepSpeed config, and the DeepSpeed engine a search step drives.

The supernet (with alpha inside it) and the combined optimizer go to `deepspeed.initialize` together,
so DeepSpeed averages alpha's gradients with the weights', keeps fp32 master copies of both under
bf16/fp16 and saves both in one checkpoint. We do not give DeepSpeed an LR scheduler: learning rates
are a pure function of the epoch (`set_epoch_lr`), which makes resume trivially exact.

Names, everywhere: `engine` is a `SearchEngine`, `engine.ds_engine` the DeepSpeed engine inside it,
`engine.optimizer` the `CombinedOptimizer`, `engine.module` the supernet. Checkpoints are
`sdarts.checkpoint`'s business.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdarts.config import SearchConfig
from sdarts.optim import CombinedOptimizer, cosine_lr


def ds_config(micro_batch: int, accum: int, world: int, precision: str, autocast: bool, zero_stage: int
              ) -> dict:
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
    """The DeepSpeed engine and the combined optimizer of one search; `step(groups)` is the update."""

    def __init__(self, cfg: SearchConfig, model: torch.nn.Module, world: int, device: torch.device):
        import deepspeed
        check_precision(cfg.precision, device)
        o = cfg.optim
        self.cfg = cfg
        self.optimizer = CombinedOptimizer(
            model.get_weights(), model.get_alphas(), w_lr=o.w.lr, w_momentum=o.w.momentum,
            w_weight_decay=o.w.weight_decay, w_nesterov=o.w.nesterov, alpha_rule=o.alpha.optimizer,
            alpha_lr=o.alpha.lr, alpha_betas=o.alpha.betas, alpha_eps=o.alpha.eps,
            alpha_momentum=o.alpha.momentum, alpha_weight_decay=o.alpha.weight_decay, grad_clip=o.w.grad_clip,
            partitioned=cfg.engine.zero_stage > 0)
        self.ds_config = ds_config(cfg.data.micro_batch, cfg.engine.grad_accum, world, cfg.precision,
                                   cfg.engine.autocast, cfg.engine.zero_stage)
        # DeepSpeed broadcasts parameters as flat byte views, which NHWC (channels_last) weights cannot
        # give; activations stay channels_last because the supernet converts its input
        for p in model.parameters():
            p.data = p.data.clone(memory_format=torch.contiguous_format)
        self.ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        self.device = self.ds_engine.device
        self.input_dtype = self._cast_for_precision(cfg)
        dev_type = torch.device(self.device).type
        if cfg.engine.cuda_graphs is True and dev_type != "cuda":
            raise ValueError(f"engine.cuda_graphs needs a CUDA device; this run is on {dev_type} "
                             f"(set it to auto or false)")
        # recorded at the first forward, when the real batch shape is known (sdarts/graphs.py)
        self._graph_pending = cfg.cuda_graphs_on(dev_type)

    def _cast_for_precision(self, cfg: SearchConfig) -> torch.dtype | None:
        """DeepSpeed's bf16/fp16 modes cast the whole module, so inputs must match (returns their dtype);
        autocast takes fp32 inputs (None)."""
        if cfg.precision == "fp32" or cfg.engine.autocast:
            return None
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
        # DeepSpeed casts parameters only; BN running statistics must follow or BN refuses the input
        for b in self.ds_engine.module.buffers():
            if b.is_floating_point():
                b.data = b.data.to(dtype)
        return dtype

    @property
    def module(self) -> torch.nn.Module:
        return self.ds_engine.module

    # -- the step: forward, backward, then one optimizer update of the named groups --------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_dtype is not None:
            x = x.to(self.input_dtype)
        if self._graph_pending:
            self._graph_pending = False
            from sdarts.graphs import install
            amp = self.cfg.precision == "bf16" and self.cfg.engine.autocast
            install(self.ds_engine.module, x, torch.bfloat16 if amp else None)
        return self.ds_engine(x)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds_engine.backward(loss)

    def step(self, groups: frozenset[str]) -> None:
        """One optimizer update of the parameter groups in `groups` ("w", "alpha"). DeepSpeed calls the
        optimizer with no arguments, so the groups are scoped to this one call; it updates only at a
        gradient-accumulation boundary and clears all gradients after."""
        with self.optimizer.updating(groups):
            self.ds_engine.step()

    def set_epoch_lr(self, epoch: int) -> None:
        w = self.cfg.optim.w
        lr = cosine_lr(w.lr, w.lr_min, epoch, self.cfg.epochs) if w.schedule == "cosine" else w.lr
        self.optimizer.set_lr("w", lr)
        self.optimizer.set_lr("alpha", self.cfg.optim.alpha.lr)

    def skipped_steps(self) -> int:
        return int(getattr(self.ds_engine, "skipped_steps", 0))
