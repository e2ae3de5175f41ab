"""The search loop: epochs of strategy steps, logging, genotype derivation and checkpoints.

Read top to bottom, `run_search` is one screen of training logic (nanoGPT style): build everything,
maybe resume, then for each epoch set the lr, run steps, log, checkpoint, derive the genotype.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdarts import genotype as G
from sdarts.analysis.hook import SearchAnalysis
from sdarts.config import SearchConfig, dump
from sdarts.data import build_search_loaders
from sdarts.distributed import barrier, init
from sdarts.engine import SearchEngine, numerical_fault, write_ds_config
from sdarts.preempt import PreemptionSignals
from sdarts.profiling import StepProfiler
from sdarts.runlog import JsonlLog, StepProgress, atomic_write, prepare_run_dir
from sdarts.search.strategies import NumericalFault, make_strategy
from sdarts.spaces import build_supernet

log = logging.getLogger("sdarts")


def _alpha_record(model, step: int, epoch: int) -> dict:
    probs = model.arch.probabilities()
    return {"step": step, "epoch": epoch, "activation": model.arch.activation, "ops": list(model.op_names),
            "edges": list(model.edge_names), "weights": {k: v.tolist() for k, v in probs.items()}}


@dataclass
class SearchResult:
    genotype: G.Genotype
    summary: dict


def run_search(cfg: SearchConfig, run_dir: str | Path, resume: bool = False, force: bool = False
               ) -> SearchResult:
    t_start = time.time()
    rank, local_rank, world, device = init(cfg.engine.device)
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume, force, rank, ("genotypes",))
    is_main = rank == 0
    torch.manual_seed(cfg.seed)
    accum = cfg.engine.grad_accum

    skipped: list[str] = []
    data_dev = device if cfg.data.device == "auto" else torch.device(cfg.data.device)
    train_loader, valid_loader = build_search_loaders(cfg.data, cfg.model.num_classes, cfg.seed, rank, world,
                                                      accum, str(data_dev), skipped)
    if skipped and is_main:
        log.warning("skipped %d undecodable samples (data.on_bad_sample=skip); first: %s", len(skipped), skipped[0])
    model = build_supernet(cfg)
    se = SearchEngine(cfg, model, world, device)
    model = se.module
    strategy = make_strategy(cfg.strategy, se, accum, cfg)

    metrics = JsonlLog(run_dir / "metrics.jsonl", is_main or cfg.log.all_ranks)
    # with log.all_ranks every rank records its alpha (rank r > 0 in alphas.rank<r>.jsonl), so a
    # multi-rank run can be checked for identical alpha everywhere
    alphas = JsonlLog(run_dir / ("alphas.jsonl" if is_main else f"alphas.rank{rank}.jsonl"),
                      is_main or cfg.log.all_ranks)
    scores = JsonlLog(run_dir / "nb201_scores.jsonl", is_main and cfg.nb201_table is not None)
    analysis = SearchAnalysis(cfg, run_dir, model, train_loader, valid_loader, enabled=is_main)  # off by default
    ckpt_dir = run_dir / "checkpoints"
    start_epoch, step = 0, 0
    # per-epoch alpha snapshots live in the checkpoint too, so alphas.jsonl can be rebuilt on resume
    alpha_history: list[dict] = [_alpha_record(model, 0, 0) | {"when": "init"}]
    client = se.load(ckpt_dir) if resume else None
    if client is not None:
        start_epoch, step = client["epoch"], client["step"]
        train_loader.load_state_dict(client["train_loader"])
        valid_loader.load_state_dict(client["valid_loader"])
        torch.set_rng_state(client["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in client:
            torch.cuda.set_rng_state(client["cuda_rng"], device)
        alpha_history = list(client["alpha_history"])
        for f in (metrics, scores):
            f.truncate_after(step)
        alphas.rewrite(alpha_history if is_main else alpha_history[1:])
        if is_main:
            log.info("resumed from step %d (epoch %d)", step, start_epoch)
    else:
        # a fresh start, or --resume before the first checkpoint (a job requeued early): whatever logs
        # an earlier attempt left are cut back to step 0
        for f in (metrics, scores):
            f.truncate_after(0)
        alphas.rewrite(alpha_history if is_main else [])
        if is_main:
            atomic_write(run_dir / "config.yaml", dump(cfg))
            write_ds_config(run_dir / "ds_config.json", se.ds_config)

    tb = None
    if is_main and cfg.log.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(run_dir / "tb"))

    def checkpoint(epoch: int) -> None:
        state = {"space": cfg.space, "epoch": epoch, "step": step, "train_loader": train_loader.state_dict(),
                 "valid_loader": valid_loader.state_dict(), "torch_rng": torch.get_rng_state(),
                 "genotype": model.genotype().to_json(), "alpha_history": alpha_history}
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        se.save(ckpt_dir, f"step{step:09d}", state, cfg.checkpoint.keep)

    signals = PreemptionSignals()
    valid_iter = valid_loader.cycle() if strategy.uses_valid else None
    steps_per_epoch = len(train_loader) // (accum * strategy.train_batches_per_step)
    progress = StepProgress(metrics, tb, "search", cfg.log.every_steps, steps_per_epoch, is_main and cfg.log.progress)
    profiler = StepProfiler(run_dir / "profile", cfg.log.profile_warmup, cfg.log.profile_steps,
                            is_main or cfg.log.all_ranks, device.type, rank, first_step=step)
    genotype = model.genotype()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            se.set_epoch_lr(epoch)
            train_loader.set_epoch(epoch)
            train_iter = iter(train_loader)
            done_in_epoch = train_loader.position // (accum * strategy.train_batches_per_step)
            progress.start_epoch(epoch, cfg.epochs, done_in_epoch)
            for _ in range(done_in_epoch, steps_per_epoch):
                try:
                    res = strategy.step(train_iter, valid_iter)
                except NumericalFault as e:
                    raise numerical_fault(ckpt_dir, step, epoch, str(e)) from None
                step += 1
                profiler.step_done(res.images)
                analysis.maybe_log(step, epoch, res)
                progress.step(step, res.images * world, lambda ips: {
                    "step": step, "epoch": epoch, "split": "train", "loss": float(res.loss), "acc": float(res.acc),
                    "lr_w": se.opt.lr("w"), "lr_alpha": se.opt.lr("alpha"), "images_per_s": ips,
                    "rank": rank, "elapsed_s": round(time.time() - t_start, 3)})
                signals.stop_if_asked(lambda: checkpoint(epoch), step, announce=is_main)
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 \
                        and step % steps_per_epoch != 0:
                    checkpoint(epoch)
            progress.end_epoch()
            # epoch end: alpha snapshot, genotype, (score), checkpoint
            genotype = model.genotype()
            alpha_history.append(_alpha_record(model, step, epoch + 1))
            alphas.append(alpha_history[-1])
            if is_main:
                G.save(genotype, run_dir / "genotypes" / f"epoch_{epoch + 1:03d}.json")
                line = f"epoch {epoch + 1}/{cfg.epochs} genotype {_short(genotype)}"
                if cfg.nb201_table and genotype.space == "nb201":
                    from sdarts.benchmarks.nb201 import lookup
                    acc = lookup(genotype, cfg.nb201_table)
                    scores.append({"step": step, "epoch": epoch + 1, "arch": genotype.to_arch_str(),
                                   "elapsed_s": round(time.time() - t_start, 3), **acc})
                    line += f" | NB201 cifar10 test {acc['cifar10_test']:.2f}"
                    if tb:
                        tb.add_scalar("nb201/cifar10_test", acc["cifar10_test"], epoch + 1)
                log.info(line)
            train_loader.set_epoch(epoch + 1)
            checkpoint(epoch + 1)
    finally:
        profiler.close()
        signals.restore()
        if tb:
            tb.close()

    summary = {"genotype": genotype.to_json(), "space": cfg.space, "strategy": cfg.strategy,
               "epochs": cfg.epochs, "steps": step, "world_size": world, "wall_time_s": time.time() - t_start,
               "skipped_samples": len(skipped), "fp16_skipped_steps": se.skipped_steps()}
    ips = [m["images_per_s"] for m in metrics.read() if m.get("images_per_s")]
    if ips:
        summary["images_per_s"] = sum(ips) / len(ips)
    if cfg.nb201_table and genotype.space == "nb201":
        from sdarts.benchmarks.nb201 import lookup
        summary["nb201"] = lookup(genotype, cfg.nb201_table)
    if is_main:
        G.save(genotype, run_dir / "genotype.json")
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    barrier()
    return SearchResult(genotype, summary)


def _short(g: G.Genotype) -> str:
    return g.to_arch_str() if g.space == "nb201" else g.to_string()
