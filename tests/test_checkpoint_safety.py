"""Checkpoints: crafted pickles are refused, foreign checkpoints named, `latest` never points at a torn save."""
import os
import pickle
import shutil

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow
SMOKE = ["launcher/search.py", "--config", "configs/search/smoke.yaml", "--set", "log.progress=false"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt") / "run"
    r = run_cli([*SMOKE, "--run-dir", str(run)])
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def _copy(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "summary.json").unlink()  # pretend it was interrupted
    tag = (run / "checkpoints" / "latest").read_text().strip()
    return run, run / "checkpoints" / tag / "mp_rank_00_model_states.pt"


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sdarts_pwned",))


def test_crafted_pickle_is_refused(finished, tmp_path):
    run, pt = _copy(finished, tmp_path)
    pt.write_bytes(pickle.dumps({"module": Boom()}))
    if os.path.exists("/tmp/sdarts_pwned"):
        os.remove("/tmp/sdarts_pwned")
    r = run_cli([*SMOKE, "--run-dir", str(run), "--resume"])
    assert r.returncode == 2 and "refused" in r.stderr and str(pt) in r.stderr, r.stderr[-1500:]
    assert not os.path.exists("/tmp/sdarts_pwned")


def test_not_a_checkpoint_and_other_space(finished, tmp_path):
    run, pt = _copy(finished, tmp_path)
    pt.write_text("hello, not a checkpoint")
    r = run_cli([*SMOKE, "--run-dir", str(run), "--resume"])
    assert r.returncode == 2 and str(pt) in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    run2, _ = _copy(finished, tmp_path / "b")
    r = run_cli([*SMOKE, "--run-dir", str(run2), "--resume", "--set", "space=darts", "--set", "model.layers=3"])
    assert r.returncode == 2 and "checkpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]


def test_torn_save_leaves_latest_on_a_complete_checkpoint(finished, tmp_path):
    """A kill during a save leaves a partial tag directory; `latest` still names the previous one."""
    run, pt = _copy(finished, tmp_path)
    torn = run / "checkpoints" / "step999999999"
    torn.mkdir()
    (torn / "mp_rank_00_model_states.pt").write_bytes(pt.read_bytes()[:100])
    r = run_cli([*SMOKE, "--run-dir", str(run), "--resume"])
    assert r.returncode == 0, r.stderr[-1500:]
    assert (run / "summary.json").exists()


def test_empty_latest_is_refused_not_restarted(finished, tmp_path):
    """`latest` is replaced by temp file + rename, so an empty one is damage: --resume names it and stops
    rather than silently starting the run over."""
    run, pt = _copy(finished, tmp_path)
    (run / "checkpoints" / "latest").write_text("")
    r = run_cli([*SMOKE, "--run-dir", str(run), "--resume"])
    assert r.returncode == 2 and "latest" in r.stderr and "empty" in r.stderr, r.stderr[-1500:]
    assert pt.exists() and not (run / "summary.json").exists()
