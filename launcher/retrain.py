"""`deepspeed [--num_gpus N | --hostfile F] launcher/retrain.py --config C --genotype G [--set k=v ...] [--run-dir D] [--resume]`

Argument parsing only: the library takes a typed config and a genotype, never an argparse namespace.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.common import add_run_arguments, fail_cleanly, setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="retrain.py", description="Retrain a found cell from scratch")
    p.add_argument("--config", required=True, help="YAML under configs/retrain/")
    p.add_argument("--genotype", required=True,
                   help="genotype JSON file (a search run's genotype.json) or a literature name, e.g. darts_v2")
    add_run_arguments(p, "runs/retrain-<config name>")
    args = p.parse_args(argv)

    with fail_cleanly():
        from retrain.config import load
        from sdarts.genotype import load as load_genotype
        cfg = load(args.config, args.overrides)
        genotype = load_genotype(args.genotype)
        cfg.check_genotype(genotype, args.config, args.genotype)  # another space's cell: refused, naming the recipe
        setup_logging(all_ranks=cfg.log.all_ranks)
        from retrain.train import run_retrain
        run_dir = args.run_dir or os.path.join("runs", f"retrain-{Path(args.config).stem}")
        result = run_retrain(cfg, genotype, run_dir, resume=args.resume, force=args.force)
        if int(os.environ.get("RANK", "0")) == 0:
            print(outcome(result))
            print(f"run directory: {run_dir}")
    return 0


def outcome(result) -> str:
    """The result in one line: the last epoch on the eval split (what to report), then the checkpoint
    selected on the holdout with its eval-split accuracy."""
    s = result.summary
    if not result.finished:
        return f"stopped at step {s['steps']} (max_steps); continue with --resume"
    final, sel = s["final"], s["selected"]
    line = f"finished: final top-1 {final['top1']:.2f} top-5 {final['top5']:.2f} (epoch {final['epoch']}, eval split)"
    if sel["epoch"]:
        on = f"holdout top-1 {sel['holdout']['top1']:.2f}, " if sel["on"] == "holdout" else ""
        line += f"; selected epoch {sel['epoch']} on the {sel['on']} ({on}eval top-1 {sel['eval']['top1']:.2f})"
    return line


if __name__ == "__main__":
    sys.exit(main())
