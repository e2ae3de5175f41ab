"""The memory model: one training step needs `fixed + per_sample * micro_batch` bytes.

`fixed` is what does not grow with the batch (weights, gradients, optimizer state, workspaces, and on
a CPU the interpreter and libraries); `per_sample` is what does (the activations autograd keeps for
the backward, and the backward's transient buffers). Both depend on the job config (network, input
resolution, strategy) and the precision, and are stored per job, device kind and precision in
`configs/calibration.yaml`, which with the GPU profiles is the single source of truth the planner
reads. Each entry says where, when and how it was obtained:

- `source: measured`: `plan.py --probe` ran real steps at growing micro-batches on the device, each in
  a fresh process, read the peak (GPU: max allocated; CPU: peak RSS) and fitted the two numbers by
  least squares (`fit`). It prints the entry as YAML, ready to paste.
- `source: derived`: for GPUs we cannot measure here. per_sample = (activation bytes autograd saves
  per sample at that precision, counted from the network's tensors) x (measured CPU fp32 per-sample
  slope / counted fp32 bytes), i.e. the counted activations scaled by the overhead the CPU probe
  showed on top of them; fixed = 16 bytes per parameter (weights, gradients, SGD momentum, fp16
  copies) + a workspace allowance. See `derive`.
- `source: published`: a constraint someone reported from real hardware (a paper's "batch X did not fit,
  Y did" on a named GPU), turned into the two numbers: per_sample is a value inside the bracket the
  report implies under the planner's own budget formula, fixed the derived formula for the reported
  network. Only under `gpu_profiles`, because such a report is about one GPU model.

Which entry a plan uses (`lookup`): for a GPU profile, a measured entry for that profile, else a
published one for that profile (`gpu_profiles.<profile>.<precision>`, a list), else the generic
`memory.gpu.<precision>` entry (derived today); CPUs use `memory.cpu.<precision>`.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, field_validator

from sdarts.config import _Strict, build, read_yaml
from sdarts.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "configs" / "calibration.yaml"
MIB = 1 << 20
#: bytes per parameter a derived GPU entry reserves: fp32 weights 4 + fp32 grads 4 + SGD momentum 4 +
#: low-precision weight copies or fp32 master weights 4 (DeepSpeed's fp16 mode needs all of them)
BYTES_PER_PARAM = 16
#: cuDNN / cuBLAS workspaces, allocated through torch's allocator during convolutions and matmuls
WORKSPACE_MIB = 256
#: profile-specific entries (`gpu_profiles`), best first: a measurement with this code beats a
#: published report; both beat the generic derived `memory.gpu` entry
SOURCE_ORDER = ("measured", "published")


@dataclass(frozen=True)
class MemoryModel:
    fixed_bytes: int
    per_sample_bytes: int

    def bytes_at(self, micro_batch: int) -> int:
        return self.fixed_bytes + self.per_sample_bytes * micro_batch

    def max_micro_batch(self, budget_bytes: int) -> int:
        """Largest micro-batch whose step fits in `budget_bytes` (0 when not even one sample fits)."""
        if self.per_sample_bytes <= 0:
            raise ValueError("memory model: per_sample_bytes must be positive")
        return max(0, (budget_bytes - self.fixed_bytes) // self.per_sample_bytes)


def fit(points: list[tuple[int, int]]) -> MemoryModel:
    """Least-squares line through (micro_batch, peak_bytes) points; needs two distinct micro-batches."""
    xs = [float(b) for b, _ in points]
    ys = [float(m) for _, m in points]
    n = len(points)
    if len(set(xs)) < 2:
        raise ValueError("memory fit needs peaks at two or more different micro-batches")
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if slope <= 0:
        raise ValueError(f"memory fit: peak memory does not grow with the micro-batch ({points}); "
                         f"probe larger micro-batches")
    return MemoryModel(int(round(my - slope * mx)), int(round(slope)))


# -- the calibration table ------------------------------------------------------------------------
class MemoryEntry(_Strict):
    fixed_bytes: int = Field(ge=0)
    per_sample_bytes: int = Field(gt=0)
    source: Literal["measured", "derived", "published"]
    #: the machine (measured), the basis (derived) or the publication and its hardware (published)
    where: str
    when: str
    how: str
    #: measured (micro_batch, peak_bytes) pairs behind a fit
    points: list[tuple[int, int]] = []
    #: the cell this entry was made with, where it is not the job's `genotype` (a published entry
    #: measured with the paper's own network)
    genotype: Optional[str] = None

    def model(self) -> MemoryModel:
        return MemoryModel(self.fixed_bytes, self.per_sample_bytes)


class JobCalibration(_Strict):
    #: the global batch the config's optim.w.lr was tuned for (retrain configs carry their own
    #: optim.w.reference_batch, which wins)
    reference_global_batch: Optional[int] = Field(default=None, gt=0)
    #: the memory-relevant settings the entries were made with (launcher.job.Job.shape)
    shape: dict[str, Any] = {}
    #: retrain jobs: the genotype the entries were made with
    genotype: Optional[str] = None
    memory: dict[Literal["gpu", "cpu"], dict[Literal["fp32", "bf16", "fp16"], MemoryEntry]] = {}
    #: entries for one GPU profile (`configs/gpus/<name>.yaml`) and precision, measured or published;
    #: they win over the generic `memory.gpu` entry for that profile (see SOURCE_ORDER)
    gpu_profiles: dict[str, dict[Literal["fp32", "bf16", "fp16"], list[MemoryEntry]]] = {}

    @field_validator("gpu_profiles")
    @classmethod
    def _measured_or_published(cls, v):
        for name, precs in v.items():
            for prec, entries in precs.items():
                for e in entries:
                    if e.source not in SOURCE_ORDER:
                        raise ValueError(f"gpu_profiles.{name}.{prec}: source {e.source!r} belongs under "
                                         f"memory.gpu (profile entries are {' or '.join(SOURCE_ORDER)})")
        return v


class CalibrationTable(_Strict):
    jobs: dict[str, JobCalibration]


def load_table(path: str | Path = CALIBRATION) -> CalibrationTable:
    return build(CalibrationTable, read_yaml(path), source=str(path))


def lookup(table: CalibrationTable, job, device_kind: str, precision: str, path: str | Path = CALIBRATION,
           profile: str | None = None) -> tuple[MemoryModel, MemoryEntry, str]:
    """The memory model for `job` on `device_kind` at `precision`, its entry and the entry's key in
    the table. For a GPU `profile`: a measured entry for that profile, else a published one, else the
    generic `memory.gpu` entry. A missing or mismatched entry is one ConfigError line saying how to
    make one."""
    probe = f"python launcher/plan.py --probe --job {job.path}"
    cal = table.jobs.get(job.name)
    if cal is None:
        raise ConfigError(f"{path}: no calibration for job {job.name!r}; run `{probe}` and paste its output")
    shape = job.shape()
    for key, value in cal.shape.items():
        if key in shape and shape[key] != value:
            raise ConfigError(f"{path}: calibration of {job.name!r} was made with {key}={value!r}, the job has "
                              f"{key}={shape[key]!r}; run `{probe}` for this network")
    if device_kind == "gpu" and profile is not None:
        candidates = cal.gpu_profiles.get(profile, {}).get(precision, [])
        for source in SOURCE_ORDER:
            for e in candidates:
                if e.source == source:
                    return e.model(), e, f"gpu_profiles.{profile}.{precision}"
    entry = cal.memory.get(device_kind, {}).get(precision)
    if entry is None:
        have = [f"{d}/{p}" for d, ps in cal.memory.items() for p in ps] + \
               [f"{n}/{p}" for n, ps in cal.gpu_profiles.items() for p in ps]
        raise ConfigError(f"{path}: no {device_kind} calibration of {job.name!r} at {precision} "
                          f"(have: {', '.join(have) or 'none'}); run `{probe}` on such a device")
    return entry.model(), entry, f"memory.{device_kind}.{precision}"


def per_sample_bracket(budget_bytes: int, fixed_bytes: int, fits: int, does_not_fit: int) -> tuple[int, int]:
    """The per-sample bytes a report "`fits` samples fit, `does_not_fit` did not" implies under
    `budget_bytes` with `fixed_bytes`: every integer p with low < p <= high (for a published entry)."""
    room = budget_bytes - fixed_bytes
    if room <= 0 or not 0 < fits < does_not_fit:
        raise ValueError(f"no per-sample bracket for fits={fits}, does_not_fit={does_not_fit}, room={room}")
    return room // does_not_fit, room // fits


def reference_global_batch(table: CalibrationTable, job) -> int | None:
    ref = job.reference_batch()
    if ref is None and job.name in table.jobs:
        ref = table.jobs[job.name].reference_global_batch
    return ref


# -- probing ---------------------------------------------------------------------------------------
def measure_in_subprocess(config: str, micro_batch: int, precision: str, overrides: list[str] | None = None,
                          steps: int = 3, genotype: str | None = None, timeout: int = 3600) -> dict | None:
    """One `memory_probe.py` run in a fresh process; None when it ran out of memory."""
    cmd = [sys.executable, str(ROOT / "launcher" / "memory_probe.py"), "--job", config,
           "--micro-batch", str(micro_batch), "--precision", precision, "--steps", str(steps)]
    for o in overrides or []:
        cmd += ["--set", o]
    if genotype:
        cmd += ["--genotype", genotype]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = r.stderr.strip().splitlines()
    if any("out of memory" in ln.lower() for ln in err) or r.returncode in (-9, 137):
        return None
    if r.returncode == 2 and err and err[-1].startswith("error:"):
        raise ConfigError(err[-1].removeprefix("error: "))
    raise RuntimeError(f"memory probe at micro-batch {micro_batch} failed (exit {r.returncode}): "
                       f"{err[-1] if err else 'no output'}")


def probe(config: str, precision: str, micro_batches: list[int], overrides: list[str] | None = None,
          steps: int = 3, genotype: str | None = None, log=print) -> tuple[MemoryModel, list[dict]]:
    """Real steps at growing micro-batches (fresh process each), stopping at the first that runs out
    of memory; the least-squares fit of the peaks."""
    records = []
    for mb in sorted(set(micro_batches)):
        rec = measure_in_subprocess(config, mb, precision, overrides, steps, genotype)
        if rec is None:
            log(f"micro-batch {mb}: out of memory; stopping")
            break
        log(f"micro-batch {mb}: peak {rec['peak_bytes'] / MIB:.0f} MiB ({rec['seconds_per_step']:.2f} s/step)")
        records.append(rec)
    if len(records) < 2:
        raise ConfigError(f"memory probe of {config}: fewer than two micro-batches ran; try smaller ones "
                          f"(--probe-batches)")
    return fit([(r["micro_batch"], r["peak_bytes"]) for r in records]), records


def describe_machine(device_kind: str, device_name: str) -> str:
    if device_kind == "cuda":
        return f"{device_name} (torch {_torch_version()})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} " \
           f"(torch {_torch_version()})"


def _torch_version() -> str:
    import torch
    return torch.__version__


def today() -> str:
    return datetime.date.today().isoformat()


def derive(job, precision: str, cpu_fp32: MemoryModel, genotype: str | None = None, batches: tuple[int, int] = (2, 4)
           ) -> tuple[MemoryEntry, dict]:
    """A GPU entry derived from counted activations and the CPU probe (see the module docstring)."""
    from launcher.memory_probe import count_saved_bytes, parameter_count
    b1, b2 = batches

    def per_sample(p: str) -> float:
        return (count_saved_bytes(job, b2, p, genotype) - count_saved_bytes(job, b1, p, genotype)) / (b2 - b1)

    counted_fp32 = per_sample("fp32")
    counted = counted_fp32 if precision == "fp32" else per_sample(precision)
    overhead = cpu_fp32.per_sample_bytes / counted_fp32
    params = parameter_count(job, genotype)
    fixed = params * BYTES_PER_PARAM + WORKSPACE_MIB * MIB
    entry = MemoryEntry(
        fixed_bytes=int(fixed), per_sample_bytes=int(math.ceil(counted * overhead)), source="derived",
        where="derived for a GPU (not measured on one)", when=today(),
        how=(f"per_sample = saved activations at {precision} ({counted / MIB:.2f} MiB/sample, counted with "
             f"saved_tensors_hooks{', autocast' if precision != 'fp32' else ''}) x {overhead:.3f} (CPU fp32 "
             f"probe slope {cpu_fp32.per_sample_bytes / MIB:.2f} / counted fp32 {counted_fp32 / MIB:.2f} MiB); "
             f"fixed = {params} params x {BYTES_PER_PARAM} B + {WORKSPACE_MIB} MiB workspace"))
    return entry, {"counted_fp32": counted_fp32, "counted": counted, "overhead": overhead, "params": params}


def snippet(job, entries: dict[str, dict[str, MemoryEntry]], genotype: str | None = None,
            reference_global_batch: int | None = None,
            profile_entries: dict[str, dict[str, MemoryEntry]] | None = None) -> str:
    """YAML for `configs/calibration.yaml` (under `jobs:`), ready to paste. `profile_entries`
    ({profile: {precision: entry}}) go under `gpu_profiles`, one list item each."""
    body: dict[str, Any] = {}
    if reference_global_batch:
        body["reference_global_batch"] = reference_global_batch
    body["shape"] = job.shape()
    if job.kind == "retrain":
        body["genotype"] = genotype
    def dump(e: MemoryEntry) -> dict:
        d = e.model_dump(mode="json", exclude_none=True)
        d["points"] = [_Flow(x) for x in d["points"]]
        if not d["points"]:
            del d["points"]
        return d

    body["memory"] = {d: {p: dump(e) for p, e in ps.items()} for d, ps in entries.items()}
    if profile_entries:
        body["gpu_profiles"] = {n: {p: [dump(e)] for p, e in ps.items()} for n, ps in profile_entries.items()}
    body["shape"] = _Flow(body["shape"])
    return yaml.dump({"jobs": {job.name: body}}, Dumper=_Dumper, sort_keys=False, width=120)


class _Flow(list):
    """Written in YAML flow style (`[8, 957440000]`, `{space: darts, ...}`)."""

    def __new__(cls, value):
        return _FlowDict(value) if isinstance(value, dict) else super().__new__(cls)

    def __init__(self, value):
        super().__init__(value)


class _FlowDict(dict):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
_Dumper.add_representer(_FlowDict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True))
