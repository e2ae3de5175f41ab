"""`sdarts plot --run-dir` on a retrain run: the kind of run is detected, and the figures hold the logged
curves (x/y data equal to metrics.jsonl) with the selected epoch marked where summary.json (new
`selected` or old `best`) or checkpoints/best.pt says, or a legend line saying why it is not."""
import json

import numpy as np
import pytest
import yaml

from conftest import need_data, run_cli
from sdarts.analysis.curves import retrain_curves, run_kind
from sdarts.analysis.retrain_plots import render_retrain, retrain_figures
from sdarts.errors import RunDirError

EPOCHS, STEPS, EVERY = 6, 8, 2  # 8 optimizer steps an epoch, a train record every 2nd step
SEL = 4                          # the selected epoch of the synthetic runs (neither the first nor the last)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt
    plt.close("all")


def _top1(split: str, epoch: int) -> float:
    base = {"holdout": 30.0, "holdout_ema": 33.0, "eval": 28.0, "eval_ema": 31.0}[split]
    return base + 5.0 * epoch - (2.0 * (epoch - SEL) ** 2 if split.startswith("holdout") else 0.0)


def write_run(root, fmt: str, epochs_done: int = EPOCHS):
    """A retrain run directory as retrain/train.py leaves it; `fmt`: 'selected' (holdout splits, summary
    'selected' + 'final'), 'best' (today's: test splits only, summary 'best') or 'unfinished' (no summary)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "checkpoints").mkdir()
    cfg = {"seed": 0, "epochs": EPOCHS, "model": {"C": 8, "layers": 5, "drop_path": 0.2}, "loss": {"label_smoothing": 0.1},
           "ema": {"decay": 0.9}, "data": {"dataset": "cifar10", "micro_batch": 32}, "log": {"every_steps": EVERY}}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    splits = ("holdout", "holdout_ema", "eval", "eval_ema") if fmt == "selected" else ("eval", "eval_ema")
    recs = []
    for e in range(epochs_done):
        lr, dp = 0.05 * (1 + np.cos(np.pi * e / EPOCHS)) / 2, 0.2 * e / EPOCHS
        for s in range(e * STEPS + EVERY, (e + 1) * STEPS + 1, EVERY):
            recs.append({"step": s, "epoch": e, "split": "train", "loss": 2.3 - 0.01 * s + 0.03 * (s % 3),
                         "acc": 0.1 + 0.01 * s, "lr_w": lr, "drop_path": dp, "images_per_s": 100.0, "rank": 0})
        for split in splits:
            t1 = _top1(split, e + 1)
            recs.append({"step": (e + 1) * STEPS, "epoch": e + 1, "split": split, "loss": 3.0 - t1 / 50,
                         "acc": t1 / 100, "top1": t1, "top5": min(99.0, t1 + 40), "images": 500})
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if fmt == "selected":
        summary = {"selected": {"epoch": SEL, "source": "ema", "on": "holdout",
                                "holdout": {"top1": _top1("holdout_ema", SEL), "top5": 80.0},
                                "eval": {"top1": _top1("eval_ema", SEL), "top5": 75.0}},
                   "final": {"epoch": SEL, "source": "ema", "top1": _top1("eval_ema", SEL), "top5": 75.0}}
    elif fmt == "best":
        summary = {"best": {"top1": _top1("eval_ema", SEL), "top5": 75.0, "epoch": SEL, "source": "ema"}}
    if fmt != "unfinished":
        (root / "summary.json").write_text(json.dumps(summary | {"epochs": EPOCHS, "steps": EPOCHS * STEPS}))
    return root, recs


def _lines(ax, gid=None):
    return [ln for ln in ax.get_lines() if gid is None or ln.get_gid() == gid]


def _by_label(ax) -> dict:
    """The curves of a panel by legend label (not the selected-epoch marks)."""
    return {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_") and ln.get_gid() is None}


def _epoch_axes(figs):
    """Every per-epoch panel: both accuracy panels, the loss-per-epoch panel, both schedule panels."""
    return [*figs["accuracy"].axes[:2], figs["loss"].axes[1], *figs["schedules"].axes[:2]]


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def test_new_format_curves_equal_metrics_and_the_holdout_selection_is_marked(tmp_path):
    run, recs = write_run(tmp_path / "r", "selected")
    figs = retrain_figures(retrain_curves(run))
    top1, top5 = figs["accuracy"].axes[:2]
    lines = _by_label(top1)
    expected = {"holdout (selection), model": "holdout", "holdout (selection), EMA": "holdout_ema",
                "test, model": "eval", "test, EMA": "eval_ema"}
    assert set(lines) == {"train batches (mean of logged steps)", *expected}
    for label, split in expected.items():
        rs = [r for r in recs if r["split"] == split]
        np.testing.assert_array_equal(lines[label].get_xdata(), [r["epoch"] for r in rs])
        np.testing.assert_allclose(lines[label].get_ydata(), [r["top1"] for r in rs])
        np.testing.assert_allclose(_by_label(top5)[label].get_ydata(), [r["top5"] for r in rs])
        # holdout solid, test dashed: told apart without colour
        assert lines[label].get_linestyle() == ("-" if split.startswith("holdout") else "--")
    train = [r for r in recs if r["split"] == "train"]
    np.testing.assert_allclose(lines["train batches (mean of logged steps)"].get_ydata(),
                               [100 * np.mean([r["acc"] for r in train if r["epoch"] == e]) for e in range(EPOCHS)])
    for ax in _epoch_axes(figs):
        (mark,) = _lines(ax, "selected")
        assert list(mark.get_xdata()) == [SEL, SEL]
    (star,) = _lines(top1, "selected_point")  # on the curve that chose it: the EMA's holdout top-1
    assert list(star.get_xdata()) == [SEL] and list(star.get_ydata()) == [_top1("holdout_ema", SEL)]
    (loss_mark,) = _lines(figs["loss"].axes[0], "selected")  # per-step panel: the selected epoch's end
    assert list(loss_mark.get_xdata()) == [SEL * STEPS, SEL * STEPS]
    legend = _legend_texts(figs["accuracy"])
    assert "selected: epoch 4 (EMA weights, chosen on the holdout)" in legend
    assert legend[-1].startswith("selected:")
    assert "final test: top-1" in figs["accuracy"]._suptitle.get_text()


def test_loss_and_schedules_are_the_logged_values(tmp_path):
    run, recs = write_run(tmp_path / "r", "selected")
    figs = retrain_figures(retrain_curves(run))
    train = [r for r in recs if r["split"] == "train"]
    (per_step,) = [ln for ln in _lines(figs["loss"].axes[0]) if ln.get_gid() != "selected"]
    np.testing.assert_array_equal(per_step.get_xdata(), [r["step"] for r in train])
    np.testing.assert_allclose(per_step.get_ydata(), [r["loss"] for r in train])
    per_epoch = _by_label(figs["loss"].axes[1])
    np.testing.assert_allclose(per_epoch["train (mean of logged steps; smoothing + aux)"].get_ydata(),
                               [np.mean([r["loss"] for r in train if r["epoch"] == e]) for e in range(EPOCHS)])
    np.testing.assert_allclose(per_epoch["holdout (selection), EMA (cross-entropy)"].get_ydata(),
                               [r["loss"] for r in recs if r["split"] == "holdout_ema"])
    lr_ax, dp_ax = figs["schedules"].axes[:2]
    first = [next(r for r in train if r["epoch"] == e) for e in range(EPOCHS)]
    (lr,) = [ln for ln in _lines(lr_ax) if ln.get_gid() != "selected"]
    (dp,) = [ln for ln in _lines(dp_ax) if ln.get_gid() != "selected"]
    np.testing.assert_array_equal(lr.get_xdata(), np.arange(1, EPOCHS + 1))  # epoch k ran with the lr of index k-1
    np.testing.assert_allclose(lr.get_ydata(), [r["lr_w"] for r in first])
    np.testing.assert_allclose(dp.get_ydata(), [r["drop_path"] for r in first])
    assert dp.get_ydata()[0] == 0.0 and dp.get_ydata()[-1] > 0.15


def test_old_best_format_is_marked_as_chosen_on_the_test_set(tmp_path):
    run, recs = write_run(tmp_path / "r", "best")
    figs = retrain_figures(retrain_curves(run))
    top1 = figs["accuracy"].axes[0]
    assert set(_by_label(top1)) == {"train batches (mean of logged steps)", "test, model", "test, EMA"}
    for ax in _epoch_axes(figs):
        (mark,) = _lines(ax, "selected")
        assert list(mark.get_xdata()) == [SEL, SEL]
    (star,) = _lines(top1, "selected_point")
    assert list(star.get_ydata()) == [_top1("eval_ema", SEL)]
    assert "best: epoch 4 (EMA weights, chosen on the test set)" in _legend_texts(figs["accuracy"])


def test_unfinished_run_plots_with_best_pt_or_says_why_it_is_unmarked(tmp_path):
    run, _ = write_run(tmp_path / "r", "unfinished", epochs_done=3)
    figs = retrain_figures(retrain_curves(run))
    assert "unfinished" in figs["accuracy"]._suptitle.get_text()
    assert _by_label(figs["accuracy"].axes[0])["test, model"].get_xdata().tolist() == [1, 2, 3]
    for ax in _epoch_axes(figs):
        assert not _lines(ax, "selected")
    assert "no selected epoch yet (no summary.json, no readable checkpoints/best.pt)" in _legend_texts(figs["accuracy"])
    # a running retrain's best.pt (written by the same function retrain/evaluate.py uses) marks its epoch
    torch = pytest.importorskip("torch")
    from sdarts.checkpoint import save_weights
    save_weights(run / "checkpoints" / "best.pt", {"w": torch.zeros(3)},
                 {"genotype": {"space": "darts"}, "top1": 41.0, "top5": 80.0, "epoch": 2, "source": "ema"})
    figs = retrain_figures(retrain_curves(run))
    for ax in _epoch_axes(figs):
        (mark,) = _lines(ax, "selected")
        assert list(mark.get_xdata()) == [2, 2]
    assert "best so far (best.pt): epoch 2 (EMA weights, chosen on the test set)" in _legend_texts(figs["loss"])
    # today's best.pt: {"module", "genotype", "selected": {...}}
    save_weights(run / "checkpoints" / "best.pt", {"w": torch.zeros(3)},
                 {"genotype": {"space": "darts"}, "selected": {"epoch": 3, "source": "model", "on": "holdout",
                                                               "holdout": {"top1": 40.0, "top5": 80.0}, "eval": None}})
    figs = retrain_figures(retrain_curves(run))
    for ax in _epoch_axes(figs):
        (mark,) = _lines(ax, "selected")
        assert list(mark.get_xdata()) == [3, 3]
    assert not _lines(figs["accuracy"].axes[0], "selected_point")  # no holdout curve logged: no point to star
    assert "selected so far (best.pt): epoch 3 (model weights, chosen on the holdout)" in _legend_texts(figs["loss"])


def test_run_kind_detection(tmp_path):
    run, _ = write_run(tmp_path / "retrain", "best")
    assert run_kind(run) == "retrain"
    search = tmp_path / "search"
    search.mkdir()
    (search / "config.yaml").write_text(yaml.safe_dump({"strategy": "single_level", "space": "nb201"}))
    assert run_kind(search) == "search"  # before its first alphas.jsonl line
    (run / "alphas.jsonl").write_text("")
    assert run_kind(run) == "search"     # a search's log wins
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("just: text\n")
    with pytest.raises(RunDirError, match="neither a search run"):
        run_kind(other)


def test_cli_writes_the_pngs_and_refuses_what_it_cannot_plot(tmp_path):
    from sdarts.genotype import LITERATURE, save
    run, _ = write_run(tmp_path / "r", "selected")
    save(LITERATURE["darts_v2"], run / "genotype.json")
    r = run_cli(["launcher/cli.py", "plot", "--run-dir", str(run)], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [str(run / "plots" / f"{n}.png") for n in ("accuracy", "loss", "schedules", "cell")]
    for p in r.stdout.split():
        data = open(p, "rb").read()
        assert data[:8] == PNG and len(data) > 10000
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    bad = run_cli(["launcher/cli.py", "plot", "--run-dir", str(other)], timeout=300)
    assert bad.returncode == 2 and "neither a search run" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (other / "plots").exists()
    empty, _ = write_run(tmp_path / "empty", "unfinished", epochs_done=0)
    bad = run_cli(["launcher/cli.py", "plot", "--run-dir", str(empty)], timeout=300)
    assert bad.returncode == 2 and "no metrics records yet" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_real_short_retrain_plots_with_its_selected_epoch_marked(tmp_path):
    npz = need_data("cifar10-subset", "cifar10_subset.npz")
    from test_retrain_train import DARTS_V2, tiny
    from retrain.train import run_retrain
    run = tmp_path / "run"
    result = run_retrain(tiny(npz, epochs=3), DARTS_V2, run)
    assert result.finished
    paths = render_retrain(run)
    assert [p.name for p in paths] == ["accuracy.png", "loss.png", "schedules.png", "cell.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG
    summary = json.loads((run / "summary.json").read_text())
    chosen = summary["selected"]
    curves = retrain_curves(run)
    assert curves.selection.epoch == chosen["epoch"] >= 1
    figs = retrain_figures(curves)
    for ax in _epoch_axes(figs):
        (mark,) = _lines(ax, "selected")
        assert list(mark.get_xdata()) == [chosen["epoch"]] * 2
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    model_test = [r["top1"] for r in evals if r["split"] == "eval"]
    assert _by_label(figs["accuracy"].axes[0])["test, model"].get_ydata().tolist() == model_test
