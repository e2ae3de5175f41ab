"""Retrain checkpoints: the last one (DeepSpeed, atomic `latest`) and the best one (weights only).

Last: `checkpoints/<tag>/` written by every rank through DeepSpeed (weights, optimizer momentum,
client state: epoch, step, loader position, RNG, EMA, best score), then a barrier, then rank 0 moves
`checkpoints/latest` by temp file + rename and only afterwards deletes checkpoints beyond `keep`, so a
kill at any moment leaves `latest` naming a complete checkpoint (the search engine's rule, one
implementation: `sdarts.engine.save_atomic`). Loading first checks every file with
`torch.load(weights_only=True)` (`sdarts.engine.verify_safe`), because DeepSpeed's loader unpickles
arbitrary objects.

Best: `checkpoints/best.pt`, a plain `{"module": state_dict, ...}` file (loadable with
`torch.load(weights_only=True)`, no DeepSpeed needed) written by rank 0 with temp file + rename.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from sdarts.engine import CheckpointSaveError, load_latest, save_atomic


def save_last(engine, ckpt_dir: Path, tag: str, client_state: dict, keep: int) -> None:
    save_atomic(engine, ckpt_dir, tag, client_state, keep)


def load_last(engine, ckpt_dir: Path, genotype_json: dict) -> dict | None:
    """Loads the checkpoint named by `latest` (None when there is none); refuses another genotype's."""
    def refuse(client: dict) -> str | None:
        if client.get("kind") != "retrain":
            return "not a retrain checkpoint"
        if client.get("genotype") != genotype_json:
            return "checkpoint was trained with another genotype than --genotype"
        return None

    return load_latest(engine, ckpt_dir, "network", refuse)


def save_best(path: Path, state_dict: dict, meta: dict) -> None:
    """Rank 0 only: weights (fp32, CPU) plus metadata, atomically (a failed write keeps the old file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({"module": {k: v.detach().cpu() for k, v in state_dict.items()}, **meta}, tmp)
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as a bare RuntimeError
        tmp.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointSaveError(f"{path} not saved: {first}; the previous {path.name} is kept") from None
