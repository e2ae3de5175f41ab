"""Analysis tools: eq. 8 gradient correlation against direct computations, dL/dp against autograd on
the activated weights, the loop hook (and that it leaves the search unchanged), and the figures."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from conftest import run_cli as _run_cli
from sdarts.analysis.dldp import dl_dp
from sdarts.analysis.gradcorr import correlation, param_map, weight_grads
from sdarts.spaces.nb201 import ClassicCell, EDGE_NAMES, NB201Supernet
from sdarts.spaces.ops import NB201_OPS


def run_cli(args):
    """run_cli with a fresh rendezvous port: in-process tests of this session already listen on the
    MASTER_PORT they put in os.environ, which a child would otherwise inherit."""
    from sdarts.distributed import _free_port
    return _run_cli(args, env={"MASTER_PORT": str(_free_port())})


def _models(C=4, N=1, seed=0):
    """A classic supernet and a fused one computing the same function (same weights)."""
    torch.manual_seed(seed)
    classic = NB201Supernet(C=C, N=N, impl="classic", init_std=0.5)
    fused = NB201Supernet(C=C, N=N, impl="fused")
    cell_idx = {i for i, c in enumerate(classic.cells) if isinstance(c, ClassicCell)}
    state = {k: v for k, v in classic.state_dict().items()
             if not (k.startswith("cells.") and int(k.split(".")[1]) in cell_idx)}
    fused.load_state_dict(state, strict=False)
    for c, f in zip(classic.search_cells(), fused.search_cells()):
        f.load_from_classic(c)
    return classic, fused


def _batches(n=2, B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, 3, 8, 8, generator=g), torch.randint(0, 10, (B,), generator=g)) for _ in range(n)]


def _direct_grad(model, module_weight, x, y) -> np.ndarray:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    g = module_weight.grad.detach().double().flatten().numpy().copy()
    model.zero_grad(set_to_none=True)
    return g


def test_correlation_of_hand_made_gradients():
    """cos and dot per op, and per edge over the concatenated ops, exactly as written out by hand."""
    ga = {(0, "1<-0", "nor_conv_1x1"): torch.tensor([1.0, 0.0]), (0, "1<-0", "nor_conv_3x3"): torch.tensor([0.0, 2.0]),
          (0, "2<-0", "nor_conv_3x3"): torch.tensor([1.0, 1.0])}
    gw = {(0, "1<-0", "nor_conv_1x1"): torch.tensor([1.0, 1.0]), (0, "1<-0", "nor_conv_3x3"): torch.tensor([0.0, -1.0]),
          (0, "2<-0", "nor_conv_3x3"): torch.tensor([-1.0, -1.0])}
    r = correlation(ga, gw)
    e = r["cells"]["0"]["edges"]["1<-0"]
    assert e["ops"]["nor_conv_1x1"]["dot"] == pytest.approx(1.0)
    assert e["ops"]["nor_conv_1x1"]["cos"] == pytest.approx(1 / math.sqrt(2))
    assert e["ops"]["nor_conv_3x3"]["cos"] == pytest.approx(-1.0)
    # edge: a = [1, 0, 0, 2], w = [1, 1, 0, -1] -> dot = 1 - 2 = -1, |a| = sqrt 5, |w| = sqrt 3
    assert e["dot"] == pytest.approx(-1.0)
    assert e["cos"] == pytest.approx(-1 / math.sqrt(15))
    assert r["cells"]["0"]["edges"]["2<-0"]["cos"] == pytest.approx(-1.0)
    assert r["cells"]["0"]["mean_cos"] == pytest.approx((-1 / math.sqrt(15) - 1.0) / 2)
    # a zero gradient has no direction: cos is None, not a division by zero
    z = correlation({(0, "1<-0", "nor_conv_3x3"): torch.zeros(3)}, {(0, "1<-0", "nor_conv_3x3"): torch.ones(3)})
    assert z["cells"]["0"]["edges"]["1<-0"]["cos"] is None and z["mean_cos"] is None


def test_eq8_on_a_tiny_supernet_matches_direct_computation():
    """Eq. 8 from `weight_grads` + `correlation` equals cos/dot of `.grad` read after plain backward passes,
    for the classic cell (one module per op) and the fused cell (ops as channel slices of wide convs)."""
    classic, fused = _models()
    (xa, ya), (xw, yw) = _batches()
    for model in (classic, fused):
        params = param_map(model, [0])
        assert {k[2] for k in params} == {"nor_conv_1x1", "nor_conv_3x3"}  # parameter-free ops have no entry
        assert len(params) == 2 * len(EDGE_NAMES)
        r = correlation(weight_grads(model, xa, ya, params), weight_grads(model, xw, yw, params))
        assert all(p.grad is None for p in model.parameters())  # nothing leaked into .grad
        cell = classic.search_cells()[0]
        for edge in ("1<-0", "3<-2"):
            parts_a, parts_w = [], []
            for op in ("nor_conv_1x1", "nor_conv_3x3"):  # the order `param_map` keeps (NB201_OPS order)
                conv = cell.edges[edge.replace("<-", "_")].ops[NB201_OPS.index(op)][1].weight
                a, w = _direct_grad(classic, conv, xa, ya), _direct_grad(classic, conv, xw, yw)
                parts_a.append(a), parts_w.append(w)
                got = r["cells"]["0"]["edges"][edge]["ops"][op]
                assert got["dot"] == pytest.approx(float(a @ w), rel=1e-4, abs=1e-9)
                assert got["cos"] == pytest.approx(float(a @ w / np.linalg.norm(a) / np.linalg.norm(w)), abs=1e-5)
            a, w = np.concatenate(parts_a), np.concatenate(parts_w)
            assert r["cells"]["0"]["edges"][edge]["cos"] == pytest.approx(
                float(a @ w / np.linalg.norm(a) / np.linalg.norm(w)), abs=1e-5)


def test_eq8_same_batch_is_one():
    """Single-level: the alpha batch is the w batch, so the correlation is 1 by construction."""
    _, fused = _models()
    (x, y), = _batches(1)
    params = param_map(fused, [0])
    g = weight_grads(fused, x, y, params)
    r = correlation(g, weight_grads(fused, x, y, params))
    assert r["mean_cos"] == pytest.approx(1.0, abs=1e-6)


def test_param_map_refuses_missing_cell():
    _, fused = _models()
    with pytest.raises(ValueError, match="analysis.cells: cell 7 does not exist"):
        param_map(fused, [7])


@pytest.mark.parametrize("impl", ["classic", "fused"])
def test_dl_dp_matches_autograd_on_the_activated_weights(impl):
    classic, fused = _models(N=2)
    model = classic if impl == "classic" else fused
    (x, y), = _batches(1)
    d = dl_dp(model, x, y, cells=None)
    assert all(p.grad is None for p in model.parameters())
    # direct: differentiate the loss w.r.t. the activated weights handed to forward
    w = model.arch.weights()["normal"].detach().clone().requires_grad_(True)
    F.cross_entropy(model(x, {"normal": w}), y).backward()
    assert torch.allclose(d["total"], w.grad, atol=1e-6)
    n = len(model.search_cells())
    assert torch.allclose(sum(d[str(i)] for i in range(n)), d["total"], atol=1e-6)
    assert not torch.equal(d["0"], d["1"])  # per-cell values differ: the split is real
    assert torch.all(d["total"][:, NB201_OPS.index("none")] == 0)  # `none` outputs zero: no pull
    # softmax chain rule: alpha's own gradient is p * (dL/dp - sum_j p_j dL/dp_j)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    p = model.arch.probabilities()["normal"]
    g = d["total"]
    assert torch.allclose(model.arch.alphas["normal"].grad, p * (g - (p * g).sum(-1, keepdim=True)), atol=1e-6)


def test_dl_dp_classic_equals_fused():
    classic, fused = _models(N=1)
    (x, y), = _batches(1)
    a, b = dl_dp(classic, x, y, [0]), dl_dp(fused, x, y, [0])
    assert torch.allclose(a["0"], b["0"], atol=1e-5)


def _hook_run(strategy: str, steps: int = 3):
    from search_helpers import make, tiny_cfg
    from sdarts.analysis.hook import SearchAnalysis
    cfg = tiny_cfg(strategy=strategy, **{"analysis.grad_corr_every": 1, "analysis.grad_p_every": 2,
                                         "analysis.cells": "[0, 2]"})
    engine, strategy, tr, va = make(cfg)
    return cfg, engine, strategy, tr, va, SearchAnalysis


@pytest.mark.parametrize("name", ["single_level", "bilevel"])
def test_hook_logs_and_restores_bn_stats(tmp_path, name):
    cfg, engine, strategy, tr, va, SearchAnalysis = _hook_run(name)
    model = engine.module
    analysis = SearchAnalysis(cfg, tmp_path, model, tr, va)
    ti, vi = iter(tr), (va.cycle() if strategy.uses_valid else None)
    for step in range(1, 4):
        res = strategy.step(ti, vi)
        before = {n: b.clone() for n, b in model.named_buffers()}
        analysis.maybe_log(step, 0, res)
        assert all(torch.equal(before[n], b) for n, b in model.named_buffers())
    recs = [json.loads(l) for l in (tmp_path / "analysis.jsonl").read_text().splitlines()]
    corr = [r for r in recs if r["kind"] == "grad_corr"]
    dldp = [r for r in recs if r["kind"] == "dl_dp"]
    assert [r["step"] for r in corr] == [1, 2, 3] and [r["step"] for r in dldp] == [2]
    assert set(corr[0]["same_step"]["cells"]) == {"0", "2"}
    assert corr[0]["prev_w"] is None and corr[1]["prev_w"] is not None
    if name == "single_level":
        assert all(r["same_batch"] for r in corr)
        assert all(r["same_step"]["mean_cos"] == pytest.approx(1.0, abs=1e-5) for r in corr)
    else:
        assert not any(r["same_batch"] for r in corr)
        assert all(abs(r["same_step"]["mean_cos"]) < 0.999 for r in corr)
    assert np.array(dldp[0]["total"]).shape == (6, 5)
    # resuming at step 2 drops the records written after it
    again = SearchAnalysis(cfg, tmp_path, model, tr, va)
    again.maybe_log(3, 0, res)
    steps = [json.loads(l)["step"] for l in (tmp_path / "analysis.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3]


@pytest.fixture(scope="module")
def analysed_run(tmp_path_factory):
    """A 2-epoch smoke search with every analysis on (and NB201 scoring when the table is at hand)."""
    from conftest import DATA
    run = tmp_path_factory.mktemp("analysis") / "run"
    args = ["launcher/search.py", "--config", str(ROOT / "configs/search/smoke.yaml"), "--run-dir", str(run),
            "--set", "strategy=bilevel", "--set", "analysis.grad_corr_every=2", "--set", "analysis.grad_p_every=2",
            "--set", "log.tensorboard=false", "--set", "log.progress=false"]
    table = DATA / "nb201" / "nb201_accuracies.csv.gz"
    if table.exists():
        args += ["--set", f"nb201_table={table}"]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-2000:]
    return run


@pytest.mark.slow
def test_analysis_leaves_the_search_unchanged(analysed_run, tmp_path):
    run = tmp_path / "plain"
    r = run_cli(["launcher/search.py", "--config", str(ROOT / "configs/search/smoke.yaml"), "--run-dir", str(run),
                 "--set", "strategy=bilevel", "--set", "log.tensorboard=false", "--set", "log.progress=false"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "alphas.jsonl").read_text() == (analysed_run / "alphas.jsonl").read_text()
    assert not (run / "analysis.jsonl").exists()


def test_figures_have_the_expected_curves(analysed_run):
    from sdarts import genotype as G
    from sdarts.analysis import curves as Cv
    from sdarts.analysis import plots as P
    ac = Cv.alpha_curves(analysed_run)
    assert ac.weights["normal"].shape[1:] == (6, 5) and ac.epochs.tolist() == [0, 1, 2]
    fig = P.alpha_figure(ac)
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert len(panels) == 6 and all(len(ax.get_lines()) == 5 for ax in panels)
    assert {t.get_text() for t in fig.legends[0].get_texts()} == set(NB201_OPS)
    assert all(ax.get_xlabel() and ax.get_ylabel() and ax.get_title() for ax in panels)
    assert fig._suptitle.get_text()

    gc = Cv.grad_corr_curves(analysed_run)
    fig = P.grad_corr_figure(gc)
    ax = fig.axes[0]
    # one line per (cell, edge) of the default analysis.cells [0], the mean, and the zero line
    assert len(gc["edges"]) == 6 and len(ax.get_lines()) == 6 + 2
    assert ax.get_legend() is not None and ax.get_title()

    d = Cv.dldp_curves(analysed_run)
    fig = P.dldp_figure(d)
    assert [len(ax.get_lines()) for ax in fig.axes if ax.get_lines()] == [5 + 1] * 6

    fig = P.cell_figure(G.load(analysed_run / "genotype.json"))
    from matplotlib.patches import FancyArrowPatch
    assert sum(isinstance(p, FancyArrowPatch) for p in fig.axes[0].patches) == 6
    fig = P.cell_figure(G.load("darts_v2"))
    assert [sum(isinstance(p, FancyArrowPatch) for p in ax.patches) for ax in fig.axes] == [8 + 4, 8 + 4]

    scores = Cv.nb201_curves(analysed_run)
    if scores:
        fig = P.nb201_figure(scores)
        assert len(fig.axes[0].get_lines()) == 4 and fig.axes[0].get_legend() is not None


def test_plot_command_writes_pngs(analysed_run):
    r = run_cli(["launcher/cli.py", "plot", "--run-dir", str(analysed_run)])
    assert r.returncode == 0, r.stderr[-2000:]
    paths = [l for l in r.stdout.splitlines() if l.endswith(".png")]
    names = {p.rsplit("/", 1)[1] for p in paths}
    assert {"alphas_normal.png", "cell.png", "grad_corr.png", "grad_corr_prev_w.png", "dl_dp.png"} <= names
    for p in paths:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    bad = run_cli(["launcher/cli.py", "plot", "--run-dir", str(analysed_run / "nope")])
    assert bad.returncode == 2 and "run directory not found" in bad.stderr
