"""Stacked seeds (`seeds: [...]`, sdarts/spaces/seedstack.py) against lone searches: kernels per search
step, and images/s summed over seeds.

1. Kernels (`kernels` cases): one search step of a lone supernet against a `SeedStack` of S of them
   (S = 1, 4, 8 by default), on the tiny inputs of benchmarks/dispatch_count.py (its `build`: batch 2,
   8x8) for `nb201` (C=16, 5 cells per stage, impl fused), `darts_cifar` (C=16, 8 cells, fused) and
   `darts_grouped` (the same, impl grouped). A step is forward + `search_loss` + backward (`fwd+bwd`)
   + `CombinedOptimizer.step()` with the search's default optimizer settings (SGD with grad clipping on
   w, Adam on alpha; `seeds=S` for the stack: per-seed clipping), counted after two warm-up steps (so
   momentum and Adam state exist) by dispatch_count's `count_ops`, extended: `kernels` are the ATen ops
   below autograd that are neither views (`func.is_view`) nor bare allocations (`empty*`), NOR
   `aten::_unsafe_view`: it is not a view op by `func.is_view`, but it only re-describes its input
   (vmap's batching rules emit it after every reshape) and launches no kernel, so this benchmark counts
   it as a view. `kernels_strict` counts it as a kernel (dispatch_count.py's rule). A CPU-side foreach op
   counts once, as its one multi-tensor launch on a GPU. The issue's target: the S-batch's step at most
   1.2x one search's kernels (per search <= 1.2/S of a lone step). `ms_per_step`: host time of the tiny
   step (dispatch-bound: what the GPU's eager step pays per launch), median over rounds; `ops` all
   dispatched ATen ops (views included: host cost); `build_s` the time to build the S supernets and
   their `SeedStack`; `kernels_vs_lone_by_op` what the stack launches more (+) or less (-) than a lone
   step, by op.
2. Throughput (`nb201_full`: C=16, N=5; `nb201_proxy`: C=8, one cell per stage; batch 64, 32x32, fp32,
   real CIFAR-10 batches): `batched`, one single-level update (`sdarts.search.strategies.update`, w
   and alpha) of a `SearchEngine` (DeepSpeed on CPU, in process) over a stack of S=5 seeds on
   [5, 64, 3, 32, 32] (the per-seed batches stacked inside the step, as `SeedRuns` does), against
   `sequential`, five lone engines (what `build_supernet` gives each seed alone: channels_last, the
   lone default), one update each. Images/s summed over the seeds = 5 x 64 / step time; the variants
   alternate their order across rounds, each round's median step is kept, then the median over rounds.
   `cpu` is process CPU time per step (less sensitive to other jobs on a shared CPU).
   `peak_rss_mb` is the process's peak so far (cases run in order: it includes every earlier case).

  OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/python benchmarks/seed_batch.py [--cases ...]
      [--stack 1,4,8] [--seeds 5] [--steps 2] [--rounds 2] [--threads 1] [--tiny-steps 5]

3. Convolutions alone (`conv_proxy`: C=8, 3x3 and 1x1, C -> 3C, batch 64, 32x32): forward + backward of
   the 5 seeds' convolutions as 5 separate NHWC convs (the lone searches) against one grouped conv over
   5 x C channels, NCHW (what the stacked step runs) and NHWC; median ms (`run_convs`).

Prints a table, then one JSON line: {"machine", "threads", "kernels": {case: {"lone": {...},
"S4": {"kernels", "kernels_per_search", "ratio_to_lone", ...}}}, "throughput": {case: {"batched":
{"images_per_s", ...}, "sequential": {...}, "speedup"}}, "convs": {case: {"k3": {"ms": {...},
"grouped_nchw_vs_separate", ...}, ...}}}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo on sys.path)

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

KERNEL_CASES = {"nb201": ("nb201", "default"), "darts_cifar": ("darts_cifar", "default"),
                "darts_grouped": ("darts_cifar", "grouped")}  # -> dispatch_count.build(case, variant)
THROUGHPUT_CASES = {"nb201_full": (16, 5), "nb201_proxy": (8, 1)}  # (C, cells per stage)
CONV_CASES = {"conv_proxy": (8, (3, 1))}  # (C, kernel sizes): the proxy's node-0 convs (C -> 3C)
CASES = tuple(KERNEL_CASES) + tuple(THROUGHPUT_CASES) + tuple(CONV_CASES)
BATCH, RES = 64, 32


# -- 1. kernels per search step --------------------------------------------------------------------
def count_step(step) -> dict:
    """dispatch_count.count_ops's rule, with `aten::_unsafe_view` counted both ways (module docstring);
    `by_op`: the kernels by ATen op name (for the breakdown of what the stack adds)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    c = {"ops": 0, "kernels": 0, "kernels_strict": 0, "by_op": Counter()}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            c["ops"] += 1
            name = func.overloadpacket.__name__  # `func.__name__` carries the overload: "_unsafe_view.default"
            if not func.is_view and not name.startswith(("empty", "new_empty")):
                c["kernels_strict"] += 1
                if name != "_unsafe_view":
                    c["kernels"] += 1
                    c["by_op"][name] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return c


