"""Shared test fixtures: where `../shared` data lives, and skips that say why."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SDARTS_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
PYTHON = sys.executable

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def need_data(*parts: str) -> Path:
    """Path under ../shared/data, or a skip naming what is missing (a user's clone has no ../shared)."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs {p} (the shared data folder beside the repo); absent here")
    return p


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None, cwd: Path = ROOT
            ) -> subprocess.CompletedProcess:
    """Runs a command of this repo (e.g. ['launcher/search.py', ...]) with this interpreter."""
    # the repo first, then whatever the caller's path held (the GPU check puts carried wheels there)
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
             PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    # a test that set up DeepSpeed in this process left its rendezvous in the environment; children
    # must make their own or they collide on the port
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(env or {})
    return subprocess.run([PYTHON, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def deepspeed_cmd() -> str:
    return str(Path(PYTHON).parent / "deepspeed")


@pytest.fixture
def shared_data() -> Path:
    if not DATA.exists():
        pytest.skip(f"needs {DATA} (the shared data folder beside the repo); absent here")
    return DATA
