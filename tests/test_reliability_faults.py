"""Kill -9 at every crash-relevant instant of a search and a retrain, and a second SIGTERM during a save.

Each job is driven through its real CLI (one process, real DeepSpeed engine on CPU/gloo, fixed seed)
through a chain of deaths, each resumed with --resume, and must end bit-for-bit where the uninterrupted
run ends (weights, optimizer-dependent alpha, genotype, EMA, best checkpoint, logs, checkpoint list).

The instants inside a checkpoint save last microseconds, so they are hit from inside the process with
the test-only hook SDARTS_TEST_FAULT="<point>:<action>[:<n>|*]" (`sdarts.checkpoint.fault_point`); the
death itself is a real SIGKILL (or SIGTERM) the process sends itself. Kill points:
  save.term      a SIGTERM arrives during a periodic save, and a second one during the preemption
                 save it causes: exit 124 with a complete checkpoint
  save.begin     kill before anything of the new checkpoint is written
  save.torn      the new checkpoint's files are cut to half (a kill mid-write), then kill
  save.written   the new tag directory is complete, `latest` not yet moved
  save.committed `latest` moved, older tags not yet pruned
A kill at a random moment between steps is `tests/test_distributed_resume.py`. A diverging retrain
stops before the bad update with exit 3 (the search's row is tests/test_config_cli.py).

fp16 (overflowed steps skipped for w and alpha alike, and counted) needs a CPU with avx512_fp16 or a
GPU: this test machine has neither, so that row is skipped with the reason (see docs/reliability.md).
"""
import os

import pytest
import torch

from reliability_runs import (KILLED, SEARCH, assert_same_tensors, finished_retrain, finished_search, jsonl,
                              latest, retrain_cmd, run, state, tags)
from sdarts.checkpoint import verify_safe
from sdarts.errors import CheckpointError

pytestmark = pytest.mark.slow


def _resume(args, run_dir, fault, expect_rc, expect_latest):
    """One more life of the run: resume (after the first), die as `fault` says, check what is left."""
    cmd = [*args, "--run-dir", str(run_dir)] + (["--resume"] if run_dir.exists() else [])
    r = run(cmd, fault)
    assert r.returncode == expect_rc, (fault, r.returncode, r.stderr[-2500:])
    assert "Traceback" not in r.stderr, r.stderr[-2500:]
    assert not (run_dir / "summary.json").exists() or expect_rc == 0
    assert latest(run_dir) == expect_latest, (fault, latest(run_dir), tags(run_dir))
    verify_safe(run_dir / "checkpoints" / expect_latest)  # what `latest` names is complete and plain
    return r


def test_search_killed_at_each_save_instant_resumes_to_the_uninterrupted_result(tmp_path_factory, tmp_path):
    """smoke.yaml: 4 steps an epoch, 2 epochs, checkpoints at steps 2, 4 (epoch end), 6, 8."""
    ref = finished_search(tmp_path_factory)
    d = tmp_path / "run"
    # a SIGTERM during the step-2 save, a second during the preemption save at the next step boundary
    r = _resume(SEARCH, d, "save.written:term:*", 124, "step000000003")
    assert "preemption signal" in r.stderr
    assert tags(d) == ["step000000002", "step000000003"]
    verify_safe(d / "checkpoints" / "step000000002")
    # the epoch-end save at step 4, four ways
    _resume(SEARCH, d, "save.begin:kill", KILLED, "step000000003")
    _resume(SEARCH, d, "save.written:torn", KILLED, "step000000003")
    with pytest.raises(CheckpointError, match="refused"):
        verify_safe(d / "checkpoints" / "step000000004")  # the torn one really is unreadable
    _resume(SEARCH, d, "save.written:kill", KILLED, "step000000003")
    verify_safe(d / "checkpoints" / "step000000004")  # complete, but not yet named by `latest`
    _resume(SEARCH, d, "save.committed:kill", KILLED, "step000000004")
    assert tags(d) == ["step000000002", "step000000003", "step000000004"]  # killed before pruning
    _resume(SEARCH, d, None, 0, "step000000008")

    assert tags(d) == tags(ref) == ["step000000006", "step000000008"]
    a, b = state(ref), state(d)
    assert_same_tensors(a["module"], b["module"], "module")  # weights and alpha, bit for bit
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")  # momentum and Adam moments too
    assert a["alpha_history"] == b["alpha_history"] and a["genotype"] == b["genotype"]
    for f in ("genotype.json", "genotypes/epoch_001.json", "genotypes/epoch_002.json"):
        assert (d / f).read_text() == (ref / f).read_text(), f
    assert jsonl(d / "alphas.jsonl") == jsonl(ref / "alphas.jsonl")
    assert jsonl(d / "metrics.jsonl") == jsonl(ref / "metrics.jsonl")  # every step once, same losses


