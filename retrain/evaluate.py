"""The retrain's epoch-end evaluation: top-1/top-5 over the whole eval split (all ranks' shards
combined), for the model and, when `ema.decay` > 0, its exponential moving average; the metrics lines,
and the best epoch with its weights (`checkpoints/best.pt`)."""
from __future__ import annotations

import copy
import logging
from contextlib import nullcontext

import torch
import torch.distributed as dist

from sdarts.checkpoint import save_weights
from sdarts.run import Run

from retrain.config import RetrainConfig
from retrain.recipe import Ema, topk_correct

log = logging.getLogger("sdarts")


def autocast(cfg: RetrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, cfg: RetrainConfig, device: torch.device) -> dict:
    """Top-1/top-5 and cross-entropy over every image of the eval split, summed across ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    for batch in loader:
        x, y = batch.x.to(device, non_blocking=True), batch.y.to(device, non_blocking=True)
        valid = batch.ids.to(device) >= 0
        with autocast(cfg, device):
            logits, _ = model(x)
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        c1, c5 = topk_correct(logits, y, valid)
        sums += torch.stack([loss[valid].sum().double(), c1.double(), c5.double(), valid.sum().double()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "images": int(n)}


class EpochEvaluation:
    """Evaluates at each epoch end, logs it, and keeps the best epoch (judged on the EMA when on)."""

    def __init__(self, run: Run, cfg: RetrainConfig, model: torch.nn.Module, ema: Ema | None, loader,
                 genotype_json: dict):
        self.run, self.cfg, self.model, self.ema, self.loader = run, cfg, model, ema, loader
        self.genotype_json = genotype_json
        self.best = {"top1": -1.0, "top5": 0.0, "epoch": 0, "source": "model"}
        self.last: dict = {}
        self.ema_model: torch.nn.Module | None = None

    def state(self) -> dict:
        """What a checkpoint keeps of it."""
        return {"best": self.best, "last_eval": self.last}

    def load(self, client: dict) -> None:
        self.best, self.last = client["best"], client.get("last_eval", {})

    def epoch_end(self, epoch: int, lr: float) -> None:
        run, cfg = self.run, self.cfg
        self.last = {"model": evaluate(self.model, self.loader, cfg, run.device)}
        judged, weights = self.last["model"], self.model.state_dict
        if self.ema is not None:
            self.last["ema"] = evaluate(self._ema_model(), self.loader, cfg, run.device)
            judged, weights = self.last["ema"], self.ema_model.state_dict
        self._log(epoch)
        if judged["top1"] > self.best["top1"]:
            self.best = {"top1": judged["top1"], "top5": judged["top5"], "epoch": epoch + 1,
                         "source": "ema" if self.ema is not None else "model"}
            if run.is_main:
                save_weights(run.ckpt_dir / "best.pt", weights(), {"genotype": self.genotype_json, **self.best})
        if run.is_main:
            line = (f"epoch {epoch + 1}/{cfg.epochs} lr {lr:.4g} eval top1 {self.last['model']['top1']:.2f} "
                    f"top5 {self.last['model']['top5']:.2f}")
            if "ema" in self.last:
                line += f" | ema top1 {self.last['ema']['top1']:.2f}"
            log.info(line + f" | best {self.best['top1']:.2f} (epoch {self.best['epoch']})")

    def _ema_model(self) -> torch.nn.Module:
        """The model with the EMA's weights."""
        if self.ema_model is None:
            self.ema_model = copy.deepcopy(self.model)
        self.ema.copy_to(self.ema_model)
        # integer buffers (BN counters) follow the live model, so best.pt does not depend on the step at
        # which ema_model was first copied (which a resume moves)
        target = self.ema_model.state_dict()
        for k, v in self.model.state_dict().items():
            if not v.is_floating_point():
                target[k].copy_(v)
        return self.ema_model

    def _log(self, epoch: int) -> None:
        for src, ev in self.last.items():
            rec = {"step": self.run.step, "epoch": epoch + 1, "split": "eval" if src == "model" else "eval_ema",
                   "loss": ev["loss"], "acc": ev["top1"] / 100.0, "top1": ev["top1"], "top5": ev["top5"],
                   "images": ev["images"]}
            self.run.metrics.append(rec)
            if self.run.tb:
                for k in ("loss", "top1", "top5"):
                    self.run.tb.add_scalar(f"{rec['split']}/{k}", ev[k], epoch + 1)
