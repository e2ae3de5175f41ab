#!/usr/bin/env python
"""Grid of NB201 searches (strategy x activation x lr x alpha optimizer x seed), in parallel, resumable,
reported in the paper's table form.

    python scripts/nb201_stability.py --config configs/search/nb201_proxy.yaml --results results/nb201_proxy \\
        --variants single_level:softmax,single_level:sigmoid,bilevel:softmax --lrs 0.025 \\
        --alpha-optimizers sgd --seeds 0,1,2 --workers 2

A grid cell is one (variant x lr x alpha optimizer); each of its seeds is one search, named
`<strategy>-<activation>-<alpha optimizer>-lr<lr>-s<seed>` in every table and file of the report.
By default a cell's seeds run batched: one `launcher/search.py` process trains them all in one
supernet (`--set seeds=[...]`, sdarts/search/seedruns.py) in `RESULTS/runs/<cell>/`, whose
`seed_<s>/` is each seed's complete run directory, logging to `RESULTS/logs/<cell>.log`.
`--no-batch-seeds` runs one process per seed instead, in `RESULTS/runs/<cell>-s<seed>/`
(`RESULTS/logs/<cell>-s<seed>.log`). Either way the search loop writes each epoch's NB201 scores as
it goes.

Resume: a seed whose run directory (batched: its `seed_<s>/`) holds a `summary.json` is finished and
never rerun, whichever mode ran it. The unfinished seeds of a cell form its process: a run directory
with a checkpoint resumes from it (`--resume`), any other is started afresh (`--force`). So a killed
grid continues where it stopped. A batch directory belongs to its seed list: when the unfinished
seeds of a cell are not the list `runs/<cell>/` was started with (seeds added to `--seeds`, or a
batch cut between its seeds' summaries), they run in `runs/<cell>+s<s1>-<s2>.../`; finished seeds are
never touched.

A batched seed whose loss went non-finite stops alone (the others go on); its summary.json records
the `numerical_fault`. It counts as failed: left out of the table's groups, listed under "Failed
searches" in table.md and under `failed` in results.json, and not rerun (delete its `seed_<s>/` to
try it again). A lone search with a non-finite loss fails its process, as any crashed search does.

Learning rates follow the paper's Table 5 protocol: `--lrs` sets w's lr, and with `--alpha-optimizers
sgd` alpha's lr too; with `adam`, alpha keeps the config's lr (3e-4) unless `--alpha-lr` is given.

For a one-shot GPU session: `--device cuda --workers N` runs N search processes at once on the one
GPU and `--deadline-s S` stops everything S seconds after the start (SIGTERM: each search checkpoints
at its next step and exits), then writes the table from whatever was scored, unfinished runs marked
partial. The table is also rewritten after every finished process: `RESULTS/table.md`,
`RESULTS/results.json` (groups, per-search trajectories, worst accuracy over the second half, failed
searches), `RESULTS/status.json` (per search: state, its process's rc/wall time/log, its directory),
and `RESULTS/trajectories.png` when matplotlib is present.

Exit code: 0 all searches finished, 1 some failed (a crashed process, a numerical fault), 124 stopped
by the deadline or a signal, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdarts.runlog import atomic_write  # noqa: E402

STRATEGIES = ("single_level", "bilevel", "bilevel_second_order", "two_batch")
ACTIVATIONS = ("softmax", "sigmoid")


class GridError(ValueError):
    pass


@dataclass
class Search:
    """One seed of one grid cell: its name in the report, the overrides of its lone search, and the
    run directory holding its files (lone: `runs/<name>/`; batched: `runs/<batch>/seed_<s>/`)."""
    name: str
    cell: str
    seed: int
    overrides: list[str]   # the lone search (seed=<s>)
    dir: Path
    state: str = "pending"   # pending | running | done | failed | stopped
    fault: str | None = None  # the numerical fault in its summary.json (a batched seed)
    job: "Job | None" = field(default=None, repr=False)

    def finished(self) -> bool:
        return (self.dir / "summary.json").exists()

    def settle(self) -> None:
        """done / failed from a finished search's summary (a numerical fault is a failure)."""
        self.fault = json.loads((self.dir / "summary.json").read_text()).get("numerical_fault")
        self.state = "failed" if self.fault else "done"


@dataclass
class Job:
    """One search process: a cell's unfinished seeds batched (`seeds=[...]`), or one lone seed."""
    name: str
    overrides: list[str]
    run_dir: Path
    log: Path
    searches: list[Search]
    state: str = "pending"   # pending | running | done | failed | stopped
    rc: int | None = None
    started: float | None = None
    wall_s: float | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def ended(self, stopped: bool) -> None:
        """After the process exited: each search done/failed from its summary; an unfinished one is
        stopped (we signalled it) or failed (it died on its own)."""
        self.rc, self.wall_s = self.proc.returncode, time.time() - self.started
        for s in self.searches:
            if s.finished():
                s.settle()
            else:
                s.state = "stopped" if stopped else "failed"
        states = {s.state for s in self.searches}
        self.state = "done" if states == {"done"} else "failed" if "failed" in states else "stopped"


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GridError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GridError(f"{what}: expected comma-separated integers, got {text!r}") from None


