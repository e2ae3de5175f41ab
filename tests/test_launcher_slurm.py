"""The rendered sbatch script: valid bash, and under fake srun/scontrol/sbatch it starts the right
commands with the right variables, forwards SIGUSR1 to every rank and requeues on exit 124."""
import contextlib
import io
import json
import os
import signal
import subprocess
import time

import pytest

import launcher_shims as shims
from conftest import ROOT, run_cli
from launcher import slurm

DARTS_IMAGENET = "configs/search/darts_imagenet.yaml"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    """Job and hostfile paths in these tests are relative to the repository root, as a user types them."""
    monkeypatch.chdir(ROOT)


def _render(tmp_path, *args):
    """`launcher/slurm.py ARGS > job.sbatch`, in this process (a fresh interpreter costs a torch import)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert slurm.main([*args, "--run-dir", str(tmp_path / "run"), "--log-dir", str(tmp_path / "logs"),
                           "--env-setup", ":"]) == 0
    path = tmp_path / "job.sbatch"
    path.write_text(out.getvalue())
    return path, out.getvalue()


def _records(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_script_renders_passes_bash_n_and_carries_the_plan(tmp_path):
    path, text = _render(tmp_path, "--job", DARTS_IMAGENET, "--nodes", "4", "--gpus-per-node", "4", "--gpu", "2080ti",
                         "--time", "48:00:00", "--partition", "gpu", "--account", "nas")
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@90", "#SBATCH --time=48:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=nas"):
        assert line in text.splitlines(), line
    # 16 x 2080 Ti: the reference 360 over 16 ranks = 22 a rank (lr scaled to 352 / 360), fp16 (no bf16)
    assert "--set data.micro_batch=22" in text and "--set precision=fp16" in text
    assert "--set optim.w.lr=0.0244444" in text
    assert "--no_ssh" in text and '--node_rank="$SLURM_NODEID"' in text and "--resume" in text

    path, text = _render(tmp_path, "--job", DARTS_IMAGENET, "--nodes", "2", "--gpus-per-node", "4", "--gpu", "a100-80gb",
                         "--mode", "srun", "--keep-global-batch")
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "#SBATCH --ntasks-per-node=4" in text and "--set precision=bf16" in text
    assert "--set data.micro_batch=45" in text
    assert 'RANK="$SLURM_PROCID"' in text and 'LOCAL_RANK="$SLURM_LOCALID"' in text


def _sbatch(tmp_path, script, nodes="gpu-a gpu-b", **extra):
    log = tmp_path / "fake.log"
    bin_dir = shims.install(tmp_path / "bin")
    r = subprocess.run(["sbatch", str(script)], env=shims.env(bin_dir, log, nodes, **extra), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    return r, _records(log)


def test_deepspeed_mode_starts_one_launcher_per_node_with_the_right_variables(tmp_path):
    script, _ = _render(tmp_path, "--job", DARTS_IMAGENET, "--nodes", "2", "--gpus-per-node", "4", "--gpu", "2080ti",
                        "--keep-global-batch", "--master-port", "29777")
    r, recs = _sbatch(tmp_path, script)
    assert r.returncode == 0, r.stderr
    srun = [x for x in recs if x["cmd"] == "srun"]
    assert len(srun) == 1 and srun[0]["opts"]["nodes"] == "2" and srun[0]["opts"]["ntasks-per-node"] == "1"
    ds = sorted((x for x in recs if x["cmd"] == "deepspeed"), key=lambda x: x["env"]["SLURM_NODEID"])
    assert len(ds) == 2
    for node, rec in enumerate(ds):
        a = rec["argv"]
        assert a[:6] == ["--hostfile", a[1], "--no_ssh", f"--node_rank={node}", "--master_addr=gpu-a",
                         "--master_port=29777"], a
        assert rec["hostfile"] == "gpu-a slots=4\ngpu-b slots=4\n"
        assert rec["usr1_ignored"], "the per-node launcher must ignore SIGUSR1 (the ranks handle it)"
        assert rec["env"]["MASTER_ADDR"] == "gpu-a" and rec["env"]["SLURM_JOB_ID"] == "4242"
        rest = a[6:]
        assert rest[:3] == ["launcher/search.py", "--config", DARTS_IMAGENET]
        sets = [rest[i + 1] for i, x in enumerate(rest) if x == "--set"]
        # 8 x 2080 Ti keeping the paper's global batch 360: 45 a rank, fp16, lr unchanged
        assert sets == ["data.micro_batch=45", "engine.grad_accum=1", "optim.w.lr=0.025", "precision=fp16"]
        assert rest[-3:] == ["--run-dir", str(tmp_path / "run"), "--resume"]
    assert not [x for x in recs if x["cmd"] == "scontrol"], "no requeue after a clean exit"


def test_exit_124_requeues_and_other_failures_do_not(tmp_path):
    script, _ = _render(tmp_path, "--job", DARTS_IMAGENET, "--nodes", "2", "--gpus-per-node", "4", "--gpu", "2080ti")
    r, recs = _sbatch(tmp_path, script, FAKE_RC="124")
    assert r.returncode == 0, r.stderr
    assert [x["argv"] for x in recs if x["cmd"] == "scontrol"] == [["requeue", "4242"]]
    assert "requeueing job 4242" in r.stderr

    (tmp_path / "fake.log").unlink()
    r, recs = _sbatch(tmp_path, script, FAKE_RC="3")
    assert r.returncode == 3
    assert not [x for x in recs if x["cmd"] == "scontrol"]


def test_sigusr1_to_the_batch_shell_reaches_every_rank_then_requeue(tmp_path):
    script, _ = _render(tmp_path, "--job", DARTS_IMAGENET, "--nodes", "2", "--gpus-per-node", "4", "--gpu", "2080ti")
    log = tmp_path / "fake.log"
    bin_dir = shims.install(tmp_path / "bin")
    p = subprocess.Popen(["sbatch", str(script)], env=shims.env(bin_dir, log, "gpu-a gpu-b", FAKE_MODE="wait"),
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and sum(1 for x in _records(log) if x.get("ready")) < 2:
        time.sleep(0.05)
    assert sum(1 for x in _records(log) if x.get("ready")) == 2, "fake ranks never started"
    os.kill(p.pid, signal.SIGUSR1)  # what SLURM does 90 s before the limit (B: = the batch shell)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    recs = _records(log)
    assert sorted(x["node"] for x in recs if x.get("got_usr1")) == ["0", "1"]
    assert {"cmd": "srun", "signal": "SIGUSR1"} in recs
    assert [x["argv"] for x in recs if x["cmd"] == "scontrol"] == [["requeue", "4242"]]
    assert "SIGUSR1" in err or "USR1 received" in err


def test_srun_mode_sets_rank_local_rank_world_size_per_task(tmp_path):
    script, _ = _render(tmp_path, "--job", DARTS_IMAGENET, "--nodes", "2", "--gpus-per-node", "2", "--gpu", "2080ti",
                        "--mode", "srun")
    r, recs = _sbatch(tmp_path, script)
    assert r.returncode == 0, r.stderr
    ranks = sorted((x for x in recs if x["cmd"] == "python"), key=lambda x: int(x["env"]["RANK"]))
    got = [(x["env"]["RANK"], x["env"]["LOCAL_RANK"], x["env"]["WORLD_SIZE"], x["env"]["SLURM_NODEID"]) for x in ranks]
    assert got == [("0", "0", "4", "0"), ("1", "1", "4", "0"), ("2", "0", "4", "1"), ("3", "1", "4", "1")]
    for x in ranks:
        assert x["env"]["MASTER_ADDR"] == "gpu-a" and x["env"]["MASTER_PORT"] == "29500"
        assert x["argv"][:4] == ["-u", "launcher/search.py", "--config", DARTS_IMAGENET]


def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys):
    for args, words in ((["--nodes", "0", "--gpus-per-node", "4", "--gpu", "2080ti"], "--nodes and --gpus-per-node"),
                        (["--nodes", "1", "--gpus-per-node", "4", "--gpu", "k80"], "unknown GPU profile 'k80'")):
        with pytest.raises(SystemExit) as e:
            slurm.main(["--job", DARTS_IMAGENET, *args])
        err = capsys.readouterr()
        assert e.value.code == 2 and err.out == "" and err.err.startswith("error: ") and err.err.count("\n") == 1
        assert words in err.err


def test_the_script_runs_as_a_program(tmp_path):
    r = run_cli(["launcher/slurm.py", "--job", DARTS_IMAGENET, "--nodes", "2", "--gpus-per-node", "4", "--gpu",
                 "v100-32gb"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#!/bin/bash") and "#SBATCH --gpus-per-node=4" in r.stdout


def test_relative_paths_become_absolute_and_the_log_folder_exists(tmp_path, monkeypatch):
    """The job runs from the repository root, and SLURM opens --output before the script runs."""
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        slurm.main(["--job", str(ROOT / "configs/retrain/imagenet.yaml"), "--nodes", "1", "--gpus-per-node", "8",
                    "--gpu", "2080ti", "--log-dir", "logs", "--", "--genotype", "darts_v2"])
    text = out.getvalue()
    assert (tmp_path / "logs").is_dir()
    assert f"#SBATCH --output={tmp_path}/logs/%x-%j.out" in text
    assert f"RUN_DIR={tmp_path}/runs/retrain-imagenet" in text  # retrain.py's own default name
    assert "launcher/retrain.py" in text and "--genotype darts_v2" in text
