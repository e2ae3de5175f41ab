"""Search strategies: how one search step turns batches into updates of w and alpha.

- `single_level` (Single-DARTS): one batch, one forward, one backward, one update of w and alpha
  together, from the same gradients.
- `bilevel` (DARTS, first order): alpha is updated from a validation-split batch, then w from a
  training-split batch; each phase updates only the parameter group it owns.
- `bilevel_second_order` (DARTS, unrolled): alpha's gradient at the one-step-unrolled weights
  w' = w - xi * dL_train/dw, with the Hessian-vector product by finite differences (fp32, ZeRO 0).
- `two_batch` (the paper's Table 4 middle row): like bilevel, but both batches come from the same
  training subset, isolating "different batch" from "different data".

With `seeds: [...]` the supernet is a `SeedStack` and every batch carries a leading seed axis: the loss
is each seed's mean cross-entropy, summed (parameters are disjoint per seed, so each seed's gradient is
its own), loss and accuracy are per seed ([S]), and the second-order finite-difference step is scaled
by each seed's own gradient norm.

Every update is `update(engine, batch, groups)`: forward, loss, backward, then `engine.step(groups)`,
which updates exactly the parameter groups named at the call ("w", "alpha"). A step consumes `accum`
micro-batches per phase; `engine.step` only updates at the accumulation boundary, so every phase is a
whole accumulation cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from sdarts.data import Batch
from sdarts.engine import SearchEngine

W, ALPHA, BOTH = frozenset({"w"}), frozenset({"alpha"}), frozenset({"w", "alpha"})


@dataclass
class StepResult:
    """Loss and accuracy stay device tensors: reading them forces a host sync, so the loop does it only
    when it logs. With stacked seeds each is [S] and the ids are [S, B]; `seed(k)` is seed k's part."""
    loss: torch.Tensor
    acc: torch.Tensor
    images: int
    alpha_ids: list[torch.Tensor]  # sample ids of the batches alpha's update came from
    w_ids: list[torch.Tensor]      # ... and w's

    def seed(self, k: int) -> "StepResult":
        return StepResult(self.loss[k], self.acc[k], self.images // len(self.loss), [i[k] for i in self.alpha_ids],
                          [i[k] for i in self.w_ids])


def search_loss(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to backward, the loss of each search): cross-entropy, or with stacked seeds (logits
    [S, B, classes]) each seed's mean over its own batch, summed."""
    if logits.dtype in (torch.float16, torch.bfloat16):  # the loss in fp32 (float64 stays float64)
        logits = logits.float()
    if logits.dim() == 2:
        loss = F.cross_entropy(logits, y)
        return loss, loss
    per_seed = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
    return per_seed.sum(), per_seed