def cells_of(args) -> list[tuple[str, list[str], list[int]]]:
    """The grid's cells: (name, overrides without the seed, seeds)."""
    variants = []
    for v in args.variants.split(","):
        strat, _, act = v.strip().partition(":")
        act = act or "softmax"
        if strat not in STRATEGIES:
            raise GridError(f"--variants: unknown strategy {strat!r} (one of {', '.join(STRATEGIES)})")
        if act not in ACTIVATIONS:
            raise GridError(f"--variants: unknown activation {act!r} in {v!r} (softmax or sigmoid)")
        variants.append((strat, act))
    aopts = [a.strip() for a in args.alpha_optimizers.split(",") if a.strip()]
    for a in aopts:
        if a not in ("sgd", "adam"):
            raise GridError(f"--alpha-optimizers: unknown optimizer {a!r} (sgd or adam)")
    lrs, seeds = _floats(args.lrs, "--lrs"), _ints(args.seeds, "--seeds")
    if not (variants and aopts and lrs and seeds):
        raise GridError("the grid is empty: give at least one variant, alpha optimizer, lr and seed")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise GridError(f"--seeds: expected distinct non-negative integers, got {args.seeds!r}")
    for ov in args.overrides:
        if ov.split("=", 1)[0].strip() in ("seed", "seeds"):
            raise GridError(f"--set {ov}: the grid sets the seeds; use --seeds")
    cells = []
    for strat, act in variants:
        for aopt in aopts:
            for lr in lrs:
                ov = [f"strategy={strat}", f"arch.activation={act}", f"optim.w.lr={lr!r}",
                      f"optim.alpha.optimizer={aopt}"]
                if aopt == "sgd":
                    ov.append(f"optim.alpha.lr={args.alpha_lr if args.alpha_lr else lr!r}")
                elif args.alpha_lr:
                    ov.append(f"optim.alpha.lr={args.alpha_lr}")
                if args.device != "auto":
                    ov.append(f"engine.device={args.device}")
                cells.append((f"{strat}-{act}-{aopt}-lr{lr:g}", ov, seeds))
    return cells


def build_grid(args) -> list[Search]:
    """Every search of the grid, each in its lone run directory (`plan` moves batched ones)."""
    runs = Path(args.results) / "runs"
    return [Search(f"{cell}-s{s}", cell, s, ov + [f"seed={s}"] + list(args.overrides), runs / f"{cell}-s{s}")
            for cell, ov, seeds in cells_of(args) for s in seeds]


def _batch_dirs(runs: Path, cell: str) -> list[Path]:
    """The batch directories a cell may have: `runs/<cell>/`, then `runs/<cell>+s.../`."""
    extra = sorted(d for d in runs.iterdir() if d.name.startswith(f"{cell}+s")) if runs.is_dir() else []
    return [runs / cell] + extra


def _batch_seeds(d: Path) -> list[int] | None:
    """The seed list a batch directory was started with (None: nothing started there yet)."""
    try:
        return yaml.safe_load((d / "config.yaml").read_text()).get("seeds")
    except (OSError, AttributeError, yaml.YAMLError):
        return None


def _free(d: Path) -> bool:
    return not d.exists() or (_batch_seeds(d) is None and not any(d.glob("seed_*/summary.json")))


def plan(searches: list[Search], args, batch: bool) -> list[Job]:
    """Finds each search's finished run wherever it is (lone or any batch of its cell), then groups the
    rest into processes: per cell one batch of its unfinished seeds, or one process per seed."""
    results = Path(args.results)
    runs = results / "runs"
    overrides = {cell: ov for cell, ov, _ in cells_of(args)}
    for s in searches:
        for d in [s.dir] + [b / f"seed_{s.seed}" for b in _batch_dirs(runs, s.cell)]:
            if (d / "summary.json").exists():
                s.dir = d
                s.settle()
                break
    jobs = []
    if not batch:
        for s in searches:
            if s.state == "pending":
                jobs.append(Job(s.name, s.overrides, s.dir, results / "logs" / f"{s.name}.log", [s]))
    else:
        todo: dict[str, list[Search]] = {}
        for s in searches:
            if s.state == "pending":
                todo.setdefault(s.cell, []).append(s)
        for cell, ss in todo.items():
            seeds = [s.seed for s in ss]
            d = runs / cell
            if not (_free(d) or _batch_seeds(d) == seeds):
                d = runs / f"{cell}+s{'-'.join(map(str, seeds))}"  # (its name fixes its seeds)
            ov = overrides[cell] + [f"seeds=[{','.join(map(str, seeds))}]"] + list(args.overrides)
            for s in ss:
                s.dir = d / f"seed_{s.seed}"
            jobs.append(Job(d.name, ov, d, results / "logs" / f"{d.name}.log", ss))
    for j in jobs:
        for s in j.searches:
            s.job = j
    return jobs