def optimizer_for(model, seeds: int):
    """The search's optimizer with its default settings (`SearchConfig().optim`)."""
    from sdarts.config import SearchConfig
    from sdarts.engine import CombinedOptimizer
    o = SearchConfig().optim
    return CombinedOptimizer(
        model.get_weights(), model.get_alphas(), w_lr=o.w.lr, w_momentum=o.w.momentum,
        w_weight_decay=o.w.weight_decay, w_nesterov=o.w.nesterov, alpha_rule=o.alpha.optimizer,
        alpha_lr=o.alpha.lr, alpha_betas=o.alpha.betas, alpha_eps=o.alpha.eps, alpha_momentum=o.alpha.momentum,
        alpha_weight_decay=o.alpha.weight_decay, grad_clip=o.w.grad_clip, seeds=seeds)


def tiny_search(case: str, S: int):
    """(fwd_bwd, opt_step) closures of one tiny search step: a lone supernet (S=0) or a SeedStack of S."""
    from dispatch_count import build
    from sdarts.search.strategies import search_loss
    from sdarts.spaces.seedstack import SeedStack
    space, variant = KERNEL_CASES[case]
    if S == 0:
        model, x, y = build(space, variant)
    else:
        parts = [build(space, variant) for _ in range(S)]
        model = SeedStack([p[0] for p in parts])
        x, y = torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts])
    model.train()
    opt = optimizer_for(model, S)

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        loss, per_search = search_loss(model(x), y)
        loss.backward()
        return per_search

    return fwd_bwd, opt.step


def run_kernels(case: str, stacks: list[int], rounds: int, tiny_steps: int) -> dict:
    variants = {"lone": 0, **{f"S{s}": s for s in stacks}}
    steps, out, by_op = {}, {}, {}
    for name, S in variants.items():
        t = time.perf_counter()
        fwd_bwd, opt_step = tiny_search(case, S)
        build_s = time.perf_counter() - t
        for _ in range(2):
            fwd_bwd(), opt_step()
        fb, op = count_step(fwd_bwd), count_step(opt_step)
        by_op[name] = fb["by_op"] + op["by_op"]
        out[name] = {"seeds": max(S, 1), "kernels": fb["kernels"] + op["kernels"],
                     "kernels_strict": fb["kernels_strict"] + op["kernels_strict"],
                     "fwd_bwd_kernels": fb["kernels"], "opt_kernels": op["kernels"],
                     "ops": fb["ops"] + op["ops"], "build_s": round(build_s, 1)}
        steps[name] = (fwd_bwd, opt_step)
    times = {n: [] for n in variants}
    names = list(variants)
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            fwd_bwd, opt_step = steps[n]
            t = time.perf_counter()
            for _ in range(tiny_steps):
                fwd_bwd(), opt_step()
            times[n].append((time.perf_counter() - t) / tiny_steps * 1000)
    lone = out["lone"]
    for n, r in out.items():
        S = r["seeds"]
        r["ms_per_step"] = round(common.median(times[n]), 2)
        r["rounds_ms"] = [round(t, 2) for t in times[n]]
        for k in ("kernels", "kernels_strict", "fwd_bwd_kernels", "ops"):
            r[f"{k}_per_search"] = round(r[k] / S, 1)
            r[f"{k}_ratio_to_lone"] = round(r[k] / lone[k], 3)
        r["ratio_to_lone"] = r["kernels_ratio_to_lone"]
        r["meets_1.2x_target"] = r["kernels"] <= 1.2 * lone["kernels"]
        if n != "lone":  # what the stack launches that the lone step does not (+) and vice versa (-)
            delta = {op: by_op[n][op] - by_op["lone"][op] for op in set(by_op[n]) | set(by_op["lone"])}
            r["kernels_vs_lone_by_op"] = dict(sorted(((o, d) for o, d in delta.items() if d),
                                                     key=lambda od: (-abs(od[1]), od[0])))
    return out


# -- 2. images/s summed over seeds -------------------------------------------------------------------
def search_cfg(C: int, N: int, seeds: list[int]):
    from sdarts.config import SearchConfig, build
    tree = {"space": "nb201", "strategy": "single_level", "precision": "fp32", "seeds": seeds,
            "model": {"C": C, "cells_per_stage": N},
            "data": {"dataset": "synthetic", "micro_batch": BATCH, "resolution": RES},
            "engine": {"device": "cpu", "cuda_graphs": False},
            "log": {"progress": False, "tensorboard": False}}
    return build(SearchConfig, tree)


