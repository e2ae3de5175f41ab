"""`sdarts plot --run-dir D`: a run's figures as PNG files in D/plots/; prints the written paths, one a line.

The kind of run is read from the directory: a search logs `alphas.jsonl`; a retrain (`launcher/retrain.py`)
has none and its `config.yaml` holds the retrain keys `ema` and `loss`. Anything else is refused.

- search: alpha probability curves per edge and op (the paper's Figure 4), the derived cell as a diagram,
  and, when the run logged them, NB201 accuracy per epoch (Figure 1), the eq. 8 gradient correlation
  (Figure 2) and dL/dp per op (Figure 3).
- retrain: accuracy.png (top-1/top-5 per epoch of the holdout and test evaluations, model and EMA),
  loss.png (per logged step and per epoch), schedules.png (lr and drop-path per epoch), each with the
  selected epoch marked (summary.json's `selected`, else its `best`, else checkpoints/best.pt while the
  run is going), and cell.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="render a search or retrain run's figures to RUN_DIR/plots/*.png",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a search or retrain run directory")


def run(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    from sdarts.analysis.curves import run_kind
    if run_kind(run_dir) == "retrain":
        from sdarts.analysis.retrain_plots import render_retrain as render
    else:
        from sdarts.analysis.plots import render_run as render
    for path in render(run_dir):
        print(path)
    return 0
