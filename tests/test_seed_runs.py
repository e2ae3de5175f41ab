"""Stacked seeds (`seeds: [...]`) as runs: what the batch leaves on disk, seed by seed.

tests/test_seed_stack.py checks the arithmetic (a stacked step equals S separate steps, float64). These
check the run around it (sdarts/search/seedruns.py), through the real CLI on configs/search/smoke.yaml
(NB201, 4 steps an epoch, 2 epochs, a checkpoint every 2 steps), seeds [0, 1]:

- a kill -9 as the last epoch-end save begins, resumed with --resume, ends where the uninterrupted run
  ends, seed by seed (alphas.jsonl, genotypes/, genotype.json, metrics.jsonl losses, summary) and in
  the one checkpoint (weights, optimizer state, alpha histories), bit for bit;
- 2 ranks give each seed what 1 rank with engine.grad_accum 2 gives (as the lone search's 2-rank test);
- each RUN/seed_<s>/ is a run directory the tools read unchanged (`sdarts nb201`, `sdarts plot`), whose
  config.yaml is the lone search's (`seed: s`, no `seeds`) and loads as a search config;
- a seed driven to a non-finite loss (one seed's slice of a weight set to NaN) changes nothing of the
  other seeds: in process, their parameters, buffers and optimizer state stay bit-identical to an
  unpoisoned stacked run (three strategies); through the CLI, the run finishes, the faulted seed's
  summary names the fault and it has no genotype.json, the others' files equal the unpoisoned run's,
  also across a kill and resume after the fault;
- bad `seeds` settings are one `error:` line naming `seeds`, exit 2, and a checkpoint of other seeds is
  refused on --resume with one line.

The NaN is put in from a `python -c` wrapper around `launcher.search.main` that wraps the loop's
strategy (`sdarts.search.loop.make_strategy`): the loop, engine and files are the real ones; there is no
library hook for it (see `_POISONED_SEARCH`).
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from conftest import DATA, ROOT, deepspeed_cmd, run_cli
from reliability_runs import (KILLED, SEARCH, assert_same_tensors, error_lines, jsonl, latest, run, state, tags,
                              tree)
from sdarts import config as C
from sdarts import genotype as G
from sdarts.errors import ConfigError

SEEDS = [0, 1]
STACKED = [*SEARCH, "--set", f"seeds=[{','.join(map(str, SEEDS))}]"]
SMOKE_OVERRIDES = ["log.progress=false", "log.tensorboard=false"]  # what SEARCH sets on smoke.yaml
TABLE = DATA / "nb201" / "nb201_accuracies.csv.gz"


def _same_seed_files(a, b, seed, what=""):
    """seed_<seed>/ of runs a and b: the same alpha records, genotypes, losses and outcome."""
    da, db = a / f"seed_{seed}", b / f"seed_{seed}"
    assert jsonl(da / "alphas.jsonl") == jsonl(db / "alphas.jsonl"), (what, seed, "alphas.jsonl")
    assert jsonl(da / "metrics.jsonl") == jsonl(db / "metrics.jsonl"), (what, seed, "metrics.jsonl")
    ga = sorted(p.name for p in (da / "genotypes").iterdir())
    assert ga == sorted(p.name for p in (db / "genotypes").iterdir()), (what, seed)
    for f in ["genotype.json", *(f"genotypes/{n}" for n in ga)]:
        assert (da / f).read_text() == (db / f).read_text(), (what, seed, f)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (da, db))
    for k in ("genotype", "seed", "batched_seeds", "steps", "numerical_fault"):
        assert sa.get(k) == sb.get(k), (what, seed, k)


@pytest.fixture(scope="module")
def stacked_ref(tmp_path_factory):
    """The uninterrupted stacked run (seeds [0, 1]); shared by several tests, never modified."""
    d = tmp_path_factory.mktemp("seed_runs") / "ref"
    r = run([*STACKED, "--run-dir", str(d)])
    assert r.returncode == 0, r.stderr[-3000:]
    return d


# -- 1. kill -9 and --resume ------------------------------------------------------------------------
@pytest.mark.slow
def test_stacked_run_killed_at_an_epoch_end_resumes_to_the_uninterrupted_result(stacked_ref, tmp_path):
    ref, d = stacked_ref, tmp_path / "run"
    args = [*STACKED, "--run-dir", str(d)]
    # killed as the 4th save (step 8, the last epoch end) begins: steps 7-8 are logged and epoch 2's alpha
    # record and genotype written, past the last checkpoint (step 6, mid-epoch 2)
    r = run(args, "save.begin:kill:4")
    assert r.returncode == KILLED, r.stderr[-2500:]
    assert latest(d) == "step000000006" and not (d / "summary.json").exists()
    for s in SEEDS:  # the stale records the resume must cut back, or the test checks nothing
        assert max(m["step"] for m in jsonl(d / f"seed_{s}" / "metrics.jsonl")) == 8
        assert (d / f"seed_{s}" / "genotypes" / "epoch_002.json").exists()
        assert [a["epoch"] for a in jsonl(d / f"seed_{s}" / "alphas.jsonl")] == [0, 1, 2]
    r = run([*args, "--resume"])
    assert r.returncode == 0, r.stderr[-2500:]
    assert "resumed from step 6" in r.stderr and "Traceback" not in r.stderr

    for s in SEEDS:
        _same_seed_files(ref, d, s, "resumed")
        steps = [m["step"] for m in jsonl(d / f"seed_{s}" / "metrics.jsonl")]
        assert steps == list(range(1, 9)), steps  # every step once
    assert jsonl(d / "metrics.jsonl") == jsonl(ref / "metrics.jsonl")
    sa, sb = (json.loads((x / "summary.json").read_text()) for x in (ref, d))
    assert sa["searches"] == sb["searches"] and sb["seeds"] == SEEDS
    assert tags(d) == tags(ref) == ["step000000006", "step000000008"]
    a, b = state(ref), state(d)
    assert_same_tensors(a["module"], b["module"], "module")  # every seed's weights and alpha
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")  # momentum, Adam moments
    assert a["seeds"] == b["seeds"] == SEEDS
    assert a["searches"] == b["searches"]  # alpha histories, genotypes, loader positions, faults


# -- 2. two ranks -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_give_each_seed_what_one_rank_with_accumulation_gives(tmp_path):
    from test_distributed_resume import SMOKE, _alphas, _env
    seeds = ["--set", "seeds=[0,1]", "--set", "log.tensorboard=false"]
    two, one = tmp_path / "two", tmp_path / "one"
    r = subprocess.run([deepspeed_cmd(), "--num_gpus", "2", "--master_port", "29657", "launcher/search.py", *SMOKE,
                        *seeds, "--set", "log.all_ranks=true", "--run-dir", str(two)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(["launcher/search.py", *SMOKE, *seeds, "--set", "engine.grad_accum=2", "--run-dir", str(one)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    finals = {}
    for s in SEEDS:
        a0, a1 = _alphas(two / f"seed_{s}" / "alphas.jsonl"), _alphas(two / f"seed_{s}" / "alphas.rank1.jsonl")
        assert len(a0) == 3 and a0[1:] == a1, s  # every epoch's alpha bit-identical on both ranks
        assert json.loads((two / f"seed_{s}" / "summary.json").read_text())["world_size"] == 2
        final_two = torch.tensor(a0[-1]["normal"])
        final_one = torch.tensor(_alphas(one / f"seed_{s}" / "alphas.jsonl")[-1]["normal"])
        assert torch.allclose(final_one, final_two, atol=1e-5), (s, (final_one - final_two).abs().max())
        assert (one / f"seed_{s}" / "genotype.json").read_text() == (two / f"seed_{s}" / "genotype.json").read_text()
        finals[s] = final_one
    # the seeds are different searches (else "each seed" above could be one search written twice)
    assert not torch.allclose(finals[0], finals[1], atol=1e-4)


# -- 3. each seed directory is a run directory of the lone search ---------------------------------
def test_seed_config_is_the_lone_config_and_loads(stacked_ref):
    top = C.load(stacked_ref / "config.yaml")
    assert top.seeds == SEEDS
    for s in SEEDS:
        path = stacked_ref / f"seed_{s}" / "config.yaml"
        cfg = C.load(path)  # what `launcher/search.py --config seed_<s>/config.yaml` reads first
        assert cfg.seed == s and cfg.seeds is None
        # byte for byte the config.yaml the lone search `--set seed=s` writes
        lone = C.load(ROOT / "configs/search/smoke.yaml", [*SMOKE_OVERRIDES, f"seed={s}"])
        assert path.read_text() == C.dump(lone)
        assert cfg == top.lone(s)


@pytest.fixture(scope="module")
def tools_run(tmp_path_factory):
    """A stacked run with the analysis hook on and, when the table is here, per-epoch NB201 scores."""
    d = tmp_path_factory.mktemp("seed_tools") / "run"
    extra = ["--set", "analysis.grad_corr_every=2", "--set", "analysis.grad_p_every=2", "--set", "strategy=bilevel"]
    if TABLE.exists():
        extra += ["--set", f"nb201_table={TABLE}"]
    r = run([*STACKED, *extra, "--run-dir", str(d)])
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.mark.skipif(not TABLE.exists(), reason=f"needs {TABLE} (the shared data folder beside the repo); absent here")
def test_nb201_reads_each_seed_dir(tools_run):
    from sdarts.nasbench201 import table as B
    top = json.loads((tools_run / "summary.json").read_text())
    for s in SEEDS:
        d = tools_run / f"seed_{s}"
        r = run_cli(["launcher/cli.py", "nb201", "--genotype", str(d / "genotype.json"), "--table", str(TABLE)])
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        g = G.load(d / "genotype.json")
        assert out["arch"] == g.to_arch_str() and {c: out[c] for c in B.COLUMNS} == B.lookup(g, str(TABLE))
        scores = jsonl(d / "nb201_scores.jsonl")
        assert [x["epoch"] for x in scores] == [1, 2]
        for x in scores:
            ge = G.load(d / "genotypes" / f"epoch_{x['epoch']:03d}.json")
            assert x["arch"] == ge.to_arch_str() and {c: x[c] for c in B.COLUMNS} == B.lookup(ge, str(TABLE))
        summary = json.loads((d / "summary.json").read_text())
        assert summary["seed"] == s and summary["nb201"] == B.lookup(g, str(TABLE))
        assert top["searches"][str(s)]["nb201"] == summary["nb201"]


def test_plot_reads_each_seed_dir(tools_run, tmp_path):
    pytest.importorskip("matplotlib", reason="sdarts plot needs matplotlib, which is not installed here")
    for s in SEEDS:
        d = tmp_path / f"seed_{s}"
        shutil.copytree(tools_run / f"seed_{s}", d)  # plot writes d/plots/; the fixture stays as it is
        r = run_cli(["launcher/cli.py", "plot", "--run-dir", str(d)])
        assert r.returncode == 0, r.stderr[-2000:]
        paths = [l for l in r.stdout.splitlines() if l.endswith(".png")]
        names = {p.rsplit("/", 1)[1] for p in paths}
        want = {"alphas_normal.png", "cell.png", "grad_corr.png", "dl_dp.png"}
        if TABLE.exists():
            want.add("nb201_accuracy.png")
        assert want <= names, names
        for p in paths:
            assert p.startswith(str(d / "plots")), p
            data = open(p, "rb").read()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p


# -- 4. a non-finite seed leaves the others alone ---------------------------------------------------
def _stacked_search(strategy: str, poison: dict[int, int], steps: int = 5):
    """`steps` strategy steps of a tiny stacked search (seeds 0, 1, 2, clipping active); before step i
    (1-based) each seed index k of `poison` {k: i} gets NaN in its slice of the first weight. Returns the
    engine and each step's per-seed losses."""
    from sdarts.data import Batch, build_search_loaders
    from sdarts.distributed import init
    from sdarts.engine import SearchEngine
    from sdarts.search.strategies import make_strategy
    from sdarts.spaces.build import build_supernet
    from search_helpers import tiny_cfg

    def stack(iters):
        for bs in zip(*iters):
            yield Batch(*(torch.stack([getattr(b, f) for b in bs]) for f in ("x", "y", "ids")))

    cfg = tiny_cfg(seeds=[0, 1, 2], strategy=strategy, **{"optim.w.grad_clip": 0.05})
    rank, _, world, device = init("cpu")
    engine = SearchEngine(cfg, build_supernet(cfg), world, device)
    engine.set_epoch_lr(0)
    strat = make_strategy(cfg.strategy, engine, 1)
    loaders = [build_search_loaders(cfg.data, cfg.model.num_classes, s, rank, world, 1, "cpu") for s in cfg.seeds]
    tr, va = stack([iter(t) for t, _ in loaders]), stack([v.cycle() for _, v in loaders])
    losses = []
    for i in range(1, steps + 1):
        with torch.no_grad():
            for k, at in poison.items():
                if at == i:
                    engine.module.get_weights()[0][k].fill_(float("nan"))
        losses.append(strat.step(tr, va).loss.clone())
    return engine, losses


