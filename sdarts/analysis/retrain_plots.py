"""Figures of a retrain run (`retrain/train.py`'s run directory), matplotlib only: accuracy, loss and the
lr / drop-path schedules per epoch, each with the selected epoch marked. `retrain_figures` builds them
from `curves.retrain_curves`; `render_retrain` writes them to `run_dir/plots/*.png`.

The x axis of the per-epoch panels is the epoch k = 1..epochs, as the evaluation records count it
(the evaluation after epoch k, the training steps of epoch k, the lr and drop-path epoch k ran with).
Evaluation curves: the holdout (carved from the training data; it selects the checkpoint) solid with
squares, the test/val set ("eval" in metrics.jsonl) dashed with circles; the model blue, its EMA orange.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sdarts.analysis.curves import EVAL_SPLITS, RetrainCurves, retrain_curves
from sdarts.analysis.plots import cell_figure, plt, save

#: split -> (legend label, color, line style, marker)
SPLIT_STYLE = {"holdout": ("holdout (selection), model", "C0", "-", "s"),
               "holdout_ema": ("holdout (selection), EMA", "C1", "-", "s"),
               "eval": ("test, model", "C0", "--", "o"),
               "eval_ema": ("test, EMA", "C1", "--", "o")}
TRAIN_COLOR = "0.35"
MARK_COLOR = "#c2185b"


def _epoch_axis(ax, c: RetrainCurves, ylabel: str) -> None:
    """Integer epochs, with half an epoch of room at both ends so a mark on the first or last is seen."""
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, _last_epoch(c) + 0.5)
    ax.grid(alpha=0.3)


def _last_epoch(c: RetrainCurves) -> int:
    ends = [int(c.epochs["epoch"].max())] if len(c.epochs["epoch"]) else []
    ends += [int(ev["epoch"].max()) for ev in c.evals.values()]
    return max(ends + [c.selection.epoch if c.selection else 1])


def _marker(c: RetrainCurves, marker: str, xs) -> str | None:
    """Point markers while the epochs are few enough to tell apart (a 600-epoch run gets plain lines),
    and always on a curve of a few points (a test set evaluated only after the last epoch)."""
    return marker if _last_epoch(c) <= 60 or len(xs) <= 3 else None


def _mark(ax, c: RetrainCurves, x: float | None = None, label: bool = True) -> None:
    """The selected epoch as a vertical line (gid 'selected') at `x` (default: the epoch); an unmarked
    run gets a legend entry saying why."""
    if c.selection is None:
        if label:
            ax.plot([], [], " ", label=c.unmarked)
        return
    ax.axvline(c.selection.epoch if x is None else x, color=MARK_COLOR, ls=":", lw=1.8, gid="selected",
               label=c.selection.label if label else None)


def _legend_below(fig: Figure, axes, ncol: int = 3) -> None:
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    # the selected epoch (or why there is none) last: one entry after the curves
    last = [k for k, h in enumerate(handles) if h.get_gid() == "selected" or not h.get_xydata().size]
    order = [k for k in range(len(handles)) if k not in last] + last
    fig.legend([handles[k] for k in order], [labels[k] for k in order], loc="lower center",
               ncol=min(ncol, len(labels)), fontsize=8)


def _eval_curves(ax, c: RetrainCurves, key: str, suffix: str = "") -> None:
    """One line per evaluation split present (`key`: 'top1', 'top5' or 'loss')."""
    for split in EVAL_SPLITS:
        if split in c.evals:
            lab, color, ls, mk = SPLIT_STYLE[split]
            ev = c.evals[split]
            ax.plot(ev["epoch"], ev[key], color=color, ls=ls, marker=_marker(c, mk, ev["epoch"]), ms=4,
                    lw=2.0 if split.startswith("holdout") else 1.4, label=lab + suffix)


def _train_curve(ax, c: RetrainCurves, values, label: str) -> None:
    if len(c.epochs["epoch"]):
        ax.plot(c.epochs["epoch"], values, color=TRAIN_COLOR, lw=1.2, marker=_marker(c, ".", c.epochs["epoch"]),
                label=label)


def _unfinished(c: RetrainCurves) -> str:
    return "" if c.finished else " (run unfinished: no summary.json)"


def accuracy_figure(c: RetrainCurves, title: str | None = None) -> Figure:
    """Top-1 and top-5 per epoch of every evaluation split present, the training batches' top-1 (mean of
    the logged steps, augmented and with drop-path), and the selected epoch (a star on the curve that chose it)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, metric, name in zip(axes, ("top1", "top5"), ("top-1", "top-5")):
        if metric == "top1":
            _train_curve(ax, c, 100.0 * c.epochs["acc"], "train batches (mean of logged steps)")
        _eval_curves(ax, c, metric)
        sel = c.selection
        if sel is not None and sel.split in c.evals:
            ev = c.evals[sel.split]
            hit = ev["epoch"] == sel.epoch
            if hit.any():
                ax.plot(ev["epoch"][hit], ev[metric][hit], "*", color=MARK_COLOR, ms=15, zorder=5, gid="selected_point")
        _mark(ax, c)
        _epoch_axis(ax, c, f"{name} accuracy (%)")
        ax.set_title(f"{name.capitalize()} accuracy per epoch", fontsize=10)
    _legend_below(fig, axes)
    sup = title or "Retrain: accuracy per epoch" + _unfinished(c)
    if c.final:
        sup += (f"\nfinal test: top-1 {c.final['top1']:.2f}, top-5 {c.final['top5']:.2f} "
                f"(epoch {c.final['epoch']}, {'EMA' if c.final['source'] == 'ema' else 'model'} weights)")
    fig.suptitle(sup)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def loss_figure(c: RetrainCurves, title: str | None = None) -> Figure:
    """Left: the training loss of every logged step (label-smoothed, plus the auxiliary head's share), the
    epoch ends on a top axis. Right: per epoch, its mean and each evaluation split's plain cross-entropy."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.2))
    left.plot(c.steps["step"], c.steps["loss"], color=TRAIN_COLOR, lw=1.0, label="train loss (logged steps)")
    step = _selected_step(c)
    if step is not None:
        _mark(left, c, x=step, label=False)
    ends = _epoch_ends(c)
    if ends:
        top = left.secondary_xaxis("top")
        every = max(1, len(ends) // 10)
        top.set_xticks([s for _, s in ends[every - 1::every]], [str(e) for e, _ in ends[every - 1::every]])
        top.tick_params(labelsize=8)
    left.set_title("Training loss per logged step", fontsize=10, pad=16 if ends else 6)
    left.set_xlabel("optimizer step (top: epoch ends)")
    left.set_ylabel("training loss")
    left.grid(alpha=0.3)
    _train_curve(right, c, c.epochs["loss"], "train (mean of logged steps; smoothing + aux)")
    _eval_curves(right, c, "loss", " (cross-entropy)")
    _mark(right, c)
    _epoch_axis(right, c, "loss")
    right.set_title("Loss per epoch", fontsize=10, pad=16 if ends else 6)  # level with the left title
    _legend_below(fig, (left, right))
    fig.suptitle(title or "Retrain: loss per logged step and per epoch" + _unfinished(c))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def _epoch_ends(c: RetrainCurves) -> list[tuple[int, int]]:
    """(epoch, optimizer step) of every evaluated epoch end, from the evaluation records."""
    ends: dict[int, int] = {}
    for ev in c.evals.values():
        ends.update(zip(ev["epoch"].tolist(), ev["step"].tolist()))
    return sorted(ends.items())


def _selected_step(c: RetrainCurves) -> int | None:
    """The optimizer step at which the selected epoch was evaluated (any split's record of that epoch)."""
    ends = dict(_epoch_ends(c))
    return ends.get(c.selection.epoch) if c.selection is not None else None


def schedule_figure(c: RetrainCurves, title: str | None = None) -> Figure:
    """The learning rate and the drop-path probability each epoch ran with (from the training records)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, ylabel, color in ((axes[0], "lr", "learning rate (weights)", "C2"),
                                   (axes[1], "drop_path", "drop-path probability", "C4")):
        ax.plot(c.epochs["epoch"], c.epochs[key], color=color, marker=_marker(c, "o", c.epochs["epoch"]), ms=4,
                lw=1.6, label=ylabel)
        _mark(ax, c)
        _epoch_axis(ax, c, ylabel)
        ax.set_title(f"{ylabel.capitalize()} per epoch", fontsize=10)
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _legend_below(fig, axes)
    fig.suptitle(title or "Retrain: schedules" + _unfinished(c))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def retrain_figures(c: RetrainCurves) -> dict[str, Figure]:
    """{file stem: Figure} of a retrain run's curves."""
    return {"accuracy": accuracy_figure(c), "loss": loss_figure(c), "schedules": schedule_figure(c)}


def render_retrain(run_dir: Path) -> list[Path]:
    """A retrain run's figures as `run_dir/plots/<name>.png` (plus the retrained cell, `cell.png`)."""
    from sdarts import genotype as G
    run_dir = Path(run_dir)
    out_dir = run_dir / "plots"
    written = [save(fig, out_dir / f"{name}.png") for name, fig in retrain_figures(retrain_curves(run_dir)).items()]
    if (run_dir / "genotype.json").exists():
        written.append(save(cell_figure(G.load(run_dir / "genotype.json"), "Retrained cell (genotype.json)"),
                            out_dir / "cell.png"))
    return written