def check_grid_file(results: Path, config: str, overrides: list[str], device: str) -> None:
    """Refuses to mix runs of different base settings in one results folder (finished cells are reused)."""
    meta = {"config": str(Path(config).resolve()), "overrides": list(overrides), "device": device}
    path = results / "grid.json"
    if path.exists():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise GridError(f"{path}: this results folder was made with other settings ({old}); "
                            f"use another --results folder")
    else:
        results.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(meta, indent=2) + "\n")


def _die_with_parent() -> None:
    """Linux: the search gets SIGTERM (checkpoint and exit) if the runner dies, even by SIGKILL."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start(job: Job, config: str, threads: int, device: str) -> None:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    resume = (job.run_dir / "checkpoints" / "latest").exists()
    cmd = [sys.executable, str(ROOT / "launcher" / "search.py"), "--config", config, "--run-dir", str(job.run_dir),
           "--resume" if resume else "--force"]
    for ov in job.overrides:
        cmd += ["--set", ov]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # each search is a lone process with its own rendezvous port
    if device in ("cpu", "cuda"):
        env["DS_ACCELERATOR"] = device  # never inherit a CPU setting into a GPU grid, or the reverse
    with open(job.log, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        job.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_parent)
    job.state, job.started = "running", time.time()
    for s in job.searches:
        s.state = "running"


def stop(jobs: list[Job], grace_s: float) -> None:
    """SIGTERM every running search (it checkpoints at its next step), SIGKILL after `grace_s`."""
    running = [j for j in jobs if j.state == "running"]
    for j in running:
        try:
            os.killpg(j.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.time() + grace_s
    for j in running:
        try:
            j.proc.wait(timeout=max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(j.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            j.proc.wait()
        j.ended(stopped=True)


def _run_dir_name(d: Path) -> str:
    """The process directory a search's files are in (its log is `logs/<that>.log`)."""
    return d.parent.name if d.name.startswith("seed_") else d.name


