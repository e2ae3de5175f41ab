"""Every run says what it ran on: the first log line and summary.json's `run` block."""
import json

import pytest
import torch

from conftest import need_data, run_cli
from reliability_runs import retrain_cmd
from sdarts.provenance import git_commit


def _dali():
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_search_records_the_data_backend_it_used(tmp_path, backend):
    root = need_data("imagenet-sample")
    if backend == "dali" and not _dali():
        pytest.skip("nvidia-dali is not installed (the [dali] extra)")
    run = tmp_path / backend
    out = run_cli(["launcher/search.py", "--config", "configs/search/smoke.yaml", "--run-dir", str(run),
                   "--set", "log.progress=false", "--set", "data.dataset=imagenet", "--set", f"data.root={root}",
                   "--set", f"data.backend={backend}", "--set", "data.micro_batch=16", "--set", "data.max_per_split=64",
                   "--set", "model.num_classes=1000", "--set", "epochs=1"])
    assert out.returncode == 0, out.stderr[-2000:]
    p = json.loads((run / "summary.json").read_text())["run"]
    assert p["data_backend"] == backend and p["dali_device"] == ("cpu" if backend == "dali" else None)
    assert p["device_type"] == "cpu" and p["world_size"] == 1 and p["precision"] == "fp32"
    assert p["global_batch"] == 16 and p["lr"] == {"w": 0.025, "alpha": 0.0003}
    assert p["versions"]["torch"] == torch.__version__.split("+")[0] or p["versions"]["torch"] == torch.__version__
    line = next(l for l in out.stderr.splitlines() if " run: data " in l)
    assert f"run: data {backend}" in line and "global batch 16" in line


def test_retrain_records_device_precision_batch_and_commit(tmp_path):
    out = run_cli(retrain_cmd() + ["--run-dir", str(tmp_path / "r"), "--set", "epochs=1", "--set", "data.micro_batch=8",
                                   "--set", "engine.grad_accum=2", "--set", "optim.w.reference_batch=32"])
    assert out.returncode == 0, out.stderr[-2000:]
    p = json.loads((tmp_path / "r" / "summary.json").read_text())["run"]
    assert p["data_backend"] == "memory" and p["global_batch"] == 16
    assert p["lr"]["w"] == pytest.approx(0.025 * 16 / 32)  # the resolved, batch-scaled lr
    assert p["git_commit"] == git_commit() and p["versions"]["deepspeed"]


def test_git_commit_outside_a_repository_is_none(tmp_path):
    assert git_commit(tmp_path) is None
