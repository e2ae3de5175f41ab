"""The search's update: the DeepSpeed engine a search step drives, and the one optimizer inside it.

    engine.step(groups)  ->  with optimizer.updating(groups): ds_engine.step()  ->  CombinedOptimizer.step()

`SearchEngine` hands the supernet (with alpha inside it) and the combined optimizer to
`deepspeed.initialize` together, so DeepSpeed averages alpha's gradients with the weights', keeps fp32
master copies of both under bf16/fp16 and saves both in one checkpoint. We do not give DeepSpeed an LR
scheduler: learning rates are a pure function of the epoch (`set_epoch_lr`), which makes resume exact.

Why one optimizer (`CombinedOptimizer`, groups tagged `w` (SGD) / `alpha` (Adam or SGD)): DeepSpeed
owns exactly one optimizer. A separate torch Adam for alpha breaks under bf16/fp16 (alpha gets no fp32
master copy: bf16 Adam at lr 3e-4 never moves it, fp16 gives NaN), its gradients are not averaged
under ZeRO 1/2, and under ZeRO 0 `ds_engine.step()` clears them before a later Adam step. DeepSpeed
calls `step()` with no arguments, so `engine.step(groups)` scopes the groups named at the call site to
its one `ds_engine.step()` (`optimizer.updating(groups)`): single-level updates both from one backward;
bi-level phases update only the group they own. Gradient clipping applies to the `w` group only
(alpha's gradients are not clipped, as in DARTS); under ZeRO 1/2 each rank holds a partition of the
gradients, so the norm is all-reduced. With stacked seeds (`SeedStack`, `seeds: [...]`) every parameter
holds S searches' along dim 0 and the clip norm is each seed's own; SGD and Adam are elementwise, so
the rest of the update is per seed as it stands.

Names, everywhere: `engine` is a `SearchEngine`, `engine.ds_engine` the DeepSpeed engine inside it,
`engine.optimizer` the `CombinedOptimizer`, `engine.module` the supernet. Checkpoints are
`sdarts.checkpoint`'s business. `ds_config` and `check_precision` serve the retrain's engine too.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sdarts.config import SearchConfig
from sdarts.errors import NumericalFault


class SearchEngine:
    """The DeepSpeed engine and the combined optimizer of one search; `step(groups)` is the update."""

    def __init__(self, cfg: SearchConfig, model: torch.nn.Module, world: int, device: torch.device):
        import deepspeed
        check_precision(cfg.precision, device)
        o = cfg.optim
        self.cfg = cfg
        #: S stacked searches (`SeedStack`), or 0 for one search
        self.seeds = len(cfg.seeds) if cfg.seeds else 0
        #: seed index -> the numerical fault that ended that seed's search (stacked seeds only)
        self.faults: dict[int, str] = {}
        self.optimizer = CombinedOptimizer(
            model.get_weights(), model.get_alphas(), w_lr=o.w.lr, w_momentum=o.w.momentum,
            w_weight_decay=o.w.weight_decay, w_nesterov=o.w.nesterov, alpha_rule=o.alpha.optimizer,
            alpha_lr=o.alpha.lr, alpha_betas=o.alpha.betas, alpha_eps=o.alpha.eps,
            alpha_momentum=o.alpha.momentum, alpha_weight_decay=o.alpha.weight_decay, grad_clip=o.w.grad_clip,
            partitioned=cfg.engine.zero_stage > 0, seeds=self.seeds)
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

    def check_finite(self, per_search: torch.Tensor, what: str) -> None:
        """A NaN/inf loss ends its search: one search raises `NumericalFault`; with stacked seeds the
        seed is recorded in `faults` (its parameters are its own, so the others go on) and the fault
        is raised only once every seed has one."""
        if bool(torch.isfinite(per_search).all()):
            return
        if not self.seeds:
            raise NumericalFault(f"non-finite loss ({float(per_search.detach())}) in {what}")
        for k, v in enumerate(per_search.detach().float().tolist()):
            if not math.isfinite(v) and k not in self.faults:
                self.faults[k] = f"non-finite loss ({v}) in {what}"
        if len(self.faults) == self.seeds:
            raise NumericalFault(f"every seed's loss is non-finite ({'; '.join(self.faults.values())})")

    def set_epoch_lr(self, epoch: int) -> None:
        w = self.cfg.optim.w
        lr = cosine_lr(w.lr, w.lr_min, epoch, self.cfg.epochs) if w.schedule == "cosine" else w.lr
        self.optimizer.set_lr("w", lr)
        self.optimizer.set_lr("alpha", self.cfg.optim.alpha.lr)

    def skipped_steps(self) -> int:
        return int(getattr(self.ds_engine, "skipped_steps", 0))


#: the parameter groups, by tag: network weights and architecture parameters
ALL_GROUPS = frozenset({"w", "alpha"})


class CombinedOptimizer(torch.optim.Optimizer):
    def __init__(self, weights, alphas, *, w_lr: float, w_momentum: float, w_weight_decay: float,
                 w_nesterov: bool, alpha_rule: str, alpha_lr: float, alpha_betas=(0.5, 0.999),
                 alpha_eps: float = 1e-8, alpha_momentum: float = 0.9, alpha_weight_decay: float = 0.0,
                 grad_clip: float = 0.0, partitioned: bool = False, seeds: int = 0):
        if alpha_rule not in ("adam", "sgd"):
            raise ValueError(f"optim.alpha.optimizer must be adam or sgd, got {alpha_rule!r}")
        groups = [
            dict(params=list(weights), tag="w", rule="sgd", lr=w_lr, momentum=w_momentum,
                 weight_decay=w_weight_decay, nesterov=w_nesterov, betas=(0.9, 0.999), eps=1e-8),
            dict(params=list(alphas), tag="alpha", rule=alpha_rule, lr=alpha_lr, momentum=alpha_momentum,
                 weight_decay=alpha_weight_decay, nesterov=False, betas=tuple(alpha_betas), eps=alpha_eps),
        ]
        super().__init__(groups, defaults=dict(lr=w_lr))
        self.grad_clip = grad_clip
        self.partitioned = partitioned  # ZeRO 1/2: each rank holds a partition of the gradients
        #: S > 0: every parameter is S searches' stacked along dim 0 (`SeedStack`); clipping is per seed
        self.seeds = seeds
        self._groups: frozenset[str] = ALL_GROUPS
        self.last_grad_norm: float | None = None

    @contextlib.contextmanager
    def updating(self, groups: frozenset[str]):
        """Steps taken inside update only the parameter groups tagged in `groups`."""
        unknown = set(groups) - ALL_GROUPS
        if unknown:
            raise ValueError(f"unknown parameter group(s) {sorted(unknown)}; expected w and/or alpha")
        self._groups = frozenset(groups)
        try:
            yield
        finally:
            self._groups = ALL_GROUPS

    def set_lr(self, tag: str, lr: float) -> None:
        for g in self.param_groups:
            if g["tag"] == tag:
                g["lr"] = lr

    def lr(self, tag: str) -> float:
        return next(g["lr"] for g in self.param_groups if g["tag"] == tag)

    def _clip_coef(self, group, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """Clip coefficient for the w group as a device tensor (no host sync on the step's hot path):
        a scalar, or one per seed ([S]) when the parameters are stacked seeds."""
        grads = [g.float() for g in grads] if grads[0].dtype in (torch.float16, torch.bfloat16) else grads
        S = self.seeds
        if S:  # each seed's own global norm: the norms of every tensor's S slices in one foreach op
            if any(g.dim() == 0 or g.shape[0] != S for g in grads):
                raise RuntimeError(f"per-seed clipping needs every gradient stacked along dim 0 ({S} seeds)")
            norms = torch._foreach_norm([g[k] for g in grads for k in range(S)])
            sq = (torch.stack(norms) ** 2).view(len(grads), S).sum(0)
        else:
            norms = torch._foreach_norm(grads)
            sq = (torch.stack(norms) ** 2).sum()  # one square for all, not one multiply per tensor
        if self.partitioned and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sq)
        norm = sq.sqrt()
        self.last_grad_norm = norm  # a tensor; read it only when logging
        if self.grad_clip <= 0:
            return None
        coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        # a non-finite norm leaves the gradients as they are (fp16 overflow is handled by the loss scaler)
        return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))

    def _clip(self, grads: list[torch.Tensor], coef: torch.Tensor) -> list[torch.Tensor]:
        if not self.seeds:
            return torch._foreach_mul(grads, coef.to(grads[0].dtype))
        out = torch._foreach_mul(grads, 1.0)  # a copy, as above: the gradients themselves stay as they are
        coef = coef.to(grads[0].dtype)
        for k in range(self.seeds):  # one foreach op per seed over every tensor's slice k
            torch._foreach_mul_([g[k] for g in out], coef[k])
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if group["tag"] not in self._groups:
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["tag"] == "w":
                coef = self._clip_coef(group, grads)
                if coef is not None:
                    grads = self._clip(grads, coef)
            if group["rule"] == "sgd":
                self._sgd(group, params, grads)
            else:
                self._adam(group, params, grads)
        return loss

    def _sgd(self, group, params, grads):
        """torch.optim.SGD's rule (coupled weight decay, dampening 0), with multi-tensor kernels."""
        lr, mom, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
        if wd:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if mom:
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            if any(b is None for b in bufs):
                for p, g in zip(params, grads):
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = g.detach().clone()
                    else:
                        self.state[p]["momentum_buffer"].mul_(mom).add_(g)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
            else:
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, grads)
            grads = torch._foreach_add(grads, bufs, alpha=mom) if nesterov else bufs
        torch._foreach_add_(params, grads, alpha=-lr)

    def _adam(self, group, params, grads):
        """torch.optim.Adam's rule (L2 weight decay added to the gradient, as DARTS uses it)."""
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p, g in zip(params, grads):
            if wd:
                g = g.add(p, alpha=wd)
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            t = float(st["step"])  # a CPU tensor: no device sync
            st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** t))


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


def cosine_lr(base: float, minimum: float, epoch: int, epochs: int) -> float:
    """DARTS/NB201 per-epoch cosine annealing from `base` to `minimum` over `epochs`."""
    return minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * epoch / epochs))
