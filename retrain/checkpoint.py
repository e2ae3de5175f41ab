"""Retrain checkpoints: the last one (DeepSpeed, atomic `latest`) and the best one (weights only).

Last: `checkpoints/<tag>/` written by every rank through DeepSpeed (weights, optimizer momentum,
client state: epoch, step, loader position, RNG, EMA, best score), then a barrier, then rank 0 moves
`checkpoints/latest` by temp file + rename and only afterwards deletes checkpoints beyond `keep`, so a
kill at any moment leaves `latest` naming a complete checkpoint (the search engine's rule).

Best: `checkpoints/best.pt`, a plain `{"module": state_dict, ...}` file (loadable with
`torch.load(weights_only=True)`, no DeepSpeed needed) written by rank 0 with temp file + rename.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from sdarts.distributed import barrier
from sdarts.engine import CheckpointError


def save_last(engine, ckpt_dir: Path, tag: str, client_state: dict, keep: int) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    barrier()
    if engine.global_rank == 0:
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
        for old in tags[:-keep]:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier()


def load_last(engine, ckpt_dir: Path, genotype_json: dict) -> dict | None:
    """Loads the checkpoint named by `latest` (None when there is none); refuses another genotype's."""
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{ckpt_dir / tag}: checkpoint named by {latest} is missing")
    try:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
    except (RuntimeError, KeyError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt_dir / tag}: not a checkpoint of this network ({first[:200]})") from None
    if client is None:
        raise CheckpointError(f"{ckpt_dir / tag}: checkpoint could not be read")
    if client.get("kind") != "retrain":
        raise CheckpointError(f"{ckpt_dir / tag}: not a retrain checkpoint")
    if client.get("genotype") != genotype_json:
        raise CheckpointError(f"{ckpt_dir / tag}: checkpoint was trained with another genotype than --genotype")
    return client


def save_best(path: Path, state_dict: dict, meta: dict) -> None:
    """Rank 0 only: weights (fp32, CPU) plus metadata, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"module": {k: v.detach().cpu() for k, v in state_dict.items()}, **meta}, tmp)
    os.replace(tmp, path)
