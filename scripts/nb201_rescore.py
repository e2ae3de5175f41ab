"""Re-derive and re-score NB201 runs from their logged alphas with the current derivation rule.

Searches log the activated edge weights of every epoch (`alphas.jsonl`), so a change of the derivation
rule can be applied to finished runs without searching again:

    python scripts/nb201_rescore.py --table ../shared/data/nb201/nb201_accuracies.csv.gz RUN_DIR [RUN_DIR ...]

Prints, per run, the per-epoch CIFAR-10 test accuracy of the derived cell, the final one and the
worst over the second half, then one JSON line with all of it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdarts.nasbench201.table import lookup  # noqa: E402
from sdarts.genotype import derive_nb201  # noqa: E402


def rescore(run: Path, table: str) -> dict:
    records = [json.loads(line) for line in (run / "alphas.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("when") != "init"]
    if not records or "normal" not in records[0]["weights"]:
        raise SystemExit(f"error: {run}: no NB201 alpha records")
    exclude = ("none",) if records[0].get("activation") == "sigmoid" else ()
    traj = [lookup(derive_nb201(torch.tensor(r["weights"]["normal"]), tuple(r["ops"]), exclude), table)
            ["cifar10_test"] for r in records]
    return {"run": run.name, "trajectory": traj, "final": traj[-1], "worst_second_half": min(traj[len(traj) // 2:])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", required=True)
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args()
    out = [rescore(r, args.table) for r in args.runs]
    for r in out:
        print(f"{r['run']:45s} final {r['final']:6.2f}  worst 2nd half {r['worst_second_half']:6.2f}  "
              f"[{' '.join(f'{x:.1f}' for x in r['trajectory'])}]")
    finals = [r["final"] for r in out]
    summary = {"mean_final": statistics.mean(finals), "std_final": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
               "min_worst_second_half": min(r["worst_second_half"] for r in out)}
    print(f"mean final {summary['mean_final']:.2f} +- {summary['std_final']:.2f}; "
          f"lowest second-half accuracy {summary['min_worst_second_half']:.2f}")
    print(json.dumps({"runs": out, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
