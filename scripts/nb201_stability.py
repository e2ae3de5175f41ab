#!/usr/bin/env python
"""Grid of NB201 searches (strategy x activation x lr x alpha optimizer x seed), in parallel, resumable,
reported in the paper's table form.

    python scripts/nb201_stability.py --config configs/search/nb201_proxy.yaml --results results/nb201_proxy \\
        --variants single_level:softmax,single_level:sigmoid,bilevel:softmax --lrs 0.025 \\
        --alpha-optimizers sgd --seeds 0,1,2 --workers 2

Each grid cell is one `launcher/search.py` process writing `RESULTS/runs/<name>/` (the search loop
writes each epoch's NB201 scores as it goes) and `RESULTS/logs/<name>.log`. A cell whose run holds a
`summary.json` is finished and never rerun; one with a checkpoint resumes from it (`--resume`); any
other is started afresh (`--force`). So a killed grid continues where it stopped.

Learning rates follow the paper's Table 5 protocol: `--lrs` sets w's lr, and with `--alpha-optimizers
sgd` alpha's lr too; with `adam`, alpha keeps the config's lr (3e-4) unless `--alpha-lr` is given.

For a one-shot GPU session: `--device cuda --workers N` runs N searches at once on the one GPU and
`--deadline-s S` stops everything S seconds after the start (SIGTERM: each search checkpoints at its
next step and exits), then writes the table from whatever was scored, unfinished runs marked partial.
The table is also rewritten after every finished run: `RESULTS/table.md`, `RESULTS/results.json`
(groups, per-run trajectories, worst accuracy over the second half), `RESULTS/status.json`, and
`RESULTS/trajectories.png` when matplotlib is present.

Exit code: 0 all cells finished, 1 some failed, 124 stopped by the deadline or a signal, 2 bad input.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdarts.runlog import atomic_write  # noqa: E402

STRATEGIES = ("single_level", "bilevel", "bilevel_second_order", "two_batch")
ACTIVATIONS = ("softmax", "sigmoid")


class GridError(ValueError):
    pass


@dataclass
class Cell:
    name: str
    overrides: list[str]
    run_dir: Path
    log: Path
    state: str = "pending"   # pending | running | done | failed | stopped
    rc: int | None = None
    started: float | None = None
    wall_s: float | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def finished(self) -> bool:
        return (self.run_dir / "summary.json").exists()


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


def build_grid(args) -> list[Cell]:
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
    results = Path(args.results)
    cells = []
    for strat, act in variants:
        for aopt in aopts:
            for lr in lrs:
                for seed in seeds:
                    name = f"{strat}-{act}-{aopt}-lr{lr:g}-s{seed}"
                    ov = [f"strategy={strat}", f"arch.activation={act}", f"optim.w.lr={lr!r}",
                          f"optim.alpha.optimizer={aopt}", f"seed={seed}"]
                    if aopt == "sgd":
                        ov.append(f"optim.alpha.lr={args.alpha_lr if args.alpha_lr else lr!r}")
                    elif args.alpha_lr:
                        ov.append(f"optim.alpha.lr={args.alpha_lr}")
                    if args.device != "auto":
                        ov.append(f"engine.device={args.device}")
                    ov += list(args.overrides)
                    cells.append(Cell(name, ov, results / "runs" / name, results / "logs" / f"{name}.log"))
    return cells


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


def start(cell: Cell, config: str, threads: int, device: str) -> None:
    cell.log.parent.mkdir(parents=True, exist_ok=True)
    resume = (cell.run_dir / "checkpoints" / "latest").exists()
    cmd = [sys.executable, str(ROOT / "launcher" / "search.py"), "--config", config, "--run-dir", str(cell.run_dir),
           "--resume" if resume else "--force"]
    for ov in cell.overrides:
        cmd += ["--set", ov]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # each search is a lone process with its own rendezvous port
    if device in ("cpu", "cuda"):
        env["DS_ACCELERATOR"] = device  # never inherit a CPU setting into a GPU grid, or the reverse
    with open(cell.log, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        cell.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
    cell.state, cell.started = "running", time.time()


def stop(cells: list[Cell], grace_s: float) -> None:
    """SIGTERM every running search (it checkpoints at its next step), SIGKILL after `grace_s`."""
    running = [c for c in cells if c.state == "running"]
    for c in running:
        try:
            os.killpg(c.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.time() + grace_s
    for c in running:
        try:
            c.proc.wait(timeout=max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            c.proc.wait()
        c.rc, c.wall_s = c.proc.returncode, time.time() - c.started
        c.state = "done" if c.finished() else "stopped"


def write_report(results: Path, cells: list[Cell], title: str) -> None:
    from sdarts.nasbench201 import report as R
    runs = [r for r in (R.load_run(c.run_dir) for c in cells) if r is not None]
    groups = R.summarize(runs) if runs else []
    status = {c.name: {"state": c.state, "rc": c.rc, "wall_s": c.wall_s, "log": str(c.log)} for c in cells}
    atomic_write(results / "status.json", json.dumps(status, indent=2) + "\n")
    atomic_write(results / "results.json", json.dumps({"groups": groups, "runs": runs}, indent=1) + "\n")
    atomic_write(results / "table.md", R.markdown(groups, runs, title))
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
    p.add_argument("--workers", type=int, default=1, help="searches at once (CPU: <= cores; GPU: several share it)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per search")
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
        cells = build_grid(args)
        results = Path(args.results)
        if not args.report_only:
            check_grid_file(results, args.config, args.overrides, args.device)
            # validate the first cell's config now: a bad --set is one line, not N failed runs
            from sdarts import config as C
            cfg = C.load(args.config, cells[0].overrides)
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
    for c in cells:
        if c.finished():
            c.state = "done"
    if args.report_only:
        write_report(results, cells, title)
        print((results / "table.md").read_text())
        return 0

    stop_flag = {"why": None}

    def on_signal(signum, frame):
        stop_flag["why"] = signal.Signals(signum).name

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.time()
    todo = [c for c in cells if c.state == "pending"]
    print(f"grid: {len(cells)} cells, {len(cells) - len(todo)} already finished, {len(todo)} to run, "
          f"{args.workers} at once", flush=True)
    write_report(results, cells, title)
    try:
        while todo or any(c.state == "running" for c in cells):
            if args.deadline_s and time.time() - t0 >= args.deadline_s:
                stop_flag["why"] = stop_flag["why"] or f"deadline {args.deadline_s:g}s"
            if stop_flag["why"]:
                print(f"stopping ({stop_flag['why']}): signalling running searches", flush=True)
                stop(cells, args.grace_s)
                break
            while todo and sum(c.state == "running" for c in cells) < args.workers:
                c = todo.pop(0)
                start(c, args.config, args.threads, args.device)
                print(f"[{time.time() - t0:6.0f}s] start {c.name}", flush=True)
            for c in cells:
                if c.state == "running" and c.proc.poll() is not None:
                    c.rc, c.wall_s = c.proc.returncode, time.time() - c.started
                    c.state = "done" if c.finished() else "failed"
                    print(f"[{time.time() - t0:6.0f}s] {c.state} {c.name} (rc {c.rc}, {c.wall_s:.0f}s)"
                          + ("" if c.state == "done" else f"; see {c.log}"), flush=True)
                    write_report(results, cells, title)
            time.sleep(0.5)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    write_report(results, cells, title)
    print(f"table: {results / 'table.md'}  ({time.time() - t0:.0f}s)", flush=True)
    if any(c.state == "failed" for c in cells):
        return 1
    return 124 if any(c.state in ("stopped", "pending") for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
