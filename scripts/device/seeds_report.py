"""How far the batched seeds of scripts/device/seeds_check.sh got: per seed, epochs done and the last NB201 scores.

    python scripts/device/seeds_report.py RUNS OUT.json [--brief]

RUNS holds one scripts/nb201_stability.py results folder per grid (its status.json names every seed's
search and run directory, RUNS/<grid>/runs/<cell>/seed_<s>/). Each seed's nb201_scores.jsonl and
summary.json are read directly, so this works while the searches run. Writes OUT.json (per seed: epochs
done, per-epoch CIFAR-10 test accuracy and elapsed seconds, the last scores, s/epoch, the wall time all
epochs project to, the last logged step and images/s; per grid: mean and std of the last CIFAR-10 test
accuracy) and prints one line per grid (--brief) or a table.
Exit code: 0 every seed finished its epochs, 1 not (or nothing found).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml

from collect import _jsonl  # noqa: E402  (scripts/device/collect.py: JSONL records, a torn last line ends them)

COLS = ("cifar10_test", "cifar100_test", "imagenet16_test")


def _config(d: Path) -> dict:
    try:
        return yaml.safe_load((d / "config.yaml").read_text()) or {}
    except OSError:
        return {}


def _images_per_s(metrics: list[dict], batch: int | None) -> float | None:
    """Training images/s of one seed from its metrics lines' steps and elapsed seconds (median over the
    last 20 intervals; not the lines' images_per_s, which stacked seeds undercount by the batch size)."""
    rates = [(b["step"] - a["step"]) * batch / (b["elapsed_s"] - a["elapsed_s"]) for a, b in zip(metrics, metrics[1:])
             if b["step"] > a["step"] and b["elapsed_s"] > a["elapsed_s"]]
    return statistics.median(rates[-20:]) if rates and batch else None


def seed_record(grid: str, name: str, st: dict) -> dict:
    d = Path(st["dir"])
    by_epoch = {int(r["epoch"]): r for r in _jsonl(d / "nb201_scores.jsonl")}  # a resumed epoch: the last wins
    scores = [by_epoch[e] for e in sorted(by_epoch)]
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else None
    el = [s["elapsed_s"] for s in scores]
    steps = [b - a for a, b in zip(el, el[1:]) if b > a]  # (elapsed restarts at a resume)
    cfg = _config(d)
    epochs = cfg.get("epochs")
    data, engine = cfg.get("data") or {}, cfg.get("engine") or {}
    batch = data.get("micro_batch", 0) * engine.get("grad_accum", 1) or None
    c10 = [s["cifar10_test"] for s in scores]
    metrics = [m for m in _jsonl(d / "metrics.jsonl") if "step" in m and "elapsed_s" in m]
    half = [s["cifar10_test"] for s in scores if epochs and s["epoch"] > epochs / 2]
    return {"grid": grid, "name": name, "dir": str(d), "state": st.get("state"),
            "epochs_done": len(scores), "epochs": epochs, "finished": summary is not None,
            "numerical_fault": (summary or {}).get("numerical_fault"),
            "last": {c: scores[-1][c] for c in COLS} if scores else None,
            "last_arch": scores[-1]["arch"] if scores else None,
            "worst_second_half": min(half) if half else None,
            "s_per_epoch": statistics.median(steps) if steps else None,
            "projected_s": el[0] + (epochs - 1) * statistics.median(steps) if steps and epochs else None,
            "step": metrics[-1]["step"] if metrics else None,
            "images_per_s": _images_per_s(metrics, batch),
            "trajectory_cifar10_test": c10, "elapsed_s": el}


def collect(runs: Path) -> dict:
    out = {"seeds": [], "grids": {}}
    for status in sorted(runs.glob("*/status.json")):
        grid = status.parent.name
        recs = [seed_record(grid, n, st) for n, st in json.loads(status.read_text()).items()]
        out["seeds"] += recs
        last = [r["last"]["cifar10_test"] for r in recs if r["last"] and not r["numerical_fault"]]
        out["grids"][grid] = {
            "seeds": len(recs), "min_epochs_done": min(r["epochs_done"] for r in recs) if recs else 0,
            "epochs": recs[0]["epochs"] if recs else None, "finished": sum(r["finished"] for r in recs),
            "faults": sum(bool(r["numerical_fault"]) for r in recs),
            "step": min((r["step"] for r in recs if r["step"] is not None), default=None),
            "images_per_s_per_seed": recs[0]["images_per_s"] if recs else None,
            "projected_s": max((r["projected_s"] for r in recs if r["projected_s"]), default=None),
            "c10_test_last_mean": statistics.mean(last) if last else None,
            "c10_test_last_std": statistics.pstdev(last) if last else None}
    return out


def _f(x, fmt=".2f") -> str:
    return "-" if x is None else format(x, fmt)


def main(argv: list[str]) -> int:
    runs, out_path, brief = Path(argv[0]), Path(argv[1]), "--brief" in argv
    data = collect(runs)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out_path)
    grids = data["grids"]
    for g, v in grids.items():
        print(f"{g}: {v['min_epochs_done']}/{v['epochs'] or '?'} epochs (slowest seed), {v['finished']}/{v['seeds']} "
              f"finished, {v['faults']} numerical faults, last C10 test {_f(v['c10_test_last_mean'])}"
              f" +- {_f(v['c10_test_last_std'])}; step {v['step']}, {_f(v['images_per_s_per_seed'], '.0f')} img/s per"
              f" seed; all epochs project to {_f(v['projected_s'], '.0f')} s")
    if not brief:
        print(f"\n{'search':40} {'epochs':>7} {'C10 test':>8} {'C100 test':>9} {'IN16 test':>9} "
              f"{'worst 2nd half':>14} {'s/epoch':>7}  state")
        for r in data["seeds"]:
            last = r["last"] or {}
            state = "numerical fault" if r["numerical_fault"] else "finished" if r["finished"] else r["state"]
            print(f"{r['name']:40} {r['epochs_done']:>3}/{r['epochs'] or '?':<3} {_f(last.get('cifar10_test')):>8} "
                  f"{_f(last.get('cifar100_test')):>9} {_f(last.get('imagenet16_test')):>9} "
                  f"{_f(r['worst_second_half']):>14} {_f(r['s_per_epoch'], '.1f'):>7}  {state}")
    done = bool(grids) and all(v["finished"] == v["seeds"] for v in grids.values())
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
