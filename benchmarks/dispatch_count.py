"""Ops dispatched per supernet training step, and the step time when the arithmetic is negligible.

Why: on the GPU the eager search step is bound by Python/ATen dispatch, not by the kernels (an H200's
step took as many CPU seconds as wall seconds: docs/performance.md), so the number of ops per step is
the figure that predicts eager GPU throughput, and it can be measured on any CPU. Tiny inputs (batch 2,
8x8; 32x32 for the ImageNet stem) make the CPU step time a dispatch-time measure too.

  python benchmarks/dispatch_count.py [--cases nb201,darts_cifar,darts_imagenet] [--steps 10] [--rounds 2]

Prints a table, then one JSON line {"machine": ..., case: {variant: {"ops", "kernels", "ms_per_step"}}}.
Counts are the ATen ops below autograd (a TorchDispatchMode), forward + backward, one step after two
warm-up steps: `ops` all of them (each costs host dispatch time), `kernels` those that run a kernel on a
device (not views such as detach/slice/permute, not bare allocations): with CUDA graphs the host cost
is gone and the kernel count is what remains. Variants alternate across rounds; the median time is kept.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CASES = ("nb201", "darts_cifar", "darts_imagenet")
VARIANTS = ("classic", "default", "grouped")


def build(case: str, variant: str):
    from sdarts.config import ModelConfig
    from sdarts.spaces.darts import DartsSupernet
    from sdarts.spaces.nb201 import NB201Supernet
    impl = ModelConfig().impl if variant == "default" else variant
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if case == "nb201":
        m, size = NB201Supernet(16, 5, 10, "softmax", 0.0, 1e-3, impl=impl, generator=g), 8
    elif case == "darts_cifar":
        m, size = DartsSupernet(16, 8, 10, "cifar", "softmax", 0.0, 1e-3, 3, g, impl=impl), 8
    else:
        m, size = DartsSupernet(16, 8, 1000, "imagenet", "sigmoid", -1.9459, 1e-3, 3, g, impl=impl), 32
    if impl != "classic":  # the auto layout (ModelConfig.channels_last unset: NHWC but for classic)
        m = m.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 2])
    return m, x, y


def count_ops(step) -> tuple[int, int]:
    """(ops, kernels) of one call of `step`: the ATen ops below autograd, forward and backward (a
    dispatch mode sees each once; composite ops count as what they decompose into, as a GPU would
    launch them), and of those the ones that are neither views nor bare allocations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            if not func.is_view and not func.__name__.startswith(("empty", "new_empty")):
                Count.kernels += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.n, Count.kernels


def measure(case: str, variant: str, steps: int) -> tuple[tuple[int, int], float]:
    m, x, y = build(case, variant)

    def step():
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()

    for _ in range(2):
        step()
    ops = count_ops(step)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return ops, (time.perf_counter() - t) / steps * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    cases = common.pick_cases(args.cases, CASES)
    torch.set_num_threads(args.threads)
    results: dict[str, dict] = {}
    for case in cases:
        ops: dict[str, tuple[int, int]] = {}
        variants = [v for v in VARIANTS if not (v == "grouped" and case == "nb201")]  # grouped: DARTS only
        times = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                n, ms = measure(case, v, args.steps)
                ops[v] = n
                times[v].append(ms)
        results[case] = {v: {"ops": ops[v][0], "kernels": ops[v][1], "ms_per_step": round(statistics.median(times[v]), 2),
                             "rounds_ms": [round(t, 2) for t in times[v]]} for v in variants}
    print(f"{'case':16s} {'variant':9s} {'ops/step':>9s} {'kernels':>8s} {'ms/step':>9s} {'ops x':>6s} "
          f"{'kern x':>6s} {'time x':>7s}")
    for case, per in results.items():
        base = per["classic"]
        for v, r in per.items():
            print(f"{case:16s} {v:9s} {r['ops']:9d} {r['kernels']:8d} {r['ms_per_step']:9.1f} "
                  f"{r['ops'] / base['ops']:6.2f} {r['kernels'] / base['kernels']:6.2f} "
                  f"{r['ms_per_step'] / base['ms_per_step']:7.2f}")
    print(json.dumps({"machine": common.machine("cpu", args.threads), **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
