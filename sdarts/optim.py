"""The combined optimizer: one `torch.optim.Optimizer` that updates w (SGD) and alpha (Adam or SGD).

Why one optimizer: DeepSpeed owns exactly one optimizer. A separate torch Adam for alpha breaks under
bf16/fp16 (alpha gets no fp32 master copy: bf16 Adam at lr 3e-4 never moves it, fp16 gives NaN), its
gradients are not averaged under ZeRO 1/2, and under ZeRO 0 `engine.step()` clears them before a later
Adam step. Handing DeepSpeed one optimizer whose param groups are tagged `w` / `alpha` gives both the
engine's gradient averaging, master weights and checkpointing, and keeps the two update rules apart.

`updating(groups)` scopes a step to the groups it names (DeepSpeed calls `step()` with no arguments,
so `SearchEngine.step(groups)` wraps its one `ds_engine.step()` in it): single-level updates both from
one backward; bi-level phases update only the group they own. Outside that scope a step updates both. Gradient clipping applies to the `w` group only (alpha's
gradients are not clipped, as in DARTS); under ZeRO 1/2 each rank holds a partition of the gradients,
so the norm is all-reduced.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist


#: the parameter groups, by tag: network weights and architecture parameters
ALL_GROUPS = frozenset({"w", "alpha"})


class CombinedOptimizer(torch.optim.Optimizer):
    def __init__(self, weights, alphas, *, w_lr: float, w_momentum: float, w_weight_decay: float,
                 w_nesterov: bool, alpha_rule: str, alpha_lr: float, alpha_betas=(0.5, 0.999),
                 alpha_eps: float = 1e-8, alpha_momentum: float = 0.9, alpha_weight_decay: float = 0.0,
                 grad_clip: float = 0.0, partitioned: bool = False):
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
        """Clip coefficient for the w group as a device tensor (no host sync on the step's hot path)."""
        norms = torch._foreach_norm([g.float() for g in grads] if grads[0].dtype != torch.float32 else grads)
        sq = torch.stack([n * n for n in norms]).sum() if len(norms) > 1 else norms[0] ** 2
        if self.partitioned and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sq)
        norm = sq.sqrt()
        self.last_grad_norm = norm  # a tensor; read it only when logging
        if self.grad_clip <= 0:
            return None
        coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        # a non-finite norm leaves the gradients as they are (fp16 overflow is handled by the loss scaler)
        return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))

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
                    grads = torch._foreach_mul(grads, coef.to(grads[0].dtype))
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


def cosine_lr(base: float, minimum: float, epoch: int, epochs: int) -> float:
    """DARTS/NB201 per-epoch cosine annealing from `base` to `minimum` over `epochs`."""
    return minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * epoch / epochs))
