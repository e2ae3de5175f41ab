"""`deepspeed [--num_gpus N | --hostfile F] launcher/search.py --config C [--set k=v ...] [--run-dir D] [--resume]`

Argument parsing only: the library takes a typed config, never an argparse namespace.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.common import add_run_arguments, fail_cleanly, setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="search.py", description="Single-DARTS architecture search")
    p.add_argument("--config", required=True, help="YAML under configs/search/")
    add_run_arguments(p, "runs/<config name>")
    args = p.parse_args(argv)

    with fail_cleanly():
        from sdarts import config as C
        cfg = C.load(args.config, args.overrides)
        setup_logging(all_ranks=cfg.log.all_ranks)
        from sdarts.search.loop import run_search
        run_dir = args.run_dir or os.path.join("runs", Path(args.config).stem)
        result = run_search(cfg, run_dir, resume=args.resume, force=args.force)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"genotype: {result.genotype}")
            print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
