"""Supernet training-step throughput and peak memory: classic formulation vs. the product default.

One step = forward + cross-entropy + backward + the real optimizer step (`sdarts.engine.CombinedOptimizer`:
SGD on w with grad clipping, Adam on alpha; no DeepSpeed needed). Cases (issue 8):
  nb201           NB201 supernet, C=16, 5 cells per stage, 32x32, batch 64, real CIFAR-10 batches
  darts_cifar     DARTS-space supernet, C=16, 8 cells, CIFAR stem, 32x32, batch 64, real CIFAR-10 batches
  darts_imagenet  DARTS-space supernet, C=16, 8 cells, 8x ImageNet stem, 224x224, batch 16 (CPU) / 64 (GPU),
                  real ImageNet-sample JPEGs
Variants: `classic` (every op its own module, weighted sum of their outputs: the reference repos' form,
the baseline) and `default` (what `ModelConfig()` builds). Experiments may name others:
`fused` (the default cell in NCHW), `grouped` (DARTS: `impl: grouped`), `classic`, `default`, each optionally followed by `+cl` (channels_last), `+compile`
(torch.compile), `+ckpt` (activation checkpointing per cell), `+graphs` (CUDA graphs through `sdarts.graphs`,
the search's `engine.cuda_graphs`).

On CPU every (case, variant) runs in a fresh subprocess so that peak RSS is per case; variants of a
case alternate (classic, default, classic, default, ... for `--rounds`), so noise from other jobs on
the machine hits both. On CUDA everything runs in this process (torch.cuda.max_memory_allocated).

Prints a table, then one JSON line: {"machine": ..., "nb201": {"classic": {"images_per_s", "peak_mem_mb"},
"default": {...}}, "darts_cifar": {...}, "darts_imagenet": {...}}.

  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/supernet_step.py --device cpu --threads 2
  python benchmarks/supernet_step.py --device cuda --precision bf16 --steps 20 --warmup 5
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

CASES = ("nb201", "darts_cifar", "darts_imagenet")
MODIFIERS = ("cl", "compile", "ckpt", "graphs")


def parse_variant(v: str) -> tuple[str, set[str]]:
    base, *mods = v.split("+")
    if base not in ("classic", "default", "fused", "grouped"):
        raise SystemExit(f"error: unknown variant {v!r}: base must be classic, default, fused or grouped")
    bad = [m for m in mods if m not in MODIFIERS]
    if bad:
        raise SystemExit(f"error: unknown variant modifier {bad[0]!r} in {v!r}; expected one of {MODIFIERS}")
    return base, set(mods)


def build_model(case: str, base: str, mods: set[str]):
    import torch
    from sdarts.config import ModelConfig
    from sdarts.spaces.darts import DartsSupernet
    from sdarts.spaces.nb201 import NB201Supernet
    defaults = ModelConfig()
    impl = defaults.impl if base == "default" else base
    auto_cl = defaults.channels_last if defaults.channels_last is not None else impl != "classic"
    # `fused` is the default cell without the auto layout; `grouped` takes the auto layout, like default
    channels_last = "cl" in mods or (base in ("default", "grouped") and auto_cl)
    ckpt = "ckpt" in mods or (base == "default" and getattr(defaults, "checkpoint_cells", False))
    g = torch.Generator().manual_seed(1)
    if case == "nb201":
        model = NB201Supernet(16, 5, 10, "softmax", 0.0, 1e-3, impl=impl, generator=g)
    elif case == "darts_cifar":
        model = DartsSupernet(16, 8, 10, "cifar", "softmax", 0.0, 1e-3, 3, g, impl=impl)
    else:
        model = DartsSupernet(16, 8, 1000, "imagenet", "sigmoid", -1.9459, 1e-3, 3, g, impl=impl)
    if ckpt:
        if not hasattr(model, "set_checkpointing"):
            raise SystemExit(f"error: {type(model).__name__} has no activation checkpointing")
        model.set_checkpointing(True)
    return model, channels_last


@functools.lru_cache(maxsize=2)
def _batches(case: str, batch: int):
    """4 real batches (cached: on CUDA all variants of a case run in this process)."""
    if case == "darts_imagenet":  # imagenet-sample/train holds one JPEG per class: 1000 images
        return common.imagenet_batches(max(1, min(4, 1000 // batch)), batch)
    return common.cifar_batches(4, batch)


@dataclass
class Step:
    """One (case, variant) ready to train: `run()` takes the i-th training step on the cached batches."""
    model: object
    data: list
    batch: int
    step: Callable
    base_rss: float

    def run(self, i: int):
        x, y = self.data[i % len(self.data)]
        return self.step(x, y)


def make_step(case: str, variant: str, device: str, precision: str, threads: int, imagenet_batch: int = 0) -> Step:
    """Builds one supernet, its real optimizer and real batches on `device`, and the step closure
    (graphs recorded, compile wrapped) that `run_one` times and `step_profile.py` profiles."""
    import torch
    import torch.nn.functional as F
    from sdarts.engine import CombinedOptimizer

    if device == "cpu":
        torch.set_num_threads(threads)
    dev = torch.device(device)
    base, mods = parse_variant(variant)
    if "graphs" in mods and device != "cuda":
        raise SystemExit("error: +graphs needs --device cuda")
    batch = 64 if case != "darts_imagenet" else (imagenet_batch or (64 if device == "cuda" else 16))
    data = _batches(case, batch)
    torch.manual_seed(0)
    model, channels_last = build_model(case, base, mods)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=fmt)
    data = [(x.to(dev, memory_format=fmt), y.to(dev)) for x, y in data]
    # peak memory counts from here: what training adds to the weights and the batches
    base_rss = common.current_rss_mb()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    opt = CombinedOptimizer(model.get_weights(), model.get_alphas(), w_lr=0.025, w_momentum=0.9,
                            w_weight_decay=3e-4, w_nesterov=False, alpha_rule="adam", alpha_lr=3e-4,
                            grad_clip=5.0)
    model.train()
    forward = model
    if "compile" in mods:
        forward = torch.compile(model)
    amp = precision == "bf16"

    def autocast():
        if not amp:
            return contextlib.nullcontext()
        # CUDA graphs replay recorded casts: autocast's weight-cast cache must be off
        return torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled="graphs" not in mods)

    if "graphs" in mods:  # the product's path (engine.cuda_graphs), not a benchmark-only variant
        from sdarts.graphs import install
        if not install(model, data[0][0], torch.bfloat16 if amp else None):
            raise RuntimeError("CUDA graph recording failed (the warning above says why)")

    def step(x, y):
        with autocast():
            loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return Step(model, data, batch, step, base_rss)


def run_one(case: str, variant: str, device: str, precision: str, steps: int, warmup: int,
            threads: int, imagenet_batch: int = 0) -> dict:
    """Times `steps` training steps of one (case, variant) after `warmup` untimed ones."""
    import torch

    st = make_step(case, variant, device, precision, threads, imagenet_batch)
    batch, base_rss = st.batch, st.base_rss
    times: list[float] = []
    cpu_times: list[float] = []  # process CPU time: far less sensitive to other jobs on a shared CPU
    t_first = None
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = st.run(i)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        if i == 0:
            t_first = dt
        if i >= warmup:
            times.append(dt)
            cpu_times.append(dc)
    if not torch.isfinite(loss.detach()).item():
        raise SystemExit(f"error: {case}/{variant}: loss is not finite")
    med = common.median(times)
    out = {
        "images_per_s": round(batch / med, 2),
        "mean_images_per_s": round(batch * len(times) / sum(times), 2),
        "step_s_median": round(med, 4),
        "cpu_s_per_step": round(common.median(cpu_times), 4),
        "first_step_s": round(t_first, 3),
        "batch": batch,
        "steps": steps,
    }
    if device == "cuda":
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        out["peak_mem_mb"] = round(common.peak_rss_mb(), 1)
        out["base_rss_mb"] = round(base_rss, 1)
    return out


def run_subprocess(case: str, variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, variant, "--device", args.device,
           "--precision", args.precision, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--imagenet-batch", str(args.imagenet_batch)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {p.returncode}"}
    return json.loads(lines[-1])


def merge(runs: list[dict]) -> dict:
    """Several rounds of one (case, variant): the median throughput, the largest peak."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    best = dict(ok[0])
    best["images_per_s"] = round(common.median([r["images_per_s"] for r in ok]), 2)
    best["cpu_s_per_step"] = round(common.median([r["cpu_s_per_step"] for r in ok]), 4)
    best["peak_mem_mb"] = max(r["peak_mem_mb"] for r in ok)
    if len(ok) > 1:
        best["rounds"] = [r["images_per_s"] for r in ok]
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    ap.add_argument("--variants", default="classic,default",
                    help="comma-separated; the first is the baseline for the ratios (default: classic,default)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: cpu 4, cuda 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: cpu 1, cuda 5)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count())
    ap.add_argument("--imagenet-batch", type=int, default=0,
                    help="batch of the darts_imagenet case (default: 16 on cpu, 64 on cuda)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the variants this many times (CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the default variant")
    ap.add_argument("--cuda-graphs", action="store_true", help="CUDA-graph the default variant (cuda)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last for the default variant")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.device == "cuda" else 4
    if args.warmup is None:
        args.warmup = 5 if args.device == "cuda" else 1

    if args.worker:
        case, variant = args.worker
        print(json.dumps(run_one(case, variant, args.device, args.precision, args.steps, args.warmup,
                                 args.threads, args.imagenet_batch)))
        return 0

    cases = common.pick_cases(args.cases, CASES)
    variants = [v for v in args.variants.split(",") if v]
    extra = "".join(m for m, on in (("+compile", args.compile), ("+cl", args.channels_last)) if on)
    names = []
    for v in variants:
        parse_variant(v)
        names.append(v)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")

    results: dict[str, dict] = {}
    for case in cases:
        per: dict[str, list[dict]] = {v: [] for v in names}
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for v in order:
                if v.startswith("grouped") and case == "nb201":
                    continue  # the grouped cell is the DARTS space's (NB201's fused cell groups already)
                real = v
                if v == "default":
                    real = v + extra + ("+graphs" if args.cuda_graphs else "")
                if args.device == "cuda":
                    try:
                        res = run_one(case, real, "cuda", args.precision, args.steps, args.warmup, args.threads,
                                      args.imagenet_batch)
                    except Exception as e:  # one failing variant must not hide the others' numbers
                        res = {"error": f"{type(e).__name__}: {e}"[:300]}
                    finally:
                        import gc, torch
                        gc.collect()
                        torch.cuda.empty_cache()
                else:
                    res = run_subprocess(case, real, args)
                if real != v and "error" not in res:
                    res["variant"] = real
                per[v].append(res)
                print(f"# {case:15s} {real:22s} " + (res.get("error") or
                      f"{res['images_per_s']:9.2f} img/s  {res['peak_mem_mb']:9.1f} MB"), file=sys.stderr, flush=True)
        results[case] = {v: merge(rs) for v, rs in per.items() if rs}

    base = names[0]
    print(f"{'case':16s} {'variant':22s} {'images/s':>10s} {'peak MB':>10s} {'speed x':>8s} {'cpu x':>6s} {'mem x':>6s}")
    for case, per in results.items():
        b = per.get(base, {})
        for v, r in per.items():
            if "error" in r:
                print(f"{case:16s} {v:22s} ERROR {r['error']}")
                continue
            nan = float("nan")
            sx = r["images_per_s"] / b["images_per_s"] if "images_per_s" in b else nan
            cx = b["cpu_s_per_step"] / r["cpu_s_per_step"] if "cpu_s_per_step" in b and r["cpu_s_per_step"] else nan
            mx = r["peak_mem_mb"] / b["peak_mem_mb"] if "peak_mem_mb" in b else nan
            if v != base and "images_per_s" in b:
                r["speedup_vs_" + base] = round(sx, 3)
                r["cpu_time_speedup_vs_" + base] = round(cx, 3)
                r["mem_ratio_vs_" + base] = round(mx, 3)
            print(f"{case:16s} {r.get('variant', v):22s} {r['images_per_s']:10.2f} {r['peak_mem_mb']:10.1f} "
                  f"{sx:8.2f} {cx:6.2f} {mx:6.2f}")
    out = {"machine": common.machine(args.device, args.threads), "device": args.device,
           "precision": args.precision, **results}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
