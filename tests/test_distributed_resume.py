"""Multi-rank equality and kill -9 resume, through the real launchers (CPU, gloo)."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, ROOT, deepspeed_cmd, run_cli

pytestmark = pytest.mark.slow

SMOKE = ["--config", "configs/search/smoke.yaml", "--set", "log.progress=false"]


def _alphas(path: Path) -> list[dict]:
    return [json.loads(l)["weights"] for l in path.read_text().splitlines()]


def _env():
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        e.pop(k, None)
    return e


def test_two_ranks_identical_and_equal_to_one_rank_with_accumulation(tmp_path):
    two = tmp_path / "two"
    r = subprocess.run([deepspeed_cmd(), "--num_gpus", "2", "--master_port", "29631", "launcher/search.py", *SMOKE,
                        "--set", "log.all_ranks=true", "--run-dir", str(two)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("config.yaml", "ds_config.json", "metrics.jsonl", "alphas.jsonl", "genotype.json", "summary.json",
              "genotypes/epoch_002.json", "checkpoints/latest"):
        assert (two / f).exists(), f
    assert any(f.name.startswith("events.out.tfevents") for f in (two / "tb").iterdir())
    a0, a1 = _alphas(two / "alphas.jsonl"), _alphas(two / "alphas.rank1.jsonl")
    assert a0[1:] == a1  # rank 1 has no init record; every epoch's alpha is bit-identical
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2

    one = tmp_path / "one"
    r = run_cli(["launcher/search.py", *SMOKE, "--set", "engine.grad_accum=2", "--run-dir", str(one)])
    assert r.returncode == 0, r.stderr[-3000:]
    final_two = torch.tensor(_alphas(two / "alphas.jsonl")[-1]["normal"])
    final_one = torch.tensor(_alphas(one / "alphas.jsonl")[-1]["normal"])
    assert torch.allclose(final_one, final_two, atol=1e-5), (final_one - final_two).abs().max()
    assert (one / "genotype.json").read_text() == (two / "genotype.json").read_text()


def _weights(run: Path) -> dict:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    sd = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)
    return sd["module"]


def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    args = [*SMOKE, "--set", "epochs=3", "--set", "data.synthetic_size=192", "--set", "checkpoint.every_steps=1",
            "--set", "checkpoint.keep=3"]
    ref = tmp_path / "ref"
    r = run_cli(["launcher/search.py", *args, "--run-dir", str(ref)])
    assert r.returncode == 0, r.stderr[-2000:]

    run = tmp_path / "run"
    p = subprocess.Popen([PYTHON, "launcher/search.py", *args, "--run-dir", str(run)], cwd=ROOT, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step000000005":
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "summary.json").exists()
    r = run_cli(["launcher/search.py", *args, "--run-dir", str(run), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _alphas(ref / "alphas.jsonl") == _alphas(run / "alphas.jsonl")
    assert (ref / "genotype.json").read_text() == (run / "genotype.json").read_text()
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no step logged twice after the resume
