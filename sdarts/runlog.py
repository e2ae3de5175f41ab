"""Run-directory files: append-only JSONL logs that can be cut back to a checkpoint on resume.

`metrics.jsonl` and `alphas.jsonl` carry a `step` in every line; on resume, lines written after the
checkpoint being resumed are dropped (temp file + rename), so an interrupted-and-resumed run leaves
the same files as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path: Path, text: str) -> None:
    # per-process temp name: with log.all_ranks every rank rewrites the shared metrics.jsonl on resume,
    # and a shared temp name let one rank's rename pull the file from under the other's
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def append(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keeps only records with `step` <= step."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a kill
        atomic_write(self.path, "".join(l + "\n" for l in keep))

    def rewrite(self, records: list[dict]) -> None:
        """Replaces the file with exactly these records (atomic)."""
        if self.enabled:
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out
