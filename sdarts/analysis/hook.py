"""The search loop's analysis hook: one call per step, off unless `analysis.*_every` is set.

`SearchAnalysis.maybe_log(step, epoch, res)` is called right after each strategy step. Every
`analysis.grad_corr_every` steps it logs the eq. 8 gradient correlation (`sdarts.analysis.gradcorr`),
every `analysis.grad_p_every` steps dL/dp per op per edge (`sdarts.analysis.dldp`), for the cells in
`analysis.cells`, as JSON lines in `analysis.jsonl`:

    {"step", "epoch", "kind": "grad_corr", "strategy", "same_step": {...}, "prev_w": {...}}
    {"step", "epoch", "kind": "dl_dp", "strategy", "ops", "edges", "cells": {cell: [[...]]}, "total": [[...]]}

The batches are the step's own samples (by id, from `StepResult.alpha_ids` / `w_ids`), taken from the
loaders' in-memory tensors without augmentation, and evaluated at the weights after the step. The
extra forward/backward passes change nothing in the search: gradients come from
`torch.autograd.grad` (nothing lands in `.grad`), BN running statistics are restored afterwards, and
no random number is drawn. Only rank 0 computes (the weights are identical on every rank).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sdarts.analysis.dldp import dl_dp
from sdarts.analysis.gradcorr import correlation, param_map, weight_grads
from sdarts.runlog import JsonlLog


@contextlib.contextmanager
def preserved_buffers(model: torch.nn.Module):
    """Restores every buffer (BN running mean/var, num_batches_tracked) on exit."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])


class _Lookup:
    """Sample id -> normalised, unaugmented image of one TensorLoader."""

    def __init__(self, loader):
        self.loader = loader
        self.pos = {int(i): k for k, i in enumerate(loader.ids.tolist())}

    def has(self, ids: torch.Tensor) -> bool:
        return all(int(i) in self.pos for i in ids.tolist())

    def batch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([self.pos[int(i)] for i in ids.tolist()], device=self.loader.images.device)
        x = (self.loader.images[idx].float() - self.loader.mean) / self.loader.std
        return x, self.loader.labels[idx]


class SearchAnalysis:
    def __init__(self, cfg, run_dir: Path, model: torch.nn.Module, train_loader, valid_loader,
                 enabled: bool = True):
        a = cfg.analysis
        self.corr_every, self.p_every, self.cells = a.grad_corr_every, a.grad_p_every, list(a.cells)
        self.enabled = enabled and (self.corr_every > 0 or self.p_every > 0)
        self.strategy, self.model = cfg.strategy, model
        self.log = JsonlLog(Path(run_dir) / "analysis.jsonl", self.enabled)
        self.sources = [_Lookup(train_loader), _Lookup(valid_loader)] if self.enabled else []
        self.params = param_map(model, self.cells) if self.enabled and self.corr_every else {}
        self.prev_w_ids: list[torch.Tensor] | None = None
        self.started = False

    def _batch(self, ids_list: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([i.flatten() for i in ids_list])
        for src in self.sources:
            if src.has(ids):
                x, y = src.batch(ids)
                dtype = next(self.model.parameters()).dtype
                return x.to(dtype), y
        raise RuntimeError("analysis: the step's sample ids are in neither search split")

    def due(self, step: int) -> bool:
        """Whether `maybe_log(step, ...)` will compute anything."""
        return self.enabled and bool((self.corr_every and step % self.corr_every == 0)
                                     or (self.p_every and step % self.p_every == 0))

    def maybe_log(self, step: int, epoch: int, res) -> None:
        """Logs what is due at `step` (the step just taken); a no-op when analysis is off."""
        if not self.enabled:
            return
        if not self.started:  # on resume, drop lines written after the checkpoint
            self.log.truncate_after(step - 1)
            self.started = True
        due_corr = self.corr_every and step % self.corr_every == 0
        due_p = self.p_every and step % self.p_every == 0
        if due_corr or due_p:
            was_training = self.model.training
            self.model.train()
            with preserved_buffers(self.model):
                if due_corr:
                    self._grad_corr(step, epoch, res)
                if due_p:
                    self._dl_dp(step, epoch, res)
            self.model.train(was_training)
        self.prev_w_ids = res.w_ids

    def _grad_corr(self, step: int, epoch: int, res) -> None:
        xa, ya = self._batch(res.alpha_ids)
        ga = weight_grads(self.model, xa, ya, self.params)
        same = all(torch.equal(a, w) for a, w in zip(res.alpha_ids, res.w_ids)) \
            and len(res.alpha_ids) == len(res.w_ids)
        if same:
            gw = ga
        else:
            xw, yw = self._batch(res.w_ids)
            gw = weight_grads(self.model, xw, yw, self.params)
        rec = {"step": step, "epoch": epoch, "kind": "grad_corr", "strategy": self.strategy,
               "same_batch": same, "same_step": correlation(ga, gw), "prev_w": None}
        if self.prev_w_ids is not None:
            xp, yp = self._batch(self.prev_w_ids)
            rec["prev_w"] = correlation(ga, weight_grads(self.model, xp, yp, self.params))
        self.log.append(rec)

    def _dl_dp(self, step: int, epoch: int, res) -> None:
        x, y = self._batch(res.alpha_ids)
        g = dl_dp(self.model, x, y, self.cells)
        self.log.append({"step": step, "epoch": epoch, "kind": "dl_dp", "strategy": self.strategy,
                         "ops": list(self.model.op_names), "edges": list(self.model.edge_names),
                         "cells": {k: v.tolist() for k, v in g.items() if k != "total"},
                         "total": g["total"].tolist()})