@pytest.mark.parametrize("strategy", ["single_level", "bilevel", "bilevel_second_order"])
def test_nan_in_one_seed_leaves_the_other_seeds_bit_identical(strategy):
    clean, clean_losses = _stacked_search(strategy, {})
    hit, hit_losses = _stacked_search(strategy, {1: 3})
    assert not clean.faults
    assert list(hit.faults) == [1] and "non-finite loss" in hit.faults[1], hit.faults
    assert torch.isfinite(hit_losses[1]).all() and not torch.isfinite(hit_losses[2][1]), "the poison must bite"
    for a, b in zip(clean_losses, hit_losses):
        assert torch.equal(a[[0, 2]], b[[0, 2]]), (a, b)
    a_net, b_net = clean.module.net, hit.module.net
    for (name, a), b in zip(a_net.named_parameters(), b_net.parameters()):
        assert torch.equal(a[[0, 2]], b[[0, 2]]), name
        sa, sb = clean.optimizer.state[a], hit.optimizer.state[b]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            if sa[key].dim():
                assert torch.equal(sa[key][[0, 2]], sb[key][[0, 2]]), (name, key)
    for (name, a), b in zip(a_net.named_buffers(), b_net.buffers()):
        if a.dim() and a.shape[0] == 3:
            assert torch.equal(a[[0, 2]], b[[0, 2]]), name
    assert str(clean.module.genotype(0)) == str(hit.module.genotype(0))


