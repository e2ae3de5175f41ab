"""The search loop: epochs of strategy steps, then the epoch's alpha snapshot, genotype and checkpoint.

`run_search` reads top to bottom: build the supernet, the engine, the data and the strategy; resume or
start; per epoch set the lr and take the strategy's steps; at the epoch end record alpha and derive the
genotype. The per-search side (loaders, files, alpha history: one search, or one per seed of `seeds`)
is `sdarts.search.seedruns.SeedRuns`. One step is `strategy.step` (sdarts/search/strategies.py), which calls `engine.step(groups)`,
which runs the `CombinedOptimizer` (both in sdarts/engine.py). Everything around the steps
(run directory, logs, profiler, preemption, checkpoints, summary) is `sdarts.run.Run`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdarts import genotype as G
from sdarts.config import SearchConfig
from sdarts.engine import SearchEngine
from sdarts.errors import NumericalFault
from sdarts.run import Run
from sdarts.search.seedruns import SeedRuns
from sdarts.search.strategies import make_strategy
from sdarts.spaces.build import build_supernet

log = logging.getLogger("sdarts")


@dataclass
class SearchResult:
    genotype: G.Genotype
    summary: dict


def run_search(cfg: SearchConfig, run_dir: str | Path, resume: bool = False, force: bool = False
               ) -> SearchResult:
    run = Run(cfg, run_dir)
    run.prepare(resume, force, ("genotypes",) if cfg.seeds is None else ())
    accum = cfg.engine.grad_accum
    data_device = run.device if cfg.data.device == "auto" else torch.device(cfg.data.device)
    engine = SearchEngine(cfg, build_supernet(cfg), run.world, run.device)
    # each search's loaders, files and alpha history (one search, or one per seed of `seeds`)
    runs = SeedRuns(cfg, run, engine.module, data_device)
    run.warn_skipped()
    run.record_provenance(runs.first.train, cfg.precision, cfg.data.micro_batch * accum * run.world,
                          {"w": cfg.optim.w.lr, "alpha": cfg.optim.alpha.lr})
    strategy = make_strategy(cfg.strategy, engine, accum)

    refuse = _first_refusal(refuse_other_space(cfg.space), runs.refuse_other_seeds)
    client = run.resume_or_start(engine.ds_engine, resume, "search", refuse, [], engine.ds_config)
    runs.restore(client)
    start_epoch = client["epoch"] if client is not None else 0
    engine.faults.update({r.index: r.fault for r in runs.runs if r.fault is not None})

    def save(epoch: int) -> None:
        run.save(engine.ds_engine, epoch, {"space": cfg.space, **runs.client_state()})

    valid_iter = runs.valid_batches() if strategy.uses_valid else None
    steps_per_epoch = len(runs.first.train) // (accum * strategy.train_batches_per_step)
    with run.training(steps_per_epoch, "search"):
        for epoch in range(start_epoch, cfg.epochs):
            engine.set_epoch_lr(epoch)
            runs.set_epoch(epoch)
            train_iter = runs.train_batches()
            done_in_epoch = runs.first.train.position // (accum * strategy.train_batches_per_step)
            run.progress.start_epoch(epoch, cfg.epochs, done_in_epoch)
            for _ in range(done_in_epoch, steps_per_epoch):
                try:
                    res = strategy.step(train_iter, valid_iter)
                except NumericalFault as e:
                    raise run.numerical_fault(epoch, str(e)) from None
                runs.record_faults(epoch, engine.faults)  # stacked seeds: a NaN ends that seed's search
                run.after_step(res.images, lambda ips: runs.metrics_line({
                    "step": run.step, "epoch": epoch, "split": "train", "loss": None, "acc": None,
                    "lr_w": engine.optimizer.lr("w"), "lr_alpha": engine.optimizer.lr("alpha"),
                    "images_per_s": ips, "rank": run.rank, "elapsed_s": round(time.time() - run.t_start, 3)},
                    res))
                runs.after_step(run.step, epoch, res)
                run.stop_if_preempted(lambda: save(epoch))
                if run.checkpoint_due(steps_per_epoch):
                    save(epoch)
            run.progress.end_epoch()
            runs.epoch_end(epoch)
            runs.set_epoch(epoch + 1)
            save(epoch + 1)

    summary = runs.finish({"space": cfg.space, "strategy": cfg.strategy, "epochs": cfg.epochs,
                           "steps": run.step, "fp16_skipped_steps": engine.skipped_steps()})
    genotype = runs.first.genotype or runs.net(0, weights=False).genotype()
    return SearchResult(genotype, run.finish(summary))


def _first_refusal(*checks):
    """A checkpoint refusal that runs `checks` in order (the first reason wins)."""
    return lambda client: next((r for r in (c(client) for c in checks) if r), None)


def refuse_other_space(space: str):
    return lambda client: None if client.get("space") == space else \
        f"checkpoint is from space {client.get('space')!r}, config says {space!r}"


