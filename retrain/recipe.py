"""The retrain recipe as plain functions: learning rate, drop-path ramp, loss, EMA, accuracy counts.

Each is a pure function of its arguments (the lr and drop-path of an epoch depend on nothing but the
epoch), so a resumed run recomputes them instead of restoring them, and tests can check them against
the formulas written here:

    warmup (epoch < W):  lr = base * (epoch + 1) / W
    then, with t = (epoch - W) / (E - W) in [0, 1):
        linear:   lr = lr_min + (base - lr_min) * (1 - t)
        cosine:   lr = lr_min + (base - lr_min) * (1 + cos(pi * t)) / 2
        constant: lr = base
    drop-path:  p = drop_path * epoch / E

`base` is `optim.w.lr` scaled linearly from `reference_batch` to the global batch. With W = 0 the
cosine branch is DARTS' per-epoch cosine (`sdarts.engine.cosine_lr`). The linear branch is P-DARTS'
linear decay without its special slope for the last 5 epochs (here the last epoch still trains at
base / (E - W), a small positive lr, instead of P-DARTS' piecewise tail).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lr_at(epoch: int, epochs: int, base: float, schedule: str = "cosine", warmup_epochs: int = 0,
          lr_min: float = 0.0) -> float:
    """The learning rate of `epoch` (0-based) in a run of `epochs` epochs."""
    if epoch < warmup_epochs:
        return base * (epoch + 1) / warmup_epochs
    if schedule == "constant":
        return base
    t = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    if schedule == "linear":
        return lr_min + (base - lr_min) * (1.0 - t)
    if schedule == "cosine":
        return lr_min + (base - lr_min) * (1.0 + math.cos(math.pi * t)) / 2.0
    raise ValueError(f"optim.w.schedule must be linear, cosine or constant, got {schedule!r}")


def drop_path_at(epoch: int, epochs: int, drop_path: float) -> float:
    """DARTS' linear drop-path ramp: 0 at the first epoch, approaching `drop_path` at the end."""
    return drop_path * epoch / epochs


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against the smoothed target q = (1 - eps) * onehot + eps / K, batch mean.

    Written out (as in the P-DARTS/PC-DARTS `CrossEntropyLabelSmooth`) rather than through
    `F.cross_entropy(label_smoothing=...)` so the formula is visible; the test checks both agree."""
    logp = F.log_softmax(logits.float(), dim=1)
    if smoothing == 0.0:
        return F.nll_loss(logp, target)
    k = logits.shape[1]
    q = torch.full_like(logp, smoothing / k).scatter_(1, target.unsqueeze(1), 1.0 - smoothing + smoothing / k)
    return -(q * logp).sum(1).mean()


def topk_correct(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                 ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, for each k; `valid` masks padding."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(target.view(-1, 1))
    if valid is not None:
        hit = hit & valid.view(-1, 1)
    return [hit[:, :min(k, kmax)].any(1).sum() for k in ks]


class Ema:
    """Exponential moving average of a module's floating-point state (weights and BN statistics).

    ema = decay * ema + (1 - decay) * current, after every optimizer step, in fp32."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().float().clone() for k, v in module.state_dict().items()
                      if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            if k in self.state:
                self.state[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "state": {k: v.cpu() for k, v in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        dev = next(iter(self.state.values())).device if self.state else torch.device("cpu")
        self.state = {k: v.to(dev) for k, v in sd["state"].items()}

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Loads the averaged values into `module` (integer buffers such as BN counters are kept)."""
        sd = module.state_dict()
        for k, v in self.state.items():
            sd[k].copy_(v.to(sd[k].dtype))
