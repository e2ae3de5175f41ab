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
from sdarts.distributed import barrier
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


def _top(ev: dict) -> dict:
    """The accuracies of one evaluation, as `final` and `selected` report them."""
    return {"top1": ev["top1"], "top5": ev["top5"]}


class EpochEvaluation:
    """Evaluates at each epoch end, logs it, and selects a checkpoint on the holdout, never on the eval
    split (the test set): `selected` is the epoch whose holdout top-1 (of the EMA weights when on) is the
    highest, its weights `checkpoints/best.pt`. Without a holdout (`data.holdout: 0`) it selects on the
    eval split, as the DARTS reference code did, and the run warns. `final` is the last epoch on the
    eval split, the number to report.

    With `data.eval_each_epoch: false` the eval split is read once, after the last epoch: the final
    weights, and the selected ones (from best.pt)."""

    def __init__(self, run: Run, cfg: RetrainConfig, model: torch.nn.Module, ema: Ema | None, loaders,
                 genotype_json: dict):
        self.run, self.cfg, self.model, self.ema = run, cfg, model, ema
        self.loaders = {"holdout": loaders.holdout, "eval": loaders.eval}
        self.on = "holdout" if loaders.holdout is not None else "eval"
        self.genotype_json = genotype_json
        self.source = "ema" if ema is not None else "model"
        self.selected: dict = {"epoch": 0, "source": self.source, "on": self.on, "holdout": None, "eval": None}
        self.last: dict = {}
        self.last_epoch = 0  # epochs evaluated (1-based: epochs done)
        self.ema_model: torch.nn.Module | None = None

    def state(self) -> dict:
        """What a checkpoint keeps of it."""
        return {"selected": self.selected, "last_eval": self.last, "last_epoch": self.last_epoch}

    def load(self, client: dict) -> None:
        self.last, self.last_epoch = client.get("last_eval", {}), client.get("last_epoch", client["epoch"])
        if "selected" in client:
            self.selected = client["selected"]
        else:  # a checkpoint from before the holdout (data.holdout 0): its "best" was chosen on the eval split
            best = client["best"]
            self.selected = {"epoch": best["epoch"], "source": best["source"], "on": "eval", "holdout": None,
                             "eval": {"top1": best["top1"], "top5": best["top5"]} if best["epoch"] else None}

    def epoch_end(self, epoch: int, lr: float, last_epoch: bool) -> None:
        """Evaluates what is due after `epoch` (0-based), selects, logs."""
        splits = [s for s in ("holdout", "eval") if self.loaders[s] is not None
                  and (s == "holdout" or self.cfg.data.eval_each_epoch or last_epoch)]
        self.last, self.last_epoch = {}, epoch + 1
        ema_model = self._ema_model() if self.ema is not None and splits else None  # one copy per epoch
        for split in splits:
            self.last[split] = evaluate(self.model, self.loaders[split], self.cfg, self.run.device)
            if ema_model is not None:
                self.last[split + "_ema"] = evaluate(ema_model, self.loaders[split], self.cfg, self.run.device)
        self._log(epoch)
        key = self.on + ("_ema" if self.ema is not None else "")
        if key in self.last and self.last[key]["top1"] > (self.selected[self.on] or {"top1": -1.0})["top1"]:
            self._select(epoch, key)
        if last_epoch and self.selected["eval"] is None:
            self._evaluate_selected()
        if self.run.is_main:
            log.info(self._line(epoch, lr))

    def final(self) -> dict:
        """The last epoch's eval-split accuracy of the weights the run ends with (EMA when on)."""
        ev = self.last.get("eval" + ("_ema" if self.ema is not None else ""))
        return {"epoch": self.last_epoch, "source": self.source, **(_top(ev) if ev else {"top1": None, "top5": None})}

    def _select(self, epoch: int, key: str) -> None:
        other = self.last.get("eval" + key[len(self.on):]) if self.on == "holdout" else self.last[key]
        self.selected = {"epoch": epoch + 1, "source": self.source, "on": self.on,
                         "holdout": _top(self.last[key]) if self.on == "holdout" else None,
                         "eval": _top(other) if other else None}
        weights = self.ema_model if self.ema is not None else self.model
        if self.run.is_main:
            save_weights(self.run.ckpt_dir / "best.pt", weights.state_dict(),
                         {"genotype": self.genotype_json, "selected": self.selected})
        barrier()

    def _evaluate_selected(self) -> None:
        """The selected weights on the eval split, when it was not read at that epoch (every rank reads
        best.pt, which rank 0 wrote before a barrier)."""
        if self.selected["epoch"] == 0:
            return
        state = torch.load(self.run.ckpt_dir / "best.pt", map_location=self.run.device, weights_only=True)
        probe = copy.deepcopy(self.model)
        probe.load_state_dict(state["module"])
        ev = evaluate(probe, self.loaders["eval"], self.cfg, self.run.device)
        self.selected["eval"] = _top(ev)
        if self.run.is_main:  # best.pt says what summary.json says
            save_weights(self.run.ckpt_dir / "best.pt", state["module"],
                         {"genotype": self.genotype_json, "selected": self.selected})
        barrier()

    def _line(self, epoch: int, lr: float) -> str:
        parts = [f"epoch {epoch + 1}/{self.cfg.epochs} lr {lr:.4g}"]
        for split, ev in self.last.items():
            parts.append(f"{split} top1 {ev['top1']:.2f}")
        s = self.selected
        return " | ".join(parts) + f" | selected epoch {s['epoch']} (on {s['on']})"

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
        for split, ev in self.last.items():
            rec = {"step": self.run.step, "epoch": epoch + 1, "split": split, "loss": ev["loss"],
                   "acc": ev["top1"] / 100.0, "top1": ev["top1"], "top5": ev["top5"], "images": ev["images"]}
            self.run.metrics.append(rec)
            if self.run.tb:
                for k in ("loss", "top1", "top5"):
                    self.run.tb.add_scalar(f"{split}/{k}", ev[k], epoch + 1)
