"""Builders for in-process search tests (a real DeepSpeed engine on CPU/gloo, one rank)."""
from __future__ import annotations

import torch

from sdarts.config import SearchConfig, build
from sdarts.data import build_search_loaders
from sdarts.distributed import init
from sdarts.engine import SearchEngine
from sdarts.search.strategies import make_strategy
from sdarts.spaces import build_supernet

TINY = {
    "epochs": 2, "space": "nb201",
    "arch": {"init_std": 0.001},
    "model": {"C": 4, "cells_per_stage": 1},
    "data": {"dataset": "synthetic", "synthetic_size": 64, "resolution": 8, "micro_batch": 8},
    "log": {"progress": False, "tensorboard": False},
}


def tiny_cfg(**over) -> SearchConfig:
    overrides = [f"{k}={v}" for k, v in over.items()]
    return build(SearchConfig, dict(TINY), overrides)


def make(cfg: SearchConfig):
    """(engine, strategy, train_loader, valid_loader) for one rank."""
    rank, _, world, device = init("cpu")
    torch.manual_seed(cfg.seed)
    tr, va = build_search_loaders(cfg.data, cfg.model.num_classes, cfg.seed, rank, world,
                                  cfg.engine.grad_accum, "cpu")
    se = SearchEngine(cfg, build_supernet(cfg), world, device)
    se.set_epoch_lr(0)
    return se, make_strategy(cfg.strategy, se, cfg.engine.grad_accum, cfg), tr, va


def snapshot(module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([p.detach().float().clone() for p in module.get_weights()],
            [a.detach().float().clone() for a in module.get_alphas()])


def changed(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after))
