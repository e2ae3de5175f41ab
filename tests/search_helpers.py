"""Builders for in-process search tests (a real DeepSpeed engine on CPU/gloo, one rank)."""
from __future__ import annotations

import copy

import torch

from sdarts.config import SearchConfig, build
from sdarts.data import build_search_loaders
from sdarts.distributed import init
from sdarts.engine import SearchEngine
from sdarts.search.strategies import make_strategy
from sdarts.spaces.build import build_supernet

TINY = {
    "epochs": 2, "space": "nb201",
    "arch": {"init_std": 0.001},
    "model": {"C": 4, "cells_per_stage": 1},
    "data": {"dataset": "synthetic", "synthetic_size": 64, "resolution": 8, "micro_batch": 8},
    "log": {"progress": False, "tensorboard": False},
}


def tiny_cfg(**over) -> SearchConfig:
    overrides = [f"{k}={v}" for k, v in over.items()]
    return build(SearchConfig, copy.deepcopy(TINY), overrides)  # a deep copy: overrides write into nested dicts


def make(cfg: SearchConfig):
    """(engine, strategy, train_loader, valid_loader) for one rank."""
    rank, _, world, device = init("cpu")
    torch.manual_seed(cfg.seed)
    tr, va = build_search_loaders(cfg.data, cfg.model.num_classes, cfg.seed, rank, world,
                                  cfg.engine.grad_accum, "cpu")
    engine = SearchEngine(cfg, build_supernet(cfg), world, device)
    engine.set_epoch_lr(0)
    return engine, make_strategy(cfg.strategy, engine, cfg.engine.grad_accum), tr, va


def snapshot(module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([p.detach().float().clone() for p in module.get_weights()],
            [a.detach().float().clone() for a in module.get_alphas()])


def changed(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after))


# -- hand-computed updates, for tests that check what a step did (not what it reports) ------------
PLAIN_SGD = {"optim.w.momentum": 0, "optim.w.weight_decay": 0, "optim.w.grad_clip": 0,
             "optim.w.schedule": "constant", "optim.alpha.optimizer": "sgd", "optim.alpha.momentum": 0,
             "optim.alpha.weight_decay": 0}


def plain_sgd_cfg(**over) -> SearchConfig:
    """`tiny_cfg` with plain SGD (no momentum, decay or clipping) on both groups: one update of a group
    is exactly `p - lr * dL/dp`."""
    return tiny_cfg(**{**PLAIN_SGD, **over})


def grads_at(module, batch, weights: list[torch.Tensor], alphas: list[torch.Tensor]
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(dL/dw, dL/dalpha) of the batch's cross-entropy with the module's parameters set to `weights`,
    `alphas` (via `functional_call`; the module's own parameters and `.grad` are left alone). BN is in
    train mode, so its running statistics do not enter the result."""
    from torch.func import functional_call
    names = {id(p): n for n, p in module.named_parameters()}
    ws = [w.detach().clone().requires_grad_() for w in weights]
    As = [a.detach().clone().requires_grad_() for a in alphas]
    params = {names[id(p)]: t for p, t in zip(module.get_weights() + module.get_alphas(), ws + As)}
    loss = torch.nn.functional.cross_entropy(functional_call(module, params, (batch.x,)).float(), batch.y)
    gs = torch.autograd.grad(loss, ws + As, allow_unused=True)
    gs = [torch.zeros_like(t) if g is None else g for t, g in zip(ws + As, gs)]
    return gs[:len(ws)], gs[len(ws):]


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |a - b| over all tensors, relative to max |b|."""
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    return diff / max(float(y.abs().max()) for y in b)
