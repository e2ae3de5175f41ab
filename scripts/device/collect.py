"""Gathers the searches of a GPU check into one JSON file (the device returns at most 8 files).

    python scripts/device/collect.py RUNS_ROOT OUT.json
For every run directory under RUNS_ROOT: its config overrides (from the run name), per-epoch NB201 scores
and elapsed time, the final summary when it finished, and throughput from metrics.jsonl.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _jsonl(p: Path) -> list[dict]:
    out = []
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def collect(root: Path) -> dict:
    runs = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        scores = _jsonl(d / "nb201_scores.jsonl")
        metrics = _jsonl(d / "metrics.jsonl")
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else None
        runs[d.name] = {
            "finished": summary is not None,
            "epochs_done": len(scores),
            "trajectory_cifar10_test": [s["cifar10_test"] for s in scores],
            "elapsed_s": [s["elapsed_s"] for s in scores],
            "archs": [s["arch"] for s in scores],
            "last": scores[-1] if scores else None,
            "images_per_s_mean": (sum(m["images_per_s"] for m in metrics[1:]) / max(1, len(metrics) - 1))
            if len(metrics) > 1 else None,
            "summary": summary,
        }
    return runs


if __name__ == "__main__":
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(collect(root), indent=1))
    tmp.replace(out)
