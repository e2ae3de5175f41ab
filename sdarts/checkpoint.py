"""The checkpoint protocol, shared by the search and the retrain: atomic save, safe load, pruning.

A checkpoint is `checkpoints/<tag>/` as DeepSpeed writes it (weights under `module`, the optimizer with
both parameter groups, our client state) plus `checkpoints/latest`, a one-line file naming the tag.

- `save_atomic`: every rank writes its part of `<tag>/` -> all ranks agree the write succeeded ->
  rank 0 replaces `latest` (temp file + rename) -> tags beyond `keep` are pruned. A kill at any instant
  leaves `latest` naming a complete checkpoint; a failed write (disk full) removes the partial tag and
  raises `CheckpointSaveError`, naming the checkpoint that is still good.
- `load_latest`: `verify_safe` opens every file with `torch.load(weights_only=True)` before DeepSpeed's
  own (unpickling) loader touches it; then the client state is checked by the caller's `refuse`.
- `save_weights`: a plain `{"module": state_dict, ...}` file (the retrain's `best.pt`), loadable with
  `weights_only=True` and without DeepSpeed, replaced atomically.
- `fault_point`: test-only fault injection at the save's crash-relevant instants (docs/reliability.md).
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path
from typing import Callable

import torch

from sdarts.distributed import all_agree, barrier
from sdarts.errors import CheckpointError, CheckpointSaveError, first_line
from sdarts.runlog import atomic_write


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag `ckpt_dir/latest` names, None when there is no (readable, non-empty) `latest` yet."""
    try:
        return (Path(ckpt_dir) / "latest").read_text().strip() or None
    except OSError:
        return None


