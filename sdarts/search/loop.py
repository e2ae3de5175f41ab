"""The search loop: epochs of strategy steps, then the epoch's alpha snapshot, genotype and checkpoint.

`run_search` reads top to bottom: build the data, the supernet, the engine and the strategy; resume or
start; per epoch set the lr and take the strategy's steps; at the epoch end record alpha and derive the
genotype. One step is `strategy.step` (sdarts/search/strategies.py), which calls `engine.step(groups)`,
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
from sdarts.analysis.hook import SearchAnalysis
from sdarts.config import SearchConfig
from sdarts.data import build_search_loaders
from sdarts.engine import SearchEngine
from sdarts.errors import NumericalFault
from sdarts.run import Run
from sdarts.runlog import JsonlLog
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
    run.prepare(resume, force, ("genotypes",))
    accum = cfg.engine.grad_accum
    data_device = run.device if cfg.data.device == "auto" else torch.device(cfg.data.device)
    train_loader, valid_loader = build_search_loaders(cfg.data, cfg.model.num_classes, cfg.seed, run.rank,
                                                      run.world, accum, str(data_device), run.skipped)
    run.warn_skipped()
    engine = SearchEngine(cfg, build_supernet(cfg), run.world, run.device)
    run.record_provenance(train_loader, cfg.precision, cfg.data.micro_batch * accum * run.world,
                          {"w": cfg.optim.w.lr, "alpha": cfg.optim.alpha.lr})
    model = engine.module
    strategy = make_strategy(cfg.strategy, engine, accum)
    logs = SearchLogs(run, cfg)
    analysis = SearchAnalysis(cfg, run.dir, model, train_loader, valid_loader, enabled=run.is_main)

    # per-epoch alpha snapshots live in the checkpoint too, so alphas.jsonl can be rebuilt on resume
    alpha_history: list[dict] = [alpha_record(model, 0, 0) | {"when": "init"}]
    client = run.resume_or_start(engine.ds_engine, resume, "search", refuse_other_space(cfg.space),
                                 [logs.scores], engine.ds_config)
    start_epoch = 0
    if client is not None:
        start_epoch, alpha_history = client["epoch"], list(client["alpha_history"])
        train_loader.load_state_dict(client["train_loader"])
        valid_loader.load_state_dict(client["valid_loader"])
    logs.alphas.rewrite(alpha_history if run.is_main else alpha_history[1:] if client else [])

    def save(epoch: int) -> None:
        run.save(engine.ds_engine, epoch, {
            "space": cfg.space, "train_loader": train_loader.state_dict(),
            "valid_loader": valid_loader.state_dict(), "genotype": model.genotype().to_json(),
            "alpha_history": alpha_history})

    valid_iter = valid_loader.cycle() if strategy.uses_valid else None
    steps_per_epoch = len(train_loader) // (accum * strategy.train_batches_per_step)
    genotype = model.genotype()
    with run.training(steps_per_epoch, "search"):
        for epoch in range(start_epoch, cfg.epochs):
            engine.set_epoch_lr(epoch)
            train_loader.set_epoch(epoch)
            train_iter = iter(train_loader)
            done_in_epoch = train_loader.position // (accum * strategy.train_batches_per_step)
            run.progress.start_epoch(epoch, cfg.epochs, done_in_epoch)
            for _ in range(done_in_epoch, steps_per_epoch):
                try:
                    res = strategy.step(train_iter, valid_iter)
                except NumericalFault as e:
                    raise run.numerical_fault(epoch, str(e)) from None
                run.after_step(res.images, lambda ips: {
                    "step": run.step, "epoch": epoch, "split": "train", "loss": float(res.loss),
                    "acc": float(res.acc), "lr_w": engine.optimizer.lr("w"),
                    "lr_alpha": engine.optimizer.lr("alpha"), "images_per_s": ips, "rank": run.rank,
                    "elapsed_s": round(time.time() - run.t_start, 3)})
                analysis.maybe_log(run.step, epoch, res)
                run.stop_if_preempted(lambda: save(epoch))
                if run.checkpoint_due(steps_per_epoch):
                    save(epoch)
            run.progress.end_epoch()
            genotype = model.genotype()
            alpha_history.append(alpha_record(model, run.step, epoch + 1))
            logs.epoch_end(epoch, genotype, alpha_history[-1])
            train_loader.set_epoch(epoch + 1)
            save(epoch + 1)

    summary = {"genotype": genotype.to_json(), "space": cfg.space, "strategy": cfg.strategy,
               "epochs": cfg.epochs, "steps": run.step, "fp16_skipped_steps": engine.skipped_steps()}
    if cfg.nb201_table and genotype.space == "nb201":
        from sdarts.nasbench201.table import lookup
        summary["nb201"] = lookup(genotype, cfg.nb201_table)
    if run.is_main:
        G.save(genotype, run.dir / "genotype.json")
    return SearchResult(genotype, run.finish(summary))


def alpha_record(model, step: int, epoch: int) -> dict:
    """One `alphas.jsonl` line: the activated edge weights of every cell type."""
    probs = model.arch.probabilities()
    return {"step": step, "epoch": epoch, "activation": model.arch.activation, "ops": list(model.op_names),
            "edges": list(model.edge_names), "weights": {k: v.tolist() for k, v in probs.items()}}


def refuse_other_space(space: str):
    return lambda client: None if client.get("space") == space else \
        f"checkpoint is from space {client.get('space')!r}, config says {space!r}"


class SearchLogs:
    """The search's own files beside `metrics.jsonl`: `alphas.jsonl` (rank r > 0 writes
    `alphas.rank<r>.jsonl` with log.all_ranks, so a multi-rank run can be checked for identical alpha
    everywhere), `nb201_scores.jsonl`, `genotypes/epoch_NNN.json`, and the epoch's log line."""

    def __init__(self, run: Run, cfg: SearchConfig):
        self.run, self.cfg = run, cfg
        name = "alphas.jsonl" if run.is_main else f"alphas.rank{run.rank}.jsonl"
        self.alphas = JsonlLog(run.dir / name, run.logs_here)
        self.scores = JsonlLog(run.dir / "nb201_scores.jsonl", run.is_main and cfg.nb201_table is not None)

    def epoch_end(self, epoch: int, genotype: G.Genotype, alphas: dict) -> None:
        self.alphas.append(alphas)
        run, cfg = self.run, self.cfg
        if not run.is_main:
            return
        G.save(genotype, run.dir / "genotypes" / f"epoch_{epoch + 1:03d}.json")
        line = f"epoch {epoch + 1}/{cfg.epochs} genotype {genotype}"
        if cfg.nb201_table and genotype.space == "nb201":
            from sdarts.nasbench201.table import lookup
            acc = lookup(genotype, cfg.nb201_table)
            self.scores.append({"step": run.step, "epoch": epoch + 1, "arch": genotype.to_arch_str(),
                                "elapsed_s": round(time.time() - run.t_start, 3), **acc})
            line += f" | NB201 cifar10 test {acc['cifar10_test']:.2f}"
            if run.tb:
                run.tb.add_scalar("nb201/cifar10_test", acc["cifar10_test"], epoch + 1)
        log.info(line)
