"""The ImageNet search on streamed data (DALI, else the torch fallback): a kill -9 in the middle of
an epoch, then --resume, gives the uninterrupted run's losses step for step, on 1 and on 2 ranks."""
import json
import os
import subprocess

import pytest

from conftest import ROOT, deepspeed_cmd, need_data, run_cli

pytestmark = pytest.mark.slow


def _backend():
    try:
        import nvidia.dali  # noqa: F401
        return "dali"
    except ImportError:
        return "torch"


def _args(root):
    return ["launcher/search.py", "--config", "configs/search/smoke.yaml", "--set", "log.progress=false",
            "--set", "data.dataset=imagenet", "--set", f"data.root={root}", "--set", f"data.backend={_backend()}",
            "--set", "data.micro_batch=32", "--set", "data.max_per_split=256", "--set", "model.num_classes=1000",
            "--set", "strategy=bilevel", "--set", "epochs=2", "--set", "checkpoint.every_steps=3"]


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r.get("rank", 0)): r["loss"] for r in rows}


def _launch(args, world, env=None):
    if world == 1:
        return run_cli(args, env=env)
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), **(env or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        e.pop(k, None)
    return subprocess.run([deepspeed_cmd(), "--num_gpus", "2", "--master_port", "29643", *args],
                          cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)


# 2 ranks: ~2.5 min of three DeepSpeed launches on the 2-core CI machine, so `heavy`; the mechanism it
# checks (each rank's DALI checkpoint inside rank 0's client state) is also covered in seconds by
# test_data_pipelines.py::test_resume_on_two_ranks_from_rank0_client_state
@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.heavy)])
def test_kill_9_mid_epoch_then_resume_matches_uninterrupted(tmp_path, world):
    root = need_data("imagenet-sample")
    args = _args(root)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = _launch([*args, "--run-dir", str(whole)], world)
    assert r.returncode == 0, r.stderr[-3000:]
    # 1 rank: 8 steps an epoch, saves at 3, 6, 8 (epoch end), 9, 12: killed right after step 12's save
    # 2 ranks: 4 steps an epoch, saves at 3, 4 (end), 6: killed right after step 6's save (epoch 2, batch 2)
    nth = 5 if world == 1 else 3
    r = _launch([*args, "--run-dir", str(cut)], world, env={"SDARTS_TEST_FAULT": f"save.committed:kill:{nth}"})
    assert r.returncode != 0
    r = _launch([*args, "--run-dir", str(cut), "--resume"], world)
    assert r.returncode == 0, r.stderr[-3000:]
    step = 12 if world == 1 else 6
    assert f"resumed from step {step}" in r.stderr
    assert _losses(cut) == _losses(whole)
