"""The searches of one process, seed by seed: their data, their files and their alpha histories.

A search config with `seed: s` is one search; with `seeds: [s1, ..., sS]` it is S searches trained in
one set of kernels (`sdarts.spaces.seedstack.SeedStack`). Either way the loop sees `SeedRuns`:

    runs = SeedRuns(cfg, run, model, device)   # one `SeedRun` per search: loaders, files, alpha history
    runs.train_batches() / runs.valid_batches()  # each search's own batch; stacked [S, B, ...] for seeds
    runs.epoch_end(epoch)                        # each search's alpha record, genotype, NB201 score
    runs.client_state() / runs.restore(client)   # their part of the (one) checkpoint
    runs.finish(summary)                         # each search's genotype.json and summary.json

One search writes its files into the run directory, exactly as before seeds existed. Stacked seeds
write `RUN/seed_<s>/`, each a complete run directory of the lone search `seed: s` (config.yaml,
metrics.jsonl, alphas.jsonl, genotypes/, nb201_scores.jsonl, analysis.jsonl, genotype.json,
summary.json), so `sdarts nb201`, `sdarts plot` and export read each as they read any search. The run
directory itself holds what the batch shares: config.yaml (with `seeds`), ds_config.json, the one
`checkpoints/`, metrics.jsonl (the batch's throughput) and summary.json (every seed's outcome).

Each seed has the data order and alpha init of its lone search: its loaders are built with its seed,
its supernet was initialised after `torch.manual_seed(s)` (`spaces.build.build_supernet`).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from sdarts import genotype as G
from sdarts.analysis.hook import SearchAnalysis
from sdarts.config import SearchConfig, dump
from sdarts.data import Batch, build_search_loaders, shared_splits
from sdarts.distributed import barrier
from sdarts.run import Run
from sdarts.runlog import JsonlLog, atomic_write
from sdarts.search.strategies import StepResult

log = logging.getLogger("sdarts")


@dataclass
class SeedRun:
    """One search of the process: its seed, its directory, its loaders and its files."""
    index: int
    seed: int
    dir: Path
    cfg: SearchConfig  # the lone search's config
    train: object
    valid: object
    logs: "SearchLogs"
    metrics: JsonlLog | None  # stacked seeds only (one search's metrics are the run's)
    alpha_history: list[dict] = field(default_factory=list)
    fault: str | None = None
    genotype: G.Genotype | None = None


class SeedRuns:
    def __init__(self, cfg: SearchConfig, run: Run, model: torch.nn.Module, data_device: torch.device):
        self.cfg, self.run, self.model = cfg, run, model
        self.stacked = cfg.seeds is not None
        accum = cfg.engine.grad_accum
        seeds = cfg.seeds if self.stacked else [cfg.seed]
        splits = shared_splits(cfg.data, cfg.model.num_classes, run.skipped) if self.stacked else None
        self.runs: list[SeedRun] = []
        for k, s in enumerate(seeds):
            d = run.dir / f"seed_{s}" if self.stacked else run.dir
            tr, va = build_search_loaders(cfg.data, cfg.model.num_classes, s, run.rank, run.world, accum,
                                          str(data_device), run.skipped, splits)
            lone = cfg.lone(s)
            metrics = JsonlLog(d / "metrics.jsonl", run.logs_here) if self.stacked else None
            self.runs.append(SeedRun(k, s, d, lone, tr, va, SearchLogs(run, lone, d, self.stacked), metrics))
        self.analyses = [SearchAnalysis(r.cfg, r.dir, self.net(r.index), r.train, r.valid, enabled=run.is_main)
                         for r in self.runs]
        for r in self.runs:
            r.alpha_history = [alpha_record(self.net(r.index, weights=False), 0, 0) | {"when": "init"}]

    # -- the model and the data, seed by seed -------------------------------------------------------
    def net(self, k: int, weights: bool = True) -> torch.nn.Module:
        """Search k's supernet (stacked seeds: a lone copy of seed k's current state; `weights=False`:
        of its alpha only, for the genotype and the alpha record)."""
        return self.model.seed_net(k, weights) if self.stacked else self.model

    @property
    def first(self) -> SeedRun:
        return self.runs[0]

    @property
    def live(self) -> list[SeedRun]:
        return [r for r in self.runs if r.fault is None]

    def set_epoch(self, epoch: int) -> None:
        for r in self.runs:
            r.train.set_epoch(epoch)

    def train_batches(self) -> Iterator[Batch]:
        its = [iter(r.train) for r in self.runs]
        return its[0] if not self.stacked else _stacked(its)

    def valid_batches(self) -> Iterator[Batch]:
        its = [r.valid.cycle() for r in self.runs]
        return its[0] if not self.stacked else _stacked(its)

    # -- after a step, at an epoch end, in a checkpoint -------------------------------------------
    def record_faults(self, epoch: int, faults: dict[int, str]) -> None:
        """Right after a step (before it is counted and logged): a stacked seed whose loss went non-finite
        ends its search there (the others go on); its files stop at its last good step."""
        for k, msg in faults.items():
            r = self.runs[k]
            if r.fault is None:
                r.fault = (f"step {self.run.step + 1} (epoch {epoch + 1}): seed {r.seed}: {msg}; this seed's "
                           f"search ended there (its files stop at its last good step; the others go on)")
                log.error("%s", r.fault)

    def after_step(self, step: int, epoch: int, res: StepResult) -> None:
        """The analysis hook of each live search."""
        for r, a in zip(self.runs, self.analyses):
            if r.fault is None:
                if self.stacked and a.due(step):
                    self.net(r.index)  # refresh the lone copy the hook reads
                a.maybe_log(step, epoch, res.seed(r.index) if self.stacked else res)

    def metrics_line(self, record: dict, res: StepResult) -> dict:
        """The run's metrics line (stacked: mean loss and accuracy over the live seeds, images/s of
        all), after writing each live seed's own line (its loss and accuracy, its images/s)."""
        if not self.stacked:  # (the loop's record holds loss and acc in their place: `|` keeps the order)
            return record | {"loss": float(res.loss), "acc": float(res.acc)}
        loss, acc = res.loss.float().tolist(), res.acc.float().tolist()
        live = self.live or self.runs
        for r in live:
            r.metrics.append(record | {"loss": loss[r.index], "acc": acc[r.index], "seed": r.seed,
                                       "images_per_s": record["images_per_s"] / len(self.runs)})
        return record | {"loss": sum(loss[r.index] for r in live) / len(live),
                         "acc": sum(acc[r.index] for r in live) / len(live)}

    def epoch_end(self, epoch: int) -> None:
        for r in self.live:
            net = self.net(r.index, weights=False)
            r.genotype = net.genotype()
            r.alpha_history.append(alpha_record(net, self.run.step, epoch + 1))
            r.logs.epoch_end(epoch, r.genotype, r.alpha_history[-1])

    def client_state(self) -> dict:
        """Their part of a checkpoint: one search's keys as they always were; stacked seeds a list."""
        states = [{"train_loader": r.train.state_dict(), "valid_loader": r.valid.state_dict(),
                   "genotype": self.net(r.index, weights=False).genotype().to_json(),
                   "alpha_history": r.alpha_history,
                   "fault": r.fault} for r in self.runs]
        if not self.stacked:
            return {k: v for k, v in states[0].items() if k != "fault"}
        return {"seeds": [r.seed for r in self.runs], "searches": states}

    def refuse_other_seeds(self, client: dict) -> str | None:
        theirs = client.get("seeds")
        ours = [r.seed for r in self.runs] if self.stacked else None
        return None if theirs == ours else f"checkpoint is from seeds {theirs}, config says {ours}"

    def restore(self, client: dict | None) -> None:
        """From a checkpoint's client state (None: a fresh start, which writes each seed's config). The
        seed directories are made here, once a checkpoint (if any) was accepted."""
        if self.stacked:
            if self.run.is_main:
                for r in self.runs:
                    (r.dir / "genotypes").mkdir(parents=True, exist_ok=True)
            barrier()  # every rank may write its own alphas.rank<r>.jsonl there (log.all_ranks)
        if client is not None:
            states = client["searches"] if self.stacked else [client]
            for r, st in zip(self.runs, states):
                r.train.load_state_dict(st["train_loader"])
                r.valid.load_state_dict(st["valid_loader"])
                r.alpha_history, r.fault = list(st["alpha_history"]), st.get("fault")
        elif self.stacked and self.run.is_main:
            for r in self.runs:
                atomic_write(r.dir / "config.yaml", dump(r.cfg))
        for r in self.runs:
            if self.stacked:
                r.metrics.truncate_after(self.run.step)
            r.logs.scores.truncate_after(self.run.step)
            main = self.run.is_main
            r.logs.alphas.rewrite(r.alpha_history if main else r.alpha_history[1:] if client else [])

    def finish(self, summary: dict) -> dict:
        """Each search's genotype.json and (stacked) summary.json; returns the run's summary."""
        per = {r.seed: self._outcome(r, summary) for r in self.runs}
        if not self.stacked:
            return per[self.first.seed]
        if self.run.is_main:
            totals = self.run.totals() | {"batched_seeds": self.cfg.seeds}
            for r in self.runs:
                ips = [m["images_per_s"] for m in r.metrics.read() if m.get("images_per_s")]
                rec = per[r.seed] | totals | {"seed": r.seed, "images_per_s": sum(ips) / len(ips) if ips else None}
                atomic_write(r.dir / "summary.json", json.dumps(rec, indent=2) + "\n")
        return summary | {"seeds": self.cfg.seeds, "searches": {
            str(s): {k: v for k, v in rec.items() if k in ("genotype", "nb201", "numerical_fault")}
            for s, rec in per.items()}}

    def _outcome(self, r: SeedRun, summary: dict) -> dict:
        """Search r's summary: its fault, or its genotype (saved as genotype.json) and NB201 scores."""
        if r.fault is not None:
            return summary | {"numerical_fault": r.fault}
        g = r.genotype or self.net(r.index, weights=False).genotype()
        out = {"genotype": g.to_json()} | summary
        if self.cfg.nb201_table and g.space == "nb201":
            from sdarts.nasbench201.table import lookup
            out["nb201"] = lookup(g, self.cfg.nb201_table)
        if self.run.is_main:
            G.save(g, r.dir / "genotype.json")
        return out