def engine_for(cfg, world, device):
    from sdarts.engine import SearchEngine
    from sdarts.spaces.build import build_supernet
    torch.manual_seed(cfg.seed)  # build_supernet seeds each stacked net itself; a lone one as Run does
    engine = SearchEngine(cfg, build_supernet(cfg), world, device)
    engine.set_epoch_lr(0)
    return engine


def run_throughput(case: str, S: int, steps: int, rounds: int) -> dict:
    from sdarts.data import Batch
    from sdarts.distributed import init
    from sdarts.search.strategies import BOTH, update
    _, _, world, device = init("cpu")
    C, N = THROUGHPUT_CASES[case]
    seeds = list(range(S))
    cfg = search_cfg(C, N, seeds)
    stacked = engine_for(cfg, world, device)
    lones = [engine_for(cfg.lone(s), world, device) for s in seeds]
    n_batches = 2 * S
    data = [Batch(x, y, torch.arange(i * BATCH, (i + 1) * BATCH))
            for i, (x, y) in enumerate(common.cifar_batches(n_batches, BATCH))]

    def seed_batches(i):  # step i: seed k's batch, the same in both variants
        return [data[(i * S + k) % n_batches] for k in range(S)]

    losses = {}

    def batched(i):
        bs = seed_batches(i)
        b = Batch(torch.stack([b.x for b in bs]), torch.stack([b.y for b in bs]), torch.stack([b.ids for b in bs]))
        losses["batched"], _ = update(stacked, b, BOTH)

    def sequential(i):
        losses["sequential"] = torch.stack([update(e, b, BOTH)[0] for e, b in zip(lones, seed_batches(i))])

    variants = {"sequential": sequential, "batched": batched}
    for f in variants.values():  # warm-up: optimizer state, first-call allocations
        f(0)
    wall = {n: [] for n in variants}
    cpu = {n: [] for n in variants}
    step = 1
    for r in range(rounds):
        for n in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            w, c = [], []
            for i in range(steps):
                t0, c0 = time.perf_counter(), time.process_time()
                variants[n](step + i)
                w.append(time.perf_counter() - t0), c.append(time.process_time() - c0)
            wall[n].append(common.median(w)), cpu[n].append(common.median(c))
        step += steps  # both variants take the same steps of each round
    out = {}
    for n in variants:
        if not bool(torch.isfinite(losses[n]).all()):
            raise SystemExit(f"error: {case}/{n}: loss is not finite")
        med = common.median(wall[n])
        out[n] = {"images_per_s": round(S * BATCH / med, 2), "step_s_median": round(med, 3),
                  "cpu_s_per_step": round(common.median(cpu[n]), 3),
                  "rounds_images_per_s": [round(S * BATCH / t, 2) for t in wall[n]]}
    out["speedup"] = round(out["batched"]["images_per_s"] / out["sequential"]["images_per_s"], 3)
    out["cpu_speedup"] = round(out["sequential"]["cpu_s_per_step"] / out["batched"]["cpu_s_per_step"], 3)
    out.update(seeds=S, batch=BATCH, resolution=RES, C=C, cells_per_stage=N, steps=steps, rounds=rounds,
               peak_rss_mb=round(common.peak_rss_mb(), 1))
    return out