def update(engine: SearchEngine, batch: Batch, groups: frozenset[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch: forward, cross-entropy, backward, and `engine.step(groups)`. Returns the
    (detached) loss and accuracy."""
    logits = engine.forward(batch.x)
    loss, per_search = search_loss(logits, batch.y)
    # fp16 runs leave overflow to the loss scaler, which skips the whole step (w and alpha) and counts it;
    # elsewhere a NaN/inf loss stops the search before backward, so alpha never learns from it (with
    # stacked seeds: that seed's search; the others go on, `SearchEngine.check_finite`)
    if engine.cfg.precision != "fp16":
        engine.check_finite(per_search, f"the {'+'.join(sorted(groups))} update")
    engine.backward(loss)
    engine.step(groups)
    acc = (logits.detach().argmax(-1) == batch.y).float().mean(-1)
    return per_search.detach(), acc


def update_accumulated(engine: SearchEngine, batches: Iterator[Batch], accum: int, groups: frozenset[str]
                       ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], int]:
    """`accum` micro-batches of `update`: one optimizer update. Returns the mean loss and accuracy, the
    batches' sample ids and the number of images."""
    losses, accs, ids, images = [], [], [], 0
    for _ in range(accum):
        b = next(batches)
        loss, acc = update(engine, b, groups)
        losses.append(loss), accs.append(acc), ids.append(b.ids)
        images += b.y.numel()  # S x B with stacked seeds
    return _mean(losses), _mean(accs), ids, images


def _mean(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.stack(xs).mean(0)


class SingleLevel:
    """Single-DARTS: w and alpha from the same batch, one backward, one update of both."""
    uses_valid = False
    train_batches_per_step = 1

    def __init__(self, engine: SearchEngine, accum: int):
        self.engine, self.accum = engine, accum

    def step(self, train: Iterator[Batch], valid: Iterator[Batch] | None) -> StepResult:
        loss, acc, ids, images = update_accumulated(self.engine, train, self.accum, BOTH)
        return StepResult(loss, acc, images, ids, ids)


class Bilevel:
    """DARTS first order: alpha from a validation batch, then w from a training batch."""
    uses_valid = True
    train_batches_per_step = 1

    def __init__(self, engine: SearchEngine, accum: int):
        self.engine, self.accum = engine, accum

    def _alpha_source(self, train: Iterator[Batch], valid: Iterator[Batch] | None) -> Iterator[Batch]:
        return valid

    def step(self, train: Iterator[Batch], valid: Iterator[Batch] | None) -> StepResult:
        _, _, alpha_ids, _ = update_accumulated(self.engine, self._alpha_source(train, valid), self.accum, ALPHA)
        loss, acc, w_ids, images = update_accumulated(self.engine, train, self.accum, W)
        return StepResult(loss, acc, images, alpha_ids, w_ids)


class TwoBatch(Bilevel):
    """Table 4 middle row: alpha and w from two different batches of the same (training) subset."""
    uses_valid = False
    train_batches_per_step = 2

    def _alpha_source(self, train: Iterator[Batch], valid: Iterator[Batch] | None) -> Iterator[Batch]:
        return train


class BilevelSecondOrder:
    """DARTS second order (unrolled). fp32 and ZeRO 0 only (checked by the config)."""
    uses_valid = True
    train_batches_per_step = 1

    def __init__(self, engine: SearchEngine, accum: int):
        if accum != 1:
            raise ValueError("strategy bilevel_second_order needs engine.grad_accum 1")
        self.engine, self.eps_scale = engine, engine.cfg.unrolled_eps

    def step(self, train: Iterator[Batch], valid: Iterator[Batch] | None) -> StepResult:
        bt, bv = next(train), next(valid)
        g_alpha = self.unrolled_alpha_grad(bt, bv)
        # A surrogate loss whose alpha-gradient is g_alpha, so DeepSpeed averages it across ranks.
        alphas = self.engine.module.get_alphas()
        self.engine.backward(sum((a * g.detach()).sum() for a, g in zip(alphas, g_alpha)))
        self.engine.step(ALPHA)
        loss, acc = update(self.engine, bt, W)
        return StepResult(loss, acc, bt.y.numel(), [bv.ids], [bt.ids])

    def unrolled_alpha_grad(self, bt: Batch, bv: Batch) -> list[torch.Tensor]:
        """dL_val(w', alpha)/d alpha at w' = w - xi * (momentum * buf + dL_train/dw + wd * w), with the
        second-order term -xi * d2L_train/(d alpha dw) . dL_val/dw' by central finite differences."""
        model, optimizer = self.engine.module, self.engine.optimizer
        weights, alphas = model.get_weights(), model.get_alphas()
        wg = next(g for g in optimizer.param_groups if g["tag"] == "w")
        xi, mom, wd = wg["lr"], wg["momentum"], wg["weight_decay"]
        backup = [w.detach().clone() for w in weights]
        gw = _grads(self._loss(bt), weights)
        with torch.no_grad():
            for w, g in zip(weights, gw):
                d = g + wd * w
                buf = optimizer.state[w].get("momentum_buffer")
                if buf is not None:
                    d = d + mom * buf
                w.sub_(xi * d)
        grads = _grads(self._loss(bv), alphas + weights)
        d_alpha, d_w = grads[:len(alphas)], grads[len(alphas):]
        eps = self.eps_scale / (_norm(d_w, self.engine.seeds) + 1e-12)  # [S] with stacked seeds
        hv = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, b0, g in zip(weights, backup, d_w):
                    w.copy_(b0 + sign * _per_seed(eps, g) * g)
            hv.append(_grads(self._loss(bt), alphas))
        with torch.no_grad():
            for w, b0 in zip(weights, backup):
                w.copy_(b0)
        return [da - xi * (p - m) / (2 * _per_seed(eps, da)) for da, p, m in zip(d_alpha, hv[0], hv[1])]

    def _loss(self, b: Batch) -> torch.Tensor:
        return search_loss(self.engine.module(b.x), b.y)[0]


def _norm(grads: list[torch.Tensor], seeds: int) -> torch.Tensor:
    """The global norm of `grads`, or each seed's ([S]) when they are stacked seeds."""
    if not seeds:
        return torch.cat([g.flatten() for g in grads]).norm()
    return torch.cat([g.reshape(seeds, -1) for g in grads], 1).norm(dim=1)


def _per_seed(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`v` (a scalar, or one value per seed) shaped to scale `like` seed by seed."""
    return v if v.dim() == 0 else v.view(-1, *([1] * (like.dim() - 1)))


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d params, zeros for the parameters the loss does not reach."""
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


STRATEGIES = {"single_level": SingleLevel, "bilevel": Bilevel, "bilevel_second_order": BilevelSecondOrder,
              "two_batch": TwoBatch}


def make_strategy(name: str, engine: SearchEngine, accum: int):
    return STRATEGIES[name](engine, accum)
