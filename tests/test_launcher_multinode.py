"""Real multi-process runs (CPU, gloo): two "nodes" on this machine through DeepSpeed's `--no_ssh`
launcher, SIGUSR1 preemption with resume, and the rendered sbatch script end to end under fake
srun/scontrol/sbatch with the real DeepSpeed launcher underneath."""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

import launcher_shims as shims
from conftest import PYTHON, ROOT, deepspeed_cmd, run_cli

pytestmark = pytest.mark.slow

SMOKE = "configs/search/smoke.yaml"
# long enough to be interrupted mid-run: 4 epochs x 8 steps on one rank (4 on each of two)
LONGER = ["--set", "log.progress=false", "--set", "epochs=4", "--set", "data.synthetic_size=128",
          "--set", "checkpoint.every_steps=0"]


def _env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        e.pop(k, None)
    return e


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alphas(path: Path) -> list[dict]:
    return [json.loads(line)["weights"] for line in path.read_text().splitlines()]


def _steps(run: Path) -> list[int]:
    m = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in m.read_text().splitlines()] if m.exists() else []


def _two_node_settings() -> list[str]:
    """What slurm.py plans for smoke on 2 x 1 CPU slots, so the sbatch run can be compared to this one."""
    from launcher import gpus, hostfile, memory, plan
    from launcher.job import load
    p = plan.make_plan(load(SMOKE), hostfile.parse("a slots=1\nb slots=1\n"), gpus.load("cpu"), memory.load_table())
    return [x for s in p["overrides"] for x in ("--set", s)]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """An uninterrupted search across two DeepSpeed "nodes" (one rank each), started without ssh."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    hf = tmp / "hostfile"
    hf.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    run, port = tmp / "run", _port()
    procs = [subprocess.Popen([deepspeed_cmd(), "--hostfile", str(hf), "--no_ssh", f"--node_rank={node}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", "launcher/search.py",
                               "--config", SMOKE, *LONGER, *_two_node_settings(), "--set", "log.all_ranks=true",
                               "--run-dir", str(run)],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return run, outs


def test_two_nodes_without_ssh_search_with_identical_alpha(two_nodes):
    run, outs = two_nodes
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    a0, a1 = _alphas(run / "alphas.jsonl"), _alphas(run / "alphas.rank1.jsonl")
    assert len(a0) == 5 and len(a1) == 4  # init + 4 epochs; rank 1 logs its epochs too (log.all_ranks)
    assert a0[1:] == a1  # bit-identical on both nodes, every epoch
    assert a0[-1] != a0[0]  # and alpha moved


def test_sigusr1_checkpoints_exits_124_and_resume_matches_uninterrupted(tmp_path):
    args = ["launcher/search.py", "--config", SMOKE, *LONGER]
    ref = tmp_path / "ref"
    r = run_cli([*args, "--run-dir", str(ref)])
    assert r.returncode == 0, r.stderr[-2000:]
    total = _steps(ref)[-1]

    run = tmp_path / "run"
    p = subprocess.Popen([PYTHON, *args, "--run-dir", str(run)], cwd=ROOT, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and len(_steps(run)) < 3:
        time.sleep(0.01)
    p.send_signal(signal.SIGUSR1)
    err = p.communicate(timeout=300)[1]
    assert p.returncode == 124, err[-2000:]
    seen = _steps(run)[-1]
    assert seen < total, "the run finished before the signal"
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert int(tag.removeprefix("step")) == seen  # checkpoint at the step it stopped at
    assert not (run / "summary.json").exists()
    assert "preemption signal" in err

    r = run_cli([*args, "--run-dir", str(run), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert _alphas(ref / "alphas.jsonl") == _alphas(run / "alphas.jsonl")
    assert (ref / "genotype.json").read_text() == (run / "genotype.json").read_text()
    assert _steps(run) == _steps(ref)


def test_sbatch_script_end_to_end_preempt_requeue_resume(tmp_path, two_nodes):
    """slurm.py's script under fake SLURM commands and the real DeepSpeed launcher, two nodes on this
    machine: SIGUSR1 to the batch shell -> every rank checkpoints and exits 124 -> requeue -> the
    requeued job resumes by itself and ends with the alpha of the uninterrupted two-node run."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    r = run_cli(["launcher/slurm.py", "--job", SMOKE, "--nodes", "2", "--gpus-per-node", "1", "--gpu", "cpu",
                 "--run-dir", str(run), "--log-dir", str(logs), "--master-port", str(_port()),
                 "--env-setup", f"export PATH={Path(PYTHON).parent}:$PATH OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu",
                 *LONGER, "--set", "log.all_ranks=true"], timeout=120)
    assert r.returncode == 0, r.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(r.stdout)
    bin_dir = shims.install(tmp_path / "bin", fake_training=False)
    log = tmp_path / "fake.log"
    env = shims.env(bin_dir, log, "localhost 127.0.0.1", PYTHONPATH=str(ROOT))
    env["PATH"] = f"{bin_dir}:{Path(PYTHON).parent}:{env['PATH']}"

    p = subprocess.Popen(["sbatch", str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and p.poll() is None and len(_steps(run)) < 2:
        time.sleep(0.02)
    p.send_signal(signal.SIGUSR1)
    out = p.communicate(timeout=400)[0]
    assert p.returncode == 0, out[-4000:]
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [x["argv"] for x in recs if x["cmd"] == "scontrol"] == [["requeue", "4242"]], out[-4000:]
    assert (run / "checkpoints" / "latest").exists() and not (run / "summary.json").exists()

    log.unlink()
    r = subprocess.run(["sbatch", str(script)], env=dict(env, SLURM_RESTART_COUNT="1"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "resumed from step" in r.stdout + r.stderr
    ref = two_nodes[0]
    assert _alphas(run / "alphas.jsonl") == _alphas(ref / "alphas.jsonl")
    assert _alphas(run / "alphas.rank1.jsonl") == _alphas(ref / "alphas.rank1.jsonl")
    assert (run / "genotype.json").read_text() == (ref / "genotype.json").read_text()