def load_latest(ds_engine, ckpt_dir: Path, what: str,
                refuse: Callable[[dict], str | None] = lambda client: None) -> dict | None:
    """Loads the checkpoint named by `latest` into `ds_engine` (a DeepSpeed engine) and returns its
    client state (None when there is no `latest`: a fresh start). Every file is checked with
    `verify_safe` first, because DeepSpeed's loader unpickles arbitrary objects; a missing tag, a foreign network, an unreadable
    file or a client state `refuse` objects to (it returns the reason) is one CheckpointError naming
    the tag directory (`what` says whose checkpoint was expected)."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    tag = read_latest(ckpt_dir)
    if tag is None:  # written by temp file + rename, so never empty on its own: refuse, do not start afresh
        raise CheckpointError(f"{latest}: empty or unreadable (it should name a checkpoint tag)")
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{ckpt_dir / tag}: checkpoint named by {ckpt_dir / 'latest'} is missing")
    states = verify_safe(ckpt_dir / tag)
    # refuse from the client state before DeepSpeed loads anything: a checkpoint of another shape (e.g.
    # another number of seeds) would otherwise fail in the strict state-dict load, without the reason
    reason = refuse(states) if states is not None else None
    if reason:
        raise CheckpointError(f"{ckpt_dir / tag}: {reason}")
    try:
        _, client = ds_engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
    except (RuntimeError, KeyError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{ckpt_dir / tag}: not a checkpoint of this {what} ({first_line(e, 200)})") from None
    if client is None:
        raise CheckpointError(f"{ckpt_dir / tag}: checkpoint could not be read")
    reason = refuse(client) if states is None else None  # (checked above when the states file was read)
    if reason:
        raise CheckpointError(f"{ckpt_dir / tag}: {reason}")
    return client


def save_atomic(ds_engine, ckpt_dir: Path, tag: str, client_state: dict, keep: int) -> None:
    """Writes `ckpt_dir/<tag>/` on every rank, then rank 0 moves `latest` to it, then prunes old tags.

    The order is the crash-safety argument: `latest` only ever names a tag that every rank finished
    writing, so a kill -9 at any instant leaves a loadable checkpoint. A write that fails on any rank
    (ENOSPC, quota, I/O error) is agreed on by all ranks (no rank waits forever in a barrier), the
    partial tag is removed and `CheckpointSaveError` names the checkpoint that is still good.
    """
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag
    rank0 = ds_engine.global_rank == 0
    error = None
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        fault_point("save.begin", tag_dir)
        ds_engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        fault_point("save.written", tag_dir)
    except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as a bare RuntimeError
        error = _save_failure(e, tag_dir)
    if not all_agree(error is not None):  # an all-reduce: also the barrier after every rank's write
        if rank0:
            try:
                atomic_write(ckpt_dir / "latest", tag)
            except OSError as e:
                error = _save_failure(e, ckpt_dir / "latest")
        if not all_agree(error is not None):
            fault_point("save.committed", tag_dir)
            if rank0:
                _prune(ckpt_dir, tag, keep)
            barrier()
            return
    previous = read_latest(ckpt_dir)
    if rank0:
        if previous != tag:
            shutil.rmtree(tag_dir, ignore_errors=True)
        for tmp in ckpt_dir.glob("latest.tmp*"):  # a pointer write that failed half-way
            tmp.unlink(missing_ok=True)
    barrier()
    kept = f"{ckpt_dir / previous} is kept" if previous else "no earlier checkpoint exists"
    raise CheckpointSaveError(f"checkpoint {tag_dir} not saved: {error or 'another rank could not write its part'}"
                              f"; `latest` still names the last complete one, {kept} (--resume continues from it)")


def _prune(ckpt_dir: Path, tag: str, keep: int) -> None:
    """Deletes tags beyond the newest `keep` up to `tag`, and any tag newer than `tag`: those are left
    over from a timeline that was killed and resumed from an earlier checkpoint, never committed."""
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
    older = [t for t in tags if t <= tag]
    stale = [t for t in tags if t > tag] + older[:-keep]
    for old in stale:
        if old != tag:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def _save_failure(e: BaseException, where: Path) -> str:
    """One line for a failed write; a full device is named as such even when torch hides the errno."""
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(x)
        x = x.__cause__ or x.__context__
    os_err = next((x for x in chain if isinstance(x, OSError) and x.errno), None)
    if os_err is not None:
        return f"{os_err.strerror or os.strerror(os_err.errno)} ({os_err.filename or where})"
    first = first_line(e, 160)
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    if free is not None and free < (1 << 20):
        return f"{os.strerror(errno.ENOSPC)} ({free} bytes free under {probe})"
    return first


#: test-only fault injection, see `fault_point` and docs/reliability.md
FAULT_ENV = "SDARTS_TEST_FAULT"
_fault_hits: dict[str, int] = {}


def fault_point(point: str, tag_dir: Path) -> None:
    """Test-only: injects a fault at one of the checkpoint writer's crash-relevant instants.

    Does nothing unless the environment has SDARTS_TEST_FAULT="<point>:<action>[:<n>|*]" (several
    separated by commas), which fires at the n-th time (default 1; `*` every time) this process reaches
    <point>: `save.begin` (nothing written yet), `save.written` (the tag is complete, `latest` not yet
    moved), `save.committed` (`latest` moved, old tags not yet pruned). Actions: `kill` (SIGKILL
    itself: a kill -9 at exactly that instant), `torn` (cut the tag's files to half, then SIGKILL: a
    kill mid-write), `enospc` (cut to half, then raise ENOSPC: a disk that fills mid-write), `term`
    (send itself SIGTERM: a preemption signal arriving during the save). The reliability tests use it
    because such instants last microseconds and cannot be hit reliably from outside the process.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, action, *nth = item.strip().split(":")
        if name != point:
            continue
        hit = _fault_hits[item] = _fault_hits.get(item, 0) + 1
        when = nth[0] if nth else "1"
        if when != "*" and hit != int(when):
            continue
        if action in ("torn", "enospc") and tag_dir.is_dir():
            for f in tag_dir.iterdir():
                if f.is_file():
                    os.truncate(f, f.stat().st_size // 2)
        if action in ("kill", "torn"):
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" ({FAULT_ENV})", str(tag_dir))
        else:
            raise ValueError(f"{FAULT_ENV}: unknown action {action!r} in {item!r}")


def verify_safe(tag_dir: Path) -> dict | None:
    """Refuses checkpoint files that need arbitrary unpickling; returns the model-states file's
    contents (DeepSpeed keeps the client state there), or None when the tag has no such file.

    DeepSpeed's loader calls `torch.load(weights_only=False)`, which runs any code a crafted pickle
    carries. Every file is first opened with `weights_only=True` (tensors, containers and plain types
    only); what fails that is refused before DeepSpeed touches it.
    """
    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir}: no checkpoint files in it")
    states = None
    for f in files:
        try:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means we will not unpickle it unsafely
            raise CheckpointError(f"{f}: refused, not a plain-tensor checkpoint ({first_line(e, 160)})") from None
        if f.name == "mp_rank_00_model_states.pt" and isinstance(loaded, dict):
            states = loaded
    return states


def save_weights(path: Path, state_dict: dict, meta: dict) -> None:
    """Rank 0 only: weights (CPU) plus metadata, atomically (a failed write keeps the old file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({"module": {k: v.detach().cpu() for k, v in state_dict.items()}, **meta}, tmp)
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as a bare RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointSaveError(f"{path} not saved: {first_line(e, 160)}; the previous {path.name} is kept") from None
