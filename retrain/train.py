"""The retrain loop: train the found cell's network from scratch, evaluate every epoch, checkpoint.

Read top to bottom, `run_retrain` is the whole recipe (nanoGPT style): build the network, a plain
torch SGD and the DeepSpeed engine (which averages gradients across ranks, clips them, runs bf16/fp16
autocast with BatchNorm in fp32 and, for fp16, DeepSpeed's GradScaler), maybe resume, then per epoch:
set lr and drop-path from their formulas (`retrain.recipe`), train steps with label-smoothed loss +
0.4 x auxiliary loss, evaluate top-1/top-5 over all ranks' shards combined, save best and last.

Run directory (the search's conventions): config.yaml, ds_config.json, genotype.json, metrics.jsonl,
tb/, checkpoints/ (DeepSpeed tags + atomic `latest`, best.pt), summary.json when all epochs are done.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from sdarts.config import dump
from sdarts.distributed import barrier, init
from sdarts.engine import CheckpointError, check_precision, ds_config, numerical_fault, write_ds_config
from sdarts.genotype import Genotype, save as save_genotype
from sdarts.preempt import PreemptionSignals
from sdarts.profiling import StepProfiler
from sdarts.runlog import JsonlLog, StepProgress, atomic_write, prepare_run_dir

from retrain.checkpoint import load_last, save_best, save_last
from retrain.config import RetrainConfig
from retrain.data import build_loaders
from retrain.model import build_network
from retrain.recipe import Ema, drop_path_at, lr_at, smoothed_cross_entropy, topk_correct
from retrain.summary import count_params

log = logging.getLogger("sdarts")


@dataclass
class RetrainResult:
    summary: dict
    finished: bool


def _autocast(cfg: RetrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)


def build_engine(cfg: RetrainConfig, model: torch.nn.Module, world: int, device: torch.device):
    """(DeepSpeed engine, its plain torch SGD, the ds_config): DeepSpeed owns gradient averaging,
    clipping (`gradient_clipping`), autocast and, for fp16, the GradScaler (ZeRO 0)."""
    import deepspeed
    w = cfg.optim.w
    opt = torch.optim.SGD(model.parameters(), lr=cfg.base_lr(world), momentum=w.momentum,
                          weight_decay=w.weight_decay, nesterov=w.nesterov)
    ds = ds_config(cfg.data.micro_batch, cfg.engine.grad_accum, world, cfg.precision, cfg.engine.autocast,
                   cfg.engine.zero_stage, device.type == "cuda")
    ds["gradient_clipping"] = w.grad_clip
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine, opt, ds


def train_loss(cfg: RetrainConfig, logits: torch.Tensor, logits_aux: torch.Tensor | None,
               y: torch.Tensor) -> torch.Tensor:
    """Label-smoothed cross-entropy, plus `auxiliary_weight` x the same loss on the auxiliary head."""
    loss = smoothed_cross_entropy(logits, y, cfg.loss.label_smoothing)
    if logits_aux is not None:
        loss = loss + cfg.loss.auxiliary_weight * smoothed_cross_entropy(logits_aux, y, cfg.loss.label_smoothing)
    return loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, cfg: RetrainConfig, device: torch.device) -> dict:
    """Top-1/top-5 and cross-entropy over every image of the eval split, summed across ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    for batch in loader:
        x, y = batch.x.to(device, non_blocking=True), batch.y.to(device, non_blocking=True)
        valid = batch.ids.to(device) >= 0
        with _autocast(cfg, device):
            logits, _ = model(x)
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        c1, c5 = topk_correct(logits, y, valid)
        sums += torch.stack([loss[valid].sum().double(), c1.double(), c5.double(), valid.sum().double()])
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "images": int(n)}