def write_report(results: Path, searches: list[Search], title: str) -> None:
    from sdarts.nasbench201 import report as R
    runs, failed = [], []
    for s in searches:
        r = R.load_run(s.dir)
        if r is not None:
            r["name"] = s.name  # (a batched seed's directory is seed_<s>: the grid's name for it instead)
        if s.fault:
            failed.append({"name": s.name, "seed": s.seed, "dir": str(s.dir), "numerical_fault": s.fault,
                           "epochs_done": r["epochs_done"] if r else 0,
                           "trajectory": r["trajectory"] if r else []})
        elif r is not None:
            runs.append(r)
    groups = R.summarize(runs) if runs else []
    status = {}
    for s in searches:
        j = s.job
        status[s.name] = {"state": s.state, "rc": j.rc if j else None, "wall_s": j.wall_s if j else None,
                          "log": str(j.log if j else results / "logs" / f"{_run_dir_name(s.dir)}.log"),
                          "dir": str(s.dir), "process": j.name if j else _run_dir_name(s.dir)}
        if s.fault:
            status[s.name]["numerical_fault"] = s.fault
    atomic_write(results / "status.json", json.dumps(status, indent=2) + "\n")
    atomic_write(results / "results.json",
                 json.dumps({"groups": groups, "runs": runs, "failed": failed}, indent=1) + "\n")
    md = R.markdown(groups, runs, title)
    if failed:
        md += ("\n### Failed searches (numerical fault: counted as failed, not in the groups above)\n\n"
               + "".join(f"- `{f['name']}` (after {f['epochs_done']} scored epochs): {f['numerical_fault']}\n"
                         for f in failed))
    atomic_write(results / "table.md", md)
    if runs:
        try:
            import matplotlib
            matplotlib.use("Agg")
            from sdarts.analysis.plots import save, stability_figure
            save(stability_figure(runs, title), results / "trajectories.png")
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nb201_stability.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/search/nb201_proxy.yaml", help="base search config")
    p.add_argument("--results", default="results/nb201_stability", help="results folder (runs/, logs/, table.md)")
    p.add_argument("--variants", default="single_level:softmax,single_level:sigmoid,bilevel:softmax",
                   help="comma-separated strategy[:activation]")
    p.add_argument("--lrs", default="0.025", help="comma-separated w learning rates (Table 5: 0.001,0.005,0.025)")
    p.add_argument("--alpha-optimizers", default="sgd", help="comma-separated: sgd (alpha lr = lr) and/or adam")
    p.add_argument("--alpha-lr", default=None, help="fixed alpha lr instead of the rule above")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--no-batch-seeds", dest="batch_seeds", action="store_false",
                   help="one process per seed instead of one per cell training all its seeds (seeds=[...])")
    p.add_argument("--workers", type=int, default=1,
                   help="search processes at once (CPU: <= cores; GPU: several share it)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per search process")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="sets engine.device")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every search (repeatable), e.g. --set epochs=10")
    p.add_argument("--deadline-s", type=float, default=0, help="stop everything after this many seconds (0 = none)")
    p.add_argument("--grace-s", type=float, default=60, help="after SIGTERM, seconds before SIGKILL")
    p.add_argument("--title", default=None, help="heading of table.md")
    p.add_argument("--report-only", action="store_true", help="rebuild the table from the results folder")
    args = p.parse_args(argv)

    try:
        if args.workers < 1 or args.threads < 1:
            raise GridError("--workers and --threads must be >= 1")
        if not Path(args.config).is_file():
            raise GridError(f"config file not found: {args.config}")
        searches = build_grid(args)
        results = Path(args.results)
        jobs = plan(searches, args, args.batch_seeds)
        if not args.report_only:
            check_grid_file(results, args.config, args.overrides, args.device)
            # validate every process's config now: a bad --set is one line, not N failed runs
            from sdarts import config as C
            cfg = C.load(args.config, searches[0].overrides)
            for j in jobs:
                C.load(args.config, j.overrides)
            # the searches run with cwd = ROOT: a missing table or data folder would otherwise cost
            # every search its first epoch before failing
            for key, value in (("nb201_table", cfg.nb201_table), ("data.root", cfg.data.root)):
                if value and not (ROOT / value).exists():
                    raise GridError(f"{key}: {value} not found (relative paths are taken from {ROOT})")
            if not cfg.nb201_table:
                raise GridError("nb201_table is not set: the stability table needs NB201 scores (--set nb201_table=PATH)")
    except (GridError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.config = str(Path(args.config).resolve())  # the searches run with cwd = the repository root
    title = args.title or f"NB201 stability: {Path(args.config).name}" + (
        f" ({', '.join(args.overrides)})" if args.overrides else "")
    if args.report_only:
        write_report(results, searches, title)
        print((results / "table.md").read_text())
        return 0

    stop_flag = {"why": None}

    def on_signal(signum, frame):
        stop_flag["why"] = signal.Signals(signum).name

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.time()
    todo = list(jobs)
    n_todo = sum(len(j.searches) for j in jobs)
    print(f"grid: {len(searches)} searches, {len(searches) - n_todo} already finished, {n_todo} to run "
          f"in {len(jobs)} processes ({'seeds batched' if args.batch_seeds else 'one per seed'}), "
          f"{args.workers} at once", flush=True)
    for s in searches:
        if s.fault:
            print(f"  {s.name}: numerical fault in an earlier run (counted as failed): {s.fault}", flush=True)
    write_report(results, searches, title)
    try:
        while todo or any(j.state == "running" for j in jobs):
            if args.deadline_s and time.time() - t0 >= args.deadline_s:
                stop_flag["why"] = stop_flag["why"] or f"deadline {args.deadline_s:g}s"
            if stop_flag["why"]:
                print(f"stopping ({stop_flag['why']}): signalling running searches", flush=True)
                stop(jobs, args.grace_s)
                break
            while todo and sum(j.state == "running" for j in jobs) < args.workers:
                j = todo.pop(0)
                start(j, args.config, args.threads, args.device)
                print(f"[{time.time() - t0:6.0f}s] start {j.name}"
                      + (f" (seeds {', '.join(str(s.seed) for s in j.searches)})" if args.batch_seeds else ""),
                      flush=True)
            for j in jobs:
                if j.state == "running" and j.proc.poll() is not None:
                    j.ended(stopped=False)
                    print(f"[{time.time() - t0:6.0f}s] {j.state} {j.name} (rc {j.rc}, {j.wall_s:.0f}s)"
                          + ("" if j.state == "done" else f"; see {j.log}"), flush=True)
                    for s in j.searches:
                        if s.fault:
                            print(f"  {s.name}: {s.fault}", flush=True)
                    write_report(results, searches, title)
            time.sleep(0.5)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    write_report(results, searches, title)
    print(f"table: {results / 'table.md'}  ({time.time() - t0:.0f}s)", flush=True)
    if any(s.state == "failed" for s in searches):
        return 1
    return 124 if any(s.state in ("stopped", "pending") for s in searches) else 0


if __name__ == "__main__":
    sys.exit(main())
