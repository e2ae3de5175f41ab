"""The NB201 stability runner: its grid (a cell's seeds batched into one process by default, one
process per seed with --no-batch-seeds), its report, and resume of a killed or stopped grid without
redoing finished seeds."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, ROOT, need_data
from sdarts.nasbench201 import report as R

spec = importlib.util.spec_from_file_location("nb201_stability", ROOT / "scripts" / "nb201_stability.py")
runner = importlib.util.module_from_spec(spec)
sys.modules["nb201_stability"] = runner  # dataclasses look their module up while the script loads
spec.loader.exec_module(runner)

ARCH_GOOD = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
ARCH_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"


def _args(tmp_path, **extra):
    """The attributes `build_grid` reads from the parsed command line."""
    ns = {"config": "configs/search/nb201_proxy.yaml", "results": str(tmp_path), "variants": "single_level:softmax,bilevel",
          "lrs": "0.025,0.005", "alpha_optimizers": "sgd,adam", "alpha_lr": None, "seeds": "0,1",
          "device": "cpu", "overrides": ["epochs=3"]}
    ns.update(extra)
    return type("A", (), ns)


def test_grid_follows_table5_lr_rule(tmp_path):
    searches = runner.build_grid(_args(tmp_path))
    assert len(searches) == 2 * 2 * 2 * 2
    by_name = {c.name: c for c in searches}
    sgd = by_name["bilevel-softmax-sgd-lr0.005-s1"].overrides
    assert "optim.w.lr=0.005" in sgd and "optim.alpha.lr=0.005" in sgd and "seed=1" in sgd  # alpha on SGD at lr
    adam = by_name["single_level-softmax-adam-lr0.025-s0"].overrides
    assert not any(o.startswith("optim.alpha.lr=") for o in adam)  # Adam keeps the config's 3e-4
    assert adam[-1] == "epochs=3" and "engine.device=cpu" in adam  # --set passes through, last wins
    assert by_name["bilevel-softmax-sgd-lr0.005-s1"].dir == tmp_path / "runs" / "bilevel-softmax-sgd-lr0.005-s1"
    # --no-batch-seeds: one process per seed, in the seed's own directory
    lone = runner.plan(runner.build_grid(_args(tmp_path)), _args(tmp_path), batch=False)
    assert len(lone) == 16 and all(len(j.searches) == 1 and j.run_dir == j.searches[0].dir for j in lone)
    # default: one process per cell, all its seeds as seeds=[...], each in seed_<s>/ of the cell's directory
    jobs = runner.plan(searches, _args(tmp_path), batch=True)
    assert len(jobs) == 8 and all(len(j.searches) == 2 for j in jobs)
    j = next(j for j in jobs if j.name == "bilevel-softmax-sgd-lr0.005")
    assert "seeds=[0,1]" in j.overrides and not any(o.startswith("seed=") for o in j.overrides)
    assert j.overrides[-1] == "epochs=3" and "optim.alpha.lr=0.005" in j.overrides
    assert j.run_dir == tmp_path / "runs" / "bilevel-softmax-sgd-lr0.005"
    assert [s.name for s in j.searches] == ["bilevel-softmax-sgd-lr0.005-s0", "bilevel-softmax-sgd-lr0.005-s1"]
    assert j.searches[1].dir == j.run_dir / "seed_1" and j.log == tmp_path / "logs" / "bilevel-softmax-sgd-lr0.005.log"


def _batch_dir(runs: Path, name: str, seeds: list[int], finished: list[int]) -> Path:
    d = runs / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "seeds": seeds}))
    for s in finished:
        (d / f"seed_{s}").mkdir()
        (d / f"seed_{s}" / "summary.json").write_text("{}")
    return d


def test_plan_finds_finished_seeds_anywhere_and_never_reuses_another_batch(tmp_path):
    cell = "single_level-softmax-sgd-lr0.025"
    args = _args(tmp_path, variants="single_level", lrs="0.025", alpha_optimizers="sgd", seeds="0,1,2,3")
    runs = tmp_path / "runs"
    _batch_dir(runs, cell, [0, 1], [0, 1])                  # a finished batch of seeds 0 and 1
    (runs / f"{cell}-s2").mkdir()
    (runs / f"{cell}-s2" / "summary.json").write_text("{}")  # seed 2 finished by --no-batch-seeds
    searches = runner.build_grid(args)
    jobs = runner.plan(searches, args, batch=True)
    assert [s.state for s in searches] == ["done", "done", "done", "pending"]
    assert searches[1].dir == runs / cell / "seed_1" and searches[2].dir == runs / f"{cell}-s2"
    # seed 3 is not runs/<cell>/'s seed list: its own batch directory (--force there cannot touch 0 and 1)
    (j,) = jobs
    assert j.run_dir == runs / f"{cell}+s3" and "seeds=[3]" in j.overrides and j.searches == [searches[3]]
    # a started batch of the same seeds is that batch's directory again (start() resumes it)
    _batch_dir(runs, f"{cell}+s3", [3], [])
    (j,) = runner.plan(runner.build_grid(args), args, batch=True)
    assert j.run_dir == runs / f"{cell}+s3"
    # lone mode finds batched seeds finished too
    searches = runner.build_grid(args)
    (j,) = runner.plan(searches, args, batch=False)
    assert j.run_dir == runs / f"{cell}-s3" and searches[0].dir == runs / cell / "seed_0"


@pytest.mark.parametrize("argv,needle", [
    (["--variants", "trilevel"], "unknown strategy 'trilevel'"),
    (["--variants", "bilevel:tanh"], "unknown activation 'tanh'"),
    (["--lrs", "fast"], "--lrs: expected comma-separated numbers"),
    (["--set", "optim.w.lr=-1"], "optim.w.lr"),
    (["--config", "nope.yaml"], "config file not found"),
    (["--seeds", "0,0"], "--seeds: expected distinct non-negative integers"),
    (["--set", "seeds=[0,1]"], "the grid sets the seeds; use --seeds"),
    (["--set", "nb201_table=/nowhere/t.csv.gz"], "nb201_table: /nowhere/t.csv.gz not found"),
    (["--set", "nb201_table=configs/search/nb201_proxy.yaml", "--set", "data.root=/nowhere/cifar"],
     "data.root: /nowhere/cifar not found"),  # (any existing file passes the table's existence check)
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    assert runner.main(["--results", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert not (tmp_path / "r" / "runs").exists()


def test_results_folder_refuses_other_settings(tmp_path):
    runner.check_grid_file(tmp_path, "configs/search/nb201_proxy.yaml", ["epochs=3"], "cpu")
    runner.check_grid_file(tmp_path, "configs/search/nb201_proxy.yaml", ["epochs=3"], "cpu")  # same: fine
    with pytest.raises(runner.GridError, match="made with other settings"):
        runner.check_grid_file(tmp_path, "configs/search/nb201_proxy.yaml", ["epochs=4"], "cpu")


def _fake_run(root: Path, name: str, strategy: str, seed: int, c10: list[float], arch: str, finished: bool):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"seed": seed, "epochs": 4, "strategy": strategy, "arch": {"activation": "softmax"},
           "optim": {"w": {"lr": 0.025}, "alpha": {"optimizer": "sgd", "lr": 0.025}}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(d / "nb201_scores.jsonl", "w") as f:
        for e, acc in enumerate(c10, start=1):
            rec = {"step": e * 10, "epoch": e, "arch": arch, **{c: acc for c in R.COLUMNS}}
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 99, "epo')  # a torn line from a kill is ignored
    if finished:
        (d / "summary.json").write_text(json.dumps({"genotype": {"space": "nb201", "arch": arch},
                                                    "nb201": {c: c10[-1] for c in R.COLUMNS}}))


def test_report_in_paper_form(tmp_path):
    _fake_run(tmp_path, "s0", "single_level", 0, [90.0, 93.0, 94.0, 94.0], ARCH_GOOD, True)
    _fake_run(tmp_path, "s1", "single_level", 1, [91.0, 80.0, 92.0, 93.0], ARCH_GOOD, True)
    _fake_run(tmp_path, "b0", "bilevel", 0, [92.0, 60.0, 10.0, 54.3], ARCH_SKIP, True)
    _fake_run(tmp_path, "b1", "bilevel", 1, [92.0, 91.0, 88.0], ARCH_GOOD, False)  # cut short at epoch 3
    with open(tmp_path / "b0" / "analysis.jsonl", "w") as f:  # eq. 8 records of the bi-level run
        for step, (same, prev) in enumerate([(0.1, None), (0.3, 0.2)], start=1):
            f.write(json.dumps({"step": step, "kind": "grad_corr", "same_step": {"mean_cos": same},
                                "prev_w": None if prev is None else {"mean_cos": prev}}) + "\n")
    runs = R.collect(tmp_path)
    assert len(runs) == 4
    groups = {g["strategy"]: g for g in R.summarize(runs)}
    s, b = groups["single_level"], groups["bilevel"]
    assert s["mean"]["cifar10_test"] == pytest.approx(93.5) and s["std"]["cifar10_test"] == pytest.approx(0.5)
    # worst over epochs > E/2 = 2: seed 0 -> 94, seed 1 -> 92 (the dip at epoch 2 is first-half)
    assert s["worst_second_half_mean"] == pytest.approx(93.0) and s["worst_second_half_min"] == 92.0
    assert b["finished"] == 1 and b["partial"] == 1
    assert b["mean"]["cifar10_test"] == pytest.approx((54.3 + 88.0) / 2)  # partial run: its last scored epoch
    assert b["worst_second_half_min"] == 10.0 and b["param_free_edges_mean"] == pytest.approx(3.5)
    md = R.markdown(R.summarize(runs), runs)
    assert "| Single-DARTS | softmax | sgd | 0.025 | 2 | " in md
    assert "| DARTS (1st order) | softmax | sgd | 0.025 | 1 (+1 partial) | " in md
    assert "93.50+-0.50" in md and "| b1 (partial) | 92.0 | 91.0 | 88.0 |" in md
    assert b["grad_corr"] == {"same_step": pytest.approx(0.2), "prev_w": pytest.approx(0.2)}
    assert s["grad_corr"] is None
    assert "| DARTS (1st order) | softmax | sgd | 0.025 | 0.200 | 0.200 |" in md


def test_numerical_fault_of_a_batched_seed_counts_as_failed(tmp_path, capsys):
    table = need_data("nb201", "nb201_accuracies.csv.gz")
    cell = "single_level-softmax-sgd-lr0.025"
    batch = _batch_dir(tmp_path / "runs", cell, [0, 1], [])
    _fake_run(batch, "seed_0", "single_level", 0, [90.0, 93.0, 94.0, 94.0], ARCH_GOOD, True)
    _fake_run(batch, "seed_1", "single_level", 1, [91.0, 50.0], ARCH_SKIP, False)
    fault = ("step 7 (epoch 2): seed 1: non-finite loss (nan) in train; this seed's search ended there (its files "
             "stop at its last good step; the others go on)")  # SeedRuns.record_faults' wording
    (batch / "seed_1" / "summary.json").write_text(json.dumps({"strategy": "single_level", "numerical_fault": fault,
                                                               "seed": 1, "batched_seeds": [0, 1]}))
    argv = ["--results", str(tmp_path), "--variants", "single_level", "--seeds", "0,1", "--device", "cpu",
            "--set", "data.dataset=synthetic", "--set", f"nb201_table={table}"]
    assert runner.main(argv + ["--report-only"]) == 0
    out = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in out["runs"]] == [f"{cell}-s0"]  # the grid's names, not seed_<s>
    assert [(f["name"], f["numerical_fault"], f["epochs_done"]) for f in out["failed"]] == [(f"{cell}-s1", fault, 2)]
    assert out["groups"][0]["seeds"] == [0] and out["groups"][0]["mean"]["cifar10_test"] == 94.0
    md = (tmp_path / "table.md").read_text()
    assert "| Single-DARTS | softmax | sgd | 0.025 | 1 | " in md and f"| {cell}-s0 | 90.0 | 93.0 |" in md
    assert "### Failed searches (numerical fault" in md and f"- `{cell}-s1` (after 2 scored epochs): {fault}" in md
    status = json.loads((tmp_path / "status.json").read_text())
    assert status[f"{cell}-s1"]["state"] == "failed" and status[f"{cell}-s1"]["numerical_fault"] == fault
    assert status[f"{cell}-s0"]["state"] == "done"
    assert status[f"{cell}-s0"]["log"] == str(tmp_path / "logs" / f"{cell}.log")  # the log of the batch that ran it
    # finished (it is not rerun), but failed: exit 1
    capsys.readouterr()
    assert runner.main(argv) == 1
    assert "2 already finished, 0 to run" in capsys.readouterr().out


def _tiny_grid_cmd(results: Path, table: Path, seeds: str = "0,1,2", epochs: int = 2) -> list[str]:
    return [PYTHON, str(ROOT / "scripts" / "nb201_stability.py"), "--results", str(results),
            "--variants", "single_level:softmax", "--seeds", seeds, "--workers", "1", "--device", "cpu",
            "--set", "data.dataset=synthetic", "--set", "data.synthetic_size=64", "--set", "data.resolution=8",
            "--set", "data.micro_batch=16", "--set", "model.C=2", "--set", f"epochs={epochs}",
            "--set", f"nb201_table={table}"]


CELL = "single_level-softmax-sgd-lr0.025"


def _launches(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("$ ")]


def _env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        e.pop(k, None)
    return e


def _searches_of(results: Path) -> list[int]:
    """Pids of search processes still writing into `results` (children outlive a SIGKILLed runner briefly)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "launcher/search.py" in cmd and str(results) in cmd:
                pids.append(int(p.name))
    return pids