# -- 3. the convolutions alone -----------------------------------------------------------------------
def run_convs(case: str, S: int, rounds: int) -> dict:
    """Forward + backward of S seeds' convolutions at the proxy's shapes (batch 64, 32x32, C -> 3C as
    NB201's node 0), each kernel size: S separate NHWC convs (the lone searches' layout) against one
    grouped conv over S x C channels (what a stacked step runs: NCHW, memory formats cannot be chosen
    inside vmap; and NHWC, for comparison). Median ms over `10 * rounds` repetitions."""
    import torch.nn.functional as F
    C, sizes = CONV_CASES[case]
    cl = torch.channels_last
    out = {}
    for k in sizes:
        xs = [torch.randn(BATCH, C, RES, RES).contiguous(memory_format=cl).requires_grad_() for _ in range(S)]
        ws = [torch.randn(3 * C, C, k, k).contiguous(memory_format=cl).requires_grad_() for _ in range(S)]
        x, w = torch.cat(xs, 1).detach(), torch.cat(ws, 0).detach()
        # plain strides: `contiguous()` would keep a 1x1 weight's channels_last strides (as SeedStack's `_stacked`)
        xg, wg = x.contiguous().requires_grad_(), w.clone(memory_format=torch.contiguous_format).requires_grad_()
        xn, wn = x.contiguous(memory_format=cl).requires_grad_(), w.contiguous(memory_format=cl).requires_grad_()
        variants = {
            "separate_nhwc": lambda: sum(F.conv2d(a, b, padding=k // 2).sum() for a, b in zip(xs, ws)).backward(),
            "grouped_nchw": lambda: F.conv2d(xg, wg, padding=k // 2, groups=S).sum().backward(),
            "grouped_nhwc": lambda: F.conv2d(xn, wn, padding=k // 2, groups=S).sum().backward(),
        }
        times = {n: [] for n in variants}
        for n, f in variants.items():
            f()  # warm-up (oneDNN primitive creation)
        for r in range(10 * rounds):
            for n, f in (variants.items() if r % 2 == 0 else list(variants.items())[::-1]):
                t = time.perf_counter()
                f()
                times[n].append((time.perf_counter() - t) * 1000)
        med = {n: round(common.median(t), 2) for n, t in times.items()}
        out[f"k{k}"] = {"ms": med, "grouped_nchw_vs_separate": round(med["grouped_nchw"] / med["separate_nhwc"], 2),
                        "grouped_nhwc_vs_separate": round(med["grouped_nhwc"] / med["separate_nhwc"], 2)}
    out.update(seeds=S, C=C, batch=BATCH, resolution=RES)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    ap.add_argument("--stack", default="1,4,8", help="seed-stack sizes S for the kernel counts")
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the throughput comparison")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round (throughput)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; the variants' order alternates")
    ap.add_argument("--tiny-steps", type=int, default=5, help="timed tiny steps per variant per round (kernels)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    cases = common.pick_cases(args.cases, CASES)
    stacks = [int(s) for s in args.stack.split(",") if s]
    torch.set_num_threads(args.threads)

    kernels, throughput, convs = {}, {}, {}
    t0 = time.perf_counter()
    for case in cases:
        if case in KERNEL_CASES:
            kernels[case] = run_kernels(case, stacks, args.rounds, args.tiny_steps)
        elif case in CONV_CASES:
            convs[case] = run_convs(case, args.seeds, args.rounds)
        else:
            throughput[case] = run_throughput(case, args.seeds, args.steps, args.rounds)
        print(f"# {case} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    if kernels:
        print(f"{'case':14s} {'search':7s} {'kernels':>8s} {'/search':>8s} {'x lone':>7s} {'<=1.2x':>6s} "
              f"{'fwd+bwd':>8s} {'opt':>5s} {'strict':>7s} {'x lone':>7s} {'ops':>6s} {'x lone':>7s} {'ms/step':>8s}")
        for case, per in kernels.items():
            for n, r in per.items():
                print(f"{case:14s} {n:7s} {r['kernels']:8d} {r['kernels_per_search']:8.1f} {r['ratio_to_lone']:7.2f} "
                      f"{'yes' if r['meets_1.2x_target'] else 'no':>6s} {r['fwd_bwd_kernels']:8d} "
                      f"{r['opt_kernels']:5d} {r['kernels_strict']:7d} {r['kernels_strict_ratio_to_lone']:7.2f} "
                      f"{r['ops']:6d} {r['ops_ratio_to_lone']:7.2f} {r['ms_per_step']:8.1f}")
    if throughput:
        if kernels:
            print()
        print(f"{'case':14s} {'variant':11s} {'img/s':>8s} {'s/step':>8s} {'cpu s':>8s} {'speed x':>8s} {'cpu x':>6s}")
        for case, r in throughput.items():
            for n in ("sequential", "batched"):
                v = r[n]
                sx, cx = (r["speedup"], r["cpu_speedup"]) if n == "batched" else (1.0, 1.0)
                print(f"{case:14s} {n:11s} {v['images_per_s']:8.2f} {v['step_s_median']:8.3f} "
                      f"{v['cpu_s_per_step']:8.3f} {sx:8.2f} {cx:6.2f}")
    if convs:
        print(f"\n{'case':14s} {'kernel':7s} {'separate NHWC':>14s} {'grouped NCHW':>13s} {'grouped NHWC':>13s}"
              " (ms, S seeds)")
        for case, r in convs.items():
            for k, v in r.items():
                if isinstance(v, dict):
                    m = v["ms"]
                    print(f"{case:14s} {k:7s} {m['separate_nhwc']:14.2f} {m['grouped_nchw']:13.2f} "
                          f"{m['grouped_nhwc']:13.2f}")
    print(json.dumps({"machine": common.machine("cpu", args.threads), "threads": args.threads,
                      "kernels": kernels, "throughput": throughput, "convs": convs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
