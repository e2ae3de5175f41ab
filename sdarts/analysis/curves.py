"""A run directory's logs as arrays: alpha probabilities per epoch, NB201 scores per epoch, and the
analysis records. Data only (no matplotlib), so tests and notebooks can use it directly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL log; a torn last line (a killed run) ends the read."""
    out = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


@dataclass
class AlphaCurves:
    """Activated alpha weights over the search: `weights[cell_type]` is [epochs+1, edges, ops]
    (row 0 = the initialisation), `epochs` the matching epoch numbers."""
    activation: str
    ops: list[str]
    edges: list[str]
    epochs: np.ndarray
    weights: dict[str, np.ndarray]


def alpha_curves(run_dir: Path) -> AlphaCurves:
    recs = read_jsonl(Path(run_dir) / "alphas.jsonl")
    if not recs:
        raise FileNotFoundError(f"{Path(run_dir) / 'alphas.jsonl'}: no alpha records (not a search run directory?)")
    by_epoch: dict[int, dict] = {}
    for r in recs:
        by_epoch[int(r["epoch"])] = r  # a resumed run may repeat an epoch; keep the last
    epochs = sorted(by_epoch)
    first = by_epoch[epochs[0]]
    weights = {k: np.array([by_epoch[e]["weights"][k] for e in epochs], dtype=float) for k in first["weights"]}
    return AlphaCurves(first["activation"], list(first["ops"]), list(first["edges"]), np.array(epochs), weights)


def nb201_curves(run_dir: Path) -> dict[str, np.ndarray]:
    """{'epoch': [...], 'arch': [...], '<column>': [...]} from `nb201_scores.jsonl` (empty when absent)."""
    by_epoch: dict[int, dict] = {}
    for r in read_jsonl(Path(run_dir) / "nb201_scores.jsonl"):
        by_epoch[int(r["epoch"])] = r
    if not by_epoch:
        return {}
    epochs = sorted(by_epoch)
    out: dict[str, np.ndarray] = {"epoch": np.array(epochs), "arch": np.array([by_epoch[e]["arch"] for e in epochs])}
    for key in by_epoch[epochs[0]]:
        if key not in ("step", "epoch", "arch"):
            out[key] = np.array([by_epoch[e][key] for e in epochs], dtype=float)
    return out


def grad_corr_curves(run_dir: Path, which: str = "same_step") -> dict:
    """Eq. 8 per edge over steps: {'step': [...], 'epoch': [...], 'edges': {'cell/edge': [...]},
    'mean': [...]} (cosines; NaN where undefined) from `analysis.jsonl`."""
    recs = [r for r in read_jsonl(Path(run_dir) / "analysis.jsonl")
            if r.get("kind") == "grad_corr" and r.get(which)]
    out: dict = {"step": np.array([r["step"] for r in recs]), "epoch": np.array([r["epoch"] for r in recs]),
                 "edges": {}, "mean": np.array([np.nan if r[which]["mean_cos"] is None else r[which]["mean_cos"]
                                                for r in recs], dtype=float)}
    for k, r in enumerate(recs):
        for cell, c in r[which]["cells"].items():
            for edge, e in c["edges"].items():
                arr = out["edges"].setdefault(f"cell {cell} / {edge}", np.full(len(recs), np.nan))
                arr[k] = np.nan if e["cos"] is None else e["cos"]
    return out


def dldp_curves(run_dir: Path, cell: str = "total") -> dict:
    """dL/dp over steps: {'step': [...], 'ops': [...], 'edges': [...], 'values': [steps, edges, ops]}."""
    recs = [r for r in read_jsonl(Path(run_dir) / "analysis.jsonl") if r.get("kind") == "dl_dp"]
    if not recs:
        return {}
    vals = [r["total"] if cell == "total" else r["cells"][cell] for r in recs]
    return {"step": np.array([r["step"] for r in recs]), "ops": recs[0]["ops"], "edges": recs[0]["edges"],
            "values": np.array(vals, dtype=float)}


# --- retrain runs (`retrain/train.py`): metrics.jsonl, summary.json, checkpoints/best.pt -----------------

#: evaluation splits of a retrain's metrics.jsonl, in legend order: the holdout carved from the training
#: data (selects the checkpoint) and the test/val set ("eval"), each for the model and its EMA
EVAL_SPLITS = ("holdout", "holdout_ema", "eval", "eval_ema")


def _read_dict(path: Path, parse, errors) -> dict | None:
    """A file parsed to a mapping; None when it is absent, does not parse or is not a mapping."""
    try:
        d = parse(path.read_text()) if path.exists() else None
    except errors:
        return None
    return d if isinstance(d, dict) else None


def run_kind(run_dir: Path) -> str:
    """'search' (it logs `alphas.jsonl`; its config has `strategy`) or 'retrain' (no `alphas.jsonl`; its
    `config.yaml` has the retrain-only keys `ema` and `loss`); anything else is a `RunDirError`."""
    import yaml
    from sdarts.errors import RunDirError
    run_dir = Path(run_dir)
    if (run_dir / "alphas.jsonl").exists():
        return "search"
    cfg = _read_dict(run_dir / "config.yaml", yaml.safe_load, yaml.YAMLError) or {}
    if "strategy" in cfg:
        return "search"
    if "ema" in cfg and "loss" in cfg:
        return "retrain"
    raise RunDirError(f"{run_dir}: neither a search run (alphas.jsonl) nor a retrain run "
                      f"(config.yaml with retrain keys ema/loss)")