def test_nan_in_every_seed_is_a_numerical_fault():
    from sdarts.errors import NumericalFault
    with pytest.raises(NumericalFault, match="every seed's loss is non-finite"):
        _stacked_search("single_level", {0: 2, 1: 2, 2: 2}, steps=2)


#: `launcher/search.py` with one seed's slice of the first weight set to NaN before the loop's n-th
#: strategy step in this process: SDARTS_TEST_POISON="<seed index>:<n>" (unset: the plain search)
_POISONED_SEARCH = r"""
import os, sys
import torch
import sdarts.search.loop as L
from launcher.search import main
spec = os.environ.get("SDARTS_TEST_POISON")
if spec:
    k, at = map(int, spec.split(":"))
    make = L.make_strategy
    def make_strategy(name, engine, accum):
        strategy, calls = make(name, engine, accum), [0]
        step = strategy.step
        def poisoned(train, valid):
            calls[0] += 1
            if calls[0] == at:
                with torch.no_grad():
                    engine.module.get_weights()[0][k].fill_(float("nan"))
            return step(train, valid)
        strategy.step = poisoned
        return strategy
    L.make_strategy = make_strategy
sys.exit(main(sys.argv[1:]))
"""


def _poisoned(args, poison: str | None, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {"SDARTS_TEST_POISON": poison} if poison else {}
    if fault:
        env["SDARTS_TEST_FAULT"] = fault
    return run_cli(["-c", _POISONED_SEARCH, *args[1:]], env=env)  # args[0] is launcher/search.py


def _check_seed1_faulted_at_step_3(d, ref):
    """Seed 1 of run d ended by its NaN at step 3; seed 0's files are those of the unpoisoned run `ref`."""
    s1 = d / "seed_1"
    summary = json.loads((s1 / "summary.json").read_text())
    fault = summary["numerical_fault"]
    assert "seed 1: non-finite loss" in fault, fault
    assert "this seed's search ended there" in fault and "--resume" not in fault, fault
    assert "genotype" not in summary and not (s1 / "genotype.json").exists()
    assert not list((s1 / "genotypes").iterdir())  # its search ended in epoch 1
    assert jsonl(s1 / "alphas.jsonl") == jsonl(ref / "seed_1" / "alphas.jsonl")[:1]  # the init record only
    # its losses before the fault are its unpoisoned losses
    before = [m for m in jsonl(s1 / "metrics.jsonl") if m["step"] < 3]
    assert before == [m for m in jsonl(ref / "seed_1" / "metrics.jsonl") if m["step"] < 3]
    top = json.loads((d / "summary.json").read_text())
    assert "numerical_fault" in top["searches"]["1"] and "genotype" not in top["searches"]["1"]
    assert top["searches"]["0"] == json.loads((ref / "summary.json").read_text())["searches"]["0"]
    _same_seed_files(ref, d, 0, "seed 0 beside a faulted seed 1")


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory):
    """The stacked run with seed 1's NaN before step 3 (epoch 1), uninterrupted; never modified."""
    d = tmp_path_factory.mktemp("seed_nan") / "run"
    r = _poisoned([*STACKED, "--run-dir", str(d)], "1:3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "the others go on" in r.stderr
    return d


@pytest.mark.slow
def test_nan_seed_ends_alone_and_the_run_finishes(stacked_ref, poisoned_run):
    _check_seed1_faulted_at_step_3(poisoned_run, stacked_ref)


@pytest.mark.slow
def test_nan_seed_fault_survives_kill_and_resume(stacked_ref, tmp_path):
    """The fault is in the checkpoint: killed after it (once the step-4 save is committed) and resumed
    without the poison, the run ends as the uninterrupted poisoned one: seed 1 stays ended, seed 0 as if
    seed 1 had never faulted."""
    cut = tmp_path / "cut"
    r = _poisoned([*STACKED, "--run-dir", str(cut)], "1:3", "save.committed:kill:2")
    assert r.returncode == KILLED and latest(cut) == "step000000004", r.stderr[-2500:]
    r = _poisoned([*STACKED, "--run-dir", str(cut), "--resume"], None)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 4" in r.stderr and "Traceback" not in r.stderr
    _check_seed1_faulted_at_step_3(cut, stacked_ref)


@pytest.mark.slow
def test_nan_seed_fault_names_its_step_and_logs_no_nan(poisoned_run):
    fault = json.loads((poisoned_run / "seed_1" / "summary.json").read_text())["numerical_fault"]
    assert fault.startswith("step 3 (epoch 1): seed 1: non-finite loss"), fault
    assert [m["step"] for m in jsonl(poisoned_run / "seed_1" / "metrics.jsonl")] == [1, 2]  # as a lone search's
    for line in (poisoned_run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl: {line}"))


# -- 5. bad input -------------------------------------------------------------------------------------
BAD_SEEDS = [
    (["--set", "seeds=[]"], "at least one seed"),
    (["--set", "seeds=[1,1]"], "distinct"),
    (["--set", "seeds=[0,1]", "--set", "precision=fp16"], "fp16"),
    (["--set", "seeds=[0,1]", "--set", "engine.zero_stage=1"], "zero_stage"),
    (["--set", "seeds=[0,1]", "--set", "model.checkpoint_cells=true"], "checkpoint_cells"),
]


@pytest.mark.parametrize("args,why", BAD_SEEDS, ids=[b[1] for b in BAD_SEEDS])
def test_bad_seeds_exit_2_with_one_line_naming_seeds(args, why, tmp_path):
    d = tmp_path / "run"
    r = run_cli(["launcher/search.py", "--config", "configs/search/smoke.yaml", "--run-dir", str(d), *args])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "seeds" in lines[0] and why in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not d.exists()


@pytest.mark.parametrize("over,why", [(["seeds=[-1,0]"], "non-negative"), (["seeds=3"], "list"),
                                      (["seeds=[0,1]", "seed=3"], "seed 3 would be ignored"),
                                      (["seeds=[0,1]", "precision=bf16", "engine.autocast=false"], "autocast")])
def test_more_bad_seeds_are_one_config_error(over, why):
    with pytest.raises(ConfigError, match="seeds") as e:
        C.load(ROOT / "configs/search/smoke.yaml", over)
    assert why in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("seeds", ["[1,0]", "[0,2]", "[0,1,2]"])
def test_resume_with_other_seeds_is_refused_with_one_line_and_touches_nothing(stacked_ref, tmp_path, seeds):
    """A copy of the finished stacked run (seeds [0, 1]) resumed with other seeds: exit 2, one line naming
    the checkpoint and the seeds it holds, and the run directory byte for byte as it was."""
    d = tmp_path / "run"
    shutil.copytree(stacked_ref, d)
    before = tree(d)
    r = run([*SEARCH, "--set", f"seeds={seeds}", "--run-dir", str(d), "--resume"])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert str(d / "checkpoints" / "step000000008") in lines[0]
    assert "seeds [0, 1]" in lines[0], lines[0]  # what the checkpoint holds, named
    assert tree(d) == before, sorted(set(tree(d)) ^ set(before))