@pytest.mark.slow
def test_killed_grid_resumes_without_redoing_finished_cells(tmp_path):
    """--no-batch-seeds: one process per seed, each in runs/<cell>-s<seed>/."""
    table = need_data("nb201", "nb201_accuracies.csv.gz")
    results = tmp_path / "grid"
    first = results / "runs" / "single_level-softmax-sgd-lr0.025-s0"
    cmd = _tiny_grid_cmd(results, table) + ["--no-batch-seeds"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while not (first / "summary.json").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "first grid cell did not finish"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # the hardest kill: no cleanup in the runner at all
    proc.wait()
    proc.stdout.close()
    t_end = time.time() + 120
    while _searches_of(results):  # the running search got SIGTERM from the kernel (parent death) and exits
        assert time.time() < t_end, "an orphaned search kept running after its runner was killed"
        time.sleep(0.5)
    summary_mtime = (first / "summary.json").stat().st_mtime_ns

    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 already finished, 2 to run in 2 processes (one per seed)" in r.stdout
    assert (first / "summary.json").stat().st_mtime_ns == summary_mtime
    launches = (results / "logs" / f"{first.name}.log").read_text().count("\n$ ")
    launches += (results / "logs" / f"{first.name}.log").read_text().startswith("$ ")
    assert launches == 1  # the finished cell was started exactly once across both invocations
    out = json.loads((results / "results.json").read_text())
    assert sorted(r["seed"] for r in out["runs"] if r["finished"]) == [0, 1, 2]
    assert "| Single-DARTS | softmax | sgd | 0.025 | 3 | " in (results / "table.md").read_text()
    status = json.loads((results / "status.json").read_text())
    assert all(v["state"] == "done" for v in status.values())
    assert sorted(d.name for d in (results / "runs").iterdir()) == [f"{CELL}-s{s}" for s in range(3)]
    assert not list((results / "runs").glob("*/seed_*"))
    # a third invocation has nothing to do, nor has a batched one: it finds the seeds finished
    for extra in (["--no-batch-seeds"], []):
        r = subprocess.run(_tiny_grid_cmd(results, table) + extra, cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0 and "3 already finished, 0 to run" in r.stdout


def test_deadline_stops_and_still_writes_the_table(tmp_path):
    table = need_data("nb201", "nb201_accuracies.csv.gz")
    results = tmp_path / "grid"
    r = subprocess.run(_tiny_grid_cmd(results, table, seeds="0,1") + ["--deadline-s", "2", "--grace-s", "30"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 124, r.stdout + r.stderr
    assert "stopping (deadline 2s)" in r.stdout
    assert (results / "table.md").exists() and (results / "results.json").exists()
    status = json.loads((results / "status.json").read_text())
    assert {k: v["state"] for k, v in status.items()} == {f"{CELL}-s0": "stopped", f"{CELL}-s1": "stopped"}
    assert not _searches_of(results)


@pytest.mark.slow
def test_default_batches_a_cells_seeds_into_one_process(tmp_path):
    table = need_data("nb201", "nb201_accuracies.csv.gz")
    results = tmp_path / "grid"
    r = subprocess.run(_tiny_grid_cmd(results, table, seeds="0,1"), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 already finished, 2 to run in 1 processes (seeds batched)" in r.stdout
    batch = results / "runs" / CELL
    assert [p.name for p in (results / "logs").iterdir()] == [f"{CELL}.log"]
    (launch,) = _launches(results / "logs" / f"{CELL}.log")  # one process for both seeds
    assert "seeds=[0,1]" in launch and "--force" in launch
    for s in (0, 1):
        d = batch / f"seed_{s}"
        assert (d / "summary.json").exists() and (d / "genotype.json").exists()
        assert yaml.safe_load((d / "config.yaml").read_text())["seed"] == s
    assert sorted(json.loads((batch / "summary.json").read_text())["searches"]) == ["0", "1"]
    # a seed added later gets its own batch; the finished seeds are read where they are, not rerun
    r = subprocess.run(_tiny_grid_cmd(results, table, seeds="0,1,2"), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 already finished, 1 to run in 1 processes" in r.stdout
    assert (results / "runs" / f"{CELL}+s2" / "seed_2" / "summary.json").exists()
    assert len(_launches(results / "logs" / f"{CELL}.log")) == 1
    out = json.loads((results / "results.json").read_text())
    assert sorted(r["name"] for r in out["runs"] if r["finished"]) == [f"{CELL}-s{s}" for s in range(3)]
    assert out["failed"] == [] and out["groups"][0]["seeds"] == [0, 1, 2]
    md = (results / "table.md").read_text()
    assert "| Single-DARTS | softmax | sgd | 0.025 | 3 | " in md
    assert all(f"| {CELL}-s{s} | " in md for s in range(3))
    status = json.loads((results / "status.json").read_text())
    assert {k: (v["state"], v["process"]) for k, v in status.items()} == {
        f"{CELL}-s0": ("done", CELL), f"{CELL}-s1": ("done", CELL), f"{CELL}-s2": ("done", f"{CELL}+s2")}


@pytest.mark.slow
def test_stopped_batch_resumes_from_its_checkpoint(tmp_path):
    table = need_data("nb201", "nb201_accuracies.csv.gz")
    results = tmp_path / "grid"
    batch = results / "runs" / CELL
    cmd = _tiny_grid_cmd(results, table, seeds="0,1,2", epochs=30)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (batch / "checkpoints" / "latest").exists():  # the batch's first epoch-end checkpoint
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the batch wrote no checkpoint"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the runner stops its search: checkpoint at the next step, exit 124
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 124, out
    assert not (batch / "summary.json").exists(), "the batch finished before it was stopped; raise epochs"
    status = json.loads((results / "status.json").read_text())
    assert {v["state"] for v in status.values()} == {"stopped"} and len(status) == 3
    done = [len(R.load_run(batch / f"seed_{s}")["trajectory"]) for s in range(3)]
    assert len(set(done)) == 1 and 1 <= done[0] < 30  # the seeds stop together
    assert "(partial)" in (results / "table.md").read_text()

    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 already finished, 3 to run in 1 processes" in r.stdout
    log = results / "logs" / f"{CELL}.log"
    first, second = _launches(log)
    assert "--force" in first and "--resume" in second and "resumed from step" in log.read_text()
    for s in range(3):  # each epoch scored once: the resumed run cut its logs back to the checkpoint
        epochs = [json.loads(line)["epoch"] for line in (batch / f"seed_{s}" / "nb201_scores.jsonl").open()]
        assert epochs == list(range(1, 31))
    assert "| Single-DARTS | softmax | sgd | 0.025 | 3 | " in (results / "table.md").read_text()