@dataclass
class Selection:
    """The epoch whose weights a retrain keeps (1-based: epochs done), where it came from, and its legend."""
    epoch: int
    source: str          # 'model' | 'ema'
    on: str              # the split that chose it: 'holdout' | 'eval' (the test/val set)
    label: str

    @property
    def split(self) -> str:
        """The metrics split whose curve the selection was read from."""
        return self.on + ("_ema" if self.source == "ema" else "")


@dataclass
class RetrainCurves:
    """A retrain run's logs as arrays.

    `steps`: every logged training step ('step', 'epoch' (0-based), 'loss', 'acc', 'lr', 'drop_path');
    `epochs`: per epoch k (1-based, as the evaluation records count) the mean training loss and accuracy
    of its logged steps and its lr and drop-path; `evals[split]`: 'epoch', 'step', 'loss', 'top1',
    'top5' per evaluation split present; `selection`: the marked epoch, or None with `unmarked` saying why;
    `final`: summary.json's final test score of the selected weights, when there is one."""
    steps: dict[str, np.ndarray]
    epochs: dict[str, np.ndarray]
    evals: dict[str, dict[str, np.ndarray]]
    selection: Selection | None
    unmarked: str
    finished: bool
    final: dict | None = None


def _by_key(recs: list[dict], key) -> list[dict]:
    """Records deduplicated on `key(r)` (a resumed run may repeat one; the last wins), sorted by it."""
    out = {key(r): r for r in recs}
    return [out[k] for k in sorted(out)]


def _train_arrays(recs: list[dict]) -> tuple[dict, dict]:
    recs = _by_key([r for r in recs if r.get("split") == "train" and r.get("rank", 0) == 0], lambda r: r["step"])
    steps = {"step": np.array([r["step"] for r in recs], dtype=int),
             "epoch": np.array([r["epoch"] for r in recs], dtype=int),
             "loss": np.array([r["loss"] for r in recs], dtype=float),
             "acc": np.array([r["acc"] for r in recs], dtype=float),
             "lr": np.array([r.get("lr_w", np.nan) for r in recs], dtype=float),
             "drop_path": np.array([r.get("drop_path", np.nan) for r in recs], dtype=float)}
    ep0 = np.unique(steps["epoch"])
    epochs = {"epoch": ep0 + 1}
    for k in ("loss", "acc"):
        epochs[k] = np.array([steps[k][steps["epoch"] == e].mean() for e in ep0], dtype=float)
    for k in ("lr", "drop_path"):  # set once per epoch: the epoch's first logged step has it
        epochs[k] = np.array([steps[k][steps["epoch"] == e][0] for e in ep0], dtype=float)
    return steps, epochs


def _eval_arrays(recs: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    evals = {}
    for split in EVAL_SPLITS:
        rs = _by_key([r for r in recs if r.get("split") == split], lambda r: r["epoch"])
        if rs:
            evals[split] = {k: np.array([r[k] for r in rs], dtype=int if k in ("epoch", "step") else float)
                            for k in ("epoch", "step", "loss", "top1", "top5")}
    return evals


def _selection(d: dict | None, default_on: str, what: str) -> Selection | None:
    """A Selection from a `selected`/`best` dict (summary.json or best.pt's metadata); None before any
    evaluation (`best` starts at epoch 0)."""
    if not isinstance(d, dict) or int(d.get("epoch") or 0) < 1:
        return None
    source, on = d.get("source", "model"), d.get("on", default_on)
    where = "the holdout" if on == "holdout" else "the test set"
    return Selection(int(d["epoch"]), source, on,
                     f"{what}: epoch {d['epoch']} ({'EMA' if source == 'ema' else 'model'} weights, chosen on {where})")


def _best_pt_meta(path: Path) -> dict | None:
    """best.pt's metadata (its tensors memory-mapped, not read): the selection of a running run."""
    if not path.exists():
        return None
    import torch
    try:
        meta = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - a torn or foreign file: no marker, not a failed plot
        return None
    if not isinstance(meta, dict):
        return None
    # {"module", "genotype", "selected": {...}}; before the holdout: {"module", "genotype", **best}
    return meta["selected"] if isinstance(meta.get("selected"), dict) else meta


def retrain_curves(run_dir: Path) -> RetrainCurves:
    """A retrain run directory's curves; the selected epoch from summary.json's `selected`, else its `best`
    (older runs: chosen on the test set), else checkpoints/best.pt (a running run), else unmarked."""
    run_dir = Path(run_dir)
    recs = read_jsonl(run_dir / "metrics.jsonl")
    if not recs:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'}: no metrics records yet (nothing to plot)")
    steps, epochs = _train_arrays(recs)
    summary = _read_dict(run_dir / "summary.json", json.loads, json.JSONDecodeError)
    finished = summary is not None
    sel, unmarked = None, ""
    if finished and summary.get("selected"):
        sel = _selection(summary["selected"], "holdout", "selected")
    elif finished and summary.get("best"):
        sel = _selection(summary["best"], "eval", "best")
    else:
        meta = _best_pt_meta(run_dir / "checkpoints" / "best.pt")
        sel = _selection(meta, "eval", f"{'selected' if meta and 'on' in meta else 'best'} so far (best.pt)")
        if sel is None:
            unmarked = "no selected epoch yet (no summary.json, no readable checkpoints/best.pt)"
    if sel is None and not unmarked:
        unmarked = "no selected epoch in summary.json"
    return RetrainCurves(steps, epochs, _eval_arrays(recs), sel, unmarked, finished,
                         summary.get("final") if finished else None)
