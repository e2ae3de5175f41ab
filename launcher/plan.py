"""`python launcher/plan.py --job CONFIG --hostfile F --gpu PROFILE [--keep-global-batch] [--run]`

Maps a job onto a cluster: reads the hostfile (world size), the GPU profile (memory, precisions) and
the calibration table (memory per sample), chooses the largest micro-batch that fits under a safety
margin, then either keeps the recipe's global batch through gradient accumulation
(`--keep-global-batch`) or scales the learning rate linearly with the global batch it can reach
(the paper's 1024 / 0.5 -> 768 / 0.375 on 11 GB GPUs). Prints the plan as JSON, with the exact
`deepspeed` command; `--run` executes it.

`python launcher/plan.py --probe --job CONFIG [--derive-gpu | --gpu PROFILE]` measures instead: real
steps at growing micro-batches on this machine's device, fitted to fixed + per-sample bytes, printed as
YAML for `configs/calibration.yaml` (with `--derive-gpu` on a CPU: GPU entries derived from counted
activations; with `--gpu PROFILE` on a GPU: filed under `gpu_profiles.PROFILE`, where it beats a
published or derived entry; see `launcher/memory.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.common import fail_cleanly  # noqa: E402
from sdarts.errors import PlanError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOCAL_HOSTS = {"localhost", "127.0.0.1"}
DEFAULT_MARGIN = 0.10
#: memory-limited micro-batches are rounded down to a multiple of this (tensor-core friendly, and
#: it leaves headroom for the batch-to-batch variation of real data)
DEFAULT_MULTIPLE = 8


def _fmt_lr(lr: float) -> str:
    return f"{lr:.6g}"


def choose_batch(max_fit: int, world: int, reference: int, keep_global_batch: bool, multiple_of: int
                 ) -> tuple[int, int, int]:
    """(micro_batch, grad_accum, global_batch) for `world` ranks that fit `max_fit` samples each.

    keep: the smallest accumulation whose micro-batch fits and makes exactly `reference` per step.
    otherwise: accumulation 1 and the micro-batch min(fit, reference / world); a memory-limited
    micro-batch is rounded down to a multiple of `multiple_of`."""
    if keep_global_batch:
        if reference % world:
            raise PlanError(f"--keep-global-batch: the reference global batch {reference} is not divisible by "
                            f"the world size {world}")
        per_rank = reference // world
        for accum in range(1, per_rank + 1):
            if per_rank % accum == 0 and per_rank // accum <= max_fit:
                return per_rank // accum, accum, reference
        raise PlanError(f"--keep-global-batch: no micro-batch <= {max_fit} divides the per-rank batch {per_rank}")
    cap = max(1, reference // world)
    micro = min(max_fit, cap)
    if micro < cap and micro >= multiple_of:
        micro -= micro % multiple_of
    return micro, 1, micro * world


def _check_genotype(job, genotype: str) -> None:
    """A retrain job's `-- --genotype G` of another space than the recipe: refused now, as the retrain
    would refuse it (a genotype file that does not exist yet, e.g. a search still running, is not read)."""
    from sdarts import genotype as G
    if Path(genotype).is_file() or genotype in G.LITERATURE:
        job.cfg.check_genotype(G.load(genotype), job.path, genotype)


def make_plan(job, hostfile, profile, table, *, keep_global_batch: bool = False, margin: float = DEFAULT_MARGIN,
              multiple_of: int = DEFAULT_MULTIPLE, precision: str | None = None, calibration_path=None,
              genotype: str | None = None) -> dict:
    """The plan as a dict (JSON-ready): sizes, lr, precision, memory figures and the command.
    `genotype` (retrain jobs) is compared with the one the calibration was made with."""
    from launcher import memory as M
    if not 0 <= margin < 1:
        raise PlanError(f"--margin must be in [0, 1), got {margin}")
    if job.kind == "retrain" and genotype:
        _check_genotype(job, genotype)
    prec = profile.pick_precision(precision or job.cfg.precision)
    model, entry, key = M.lookup(table, job, profile.kind, prec, calibration_path or M.CALIBRATION,
                                 profile=profile.name if profile.kind == "gpu" else None)
    budget = profile.usable_bytes(margin)
    if profile.kind == "cpu":  # one host's memory is shared by its ranks
        budget //= max(hostfile.slots_per_node)
    max_fit = model.max_micro_batch(budget)
    if max_fit < 1:
        raise PlanError(f"{job.name} at {prec} needs {model.bytes_at(1) / M.MIB:.0f} MiB for one sample; "
                        f"{profile.name} offers {budget / M.MIB:.0f} MiB per rank after the margin")
    reference = M.reference_global_batch(table, job)
    if reference is None:
        raise PlanError(f"no reference global batch for {job.name}: add reference_global_batch to its entry "
                        f"in configs/calibration.yaml (the global batch optim.w.lr was tuned for)")
    world = hostfile.world_size
    micro, accum, global_batch = choose_batch(max_fit, world, reference, keep_global_batch, multiple_of)
    lr = job.cfg.optim.w.lr * global_batch / reference
    notes = []
    cal_genotype = entry.genotype or table.jobs[job.name].genotype
    if job.kind == "retrain" and genotype and cal_genotype and Path(genotype).stem != cal_genotype:
        notes.append(f"memory calibrated with genotype {cal_genotype}; another cell needs more or less: "
                     f"`plan.py --probe --job {job.path} --genotype {genotype}` measures yours")
    if entry.source == "derived":
        notes.append(f"{profile.name}: {job.name} at {prec} uses a derived (not measured) calibration")
    elif entry.source == "published":
        notes.append(f"{profile.name}: {job.name} at {prec} uses a published calibration ({entry.where}), "
                     f"not one measured with this code: `plan.py --probe --job {job.path} --gpu {profile.name}` on "
                     f"such a GPU measures one, which wins")
    sets = [f"data.micro_batch={micro}", f"engine.grad_accum={accum}", f"optim.w.lr={_fmt_lr(lr)}",
            f"precision={prec}"]
    if job.kind == "retrain":  # the retrain script scales optim.w.lr from reference_batch itself
        sets.append(f"optim.w.reference_batch={global_batch}")
    return {
        "job": job.name, "config": job.path, "kind": job.kind, "hostfile": hostfile.path,
        "nodes": hostfile.num_nodes, "world_size": world, "gpu": profile.name, "precision": prec,
        "micro_batch": micro, "grad_accum": accum, "global_batch": global_batch,
        "reference_global_batch": reference, "lr": float(_fmt_lr(lr)), "reference_lr": job.cfg.optim.w.lr,
        "keep_global_batch": keep_global_batch,
        "memory_source": f"{entry.source} ({key}): {entry.where}",
        "memory": {"budget_mib": round(budget / M.MIB), "margin": margin, "max_micro_batch": max_fit,
                   "step_mib": round(model.bytes_at(micro) / M.MIB), "fixed_bytes": model.fixed_bytes,
                   "per_sample_bytes": model.per_sample_bytes, "calibration": entry.source,
                   "calibration_key": key, "calibration_where": entry.where, "calibration_when": entry.when,
                   "calibration_genotype": cal_genotype},
        "overrides": sets,
        "notes": notes,
    }


def command(plan: dict, hostfile, extra: list[str] | None = None, deepspeed: str = "deepspeed",
            user_sets: list[str] | None = None) -> list[str]:
    """The `deepspeed --hostfile F <script> --config C --set ...` argv for a plan (the user's own
    `--set`s first, so the planned ones win)."""
    argv = [deepspeed, "--hostfile", hostfile.path]
    if hostfile.num_nodes == 1 and hostfile.first_host in LOCAL_HOSTS:
        # DeepSpeed ssh-checks every hostfile host, this machine included; a local host needs none
        argv += ["--no_ssh_check", "--master_addr=127.0.0.1"]
    argv += [_script_path(plan["kind"]), "--config", plan["config"]]
    for s in list(user_sets or []) + plan["overrides"]:
        argv += ["--set", s]
    return argv + list(extra or [])


def _script_path(kind: str) -> str:
    from launcher.job import SCRIPTS
    script = ROOT / SCRIPTS[kind]
    try:
        return os.path.relpath(script) if Path.cwd() in script.parents else str(script)
    except ValueError:
        return str(script)


def _arg_after(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _deepspeed_exe() -> str:
    return shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")


# -- probing ----------------------------------------------------------------------------------------
def run_probe(args) -> int:
    import torch
    from launcher import gpus, memory as M
    from launcher.job import load as load_job
    job = load_job(args.job, args.overrides)
    if job.kind == "retrain" and args.genotype:
        _check_genotype(job, args.genotype)  # before any probe process starts
    on_gpu = torch.cuda.is_available() and job.cfg.engine.device != "cpu"
    kind = "gpu" if on_gpu else "cpu"
    if args.precision:
        prec = args.precision
    elif args.derive_gpu:
        prec = "fp32"
    else:
        local = gpus.load("cpu") if not on_gpu else None
        prec = local.pick_precision(job.cfg.precision) if local else job.cfg.precision
    batches = [int(b) for b in args.probe_batches.split(",")] if args.probe_batches else \
        ([8, 16, 32, 64, 128] if on_gpu else [2, 4, 8])
    log = lambda msg: print(f"probe {job.name} {prec}: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    model, records = M.probe(args.job, prec, batches, args.overrides, args.probe_steps, args.genotype, log)
    where = M.describe_machine(records[0]["device_kind"], records[0]["device"])
    entry = M.MemoryEntry(fixed_bytes=model.fixed_bytes, per_sample_bytes=model.per_sample_bytes, source="measured",
                          where=where, when=M.today(),
                          how=f"plan.py --probe: {args.probe_steps} real steps per micro-batch, fresh process each, "
                              f"{'max_memory_allocated' if on_gpu else 'peak RSS'}, least squares",
                          points=[(r["micro_batch"], r["peak_bytes"]) for r in records])
    entries = {kind: {prec: entry}}
    profile_entries = None
    if on_gpu and args.gpu:  # a measurement on this GPU model: filed under its profile (wins over memory.gpu)
        profile_entries = {gpus.load(args.gpu).name: {prec: entry}}
        entries = {}
    if args.derive_gpu:
        if on_gpu or prec != "fp32":
            raise PlanError("--derive-gpu scales a CPU fp32 probe: run it on a CPU with --precision fp32")
        entries["gpu"] = {}
        for p in ("fp32", "bf16", "fp16"):
            e, info = M.derive(job, p, model, args.genotype)
            entries["gpu"][p] = e
            log(f"derived gpu {p}: {e.per_sample_bytes / M.MIB:.1f} MiB/sample (overhead x{info['overhead']:.3f})")
    table = M.load_table() if M.CALIBRATION.exists() else None
    ref = (M.reference_global_batch(table, job) if table else None) or job.reference_batch()
    geno = None
    if job.kind == "retrain":
        from retrain.config import DEFAULT_GENOTYPE
        geno = args.genotype or DEFAULT_GENOTYPE[job.cfg.model.space]
    print(f"# paste under `jobs:` in configs/calibration.yaml (merge with an existing {job.name} entry)")
    print(M.snippet(job, entries, geno, ref, profile_entries), end="")
    summary = {"job": job.name, "device": where, "precision": prec, "fixed_mib": round(model.fixed_bytes / M.MIB, 1),
               "per_sample_mib": round(model.per_sample_bytes / M.MIB, 2)}
    print(json.dumps(summary), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="plan.py", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", required=True, help="search or retrain config (YAML)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile (`host slots=N` lines)")
    p.add_argument("--gpu", help="GPU profile name (configs/gpus/<name>.yaml) or path; with --probe on a GPU: "
                                 "the profile of this GPU, to file the measured entry under gpu_profiles.<name>")
    p.add_argument("--keep-global-batch", action="store_true",
                   help="keep the reference global batch (and lr) through gradient accumulation")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="override the job's precision (default: the job's, or what the GPU supports)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"fraction of the memory left free (default {DEFAULT_MARGIN})")
    p.add_argument("--multiple-of", type=int, default=DEFAULT_MULTIPLE,
                   help=f"round a memory-limited micro-batch down to a multiple of this (default {DEFAULT_MULTIPLE})")
    p.add_argument("--calibration", default=None, help="calibration table (default configs/calibration.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, applied before planning and passed on to the command")
    p.add_argument("--run", action="store_true", help="execute the planned command")
    p.add_argument("--probe", action="store_true", help="measure this job's memory on the local device")
    p.add_argument("--probe-batches", default=None, help="comma-separated micro-batches for --probe")
    p.add_argument("--probe-steps", type=int, default=3)
    p.add_argument("--derive-gpu", action="store_true", help="with --probe on a CPU: also derive GPU entries")
    p.add_argument("--genotype", default=None, help="retrain jobs: genotype for --probe (default by the job's "
                                                     "model.space: darts_v2, or nb201_single_darts)")
    p.add_argument("extra", nargs="*", help="after `--`: more arguments for the training script "
                                            "(e.g. -- --genotype g.json --run-dir runs/x)")
    args = p.parse_args(argv)

    with fail_cleanly():
        if args.probe:
            return run_probe(args)
        if not args.hostfile or not args.gpu:
            p.error("--hostfile and --gpu are required (unless --probe)")
        from launcher import gpus, hostfile as H, memory as M
        from launcher.job import load as load_job
        job = load_job(args.job, args.overrides)
        hf = H.load(args.hostfile)
        profile = gpus.load(args.gpu)
        cal = args.calibration or M.CALIBRATION
        plan = make_plan(job, hf, profile, M.load_table(cal), keep_global_batch=args.keep_global_batch,
                         margin=args.margin, multiple_of=args.multiple_of, precision=args.precision,
                         calibration_path=cal, genotype=_arg_after(args.extra, "--genotype"))
        for note in plan["notes"]:
            print(f"note: {note}", file=sys.stderr)
        argv_ = command(plan, hf, args.extra, user_sets=args.overrides)
        plan["argv"] = argv_
        plan["command"] = shlex.join(argv_)
        print(json.dumps(plan, indent=2), flush=True)
        if args.run:
            argv_[0] = _deepspeed_exe()
            return subprocess.call(argv_)
    return 0


if __name__ == "__main__":
    sys.exit(main())
