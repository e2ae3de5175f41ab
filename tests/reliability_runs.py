"""Shared pieces of the reliability tests (tests/test_reliability_*.py, docs/reliability.md).

Every fault test compares against one uninterrupted run of the same settings, and every bad-input
test checks that an existing run directory is left byte-for-byte untouched. Those finished runs cost
a real CLI run each (~10-20 s on a 2-core CPU), so they are made once per pytest session, under the
session's base temp directory, and only ever copied, never changed, by the tests.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import torch

from conftest import PYTHON, ROOT, need_data

#: the search under test: configs/search/smoke.yaml (NB201, 4 steps an epoch, 2 epochs, a checkpoint
#: every 2 steps, keep 2), TensorBoard off so the run directory holds only deterministic files
SEARCH = ["launcher/search.py", "--config", "configs/search/smoke.yaml", "--set", "log.progress=false",
          "--set", "log.tensorboard=false"]


def retrain_cmd() -> list[str]:
    """A seconds-long CIFAR retrain: 3 cells of 4 channels, 90 images of which the default holdout takes
    1 per class, so 80 train: 5 steps an epoch, 2 epochs, a checkpoint every 2 steps (and at epoch
    ends), an EMA of the weights selected on the holdout."""
    npz = need_data("cifar10-subset", "cifar10_subset.npz")
    return ["launcher/retrain.py", "--config", "configs/retrain/cifar10.yaml", "--genotype", "darts_v2",
            "--set", f"data.root={npz}", "--set", "epochs=2", "--set", "model.layers=3", "--set", "model.C=4",
            "--set", "data.max_per_split=90", "--set", "data.micro_batch=16", "--set", "checkpoint.every_steps=2",
            "--set", "ema.decay=0.9", "--set", "log.progress=false", "--set", "log.tensorboard=false",
            "--set", "log.every_steps=1"]


def env(**extra: str) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "SDARTS_TEST_FAULT"):
        e.pop(k, None)
    e.update(extra)
    return e


def run(args: list[str], fault: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """One CLI process; `fault` sets SDARTS_TEST_FAULT (see sdarts.checkpoint.fault_point)."""
    extra = {"SDARTS_TEST_FAULT": fault} if fault else {}
    return subprocess.run([PYTHON, *args], cwd=ROOT, env=env(**extra), capture_output=True, text=True,
                          timeout=timeout)


def _finished(factory, name: str, args: list[str]) -> Path:
    base = factory.getbasetemp() / "reliability_finished"
    out = base / name
    if not (out / "summary.json").exists():
        base.mkdir(exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        r = run([*args, "--run-dir", str(out)])
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def finished_search(factory) -> Path:
    """The uninterrupted reference search (made once per session; do not modify it)."""
    return _finished(factory, "search", SEARCH)


def finished_retrain(factory) -> Path:
    """The uninterrupted reference retrain (made once per session; do not modify it)."""
    return _finished(factory, "retrain", retrain_cmd())


def tree(path: Path) -> dict[str, tuple]:
    """Every entry under `path`: files by (size, sha256, mtime_ns), directories by name; a changed,
    added, removed or even rewritten-with-the-same-bytes file changes it."""
    out: dict[str, tuple] = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_dir():
            out[rel] = ("dir",)
        else:
            st = p.stat()
            out[rel] = (st.st_size, hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
    return out


def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith("error:")]


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def state(run_dir: Path, tag: str | None = None) -> dict:
    """The rank-0 DeepSpeed model-states file of `tag` (default: the one `latest` names)."""
    tag = tag or latest(run_dir)
    return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=True)


def assert_same_tensors(a, b, where: str = "") -> None:
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def jsonl(path: Path, drop: tuple[str, ...] = ("images_per_s", "elapsed_s")) -> list[dict]:
    """A JSONL log without its timing fields (the only ones that differ between equal runs)."""
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in path.read_text().splitlines()]


KILLED = -signal.SIGKILL
