"""Stacked seeds in fp32 on the demo: how closely each stacked seed follows its lone search.

Runs the demo search (configs/search/demo.yaml) with `seeds: [0, 1]` stacked, and each seed alone twice:
NCHW (`model.channels_last=false`, the stack's own layout: memory formats cannot be chosen inside vmap)
and NHWC (the lone default). All with `log.every_steps=1`. Per seed it reports:
- `same_losses_for`: the steps over which the stacked seed's loss equals the NCHW lone search's to 1e-5;
- `final_alpha_gap`: max abs difference of the last alphas (stacked vs NCHW, stacked vs NHWC, and the
  lone search against itself across the two layouts: fp32 rounding alone);
- `same_genotype_epochs`: epochs (of 20) whose derived genotype is the same, for the same three pairs.

  OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/python scripts/stacked_fp32_demo.py --out runs/stacked_fp32

Prints a table, then one JSON line. Takes about 5 minutes on a 2-core VM.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEEDS = (0, 1)
PAIRS = (("stacked", "nchw"), ("stacked", "nhwc"), ("nhwc", "nchw"))


def run_dirs(out: Path, seed: int) -> dict[str, Path]:
    return {"stacked": out / "stacked" / f"seed_{seed}", "nchw": out / f"nchw_{seed}", "nhwc": out / f"nhwc_{seed}"}


def search_all(out: Path, epochs: int) -> None:
    from sdarts.config import load
    from sdarts.search.loop import run_search
    base = [f"epochs={epochs}", "log.progress=false", "log.tensorboard=false", "log.every_steps=1"]
    runs = {out / "stacked": ["seeds=[0,1]"]}
    for s in SEEDS:
        runs[out / f"nchw_{s}"] = [f"seed={s}", "model.channels_last=false"]
        runs[out / f"nhwc_{s}"] = [f"seed={s}"]
    for run_dir, over in runs.items():
        if not (run_dir / "summary.json").exists():
            run_search(load(ROOT / "configs/search/demo.yaml", base + over), run_dir)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") == "train"]


def alphas(run_dir: Path) -> list[list[float]]:
    rows = [json.loads(line)["weights"] for line in (run_dir / "alphas.jsonl").read_text().splitlines()]
    return [[v for cell in w.values() for row in cell for v in row] for w in rows]


def genotypes(run_dir: Path) -> list[str]:
    return [p.read_text() for p in sorted((run_dir / "genotypes").glob("epoch_*.json"))]


def compare(dirs: dict[str, Path]) -> dict:
    a, b = losses(dirs["stacked"]), losses(dirs["nchw"])
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if abs(x - y) > 1e-5), min(len(a), len(b)))
    out = {"same_losses_for": same, "steps": len(a), "final_alpha_gap": {}, "same_genotype_epochs": {}}
    for p, q in PAIRS:
        ap, aq = alphas(dirs[p])[-1], alphas(dirs[q])[-1]
        gp, gq = genotypes(dirs[p]), genotypes(dirs[q])
        out["final_alpha_gap"][f"{p}_vs_{q}"] = round(max(abs(x - y) for x, y in zip(ap, aq)), 4)
        out["same_genotype_epochs"][f"{p}_vs_{q}"] = sum(x == y for x, y in zip(gp, gq))
    out["epochs"] = len(genotypes(dirs["stacked"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="run directories go here (kept: a rerun reuses them)")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args(argv)
    search_all(args.out, args.epochs)
    results = {s: compare(run_dirs(args.out, s)) for s in SEEDS}
    print(f"{'seed':5s} {'pair':18s} {'final alpha gap':>16s} {'same genotype epochs':>21s}")
    for s, r in results.items():
        for p, q in PAIRS:
            k = f"{p}_vs_{q}"
            gap, same = r["final_alpha_gap"][k], r["same_genotype_epochs"][k]
            print(f"{s:<5d} {k:18s} {gap:16.4f} {same:14d} / {r['epochs']}")
        print(f"{s:<5d} stacked losses equal the NCHW lone search's (1e-5) for {r['same_losses_for']} "
              f"of {r['steps']} steps")
    print(json.dumps({"threads": torch.get_num_threads(), "seeds": {str(s): r for s, r in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
