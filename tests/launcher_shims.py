"""Fake SLURM commands (`sbatch`, `srun`, `scontrol`) for running rendered sbatch scripts here.

They behave like the real ones where the script depends on it, and log what they were asked to do
(one JSON object a line in $FAKE_LOG):
- `sbatch SCRIPT` runs the script synchronously (exec, so the caller's pid is the batch shell) with
  SLURM_JOB_ID / SLURM_JOB_NODELIST / SLURM_JOB_NUM_NODES / SLURM_NNODES set from its #SBATCH lines.
- `srun --nodes=N --ntasks-per-node=T CMD...` starts N*T copies of CMD with SLURM_NODEID,
  SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS; each task in its own process group, and a signal sent to
  srun is delivered to every process of every task (as slurmstepd signals the whole step); exits with
  the largest task exit code.
- `scontrol show hostnames` prints $FAKE_NODES (space-separated); `scontrol requeue ID` is logged.
- optional fakes of `deepspeed` / `python` (the training side) log argv, the SLURM/torch variables and
  whether SIGUSR1 was ignored on entry; FAKE_MODE=wait makes them wait for SIGUSR1 and exit 124.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

SBATCH = r'''
import os, re, sys
script = sys.argv[-1]
text = open(script).read()
nodes = int((re.search(r"^#SBATCH --nodes=(\d+)", text, re.M) or [0, "1"])[1])
os.environ.update(SLURM_JOB_ID=os.environ.get("FAKE_JOB_ID", "4242"), SLURM_JOB_NODELIST="fake[1-%d]" % nodes,
                  SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes))
log({"cmd": "sbatch", "argv": sys.argv[1:]})
os.execvp("bash", ["bash", script])
'''

SRUN = r'''
import os, signal, subprocess, sys, time
argv = sys.argv[1:]
opts = {}
while argv and argv[0].startswith("--"):
    k, _, v = argv.pop(0)[2:].partition("=")
    opts[k] = v
nodes = int(opts.get("nodes", os.environ.get("SLURM_NNODES", "1")))
per_node = int(opts.get("ntasks-per-node", "1"))
log({"cmd": "srun", "opts": opts, "argv": argv})
procs = []
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node * per_node + local),
                   SLURM_LOCALID=str(local), SLURM_NTASKS=str(nodes * per_node), SLURM_STEP_ID="0")
        procs.append(subprocess.Popen(argv, env=env, start_new_session=True))

def forward(sig, frame):
    log({"cmd": "srun", "signal": signal.Signals(sig).name})
    for p in procs:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
while any(p.poll() is None for p in procs):
    time.sleep(0.05)
sys.exit(max(p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs))
'''

SCONTROL = r'''
import os, sys
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\n".join(os.environ["FAKE_NODES"].split()))
else:
    log({"cmd": "scontrol", "argv": sys.argv[1:]})
'''

TRAINING = r'''
import os, signal, sys, time
keys = ("SLURM_NODEID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT",
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID")
rec = {"cmd": os.path.basename(sys.argv[0]), "argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys},
       "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}
if "--hostfile" in sys.argv:
    rec["hostfile"] = open(sys.argv[sys.argv.index("--hostfile") + 1]).read()
if os.environ.get("FAKE_MODE") == "wait":
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    log(dict(rec, ready=True))
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        time.sleep(0.02)
    log({"cmd": rec["cmd"], "node": os.environ.get("SLURM_NODEID"), "got_usr1": bool(got)})
    sys.exit(124 if got else 1)
log(rec)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
'''

PRELUDE = r'''
import json, os
def log(rec):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(rec) + "\n")
'''


def install(bin_dir: Path, fake_training: bool = True) -> Path:
    """Writes the shims into `bin_dir` (put it first on PATH); returns bin_dir."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shims = {"sbatch": SBATCH, "srun": SRUN, "scontrol": SCONTROL}
    if fake_training:
        shims.update(deepspeed=TRAINING, python=TRAINING)
    for name, body in shims.items():
        p = bin_dir / name
        p.write_text(f"#!{sys.executable}\n{PRELUDE}\n{body}")
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def env(bin_dir: Path, log: Path, nodes: str, **extra: str) -> dict:
    e = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_NODES=nodes, **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "SLURM_JOB_ID"):
        e.pop(k, None)
    return e
