"""Stability report of a grid of NB201 searches, in the paper's table form (Tables 1, 4, 5).

Each run directory is read on its own terms (its resolved `config.yaml`, `nb201_scores.jsonl` written
per epoch by the search loop, `summary.json` once finished), so a report can be rebuilt from any
results folder, including one whose searches were cut short: an unfinished run contributes its last
scored epoch and is counted as partial.

Per group (strategy x activation x alpha optimizer x lr): mean +- std over seeds of the six NB201
accuracies of the final cell (std is the population std, ddof=0, as NB201 papers report it), the
worst CIFAR-10 test accuracy over the second half of the search (epochs > E/2; mean over seeds and
the minimum), and the number of parameter-free edges (none / skip / pool) in the final cell.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from sdarts.analysis.curves import read_jsonl
from sdarts.nasbench201.table import COLUMNS

PARAM_FREE = ("none", "skip_connect", "avg_pool_3x3")
METHOD = {"single_level": "Single-DARTS", "bilevel": "DARTS (1st order)",
          "bilevel_second_order": "DARTS (2nd order)", "two_batch": "same subset, different batches"}
HEAD = {"cifar10_valid_val": "C10 valid", "cifar10_test": "C10 test", "cifar100_val": "C100 valid",
        "cifar100_test": "C100 test", "imagenet16_val": "IN16 valid", "imagenet16_test": "IN16 test"}


def param_free_edges(arch: str) -> int:
    return sum(arch.count(f"|{op}~") for op in PARAM_FREE)


def grad_corr_means(run_dir: Path) -> dict | None:
    """Mean over the logged steps of the eq. 8 cosine (mean over edges and analysed cells), for the
    same-step pair (alpha batch vs. w batch of one step) and `prev_w` (alpha batch of step t vs. w
    batch of step t-1); None when the run logged no gradient correlation."""
    recs = [r for r in read_jsonl(Path(run_dir) / "analysis.jsonl") if r.get("kind") == "grad_corr"]
    if not recs:
        return None
    out = {}
    for which in ("same_step", "prev_w"):
        vals = [r[which]["mean_cos"] for r in recs if r.get(which) and r[which]["mean_cos"] is not None]
        out[which] = sum(vals) / len(vals) if vals else None
    out["records"] = len(recs)
    return out


def load_run(run_dir: Path) -> dict | None:
    """One run's trajectory and final scores; None when it has not scored a single epoch yet."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        return None
    cfg = yaml.safe_load(cfg_path.read_text())
    by_epoch: dict[int, dict] = {}
    for rec in read_jsonl(run_dir / "nb201_scores.jsonl"):
        by_epoch[int(rec["epoch"])] = rec  # a resumed run may repeat an epoch; the last one wins
    traj = [by_epoch[e] for e in sorted(by_epoch)]
    if not traj:
        return None
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    epochs = int(cfg["epochs"])
    last = traj[-1]
    final = {c: float(last[c]) for c in COLUMNS}
    arch = last["arch"]
    if summary and summary.get("nb201"):
        final = {c: float(summary["nb201"][c]) for c in COLUMNS}
        arch = summary["genotype"]["arch"]
    half = [r["cifar10_test"] for r in traj if r["epoch"] > epochs / 2]
    return {
        "name": run_dir.name, "dir": str(run_dir), "finished": summary is not None,
        "strategy": cfg["strategy"], "activation": cfg["arch"]["activation"],
        "alpha_optimizer": cfg["optim"]["alpha"]["optimizer"], "lr": float(cfg["optim"]["w"]["lr"]),
        "alpha_lr": float(cfg["optim"]["alpha"]["lr"]), "seed": int(cfg["seed"]), "epochs": epochs,
        "epochs_done": int(traj[-1]["epoch"]), "final": final, "final_arch": arch,
        "param_free_edges": param_free_edges(arch),
        "worst_second_half": min(half) if half else None,
        "trajectory": [{"epoch": int(r["epoch"]), "arch": r["arch"], **{c: float(r[c]) for c in COLUMNS}}
                       for r in traj],
        "wall_time_s": summary.get("wall_time_s") if summary else None,
        "grad_corr": grad_corr_means(run_dir),
    }


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def group_key(run: dict) -> tuple:
    return (run["strategy"], run["activation"], run["alpha_optimizer"], run["lr"])


def sort_key(key: tuple) -> tuple:
    """Rows in the paper's order: method, then softmax before sigmoid, then alpha optimizer, larger lr first."""
    strat, act, aopt, lr = key
    return (list(METHOD).index(strat) if strat in METHOD else 9, {"softmax": 0, "sigmoid": 1}.get(act, 2), aopt, -lr)


