"""Stacked seeds (`seeds: [...]`, sdarts/spaces/seedstack.py): S searches in one supernet give, seed by
seed, what S separate searches give. Checked in float64 on tiny supernets of both spaces, through the
real engine and strategies (DeepSpeed on CPU), for single_level, bilevel and bilevel_second_order."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sdarts.data import Batch, build_search_loaders
from sdarts.distributed import init
from sdarts.engine import SearchEngine
from sdarts.search.strategies import make_strategy
from sdarts.spaces.build import build_supernet
from search_helpers import tiny_cfg

SEEDS = [3, 0, 7]
DARTS = {"space": "darts", "model.C": 4, "model.layers": 3, "model.impl": "grouped"}
STEPS = 3


@pytest.fixture(autouse=True)
def _float64_grads(monkeypatch):
    """DeepSpeed's CPU accelerator lists the dtypes it all-reduces (fp32/bf16/fp16) and asserts on any
    other; gloo reduces float64 fine, so the list gains float64 for these tests. Nothing else changes."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    listed = acc.supported_dtypes()
    monkeypatch.setattr(acc, "supported_dtypes", lambda: listed + [torch.float64])


def _double(batches):
    for b in batches:
        yield dataclasses.replace(b, x=b.x.double())


def _stack(iters):
    for bs in zip(*iters):
        yield Batch(torch.stack([b.x for b in bs]), torch.stack([b.y for b in bs]), torch.stack([b.ids for b in bs]))


def _search(cfg, seeds):
    """STEPS strategy steps of `cfg` in float64; returns the module. `seeds`: lone (one seed) or stacked."""
    rank, _, world, device = init("cpu")
    torch.manual_seed(cfg.seed)
    model = build_supernet(cfg).double()
    engine = SearchEngine(cfg, model, world, device)
    engine.set_epoch_lr(0)
    strategy = make_strategy(cfg.strategy, engine, 1)
    loaders = [build_search_loaders(cfg.data, cfg.model.num_classes, s, rank, world, 1, "cpu") for s in seeds]
    if cfg.seeds is None:
        tr, va = iter(loaders[0][0]), loaders[0][1].cycle()
    else:
        tr, va = _stack([iter(t) for t, _ in loaders]), _stack([v.cycle() for _, v in loaders])
    tr, va = _double(tr), _double(va)
    losses = [strategy.step(tr, va).loss for _ in range(STEPS)]
    return engine.module, losses


@pytest.mark.parametrize("space", ["nb201", "darts"])
@pytest.mark.parametrize("strategy", ["single_level", "bilevel", "bilevel_second_order"])
def test_stacked_seeds_equal_separate_searches_float64(space, strategy):
    over = {"strategy": strategy, "optim.w.grad_clip": 0.05, **(DARTS if space == "darts" else {})}
    stacked, s_losses = _search(tiny_cfg(**over, seeds=SEEDS), SEEDS)
    for k, seed in enumerate(SEEDS):
        lone, l_losses = _search(tiny_cfg(**over, seed=seed), [seed])
        view = stacked.seed_net(k)
        for (name, a), b in zip(lone.named_parameters(), view.parameters()):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), f"seed {seed}: {name} differs"
        for (name, a), b in zip(lone.named_buffers(), view.buffers()):
            assert torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-11), f"seed {seed}: buffer {name}"
        assert [float(x) for x in l_losses] == pytest.approx([float(x[k]) for x in s_losses], rel=1e-10)
        assert str(lone.genotype()) == str(stacked.genotype(k))


def _alphas(run_dir):
    import json

    import numpy as np
    return [np.concatenate([np.asarray(v).ravel() for v in json.loads(line)["weights"].values()])
            for line in (run_dir / "alphas.jsonl").read_text().splitlines()]


def _losses(run_dir):
    import json
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("split") == "train"]


def test_stacked_demo_fp32_follows_its_lone_search_within_its_own_rounding_spread(tmp_path):
    """fp32, the demo (2 epochs): a stacked seed is its lone search: the same init (exactly) and the same
    first batch through the same weights (its first logged loss, to fp32 rounding; another seed's is
    far off); after that its alphas stay as close to the lone search's as the lone search stays to
    itself under another memory layout (NHWC vs NCHW: the same maths, other rounding). No closer is
    possible: the demo's alphas are near ties, and fp32 rounding alone changes them by about as much
    as a step of Adam (docs/performance.md, stacked seeds). The lone reference runs NCHW, as the
    stack does (memory formats cannot be chosen inside vmap)."""
    import numpy as np

    from sdarts.config import load
    from sdarts.search.loop import run_search
    from conftest import ROOT
    base = ["epochs=2", "log.progress=false", "log.tensorboard=false", "log.every_steps=1"]
    cfg = lambda *o: load(ROOT / "configs/search/demo.yaml", base + list(o))  # noqa: E731
    run_search(cfg("seeds=[0,1]"), tmp_path / "stacked")
    run_search(cfg("seed=1", "model.channels_last=false"), tmp_path / "lone")
    run_search(cfg("seed=1"), tmp_path / "lone_nhwc")
    run_search(cfg("seed=0", "model.channels_last=false"), tmp_path / "other_seed")
    stacked, lone = _alphas(tmp_path / "stacked" / "seed_1"), _alphas(tmp_path / "lone")
    nhwc, other = _alphas(tmp_path / "lone_nhwc"), _alphas(tmp_path / "other_seed")
    assert np.array_equal(stacked[0], lone[0]) and not np.array_equal(other[0], lone[0])  # the init
    first = [_losses(tmp_path / d)[0] for d in ("stacked/seed_1", "lone", "other_seed")]
    assert first[0] == pytest.approx(first[1], rel=1e-5)  # the seed's first batch, its init weights
    assert abs(first[2] - first[1]) > 1e-3  # another seed's batch and init
    for e in (1, 2):
        own_spread = np.abs(lone[e] - nhwc[e]).max()
        gap = np.abs(stacked[e] - lone[e]).max()
        assert gap <= 2 * own_spread + 1e-6, (e, gap, own_spread)


def test_stacked_fp32_demo_script_reports_each_seeds_agreement(tmp_path):
    """scripts/stacked_fp32_demo.py on one epoch: a table and a JSON line per seed, whose stacked seed
    starts on its NCHW lone search's losses (same init, same first batch)."""
    import json

    from conftest import run_cli
    p = run_cli(["scripts/stacked_fp32_demo.py", "--out", str(tmp_path), "--epochs", "1"], timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    for seed in ("0", "1"):
        r = out["seeds"][seed]
        assert 1 <= r["same_losses_for"] <= r["steps"] and r["epochs"] == 1
        assert set(r["final_alpha_gap"]) == {"stacked_vs_nchw", "stacked_vs_nhwc", "nhwc_vs_nchw"}
        assert all(0 <= n <= 1 for n in r["same_genotype_epochs"].values())
    assert (tmp_path / "stacked" / "seed_1" / "alphas.jsonl").exists()