def run_retrain(cfg: RetrainConfig, genotype: Genotype, run_dir: str | Path, resume: bool = False,
                force: bool = False) -> RetrainResult:
    t_start = time.time()
    rank, _, world, device = init(cfg.engine.device)
    check_precision(cfg.precision, device)
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume, force, rank, ("checkpoints",))
    is_main = rank == 0
    torch.manual_seed(cfg.seed)
    accum = cfg.engine.grad_accum

    skipped: list[str] = []
    train_loader, eval_loader = build_loaders(cfg, rank, world, device, skipped)
    if skipped and is_main:
        log.warning("skipped %d undecodable samples (data.on_bad_sample=skip); first: %s", len(skipped), skipped[0])
    m = cfg.model
    model = build_network(genotype, cfg.data.dataset, m.C, m.layers, cfg.num_classes, m.auxiliary, 0.0)
    params = count_params(model)
    w = cfg.optim.w
    base_lr = cfg.base_lr(world)
    engine, opt, ds = build_engine(cfg, model, world, device)
    model = engine.module
    ema = Ema(model, cfg.ema.decay) if cfg.ema.decay > 0 else None
    ema_model = None

    metrics = JsonlLog(run_dir / "metrics.jsonl", is_main or cfg.log.all_ranks)
    ckpt_dir = run_dir / "checkpoints"
    start_epoch, step = 0, 0
    best = {"top1": -1.0, "top5": 0.0, "epoch": 0, "source": "model"}
    last_eval: dict = {}
    gj = genotype.to_json()
    if resume and (run_dir / "genotype.json").exists():
        from sdarts.genotype import load as load_genotype
        if load_genotype(run_dir / "genotype.json").to_json() != gj:
            raise CheckpointError(f"{run_dir}: this run was trained with another genotype than --genotype "
                                  f"(see {run_dir / 'genotype.json'})")
    client = load_last(engine, ckpt_dir, gj) if resume else None
    if client is not None:
        start_epoch, step, best = client["epoch"], client["step"], client["best"]
        last_eval = client.get("last_eval", {})
        train_loader.load_state_dict(client["train_loader"])
        torch.set_rng_state(client["torch_rng"])
        if device.type == "cuda" and client.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(client["cuda_rng"], device)
        if ema is not None and client.get("ema") is not None:
            ema.load_state_dict(client["ema"])
        scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None and client.get("grad_scaler"):
            scaler.load_state_dict(client["grad_scaler"])
        metrics.truncate_after(step)
        if is_main:
            log.info("resumed from step %d (epoch %d)", step, start_epoch)
    elif is_main:
        atomic_write(run_dir / "config.yaml", dump(cfg))
        write_ds_config(run_dir / "ds_config.json", ds)
        save_genotype(genotype, run_dir / "genotype.json")

    tb = None
    if is_main and cfg.log.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(run_dir / "tb"))

    def checkpoint(epoch: int) -> None:
        scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
        state = {"kind": "retrain", "genotype": gj, "epoch": epoch, "step": step, "best": best,
                 "last_eval": last_eval, "train_loader": train_loader.state_dict(),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                 "ema": ema.state_dict() if ema is not None else None,
                 "grad_scaler": scaler.state_dict() if scaler is not None else None}
        save_last(engine, ckpt_dir, f"step{step:09d}", state, cfg.checkpoint.keep)

    signals = PreemptionSignals()
    steps_per_epoch = len(train_loader) // accum
    progress = StepProgress(metrics, tb, "train", cfg.log.every_steps, steps_per_epoch, is_main and cfg.log.progress)
    profiler = StepProfiler(run_dir / "profile", cfg.log.profile_warmup, cfg.log.profile_steps,
                            is_main or cfg.log.all_ranks, device.type, rank, first_step=step)
    if is_main:
        log.info("network: %s, %.2fM params (no aux head); %d ranks x %d x %d accum = global batch %d, lr %.4g",
                 type(model).__name__, params / 1e6, world, cfg.data.micro_batch, accum,
                 cfg.global_batch(world), base_lr)
    capped = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            lr = lr_at(epoch, cfg.epochs, base_lr, w.schedule, w.warmup_epochs, w.lr_min)
            for g in opt.param_groups:
                g["lr"] = lr
            model.drop_path_prob = drop_path_at(epoch, cfg.epochs, m.drop_path)
            train_loader.set_epoch(epoch)
            batches = iter(train_loader)
            done = train_loader.state_dict().get("position", 0) // accum
            progress.start_epoch(epoch, cfg.epochs, done)
            engine.train()
            for _ in range(done, steps_per_epoch):
                loss_sum, correct, seen = 0.0, 0, 0
                for _ in range(accum):  # one optimizer step = accum micro-batches
                    batch = next(batches)
                    x, y = batch.x.to(device, non_blocking=True), batch.y.to(device, non_blocking=True)
                    logits, logits_aux = engine(x)
                    loss = train_loss(cfg, logits, logits_aux, y)
                    value = float(loss.detach())
                    # fp16 leaves overflow to DeepSpeed's loss scaler (it skips and counts the step);
                    # elsewhere a NaN/inf loss stops the run before backward, so no weight moves
                    if cfg.precision != "fp16" and not math.isfinite(value):
                        raise numerical_fault(ckpt_dir, step, epoch, f"non-finite loss ({value})")
                    engine.backward(loss)
                    engine.step()
                    loss_sum += value
                    # a device tensor, read only when a record is due: an int() here would stall the host
                    # until the optimizer step finished, every step
                    correct = correct + (logits.detach().argmax(1) == y).sum()
                    seen += y.numel()
                if ema is not None:
                    ema.update(model)
                step += 1
                profiler.step_done(seen)
                progress.step(step, seen * world, lambda ips: {
                    "step": step, "epoch": epoch, "split": "train", "loss": loss_sum / accum,
                    "acc": int(correct) / max(seen, 1), "lr_w": lr, "drop_path": model.drop_path_prob,
                    "images_per_s": ips, "rank": rank})
                signals.stop_if_asked(lambda: checkpoint(epoch), step, announce=is_main)
                if cfg.max_steps and step >= cfg.max_steps and step % steps_per_epoch != 0:
                    capped = True
                    break
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 \
                        and step % steps_per_epoch != 0:
                    checkpoint(epoch)
            progress.end_epoch()
            if capped:
                checkpoint(epoch)
                break
            # epoch end: evaluate (model, and EMA when on), keep the best, checkpoint
            last_eval = {"model": evaluate(model, eval_loader, cfg, device)}
            judged, weights = last_eval["model"], model.state_dict
            if ema is not None:
                if ema_model is None:
                    import copy
                    ema_model = copy.deepcopy(model)
                ema.copy_to(ema_model)
                # integer buffers (BN counters) follow the live model, so best.pt does not depend on the
                # step at which ema_model was first copied (which a resume moves)
                target = ema_model.state_dict()
                for k, v in model.state_dict().items():
                    if not v.is_floating_point():
                        target[k].copy_(v)
                last_eval["ema"] = evaluate(ema_model, eval_loader, cfg, device)
                judged, weights = last_eval["ema"], ema_model.state_dict
            for src, ev in last_eval.items():
                rec = {"step": step, "epoch": epoch + 1, "split": "eval" if src == "model" else "eval_ema",
                       "loss": ev["loss"], "acc": ev["top1"] / 100.0, "top1": ev["top1"], "top5": ev["top5"],
                       "images": ev["images"]}
                metrics.append(rec)
                if tb:
                    for k in ("loss", "top1", "top5"):
                        tb.add_scalar(f"{rec['split']}/{k}", ev[k], epoch + 1)
            if judged["top1"] > best["top1"]:
                best = {"top1": judged["top1"], "top5": judged["top5"], "epoch": epoch + 1,
                        "source": "ema" if ema is not None else "model"}
                if is_main:
                    save_best(ckpt_dir / "best.pt", weights(), {"genotype": gj, **best})
            if is_main:
                line = (f"epoch {epoch + 1}/{cfg.epochs} lr {lr:.4g} eval top1 {last_eval['model']['top1']:.2f} "
                        f"top5 {last_eval['model']['top5']:.2f}")
                if "ema" in last_eval:
                    line += f" | ema top1 {last_eval['ema']['top1']:.2f}"
                log.info(line + f" | best {best['top1']:.2f} (epoch {best['epoch']})")
            train_loader.set_epoch(epoch + 1)
            checkpoint(epoch + 1)
            if cfg.max_steps and step >= cfg.max_steps and epoch + 1 < cfg.epochs:
                capped = True
                break
    finally:
        profiler.close()
        signals.restore()
        if tb:
            tb.close()

    ips = [r["images_per_s"] for r in metrics.read() if r.get("images_per_s")]
    summary = {"genotype": gj, "dataset": cfg.data.dataset, "network": type(model).__name__,
               "params": params, "epochs": cfg.epochs, "steps": step, "world_size": world,
               "global_batch": cfg.global_batch(world), "lr": base_lr, "precision": cfg.precision,
               "best": best, "last": last_eval, "wall_time_s": time.time() - t_start,
               "images_per_s": sum(ips) / len(ips) if ips else None, "skipped_samples": len(skipped),
               "fp16_skipped_steps": int(getattr(engine, "skipped_steps", 0))}
    if capped:
        if is_main:
            log.info("stopped at max_steps=%d (step %d); continue with --resume", cfg.max_steps, step)
    elif is_main:
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    barrier()
    return RetrainResult(summary, finished=not capped)
