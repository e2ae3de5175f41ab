"""What a run actually ran on: the `run` block of `summary.json` and the first log line of every run.

`data.backend: auto` picks DALI when it imports and the torch loader otherwise, DALI decodes on the CPU
or the GPU, and the precision, world size and batch are resolved at start: two runs that read data
differently must say so. The block (search and retrain alike):

    {"data_backend": "memory" | "torch" | "dali", "dali_device": "cpu" | "gpu" | null,
     "device": "<name>", "device_type": "cpu" | "cuda", "world_size": N, "precision": "fp32" | ...,
     "versions": {"python", "torch", "deepspeed", "dali", "timm"}, "git_commit": "<sha>[+dirty]" | null,
     "global_batch": N, "lr": {"w": ..., ["alpha": ...]}}

`memory`: the in-memory CIFAR/digits/synthetic loader (`sdarts.data.loader.TensorLoader`), augmented on
the training device.
"""
from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"torch": "torch", "deepspeed": "deepspeed", "dali": "nvidia-dali-cuda130", "timm": "timm"}


def data_backend(loader) -> tuple[str, str | None]:
    """(backend, DALI device) of a loader: every loader class names its backend (`DaliLoader.device` is
    "cpu" or "gpu")."""
    backend = loader.backend
    return backend, str(loader.device) if backend == "dali" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for key, dist in PACKAGES.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def git_commit(repo: Path = REPO) -> str | None:
    """The commit of the code that runs, `+dirty` when it has uncommitted changes; None outside git."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def provenance(loader, device: torch.device, world: int, precision: str, global_batch: int, lr: dict) -> dict:
    backend, dali_device = data_backend(loader)
    return {"data_backend": backend, "dali_device": dali_device, "device": device_name(device),
            "device_type": device.type, "world_size": world, "precision": precision, "versions": versions(),
            "git_commit": git_commit(), "global_batch": global_batch, "lr": lr}


def describe(p: dict) -> str:
    """The one log line a run starts with."""
    data = p["data_backend"] + (f" ({p['dali_device']})" if p["dali_device"] else "")
    v = p["versions"]
    libs = ", ".join(f"{k} {v[k] or '-'}" for k in ("torch", "deepspeed", "dali", "timm"))
    lr = ", ".join(f"lr_{k} {x:.4g}" for k, x in p["lr"].items())
    return (f"run: data {data} | {p['device']} ({p['device_type']}) x{p['world_size']} | {p['precision']} | "
            f"global batch {p['global_batch']}, {lr} | {libs} | commit {p['git_commit'] or '-'} | "
            f"python {v['python']} {sys.platform}")
