"""Input pipeline speed: DALI (CPU operators) against the torchvision DataLoader fallback.

Both run through `sdarts.data.build_image_loader` (the loaders the search and retrain use), on the
real ImageNet JPEGs of `../shared/data/imagenet-sample`, with the same recipe (default: the retrain
"train" augmentation at 224: random resized crop, flip, ColorJitter 0.4/0.4/0.4/0.2, normalise) and
the same thread count (DALI `num_threads` = DataLoader `num_workers` = --threads). Rounds alternate
between the two so load from other processes on a shared machine hits both alike; each round times
one epoch after its first batch (pipeline build and worker start-up excluded), and the table
reports the median round.

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py [--threads 2] [--batch 64] [--rounds 3]

Prints a table, then one JSON line: {"machine", "dali_images_per_s", "torch_images_per_s", "ratio", ...}.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

from common import SHARED_DATA, machine, median, peak_rss_mb

from sdarts.data import build_image_loader


def one_epoch(backend: str, root: str, args) -> tuple[float, int]:
    """Images per second over one epoch after its first batch; and the images counted."""
    loader = build_image_loader(root, "train", args.pipeline, args.batch, backend=backend, device="cpu",
                                resolution=args.resolution, workers=args.threads, seed=0,
                                classes_file=f"{root}/classes.tsv")
    it = iter(loader)
    first = next(it)
    assert first.x.shape[-1] == args.resolution
    t0, n = time.perf_counter(), 0
    for b in it:
        n += int(b.x.shape[0])
        b.x.sum()   # touch the data, as a training step would
    dt = time.perf_counter() - t0
    del it, loader
    gc.collect()
    return n / dt, n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pipeline", default="train", choices=["train", "search", "eval"])
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--root", default=str(SHARED_DATA / "imagenet-sample"))
    args = p.parse_args()
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        print("error: nvidia.dali is not installed; this benchmark compares it with the fallback", file=sys.stderr)
        return 2
    rates: dict[str, list[float]] = {"torch": [], "dali": []}
    for r in range(args.rounds):
        for backend in ("torch", "dali"):
            ips, n = one_epoch(backend, args.root, args)
            rates[backend].append(ips)
            print(f"round {r + 1}/{args.rounds}  {backend:5s}  {ips:7.1f} img/s  ({n} images)", flush=True)
    dali, torch_ = median(rates["dali"]), median(rates["torch"])
    print()
    print(f"{'pipeline':10s} {'backend':24s} {'threads':>7s} {'img/s (median)':>15s} {'rounds':>22s}")
    for name, label in (("torch", "torchvision DataLoader"), ("dali", "DALI CPU")):
        rounds = " ".join(f"{x:.0f}" for x in rates[name])
        print(f"{args.pipeline + str(args.resolution):10s} {label:24s} {args.threads:7d} "
              f"{median(rates[name]):15.1f} {rounds:>22s}")
    print(f"ratio DALI / torch: {dali / torch_:.2f}x   peak RSS {peak_rss_mb():.0f} MB")
    print(json.dumps({"machine": machine("cpu", args.threads), "pipeline": f"{args.pipeline}{args.resolution}",
                      "threads": args.threads, "batch": args.batch, "rounds": args.rounds,
                      "dali_images_per_s": round(dali, 1), "torch_images_per_s": round(torch_, 1),
                      "ratio": round(dali / torch_, 2), "peak_mem_mb": round(peak_rss_mb())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
