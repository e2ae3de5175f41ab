"""Process-group set-up for one process or many (deepspeed launcher, torchrun, SLURM).

A single `python launcher/search.py` has no RANK/WORLD_SIZE; DeepSpeed would then try MPI discovery
(and ask for mpi4py), so one-process runs get a loopback rendezvous of their own.
"""
from __future__ import annotations

import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_env() -> None:
    """Fills RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* for a lone process; maps SLURM variables when present."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ \
            and int(os.environ["SLURM_NTASKS"]) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")


def init(device: str = "auto") -> tuple[int, int, int, torch.device]:
    """Initialises the process group; returns (rank, local_rank, world_size, device)."""
    setup_env()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    # Only used for inference all-reduce on CPU; compiling it costs ~45 s at the first initialize.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import deepspeed.comm as dist
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    return rank, local_rank, world, dev


def barrier() -> None:
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def all_agree(flag: bool) -> bool:
    """True on every rank if any rank's flag is True (a preemption signal seen by one rank stops all)."""
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t)
    return bool(t.item() > 0)