def _stacked(iterators: list[Iterator[Batch]]) -> Iterator[Batch]:
    """One batch of every seed's stream, stacked along a leading seed axis."""
    for batches in zip(*iterators):
        yield Batch(torch.stack([b.x for b in batches]), torch.stack([b.y for b in batches]),
                    torch.stack([b.ids for b in batches]))


def alpha_record(model, step: int, epoch: int) -> dict:
    """One `alphas.jsonl` line: the activated edge weights of every cell type."""
    probs = model.arch.probabilities()
    return {"step": step, "epoch": epoch, "activation": model.arch.activation, "ops": list(model.op_names),
            "edges": list(model.edge_names), "weights": {k: v.tolist() for k, v in probs.items()}}


class SearchLogs:
    """One search's own files beside `metrics.jsonl`: `alphas.jsonl` (rank r > 0 writes
    `alphas.rank<r>.jsonl` with log.all_ranks, so a multi-rank run can be checked for identical alpha
    everywhere), `nb201_scores.jsonl`, `genotypes/epoch_NNN.json`, and the epoch's log line."""

    def __init__(self, run: Run, cfg: SearchConfig, run_dir: Path, stacked: bool):
        self.run, self.cfg, self.dir = run, cfg, run_dir
        self.tag = f"seed {cfg.seed} " if stacked else ""
        name = "alphas.jsonl" if run.is_main else f"alphas.rank{run.rank}.jsonl"
        self.alphas = JsonlLog(run_dir / name, run.logs_here)
        self.scores = JsonlLog(run_dir / "nb201_scores.jsonl", run.is_main and cfg.nb201_table is not None)

    def epoch_end(self, epoch: int, genotype: G.Genotype, alphas: dict) -> None:
        self.alphas.append(alphas)
        run, cfg = self.run, self.cfg
        if not run.is_main:
            return
        G.save(genotype, self.dir / "genotypes" / f"epoch_{epoch + 1:03d}.json")
        line = f"{self.tag}epoch {epoch + 1}/{cfg.epochs} genotype {genotype}"
        if cfg.nb201_table and genotype.space == "nb201":
            from sdarts.nasbench201.table import lookup
            acc = lookup(genotype, cfg.nb201_table)
            self.scores.append({"step": run.step, "epoch": epoch + 1, "arch": genotype.to_arch_str(),
                                "elapsed_s": round(time.time() - run.t_start, 3), **acc})
            line += f" | NB201 cifar10 test {acc['cifar10_test']:.2f}"
            if run.tb:
                run.tb.add_scalar(f"nb201/cifar10_test{'/' + self.tag.strip() if self.tag else ''}",
                                  acc["cifar10_test"], epoch + 1)
        log.info(line)
