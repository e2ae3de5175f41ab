"""The retrain loop: train the found cell's network from scratch, evaluate every epoch, checkpoint.

`run_retrain` reads top to bottom (nanoGPT style): build the network, a plain torch SGD and the
DeepSpeed engine (which averages gradients across ranks, clips them, runs bf16/fp16 autocast with
BatchNorm in fp32 and, for fp16, DeepSpeed's GradScaler); resume or start; then per epoch set lr and
drop-path from their formulas (`retrain.recipe`), take the steps (`train_epoch`: label-smoothed loss +
0.4 x auxiliary loss) and evaluate (`retrain.evaluate`). Everything around the steps (run directory,
logs, profiler, preemption, checkpoints, summary) is `sdarts.run.Run`.

Run directory (the search's conventions): config.yaml, ds_config.json, genotype.json, metrics.jsonl,
tb/, checkpoints/ (DeepSpeed tags + atomic `latest`, best.pt), summary.json when all epochs are done.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sdarts.engine import check_precision, ds_config
from sdarts.errors import CheckpointError
from sdarts.genotype import Genotype, load as load_genotype, save as save_genotype
from sdarts.run import Run

from retrain.config import RetrainConfig
from retrain.data import build_loaders
from retrain.evaluate import EpochEvaluation
from retrain.model import build_network
from retrain.recipe import Ema, drop_path_at, lr_at, smoothed_cross_entropy
from retrain.summary import count_params

log = logging.getLogger("sdarts")


@dataclass
class RetrainResult:
    summary: dict
    finished: bool


def build_engine(cfg: RetrainConfig, model: torch.nn.Module, world: int):
    """(DeepSpeed engine, its plain torch SGD, the ds_config): DeepSpeed owns gradient averaging,
    clipping (`gradient_clipping`), autocast and, for fp16, the GradScaler (ZeRO 0)."""
    import deepspeed
    w = cfg.optim.w
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.base_lr(world), momentum=w.momentum,
                                weight_decay=w.weight_decay, nesterov=w.nesterov)
    ds = ds_config(cfg.data.micro_batch, cfg.engine.grad_accum, world, cfg.precision, cfg.engine.autocast,
                   cfg.engine.zero_stage)
    ds["gradient_clipping"] = w.grad_clip
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return ds_engine, optimizer, ds


def train_loss(cfg: RetrainConfig, logits: torch.Tensor, logits_aux: torch.Tensor | None,
               y: torch.Tensor) -> torch.Tensor:
    """Label-smoothed cross-entropy, plus `auxiliary_weight` x the same loss on the auxiliary head."""
    loss = smoothed_cross_entropy(logits, y, cfg.loss.label_smoothing)
    if logits_aux is not None:
        loss = loss + cfg.loss.auxiliary_weight * smoothed_cross_entropy(logits_aux, y, cfg.loss.label_smoothing)
    return loss


def run_retrain(cfg: RetrainConfig, genotype: Genotype, run_dir: str | Path, resume: bool = False,
                force: bool = False) -> RetrainResult:
    cfg.check_genotype(genotype)  # a cell of another space than model.space is refused, never reinterpreted
    run = Run(cfg, run_dir)
    check_precision(cfg.precision, run.device)
    run.prepare(resume, force, ("checkpoints",))
    loaders = build_loaders(cfg, run.rank, run.world, run.device, run.skipped)
    train_loader = loaders.train
    run.warn_skipped()
    m = cfg.model
    model = build_network(genotype, cfg.data.dataset, m.C, m.layers, cfg.num_classes, m.auxiliary, 0.0)
    params = count_params(model)
    ds_engine, optimizer, ds = build_engine(cfg, model, run.world)
    model = ds_engine.module
    ema = Ema(model, cfg.ema.decay) if cfg.ema.decay > 0 else None
    gj = genotype.to_json()
    evaluation = EpochEvaluation(run, cfg, model, ema, loaders, gj)
    base_lr = cfg.base_lr(run.world)
    run.record_provenance(train_loader, cfg.precision, cfg.global_batch(run.world), {"w": base_lr})
    warn_no_holdout(run, loaders.holdout_per_class)
    if resume:
        refuse_other_genotype_run(run.dir, gj)
    client = run.resume_or_start(ds_engine, resume, "network",
                                 refuse_other_network(gj, loaders.holdout_per_class), [], ds)
    start_epoch = 0
    if client is not None:
        start_epoch = client["epoch"]
        evaluation.load(client)
        train_loader.load_state_dict(client["train_loader"])
        if ema is not None and client.get("ema") is not None:
            ema.load_state_dict(client["ema"])
        scaler = grad_scaler(ds_engine)
        if scaler is not None and client.get("grad_scaler"):
            scaler.load_state_dict(client["grad_scaler"])
    elif run.is_main:
        save_genotype(genotype, run.dir / "genotype.json")

    def save(epoch: int) -> None:
        scaler = grad_scaler(ds_engine)
        run.save(ds_engine, epoch, {
            "kind": "retrain", "genotype": gj, "holdout_per_class": loaders.holdout_per_class,
            **evaluation.state(), "train_loader": train_loader.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "grad_scaler": scaler.state_dict() if scaler is not None else None})

    if run.is_main:
        log.info("network: %s, %.2fM params (no aux head); %d ranks x %d x %d accum = global batch %d, lr %.4g",
                 type(model).__name__, params / 1e6, run.world, cfg.data.micro_batch, cfg.engine.grad_accum,
                 cfg.global_batch(run.world), base_lr)
    capped, w = False, cfg.optim.w
    with run.training(len(train_loader) // cfg.engine.grad_accum, "train"):
        for epoch in range(start_epoch, cfg.epochs):
            lr = lr_at(epoch, cfg.epochs, base_lr, w.schedule, w.warmup_epochs, w.lr_min)
            for g in optimizer.param_groups:
                g["lr"] = lr
            model.drop_path_prob = drop_path_at(epoch, cfg.epochs, m.drop_path)
            if train_epoch(run, cfg, ds_engine, train_loader, ema, epoch, lr, save):
                capped = True
                save(epoch)
                break
            evaluation.epoch_end(epoch, lr, last_epoch=epoch + 1 == cfg.epochs)
            train_loader.set_epoch(epoch + 1)
            save(epoch + 1)
            if cfg.max_steps and run.step >= cfg.max_steps and epoch + 1 < cfg.epochs:
                capped = True
                break

    summary = {"genotype": gj, "dataset": cfg.data.dataset, "network": type(model).__name__,
               "params": params, "epochs": cfg.epochs, "steps": run.step, "global_batch": cfg.global_batch(run.world),
               "lr": base_lr, "precision": cfg.precision,
               "final": evaluation.final(), "selected": evaluation.selected,
               "holdout_per_class": loaders.holdout_per_class, "last": evaluation.last,
               "fp16_skipped_steps": int(getattr(ds_engine, "skipped_steps", 0))}
    if capped and run.is_main:
        log.info("stopped at max_steps=%d (step %d); continue with --resume", cfg.max_steps, run.step)
    return RetrainResult(run.finish(summary, write=not capped), finished=not capped)


def train_epoch(run: Run, cfg: RetrainConfig, ds_engine, loader, ema: Ema | None, epoch: int, lr: float,
                save: Callable[[int], None]) -> bool:
    """One epoch's optimizer steps, from where a resumed run left off. True when `max_steps` cut it short."""
    accum = cfg.engine.grad_accum
    steps_per_epoch = len(loader) // accum
    model = ds_engine.module
    loader.set_epoch(epoch)
    batches = iter(loader)
    done = loader.state_dict().get("position", 0) // accum
    run.progress.start_epoch(epoch, cfg.epochs, done)
    ds_engine.train()
    for _ in range(done, steps_per_epoch):
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(accum):  # one optimizer step = accum micro-batches
            batch = next(batches)
            x, y = batch.x.to(run.device, non_blocking=True), batch.y.to(run.device, non_blocking=True)
            logits, logits_aux = ds_engine(x)
            loss = train_loss(cfg, logits, logits_aux, y)
            value = float(loss.detach())
            # fp16 leaves overflow to DeepSpeed's loss scaler (it skips and counts the step);
            # elsewhere a NaN/inf loss stops the run before backward, so no weight moves
            if cfg.precision != "fp16" and not math.isfinite(value):
                raise run.numerical_fault(epoch, f"non-finite loss ({value})")
            ds_engine.backward(loss)
            ds_engine.step()
            loss_sum += value
            # a device tensor, read only when a record is due: an int() here would stall the host until
            # the optimizer step finished, every step
            correct = correct + (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
        if ema is not None:
            ema.update(model)
        run.after_step(seen, lambda ips: {
            "step": run.step, "epoch": epoch, "split": "train", "loss": loss_sum / accum,
            "acc": int(correct) / max(seen, 1), "lr_w": lr, "drop_path": model.drop_path_prob,
            "images_per_s": ips, "rank": run.rank})
        run.stop_if_preempted(lambda: save(epoch))
        if cfg.max_steps and run.step >= cfg.max_steps and run.step % steps_per_epoch != 0:
            run.progress.end_epoch()
            return True
        if run.checkpoint_due(steps_per_epoch):
            save(epoch)
    run.progress.end_epoch()
    return False


def grad_scaler(ds_engine):
    """DeepSpeed's GradScaler under fp16 autocast (ZeRO 0), else None."""
    return getattr(ds_engine, "torch_autocast_z0_gradscaler", None)


def refuse_other_network(genotype_json: dict, holdout_per_class: int) -> Callable[[dict], str | None]:
    """A retrain checkpoint of this genotype, trained on this training split, is the only one `--resume`
    may load. Checkpoints from before the holdout trained on the whole split (no `holdout_per_class`)."""
    def refuse(client: dict) -> str | None:
        if client.get("kind") != "retrain":
            return "not a retrain checkpoint"
        if client.get("genotype") != genotype_json:
            return "checkpoint was trained with another genotype than --genotype"
        held = client.get("holdout_per_class", 0)
        if held != holdout_per_class:
            older = " (an older layout, from before the holdout)" if "holdout_per_class" not in client else ""
            return (f"checkpoint was trained with data.holdout {held}{older}, this config gives "
                    f"{holdout_per_class}; resume with --set data.holdout={held}")
        return None
    return refuse


def warn_no_holdout(run: Run, holdout_per_class: int) -> None:
    if not holdout_per_class and run.is_main:
        log.warning("data.holdout 0: the checkpoint (best.pt, summary 'selected') is chosen on the eval split, "
                    "the test set; report 'final' (the last epoch), or set data.holdout to select on held-out "
                    "training images")


def refuse_other_genotype_run(run_dir: Path, genotype_json: dict) -> None:
    if (run_dir / "genotype.json").exists() and load_genotype(run_dir / "genotype.json").to_json() != genotype_json:
        raise CheckpointError(f"{run_dir}: this run was trained with another genotype than --genotype "
                              f"(see {run_dir / 'genotype.json'})")
