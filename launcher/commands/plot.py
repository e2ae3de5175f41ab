"""`sdarts plot --run-dir D`: a search's figures as PNG files in D/plots/.

Alpha probability curves per edge and op (the paper's Figure 4), the derived cell as a diagram,
and, when the run logged them, NB201 accuracy per epoch (Figure 1), the eq. 8 gradient correlation
(Figure 2) and dL/dp per op (Figure 3). Prints the written paths, one a line.
"""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="render a search run's figures to RUN_DIR/plots/*.png",
                              description=__doc__)
    p.add_argument("--run-dir", required=True, help="a search run directory (holds alphas.jsonl)")


def run(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    from sdarts.analysis.plots import render_run
    for path in render_run(run_dir):
        print(path)
    return 0
