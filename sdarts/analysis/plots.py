"""Figures of a search, matplotlib only (no graphviz binary): alpha curves (the paper's Figure 4), NB201
accuracy per epoch (Figure 1), eq. 8 gradient correlation (Figure 2), dL/dp per op (Figure 3), cell
diagrams, and the stability grid's trajectories. Every function returns a `Figure`; `render_run`
writes a run directory's figures to `run_dir/plots/*.png`.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from sdarts.analysis.curves import AlphaCurves, alpha_curves, dldp_curves, grad_corr_curves, nb201_curves  # noqa: E402

OP_COLORS = {"none": "#9e9e9e", "skip_connect": "#1f77b4", "nor_conv_1x1": "#ff7f0e", "nor_conv_3x3": "#d62728",
             "avg_pool_3x3": "#2ca02c", "max_pool_3x3": "#17becf", "sep_conv_3x3": "#d62728",
             "sep_conv_5x5": "#9467bd", "dil_conv_3x3": "#ff7f0e", "dil_conv_5x5": "#8c564b"}
NB201_LABELS = {"cifar10_test": "CIFAR-10 test", "cifar10_valid_val": "CIFAR-10 valid",
                "cifar100_test": "CIFAR-100 test", "imagenet16_test": "ImageNet16-120 test"}


def _grid(n: int) -> tuple[int, int]:
    cols = max(1, min(n, 3)) if n <= 9 else 4
    return math.ceil(n / cols), cols


def _color(op: str, k: int) -> str:
    return OP_COLORS.get(op, f"C{k}")


def alpha_figure(curves: AlphaCurves, cell_type: str = "normal", title: str | None = None) -> Figure:
    """One panel per edge, one line per op: the activated weight p of each op at each epoch end."""
    w = curves.weights[cell_type]
    rows, cols = _grid(len(curves.edges))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), sharex=True, squeeze=False)
    for e, edge in enumerate(curves.edges):
        ax = axes[e // cols][e % cols]
        for k, op in enumerate(curves.ops):
            ax.plot(curves.epochs, w[:, e, k], color=_color(op, k), label=op, lw=1.6)
        ax.set_title(f"edge {edge} (node {edge.split('<-')[1]} -> node {edge.split('<-')[0]})", fontsize=9)
        ax.set_ylabel(f"p = {curves.activation}(alpha)")
        ax.set_xlabel("epoch (0 = init)")
        ax.grid(alpha=0.3)
    for e in range(len(curves.edges), rows * cols):
        axes[e // cols][e % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), title="candidate op")
    fig.suptitle(title or f"Architecture weights over the search ({cell_type} cell, {curves.activation})")
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    return fig


def nb201_figure(scores: dict, title: str | None = None) -> Figure:
    """NB201 accuracy (200-epoch benchmark training) of the cell derived at each epoch end."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, label in NB201_LABELS.items():
        if key in scores:
            ax.plot(scores["epoch"], scores[key], marker="o", ms=3, label=label)
    ax.set_xlabel("search epoch")
    ax.set_ylabel("NB201 accuracy of the derived cell (%)")
    ax.set_title(title or "NAS-Bench-201 accuracy of the cell derived at each epoch")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def grad_corr_figure(gc: dict, title: str | None = None) -> Figure:
    """Eq. 8 cosine per edge over the search; the bold line is the mean over edges and cells."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, vals in gc["edges"].items():
        ax.plot(gc["step"], vals, lw=0.8, alpha=0.5, label=name)
    ax.plot(gc["step"], gc["mean"], color="black", lw=2.2, label="mean over edges")
    ax.axhline(0.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("search step")
    ax.set_ylabel("cos(dL_alpha-batch/dw, dL_w-batch/dw)")
    ax.set_title(title or "Gradient correlation between the alpha-update and w-update batches (eq. 8)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=3, loc="best")
    fig.tight_layout()
    return fig


def dldp_figure(d: dict, title: str | None = None) -> Figure:
    """dL/dp per op, one panel per edge (negative: more of this op would lower the loss)."""
    rows, cols = _grid(len(d["edges"]))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), sharex=True, squeeze=False)
    for e, edge in enumerate(d["edges"]):
        ax = axes[e // cols][e % cols]
        for k, op in enumerate(d["ops"]):
            ax.plot(d["step"], d["values"][:, e, k], color=_color(op, k), label=op, lw=1.2)
        ax.axhline(0.0, color="gray", lw=0.8, ls="--")
        ax.set_title(f"edge {edge}", fontsize=9)
        ax.set_xlabel("search step")
        ax.set_ylabel("dL/dp")
        ax.grid(alpha=0.3)
    for e in range(len(d["edges"]), rows * cols):
        axes[e // cols][e % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), title="candidate op")
    fig.suptitle(title or "Loss gradient on each op's weight, dL/dp, on the alpha-update batch")
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    return fig


def _draw_cell(ax, nodes: list[tuple[str, float]], edges: list[tuple[int, int, str]], title: str) -> None:
    """Nodes on a line (name, x); edges (src, dst, op) as arcs labelled with the op."""
    for name, x in nodes:
        ax.add_patch(plt.Circle((x, 0), 0.28, color="#e8eef7", ec="#335", lw=1.5, zorder=3))
        ax.text(x, 0, name, ha="center", va="center", fontsize=10, zorder=4)
    for k, (src, dst, op) in enumerate(edges):
        x0, x1 = nodes[src][1], nodes[dst][1]
        span = abs(x1 - x0)
        rad = -0.35 if k % 2 == 0 else 0.35
        rad = rad * (1.0 if span > 1.01 else 0.6)
        style = dict(color=_color(op, 0), lw=1.8, ls="--" if op == "none" else "-")
        ax.add_patch(FancyArrowPatch((x0 + 0.28, 0), (x1 - 0.28, 0), connectionstyle=f"arc3,rad={rad}",
                                     arrowstyle="-|>", mutation_scale=12, zorder=2, **style))
        ymid = -rad * span / 2
        ax.text((x0 + x1) / 2, ymid, op, ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=style["color"], lw=0.8), zorder=5)
    xs = [x for _, x in nodes]
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(-1.6, 1.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title)


def cell_figure(genotype, title: str | None = None) -> Figure:
    """A derived cell as a graph: NB201 (4 nodes, 6 edges; `none` dashed: no connection) or DARTS
    (normal and reduction cells: inputs c_{k-2}, c_{k-1}, 4 nodes, output c_{k} = concat)."""
    from sdarts.genotype import NB201_EDGES
    if genotype.space == "nb201":
        fig, ax = plt.subplots(figsize=(9, 4))
        nodes = [(f"{i}", 1.6 * i) for i in range(4)]
        edges = [(j, i, op) for (i, j), op in zip(NB201_EDGES, genotype.ops)]
        _draw_cell(ax, nodes, edges, title or "NB201 cell (node 0 = input, node 3 = output; dashed = none)")
        fig.text(0.5, 0.03, genotype.to_arch_str(), ha="center", fontsize=8, family="monospace")
        return fig
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.5))
    for ax, kind in zip(axes, ("normal", "reduce")):
        pairs = getattr(genotype, kind)
        concat = getattr(genotype, f"{kind}_concat")
        nodes = [("c_{k-2}", 0.0), ("c_{k-1}", 1.6)] + [(str(i), 1.6 * (i + 2)) for i in range(4)] + [("c_{k}", 1.6 * 6)]
        edges = [(src, 2 + k // 2, op) for k, (op, src) in enumerate(pairs)]
        edges += [(2 + n - 2, 6, "concat") for n in concat]
        _draw_cell(ax, nodes, edges, f"{kind} cell")
    fig.suptitle(title or "DARTS cells of the derived genotype")
    fig.tight_layout()
    return fig


def stability_figure(runs: list[dict], title: str = "NB201 accuracy per epoch") -> Figure:
    """One panel per (method, activation, alpha optimizer, lr): each seed's CIFAR-10 test accuracy of
    the derived cell at every epoch (the paper's Figure 1)."""
    from sdarts.nasbench201.report import METHOD, group_key, sort_key
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(group_key(r), []).append(r)
    keys = sorted(groups, key=sort_key)
    rows, cols = _grid(len(keys))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for n, key in enumerate(keys):
        ax = axes[n // cols][n % cols]
        for r in sorted(groups[key], key=lambda r: r["seed"]):
            ep = [t["epoch"] for t in r["trajectory"]]
            acc = [t["cifar10_test"] for t in r["trajectory"]]
            ax.plot(ep, acc, marker="o", ms=2.5, lw=1.2, label=f"seed {r['seed']}" + ("" if r["finished"] else " (partial)"))
        strat, act, aopt, lr = key
        ax.set_title(f"{METHOD.get(strat, strat)}, {act}, alpha {aopt}, lr {lr:g}", fontsize=9)
        ax.set_xlabel("search epoch")
        ax.set_ylabel("NB201 CIFAR-10 test (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for n in range(len(keys), rows * cols):
        axes[n // cols][n % cols].axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def render_run(run_dir: Path) -> list[Path]:
    """Every figure the run's logs allow, as `run_dir/plots/<name>.png`; returns the paths."""
    from sdarts import genotype as G
    run_dir = Path(run_dir)
    out_dir = run_dir / "plots"
    written = []
    curves = alpha_curves(run_dir)
    for cell_type in curves.weights:
        written.append(save(alpha_figure(curves, cell_type), out_dir / f"alphas_{cell_type}.png"))
    scores = nb201_curves(run_dir)
    if scores:
        written.append(save(nb201_figure(scores), out_dir / "nb201_accuracy.png"))
    geno_path = run_dir / "genotype.json"
    if not geno_path.exists():
        epochs = sorted((run_dir / "genotypes").glob("epoch_*.json"))
        geno_path = epochs[-1] if epochs else None
    if geno_path is not None:
        written.append(save(cell_figure(G.load(geno_path), f"Derived cell ({geno_path.name})"), out_dir / "cell.png"))
    gc = grad_corr_curves(run_dir)
    if len(gc["step"]):
        written.append(save(grad_corr_figure(gc), out_dir / "grad_corr.png"))
        lag = grad_corr_curves(run_dir, "prev_w")
        if len(lag["step"]):
            written.append(save(grad_corr_figure(
                lag, "Gradient correlation: alpha batch of step t vs. w batch of step t-1"), out_dir / "grad_corr_prev_w.png"))
    d = dldp_curves(run_dir)
    if d:
        written.append(save(dldp_figure(d), out_dir / "dl_dp.png"))
    return written
