#!/usr/bin/env python
"""The multi-seed evidence table of docs/results.md, from batched-seed runs (RUN/seed_<s>/ each).

    python scripts/nb201_evidence.py RUN_A RUN_B ... [--block 16] [--json out.json]

Per group (strategy x activation x alpha optimizer x lr, as `sdarts.nasbench201.report` groups runs):
the final NB201 accuracies (mean +- population std over seeds), the worst CIFAR-10 test accuracy of the
derived cell over the second half (mean / minimum), the parameter-free edges of the final cells (mean,
and per seed), and the eq. 8 gradient correlation (the analysis hook's `analysis.jsonl`, mean over
edges and analysed cells) per block of `--block` epochs, for the same step (alpha batch vs w batch) and
for the previous w step. Unfinished runs count with their last scored epoch and are marked partial.
Prints markdown; `--json` also writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdarts.analysis.curves import read_jsonl  # noqa: E402
from sdarts.nasbench201.report import group_key, load_run, markdown, summarize  # noqa: E402


def seed_dirs(run: Path) -> list[Path]:
    dirs = sorted(d for d in run.glob("seed_*") if d.is_dir())
    return dirs or [run]  # a lone search's run directory is its own seed


def eq8_blocks(run_dir: Path, block: int, epochs: int) -> dict[str, list[float | None]]:
    """Mean eq. 8 cosine per block of epochs (records are 0-based `epoch` of the step)."""
    recs = [r for r in read_jsonl(run_dir / "analysis.jsonl") if r.get("kind") == "grad_corr"]
    out: dict[str, list[float | None]] = {}
    for which in ("same_step", "prev_w"):
        row = []
        for b0 in range(0, epochs, block):
            vals = [r[which]["mean_cos"] for r in recs if b0 <= r["epoch"] < b0 + block
                    and r.get(which) and r[which].get("mean_cos") is not None]
            row.append(sum(vals) / len(vals) if vals else None)
        out[which] = row
    return out


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--title", default="NB201 stability, batched seeds")
    a = p.parse_args(argv)
    missing = [str(r) for r in a.runs if not r.is_dir()]
    if missing:
        print(f"error: not a run directory: {missing[0]}", file=sys.stderr)
        return 2
    runs = [r for run in a.runs for r in (load_run(d) for d in seed_dirs(run)) if r is not None]
    for r in runs:
        r["eq8_blocks"] = eq8_blocks(Path(r["dir"]), a.block, r["epochs"])
        r["name"] = f"{Path(r['dir']).parent.name}/{Path(r['dir']).name}"
    groups = summarize(runs)
    members = {}  # group -> its runs by seed (summarize's groups are group_key's keys, in its order)
    for r in sorted(runs, key=lambda r: r["seed"]):
        members.setdefault(group_key(r), []).append(r)
    epochs = max(r["epochs"] for r in runs)
    starts = range(0, epochs, a.block)
    lines = [markdown(groups, runs, a.title), f"### Eq. 8 per block of {a.block} epochs (mean over seeds)", "",
             "| method | alpha opt | lr | which | " + " | ".join(f"{b + 1}-{min(b + a.block, epochs)}" for b in starts)
             + " |", "|---|---|---|---|" + "---|" * len(starts)]
    per_seed = ["", "### Parameter-free edges of the final cell, per seed", ""]
    for g in groups:
        rs = members[(g["strategy"], g["activation"], g["alpha_optimizer"], g["lr"])]
        g["eq8_blocks"] = {}
        for which in ("same_step", "prev_w"):
            g["eq8_blocks"][which] = [_mean(list(c)) for c in zip(*[r["eq8_blocks"][which] for r in rs])]
            cells = " | ".join("" if v is None else f"{v:.3f}" for v in g["eq8_blocks"][which])
            lines.append(f"| {g['method']} | {g['alpha_optimizer']} | {g['lr']:g} | {which} | {cells} |")
        per_seed.append(f"- {g['method']} ({g['alpha_optimizer']}, lr {g['lr']:g}): "
                        + ", ".join(f"s{r['seed']} {r['param_free_edges']}" for r in rs))
    lines += per_seed
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps({"groups": groups, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
