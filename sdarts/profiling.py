"""Where a training step's time goes: a torch.profiler window over a few steps of a real run.

`log.profile_steps: N` (search and retrain) profiles N optimizer steps after `log.profile_warmup` steps
of this process (warm-up is per process: cuDNN autotuning, CUDA-graph recording, allocator growth),
then writes into `<run_dir>/profile/`:
- `rank<r>.trace.json`: the Chrome/Perfetto trace (open in chrome://tracing or ui.perfetto.dev);
- `rank<r>.summary.json`: the time per step by category and the top kernels, the shape
  `benchmarks/step_profile.py` prints, so a cluster run and a benchmark read the same way;
- one log line: time per step, calls per step, the leading category.

On CUDA the summary sums the kernels' device time: a step cannot be faster than that sum, so
`kernel_bound_images_per_s` is what the step could reach once the host's launches stop mattering
(CUDA graphs). With `engine.cuda_graphs` on, a replayed graph's kernels may show as one launch. On CPU
it sums the ATen ops' own time. Rank 0 profiles; every rank with `log.all_ranks`.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from sdarts.runlog import atomic_write

log = logging.getLogger("sdarts")

#: first match wins; CUDA kernel names and ATen op names (CPU) both
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("optimizer", r"foreach|multi_tensor|adam|sgd|clip|norm_kernel|lerp"),
    ("batch_norm", r"batch_norm|batchnorm|bn_fw|bn_bw|welford"),
    ("depthwise conv", r"depthwise|dw_|grouped_direct|conv_depthwise"),
    ("layout transform", r"tonhwc|tonchw|nhwc2nchw|nchw2nhwc|transpose|permute"),
    ("pool", r"pool"),
    ("conv / gemm", r"conv|gemm|xmma|cudnn|wgrad|dgrad|fprop|mkldnn|mm\b|addmm|bmm|cutlass"),
    ("copy / cat / index", r"copy|cat|index|gather|scatter|contiguous|clone"),
    ("reduction", r"reduce|sum|mean|softmax|log_softmax|nll"),
    ("elementwise", r"elementwise|vectorized|unrolled|add|mul|relu|threshold|div|sub|fill|where|sigmoid"),
)


def category(name: str) -> str:
    """The kind of work a kernel or ATen op does, from its name (`CATEGORIES`)."""
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def activities(device_type: str) -> list:
    """What to record: the host's ATen ops always, the device's kernels on CUDA."""
    from torch.profiler import ProfilerActivity
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])


def summarize(prof: Any, steps: int, device_type: str, batch: int, top: int = 15) -> dict:
    """Per-step time by category and the `top` kernels (CUDA: device time) or ATen ops (CPU: self time)
    of a finished `torch.profiler.profile` that covered `steps` steps of `batch` images each."""
    from torch.autograd import DeviceType
    want = DeviceType.CUDA if device_type == "cuda" else DeviceType.CPU
    rows: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if e.device_type != want:
            continue
        us = e.self_device_time_total if device_type == "cuda" else e.self_cpu_time_total
        if us <= 0:
            continue
        r = rows.setdefault(e.key, [0.0, 0.0])
        r[0] += us / steps
        r[1] += e.count / steps
    total = sum(r[0] for r in rows.values())
    cats: dict[str, float] = {}
    for name, (us, _) in rows.items():
        c = category(name)
        cats[c] = cats.get(c, 0.0) + us
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])
    return {
        "steps": steps, "batch": batch, "device": device_type,
        # CUDA: the kernels' device time; CPU: the ATen ops' self time
        "profiled_ms_per_step": round(total / 1e3, 3),
        "kernel_bound_images_per_s": round(batch / (total / 1e6), 1) if device_type == "cuda" and total else None,
        "calls_per_step": round(sum(r[1] for r in rows.values()), 1),
        "categories_ms": {k: round(v / 1e3, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:120], "ms": round(us / 1e3, 3), "calls": round(c, 1), "category": category(n)}
                for n, (us, c) in ranked[:top]],
    }


class StepProfiler:
    """The `log.profile_*` window of one training loop: `step_done(images)` after every optimizer step
    of this process starts the profiler after the warm-up steps and writes the files after the window.
    Off (`steps == 0` or not `enabled`), it costs one integer comparison per step."""

    def __init__(self, out_dir: Path, warmup: int, steps: int, enabled: bool, device_type: str, rank: int,
                 first_step: int = 0):
        self.out_dir, self.warmup, self.steps = Path(out_dir), warmup, steps
        self.on = enabled and steps > 0
        self.device_type, self.rank = device_type, rank
        # the run's global steps in the window (a resumed run starts past 0)
        self.window = (first_step + warmup + 1, first_step + warmup + steps)
        self._taken = 0  # steps this process took
        self._prof = None
        self._images = 0
        if self.on and warmup == 0:
            self._start()

    def _sync(self) -> None:
        if self.device_type == "cuda":
            import torch
            torch.cuda.synchronize()

    def _start(self) -> None:
        from torch.profiler import profile
        self._sync()
        self._prof = profile(activities=activities(self.device_type))
        self._prof.start()

    def step_done(self, images: int) -> None:
        """After one optimizer step of this process that took `images` images on this rank."""
        if not self.on:
            return
        self._taken += 1
        if self._prof is not None:
            self._images += images
            if self._taken == self.warmup + self.steps:
                self._finish()
        elif self._taken == self.warmup:
            self._start()

    def _finish(self) -> None:
        self._sync()
        prof, self._prof, self.on = self._prof, None, False
        prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}.trace.json"))
        s = summarize(prof, self.steps, self.device_type, round(self._images / self.steps))
        s["run_steps"] = list(self.window)
        atomic_write(self.out_dir / f"rank{self.rank}.summary.json", json.dumps(s, indent=2) + "\n")
        lead = next(iter(s["categories_ms"].items()), ("none", 0.0))
        what = "kernel time" if self.device_type == "cuda" else "ATen self time"
        log.info("profile of steps %d-%d: %.2f ms/step %s in %.0f calls, most in %s (%.2f ms); %s",
                 *self.window, s["profiled_ms_per_step"], what, s["calls_per_step"], lead[0], lead[1], self.out_dir)

    def close(self) -> None:
        """A run that ends (or stops) inside the window: the profiler is stopped, nothing is written."""
        if self._prof is not None:
            self._prof.stop()
            self._prof, self.on = None, False
