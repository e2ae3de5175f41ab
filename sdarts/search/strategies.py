"""Search strategies: how one search step turns batches into updates of w and alpha.

- `single_level` (Single-DARTS): one batch, one forward, one backward, one step that updates w and
  alpha together from the same gradients.
- `bilevel` (DARTS, first order): alpha steps on a validation-split batch, then w steps on a
  training-split batch; each phase steps only the parameter group it owns.
- `bilevel_second_order` (DARTS, unrolled): alpha's gradient at the one-step-unrolled weights
  w' = w - xi * dL_train/dw, with the Hessian-vector product by finite differences (fp32, ZeRO 0).
- `two_batch` (the paper's Table 4 middle row): like bilevel, but both batches come from the same
  training subset, isolating "different batch" from "different data".

A step consumes `accum` micro-batches per phase; `engine.step` only updates at the accumulation
boundary, so every phase is a whole accumulation cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from sdarts.data import Batch
from sdarts.engine import NumericalFault  # noqa: F401 - defined once, shared with the retrain loop


@dataclass
class StepResult:
    """Loss and accuracy stay device tensors: reading them forces a host sync, so the loop does it only
    when it logs."""
    loss: torch.Tensor
    acc: torch.Tensor
    images: int
    alpha_ids: list[torch.Tensor]  # sample ids that produced alpha's gradient (tests assert on them)
    w_ids: list[torch.Tensor]


def _micro(engine, batch: Batch, tags: set[str]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = engine.forward(batch.x)
    loss = F.cross_entropy(logits.float(), batch.y)
    # fp16 runs leave overflow to the loss scaler, which skips the whole step (w and alpha) and counts it;
    # elsewhere a NaN/inf loss stops the run before backward, so alpha never learns from it
    if engine.cfg.precision != "fp16" and not torch.isfinite(loss):
        raise NumericalFault(f"non-finite loss ({float(loss.detach())}) in an {'+'.join(sorted(tags))} update")
    engine.backward(loss)
    engine.step(tags)
    acc = (logits.detach().argmax(1) == batch.y).float().mean()
    return loss.detach(), acc


def _mean(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.stack(xs).mean()


class SingleLevel:
    """Single-DARTS: w and alpha from the same batch, one backward, one step."""
    uses_valid = False
    train_batches_per_step = 1

    def __init__(self, engine, accum: int, cfg=None):
        self.engine, self.accum = engine, accum

    def step(self, train: Iterator[Batch], valid: Iterator[Batch] | None) -> StepResult:
        losses, accs, ids, n = [], [], [], 0
        for _ in range(self.accum):
            b = next(train)
            l, a = _micro(self.engine, b, {"w", "alpha"})
            losses.append(l), accs.append(a), ids.append(b.ids)
            n += len(b.y)
        return StepResult(_mean(losses), _mean(accs), n, ids, ids)


class Bilevel:
    """DARTS first order: alpha on a validation batch, then w on a training batch."""
    uses_valid = True
    train_batches_per_step = 1

    def __init__(self, engine, accum: int, cfg=None):
        self.engine, self.accum = engine, accum

    def _alpha_source(self, train, valid):
        return valid

    def step(self, train: Iterator[Batch], valid: Iterator[Batch] | None) -> StepResult:
        src = self._alpha_source(train, valid)
        alpha_ids = []
        for _ in range(self.accum):
            b = next(src)
            _micro(self.engine, b, {"alpha"})
            alpha_ids.append(b.ids)
        losses, accs, w_ids, n = [], [], [], 0
        for _ in range(self.accum):
            b = next(train)
            l, a = _micro(self.engine, b, {"w"})
            losses.append(l), accs.append(a), w_ids.append(b.ids)
            n += len(b.y)
        return StepResult(_mean(losses), _mean(accs), n, alpha_ids, w_ids)


class TwoBatch(Bilevel):
    """Table 4 middle row: alpha and w from two different batches of the same (training) subset."""
    uses_valid = False
    train_batches_per_step = 2

    def _alpha_source(self, train, valid):
        return train


class BilevelSecondOrder:
    """DARTS second order (unrolled). fp32 and ZeRO 0 only (checked by the config)."""
    uses_valid = True
    train_batches_per_step = 1

    def __init__(self, engine, accum: int, cfg):
        if accum != 1:
            raise ValueError("strategy bilevel_second_order needs engine.grad_accum 1")
        self.engine, self.eps_scale = engine, cfg.unrolled_eps

    def _loss(self, model, b: Batch) -> torch.Tensor:
        return F.cross_entropy(model(b.x), b.y)

    def _alpha_grad(self, bt: Batch, bv: Batch) -> list[torch.Tensor]:
        model = self.engine.module
        opt = self.engine.opt
        weights, alphas = model.get_weights(), model.get_alphas()
        wg = next(g for g in opt.param_groups if g["tag"] == "w")
        xi, mom, wd = wg["lr"], wg["momentum"], wg["weight_decay"]
        backup = [w.detach().clone() for w in weights]
        # w' = w - xi * (momentum * buf + dL_train/dw + wd * w)
        gw = torch.autograd.grad(self._loss(model, bt), weights, allow_unused=True)
        with torch.no_grad():
            for w, g in zip(weights, gw):
                d = (torch.zeros_like(w) if g is None else g) + wd * w
                buf = opt.state[w].get("momentum_buffer")
                if buf is not None:
                    d = d + mom * buf
                w.sub_(xi * d)
        # dL_val(w', alpha)/d(alpha, w')
        grads = torch.autograd.grad(self._loss(model, bv), alphas + weights, allow_unused=True)
        d_alpha = [torch.zeros_like(a) if g is None else g for a, g in zip(alphas, grads[:len(alphas)])]
        d_w = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads[len(alphas):])]
        eps = self.eps_scale / (torch.cat([g.flatten() for g in d_w]).norm() + 1e-12)
        hv = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, b0, g in zip(weights, backup, d_w):
                    w.copy_(b0 + sign * eps * g)
            ga = torch.autograd.grad(self._loss(model, bt), alphas, allow_unused=True)
            hv.append([torch.zeros_like(a) if g is None else g for a, g in zip(alphas, ga)])
        with torch.no_grad():
            for w, b0 in zip(weights, backup):
                w.copy_(b0)
        return [da - xi * (p - m) / (2 * eps) for da, p, m in zip(d_alpha, hv[0], hv[1])]

    def step(self, train: Iterator[Batch], valid: Iterator[Batch] | None) -> StepResult:
        bt, bv = next(train), next(valid)
        g_alpha = self._alpha_grad(bt, bv)
        # A surrogate loss whose alpha-gradient is g_alpha, so DeepSpeed averages it across ranks.
        alphas = self.engine.module.get_alphas()
        self.engine.backward(sum((a * g.detach()).sum() for a, g in zip(alphas, g_alpha)))
        self.engine.step({"alpha"})
        loss, acc = _micro(self.engine, bt, {"w"})
        return StepResult(loss, acc, len(bt.y), [bv.ids], [bt.ids])


STRATEGIES = {"single_level": SingleLevel, "bilevel": Bilevel, "bilevel_second_order": BilevelSecondOrder,
              "two_batch": TwoBatch}


def make_strategy(name: str, engine, accum: int, cfg):
    return STRATEGIES[name](engine, accum, cfg)
