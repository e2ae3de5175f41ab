"""Where a supernet training step's time goes, kernel by kernel (torch.profiler), per variant.

`supernet_step.py` says how fast a step is; this says why. On CUDA it sums the device time of every
kernel the step launches, so one eager run answers what a graphed run can reach: with CUDA graphs
the host's launch cost is gone and the step takes at least the sum of its kernels, hence
`kernel_bound_images_per_s` = batch / (kernel time per step) is the ceiling of the graphed step, and
the category table says which kind of kernel to attack next (depthwise convs, BN, copies, ...). On
CPU it sums the self CPU time of the ATen ops instead (the same step, the host's view).

The same (case, variant) names and the same real batches as `supernet_step.py` (`make_step`), the same
summary as a run's `log.profile_steps` (`sdarts.profiling.summarize`). Prints, per variant, the top
kernels and the time by category, then one JSON line.

  python benchmarks/step_profile.py --device cuda --precision bf16 --case darts_imagenet \\
      --imagenet-batch 360 --variants default,grouped --steps 3
  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/step_profile.py --case darts_cifar --variants default,grouped
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)
from supernet_step import CASES, make_step, parse_variant  # noqa: E402

from sdarts.profiling import activities, summarize  # noqa: E402


def profile_one(case: str, variant: str, device: str, precision: str, steps: int, warmup: int, threads: int,
                imagenet_batch: int, top: int) -> dict:
    import torch
    from torch.profiler import profile

    st = make_step(case, variant, device, precision, threads, imagenet_batch)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for i in range(warmup):
        st.run(i)
    sync()
    t0 = time.perf_counter()  # the same steps unprofiled first: the wall time the profile is compared with
    for i in range(steps):
        st.run(warmup + i)
    sync()
    wall = (time.perf_counter() - t0) / steps
    with profile(activities=activities(device)) as prof:
        for i in range(steps):
            st.run(warmup + steps + i)
        sync()
    s = summarize(prof, steps, device, st.batch, top)
    if s["profiled_ms_per_step"] <= 0:
        raise SystemExit(f"error: {case}/{variant}: the profile recorded no time")
    return {"case": case, "variant": variant, "wall_ms_per_step": round(wall * 1e3, 2),
            "wall_images_per_s": round(st.batch / wall, 1), **s}


def print_report(r: dict, device: str) -> None:
    what = "kernel" if device == "cuda" else "ATen op (self CPU)"
    print(f"\n== {r['case']} / {r['variant']}, batch {r['batch']}: wall {r['wall_ms_per_step']} ms/step "
          f"({r['wall_images_per_s']} img/s); {what} time {r['profiled_ms_per_step']} ms/step in "
          f"{r['calls_per_step']:.0f} calls" + (f"; kernel-bound ceiling {r['kernel_bound_images_per_s']} img/s"
                                              if r["kernel_bound_images_per_s"] else ""))
    tot = r["profiled_ms_per_step"]
    print(f"{'category':22s} {'ms/step':>9s} {'share':>6s}")
    for k, v in r["categories_ms"].items():
        print(f"{k:22s} {v:9.2f} {v / tot:6.1%}")
    print(f"{'top ' + what + 's':70s} {'ms/step':>9s} {'calls':>7s}")
    for t in r["top"]:
        print(f"{t['name'][:70]:70s} {t['ms']:9.3f} {t['calls']:7.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--case", choices=CASES, default="darts_imagenet")
    ap.add_argument("--variants", default="default", help="comma-separated, as supernet_step.py names them")
    ap.add_argument("--steps", type=int, default=3, help="steps timed, then the same number profiled")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--imagenet-batch", type=int, default=0, help="darts_imagenet batch (16 cpu, 64 cuda)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count())
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        parse_variant(v)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    results = []
    for v in variants:
        try:
            r = profile_one(args.case, v, args.device, args.precision, args.steps, args.warmup, args.threads,
                            args.imagenet_batch, args.top)
        except Exception as e:  # one failing variant must not hide the others' profiles
            r = {"case": args.case, "variant": v, "error": f"{type(e).__name__}: {e}"[:300]}
            print(f"\n== {args.case} / {v}: ERROR {r['error']}")
        else:
            print_report(r, args.device)
        results.append(r)
        if args.device == "cuda":
            import gc
            import torch
            gc.collect()
            torch.cuda.empty_cache()
    print(json.dumps({"machine": common.machine(args.device, args.threads), "precision": args.precision,
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
