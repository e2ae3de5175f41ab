"""Arithmetic and memory traffic per image of a supernet training step: the floor any device's step sits on.

Why: a GPU step's time is its kernels' time (`step_profile.py`), and a kernel of these small-channel cells
moves far more bytes than it does arithmetic. The bytes every kernel of a step reads and writes, per image,
divided into a device's memory bandwidth, give the images/s the step could reach if every kernel ran at
that bandwidth; the measured kernel time over that floor is how far the kernels are from it. Measured on
any CPU (a TorchDispatchMode over one real-resolution step: batch 2, 32x32 or 224x224), so it is known
before a GPU is lent.

  python benchmarks/step_traffic.py [--cases nb201,darts_cifar,darts_imagenet] [--bandwidth-tbs 4.8]

Counts: `fwd_gflop` the forward's multiply-adds x 2 (torch.utils.flop_counter; its backward formula
overcounts grouped convolutions, so the backward is not counted: it is about twice the forward);
`read_mb` / `written_mb` the tensors every kernel of forward + backward reads and writes (views and bare
allocations excluded; weights included), in the step's own dtype (fp32 here: bf16 activations halve it).
Prints a table, then one JSON line {"machine", "bandwidth_tbs", case: {variant: {...,
"memory_floor_images_per_s_bf16"}}}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo on sys.path)
from supernet_step import CASES, build_model  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

VARIANTS = ("classic", "default", "grouped")


def _tensors(x, acc: list) -> list:
    if isinstance(x, torch.Tensor):
        acc.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, acc)
    elif isinstance(x, dict):
        for y in x.values():
            _tensors(y, acc)
    return acc


class Traffic(TorchDispatchMode):
    """Bytes read (tensor arguments) and written (tensor results) by every op that runs a kernel."""

    def __init__(self):
        super().__init__()
        self.read = self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.__name__.startswith(("empty", "new_empty")):
            return out
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        self.read += nbytes(_tensors([args, kwargs or {}], []))
        self.written += nbytes(_tensors(out, []))
        return out


def measure(case: str, variant: str, batch: int = 2) -> dict:
    model, channels_last = build_model(case, variant, set())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    size = 224 if case == "darts_imagenet" else 32
    classes = 1000 if case == "darts_imagenet" else 10
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), generator=g)
    fc = FlopCounterMode(display=False)
    with fc:
        logits = model(x)
    logits.sum().backward()  # warm-up of lazily built state, outside the counts
    model.zero_grad(set_to_none=True)
    t = Traffic()
    with t:
        F.cross_entropy(model(x), y).backward()
    return {"fwd_gflop": round(fc.get_total_flops() / batch / 1e9, 3),
            "read_mb": round(t.read / batch / 2**20, 1), "written_mb": round(t.written / batch / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--bandwidth-tbs", type=float, default=4.8,
                    help="device memory bandwidth in TB/s for the floor (H200 4.8, H100 SXM 3.35, 2080 Ti 0.616)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    cases = common.pick_cases(args.cases, CASES)
    torch.set_num_threads(args.threads)
    results: dict[str, dict] = {}
    print(f"{'case':16s} {'variant':9s} {'fwd GFLOP/img':>13s} {'read MB/img':>12s} {'written MB/img':>15s} "
          f"{'floor img/s (bf16)':>19s}")
    for case in cases:
        results[case] = {}
        for v in VARIANTS:
            if v == "grouped" and case == "nb201":
                continue  # the grouped cell is the DARTS space's
            r = measure(case, v)
            # bf16 autocast: activations (nearly all of the bytes) are half as wide as in this fp32 count
            bf16_bytes = (r["read_mb"] + r["written_mb"]) * 2**20 / 2
            r["memory_floor_images_per_s_bf16"] = round(args.bandwidth_tbs * 1e12 / bf16_bytes, 0)
            results[case][v] = r
            print(f"{case:16s} {v:9s} {r['fwd_gflop']:13.3f} {r['read_mb']:12.1f} {r['written_mb']:15.1f} "
                  f"{r['memory_floor_images_per_s_bf16']:19.0f}", flush=True)
    print(json.dumps({"machine": common.machine("cpu", args.threads), "bandwidth_tbs": args.bandwidth_tbs,
                      **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
