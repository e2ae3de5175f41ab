"""Disk and directories: finished runs are never overwritten by accident, a full disk during a save is
one line and exit code 4 with the previous checkpoint kept (and resumable to the uninterrupted result),
and no code path evaluates user text or unpickles a checkpoint without `weights_only=True`.

The full disk is real when the tests run as root: the run directory is a size-limited tmpfs that
holds one checkpoint but not two, so the second save fails inside torch.save with ENOSPC. Without
root, and for the retrain, the checkpoint writer's test hook (SDARTS_TEST_FAULT=save.written:enospc,
see `sdarts.checkpoint.fault_point`) cuts the new files to half and raises ENOSPC at the same place.
"""
import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from reliability_runs import (SEARCH, assert_same_tensors, error_lines, finished_retrain, finished_search, jsonl,
                              latest, retrain_cmd, run, state, tags, tree)

EXIT_SAVE_FAILED = 4


# -- finished and existing run directories --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("job", ["search", "retrain"])
def test_a_finished_run_is_not_overwritten_without_resume_or_force(tmp_path_factory, job):
    run_dir, args = ((finished_search(tmp_path_factory), SEARCH) if job == "search"
                     else (finished_retrain(tmp_path_factory), retrain_cmd()))
    before = tree(run_dir)
    r = run([*args, "--run-dir", str(run_dir)])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for word in (str(run_dir), "finished run", "--resume", "--force"):
        assert word in lines[0], (word, lines[0])
    assert tree(run_dir) == before


@pytest.mark.slow
def test_force_starts_a_finished_run_over(tmp_path_factory, tmp_path):
    run_dir = tmp_path / "again"
    shutil.copytree(finished_retrain(tmp_path_factory), run_dir)
    r = run([*retrain_cmd(), "--set", "max_steps=1", "--run-dir", str(run_dir), "--force"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (run_dir / "summary.json").exists() and tags(run_dir) == ["step000000001"]
    assert [m["step"] for m in jsonl(run_dir / "metrics.jsonl")] == [1]


# -- a full disk during a checkpoint save ---------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """(directory, how the disk fills): a tmpfs sized by the caller when we may mount one, else a plain
    directory and the writer's ENOSPC hook."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = []

    def make(size_bytes: int) -> str:
        if os.geteuid() == 0 and shutil.which("mount"):
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs", str(mnt)],
                               capture_output=True, text=True)
            if r.returncode == 0:
                mounted.append(mnt)
                return "tmpfs"
        return "hook"

    yield mnt, make, mounted
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], check=False)


def _check_save_failure(r, run_dir, failed, kept):
    assert r.returncode == EXIT_SAVE_FAILED, (r.returncode, r.stderr[-2500:])
    assert "Traceback" not in r.stderr, r.stderr[-2500:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-2500:]
    for word in (str(run_dir / "checkpoints" / failed), "No space left on device",
                 f"{run_dir / 'checkpoints' / kept} is kept", "--resume"):
        assert word in lines[0], (word, lines[0])
    assert latest(run_dir) == kept and failed not in tags(run_dir)  # the partial tag is gone
    assert not list((run_dir / "checkpoints").glob("latest.tmp*"))
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_search_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path_factory, small_disk):
    ref = finished_search(tmp_path_factory)
    mnt, make, mounted = small_disk
    one = sum(f.stat().st_size for f in (ref / "checkpoints" / latest(ref)).iterdir())
    how = make(int(1.5 * one) + 96 * 1024)  # room for the step-2 checkpoint and the logs, not for step 4's too
    run_dir = mnt / "run"
    r = run([*SEARCH, "--run-dir", str(run_dir)], fault=None if how == "tmpfs" else "save.written:enospc:2")
    _check_save_failure(r, run_dir, "step000000004", "step000000002")

    # an unfinished run directory is not clobbered either, and the kept checkpoint resumes exactly
    before = tree(run_dir)
    r = run([*SEARCH, "--run-dir", str(run_dir)])
    assert r.returncode == 2 and "existing run" in error_lines(r.stderr)[0], r.stderr[-2000:]
    assert tree(run_dir) == before
    if mounted:
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
    r = run([*SEARCH, "--run-dir", str(run_dir), "--resume"])
    assert r.returncode == 0, r.stderr[-2500:]
    assert_same_tensors(state(ref)["module"], state(run_dir)["module"], "module")
    assert jsonl(run_dir / "alphas.jsonl") == jsonl(ref / "alphas.jsonl")
    assert (run_dir / "genotype.json").read_text() == (ref / "genotype.json").read_text()