def summarize(runs: list[dict]) -> list[dict]:
    """One entry per group: mean/std of the final accuracies, worst in the second half, counts."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(group_key(r), []).append(r)
    out = []
    for key in sorted(groups, key=sort_key):
        rs = sorted(groups[key], key=lambda r: r["seed"])
        g = {"strategy": key[0], "method": METHOD.get(key[0], key[0]), "activation": key[1],
             "alpha_optimizer": key[2], "lr": key[3], "seeds": [r["seed"] for r in rs],
             "finished": sum(r["finished"] for r in rs), "partial": sum(not r["finished"] for r in rs),
             "mean": {}, "std": {}}
        for c in COLUMNS:
            g["mean"][c], g["std"][c] = _mean_std([r["final"][c] for r in rs])
        worst = [r["worst_second_half"] for r in rs if r["worst_second_half"] is not None]
        g["worst_second_half_mean"] = sum(worst) / len(worst) if worst else None
        g["worst_second_half_min"] = min(worst) if worst else None
        g["param_free_edges_mean"] = sum(r["param_free_edges"] for r in rs) / len(rs)
        g["final_archs"] = [r["final_arch"] for r in rs]
        gc = [r["grad_corr"] for r in rs if r.get("grad_corr")]
        g["grad_corr"] = None if not gc else {
            w: (sum(x[w] for x in gc if x[w] is not None) / max(1, sum(x[w] is not None for x in gc)))
            for w in ("same_step", "prev_w")}
        out.append(g)
    return out


def markdown(groups: list[dict], runs: list[dict], title: str = "NB201 search stability") -> str:
    lines = [f"## {title}", "",
             "Final cell's NB201 accuracies, mean +- std over seeds (population std). 'worst 2nd half' = lowest "
             "CIFAR-10 test accuracy of the derived cell over epochs > E/2 (mean over seeds / minimum). "
             "'p-free' = parameter-free edges (none/skip/pool) in the final cell, of 6.", "",
             "| method | act. | alpha opt | lr | runs | " + " | ".join(HEAD[c] for c in COLUMNS)
             + " | worst 2nd half | p-free |",
             "|---|---|---|---|---|" + "---|" * len(COLUMNS) + "---|---|"]
    for g in groups:
        runs_s = f"{g['finished']}" + (f" (+{g['partial']} partial)" if g["partial"] else "")
        accs = " | ".join(f"{g['mean'][c]:.2f}+-{g['std'][c]:.2f}" for c in COLUMNS)
        worst = "n/a" if g["worst_second_half_mean"] is None else \
            f"{g['worst_second_half_mean']:.2f} / {g['worst_second_half_min']:.2f}"
        lines.append(f"| {g['method']} | {g['activation']} | {g['alpha_optimizer']} | {g['lr']:g} | {runs_s} | "
                     f"{accs} | {worst} | {g['param_free_edges_mean']:.1f} |")
    if any(g.get("grad_corr") for g in groups):
        lines += ["", "### Gradient correlation (eq. 8), mean over logged steps, edges and analysed cells", "",
                  "'same step': alpha-update batch vs. w-update batch of the same step (1 by construction for "
                  "single-level); 'prev. w step': alpha batch of step t vs. w batch of step t-1.", "",
                  "| method | act. | alpha opt | lr | same step | prev. w step |", "|---|---|---|---|---|---|"]
        for g in groups:
            if g.get("grad_corr"):
                c = g["grad_corr"]
                lines.append(f"| {g['method']} | {g['activation']} | {g['alpha_optimizer']} | {g['lr']:g} | "
                             f"{c['same_step']:.3f} | {c['prev_w']:.3f} |")
    lines += ["", "### CIFAR-10 test accuracy of the derived cell at every epoch", ""]
    if runs:
        n = max(r["epochs"] for r in runs)
        lines.append("| run | " + " | ".join(str(e) for e in range(1, n + 1)) + " |")
        lines.append("|---|" + "---|" * n)
        for r in sorted(runs, key=lambda r: (sort_key(group_key(r)), r["seed"])):
            vals = {t["epoch"]: t["cifar10_test"] for t in r["trajectory"]}
            cells = [f"{vals[e]:.1f}" if e in vals else "" for e in range(1, n + 1)]
            lines.append(f"| {r['name']}{'' if r['finished'] else ' (partial)'} | " + " | ".join(cells) + " |")
    lines += ["", "### Final cells", ""]
    for r in sorted(runs, key=lambda r: (sort_key(group_key(r)), r["seed"])):
        lines.append(f"- `{r['name']}`: `{r['final_arch']}`")
    return "\n".join(lines) + "\n"


def collect(runs_dir: Path) -> list[dict]:
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return [r for r in (load_run(d) for d in sorted(runs_dir.iterdir()) if d.is_dir()) if r is not None]
