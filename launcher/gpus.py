"""GPU profiles (`configs/gpus/<name>.yaml`): how much memory a device has and what it can compute.

A profile is data, not code: adding a GPU is adding a YAML file. Together with the calibration table
(`configs/calibration.yaml`, see `launcher/memory.py`) it is the single source of truth the planner
reads; nothing about a device is hard-coded elsewhere.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field

from sdarts.config import _Strict, build, read_yaml
from sdarts.errors import ConfigError

PROFILE_DIR = Path(__file__).resolve().parents[1] / "configs" / "gpus"
MIB = 1 << 20


class GpuProfile(_Strict):
    name: str
    #: 'gpu' profiles use the calibration table's gpu entries, 'cpu' its cpu entries
    kind: Literal["gpu", "cpu"] = "gpu"
    description: str = ""
    #: total device memory in MiB as nvidia-smi reports it; 'auto' (cpu only) = this machine's MemAvailable
    memory_mib: Union[int, Literal["auto"]]
    #: memory the process holds outside torch's allocator (CUDA context, cuDNN/cuBLAS handles)
    context_mib: int = Field(default=0, ge=0)
    #: precisions the device runs (Turing and Volta have no bf16)
    precisions: list[Literal["fp32", "bf16", "fp16"]]
    #: dense peak throughput per precision (tensor cores where they apply), for estimates only
    peak_tflops: dict[str, float] = {}
    memory_bandwidth_gbs: Optional[float] = None

    def memory_bytes(self) -> int:
        if self.memory_mib == "auto":
            return _mem_available()
        return int(self.memory_mib) * MIB

    def usable_bytes(self, margin: float) -> int:
        """Bytes a training process may allocate: total minus context, minus `margin` of the rest
        (the caching allocator's fragmentation: reserved memory exceeds allocated memory)."""
        return int((self.memory_bytes() - self.context_mib * MIB) * (1.0 - margin))

    def pick_precision(self, wanted: str) -> str:
        """The job's precision if the device runs it; else the low precision it has (bf16 -> fp16 on
        Turing/Volta, fp16 -> bf16 on CPUs), else fp32."""
        if wanted in self.precisions:
            return wanted
        if wanted in ("bf16", "fp16"):
            for alt in ("fp16", "bf16"):
                if alt in self.precisions:
                    return alt
        return "fp32"


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def names(profile_dir: Path = PROFILE_DIR) -> list[str]:
    return sorted(p.stem for p in profile_dir.glob("*.yaml"))


def load(name_or_path: str, profile_dir: Path = PROFILE_DIR) -> GpuProfile:
    """A profile by name (`2080ti`) or by path to a YAML file."""
    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") and p.is_file()):
        p = profile_dir / f"{name_or_path}.yaml"
    if not p.is_file():
        raise ConfigError(f"unknown GPU profile {name_or_path!r} (known: {', '.join(names(profile_dir))}; "
                          f"or give a path to a YAML profile)")
    return build(GpuProfile, read_yaml(p), source=str(p))