@pytest.mark.slow
def test_retrain_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path_factory, tmp_path):
    ref = finished_retrain(tmp_path_factory)
    run_dir = tmp_path / "run"
    r = run([*retrain_cmd(), "--run-dir", str(run_dir)], fault="save.written:enospc:2")
    _check_save_failure(r, run_dir, "step000000004", "step000000002")
    r = run([*retrain_cmd(), "--run-dir", str(run_dir), "--resume"])
    assert r.returncode == 0, r.stderr[-2500:]
    a, b = state(ref), state(run_dir)
    assert_same_tensors(a["module"], b["module"], "module")
    assert_same_tensors(a["ema"], b["ema"], "ema")
    assert jsonl(run_dir / "metrics.jsonl") == jsonl(ref / "metrics.jsonl")


# -- safe loading, statically ---------------------------------------------------------------------

PACKAGES = ("sdarts", "retrain", "launcher")


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Calls that could run user text or unpickle arbitrary objects, as 'file:line: what'."""
    found = []

    def name(node) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return f"{name(node.value)}.{node.attr}"
        return "?"

    def kw(call, key):
        return next((k.value for k in call.keywords if k.arg == key), None)

    tree_ = ast.parse(source, filename)
    for node in ast.walk(tree_):
        if not isinstance(node, ast.Call):
            continue
        f = name(node.func)
        where = f"{filename}:{node.lineno}"
        if f in ("eval", "exec", "compile", "builtins.eval", "builtins.exec"):
            found.append(f"{where}: {f}()")
        elif f in ("pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.loads", "marshal.load",
                   "dill.load", "dill.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"{where}: {f}()")
        elif f == "torch.load":
            v = kw(node, "weights_only")
            if not (isinstance(v, ast.Constant) and v.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        elif f.endswith("np.load") or f.endswith("numpy.load"):
            v = kw(node, "allow_pickle")
            if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                found.append(f"{where}: np.load with allow_pickle")
        elif f.startswith("subprocess.") or f in ("os.system", "os.popen"):
            v = kw(node, "shell")
            if f in ("os.system", "os.popen") or (v is not None and not (isinstance(v, ast.Constant) and v.value is False)):
                found.append(f"{where}: {f} through a shell")
    # DeepSpeed's load_checkpoint unpickles with weights_only=False: every function that calls it
    # must first call verify_safe (the weights_only=True pre-check)
    for fn in ast.walk(tree_):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)]
            loads = [n.lineno for n in calls if name(n.func).endswith(".load_checkpoint")]
            checks = [n.lineno for n in calls if name(n.func).endswith("verify_safe")]
            for line in loads:
                if not any(c < line for c in checks):
                    found.append(f"{filename}:{line}: load_checkpoint without verify_safe before it")
    return found


def test_the_checker_finds_what_it_looks_for():
    bad = ("import torch, pickle, yaml, subprocess\n"
           "eval(text)\nexec(text)\npickle.loads(b)\nyaml.load(s)\ntorch.load(p)\n"
           "torch.load(p, weights_only=False)\nsubprocess.run(cmd, shell=True)\nnp.load(f, allow_pickle=True)\n"
           "def resume(engine, d):\n    engine.load_checkpoint(d)\n")
    found = unsafe_calls(bad)
    assert len(found) == 9, found
    ok = ("import torch, yaml, ast\nmodel.eval()\nast.literal_eval(t)\nyaml.safe_load(s)\n"
          "torch.load(p, map_location='cpu', weights_only=True)\nsubprocess.run(['ls'])\n"
          "def resume(engine, d):\n    verify_safe(d)\n    engine.load_checkpoint(d)\n")
    assert unsafe_calls(ok) == []


def test_no_eval_exec_or_unsafe_unpickling_of_user_input():
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found += unsafe_calls(path.read_text(), str(path.relative_to(ROOT)))
    assert found == [], "\n".join(found)
