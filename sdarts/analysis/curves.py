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