def test_retrain_killed_at_each_save_instant_resumes_to_the_uninterrupted_result(tmp_path_factory, tmp_path):
    """5 steps an epoch, 2 epochs: checkpoints at steps 2, 4, 5 (epoch end, after best.pt), 6, 8, 10."""
    args = retrain_cmd()
    ref = finished_retrain(tmp_path_factory)
    d = tmp_path / "run"
    r = _resume(args, d, "save.written:term:*", 124, "step000000003")
    assert "preemption signal" in r.stderr
    _resume(args, d, "save.begin:kill", KILLED, "step000000003")
    _resume(args, d, "save.written:torn:2", KILLED, "step000000004")  # torn at the epoch-end save
    assert (d / "checkpoints" / "best.pt").exists()  # written before the save that was torn
    _resume(args, d, "save.written:kill:2", KILLED, "step000000005")  # step 6 complete, not committed
    _resume(args, d, "save.committed:kill:2", KILLED, "step000000008")
    assert tags(d) == ["step000000005", "step000000006", "step000000008"]  # killed before pruning
    _resume(args, d, None, 0, "step000000010")

    assert tags(d) == tags(ref) == ["step000000008", "step000000010"]
    a, b = state(ref), state(d)
    assert_same_tensors(a["module"], b["module"], "module")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    assert_same_tensors(a["ema"], b["ema"], "ema")
    assert a["selected"] == b["selected"] and a["last_eval"] == b["last_eval"]
    best_a = torch.load(ref / "checkpoints" / "best.pt", weights_only=True)
    best_b = torch.load(d / "checkpoints" / "best.pt", weights_only=True)
    assert_same_tensors(best_a, best_b, "best.pt")
    assert jsonl(d / "metrics.jsonl") == jsonl(ref / "metrics.jsonl")


def test_retrain_nan_loss_stops_before_the_update_naming_step_and_checkpoint(tmp_path):
    """A diverging retrain (lr 1e38, no clipping) stops at the first non-finite loss with exit 3, before
    that step updates anything, so the checkpoints already written (every step here) stay finite."""
    d = tmp_path / "nan"
    r = run([*retrain_cmd(), "--run-dir", str(d), "--set", "optim.w.lr=1e38", "--set", "optim.w.grad_clip=0",
             "--set", "checkpoint.every_steps=1"])
    assert r.returncode == 3, r.stderr[-2500:]
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2500:]
    last = latest(d)
    step = int(last.removeprefix("step"))
    assert f"step {step + 1} (epoch 1): non-finite loss" in lines[0], lines[0]
    assert f"last good checkpoint: {d / 'checkpoints' / last}" in lines[0], lines[0]
    assert all(torch.isfinite(v).all() for v in state(d)["module"].values() if v.is_floating_point())
    assert not (d / "summary.json").exists()


def _no_fp16_reason() -> str | None:
    """Why the CPU test engine cannot run fp16 here (None when it can)."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if "avx512_fp16" in flags or "amx_fp16" in flags:
        return None
    return ("fp16 on the CPU test engine needs avx512_fp16/amx_fp16, which this CPU lacks (the search refuses "
            "fp16 here); on a GPU see docs/reliability.md")


@pytest.mark.skipif(_no_fp16_reason() is not None, reason=str(_no_fp16_reason()))
def test_fp16_overflow_skips_the_step_for_w_and_alpha_and_counts_it():
    """An overflowed fp16 step is skipped by the loss scaler for weights and alpha alike, and counted."""
    from sdarts.data import Batch
    from search_helpers import changed, make, snapshot, tiny_cfg
    engine, strategy, tr, _ = make(tiny_cfg(precision="fp16", **{"engine.autocast": "false"}))
    b = next(iter(tr))
    # real images scaled to ~6e4: the stem's conv overflows fp16 -> inf/NaN loss and grads. (A constant
    # 6e4 image did not: its conv output is one value per channel, which BN maps to 0, a finite loss;
    # this test never ran before a CPU with avx512_fp16, and then failed on that premise.)
    huge = Batch(b.x * 6e4, b.y, b.ids)
    w0, a0 = snapshot(engine.module)
    res = strategy.step(iter([huge]), None)
    assert not torch.isfinite(res.loss), "the batch must overflow fp16 for this test to say anything"
    w1, a1 = snapshot(engine.module)
    assert not changed(w0, w1) and not changed(a0, a1)
    assert engine.skipped_steps() == 1
