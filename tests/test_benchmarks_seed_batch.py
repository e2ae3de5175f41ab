"""benchmarks/seed_batch.py: its options parse, and a tiny kernel count (NB201, lone vs a stack of 4 seeds,
a few seconds) ends in one JSON line whose stack launches fewer kernels per search than a lone search."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli


def test_help():
    p = run_cli(["benchmarks/seed_batch.py", "--help"], timeout=120)
    assert p.returncode == 0, p.stderr
    for opt in ("--cases", "--stack", "--threads", "--rounds", "--steps"):
        assert opt in p.stdout


def test_tiny_kernel_count_emits_json_with_fewer_kernels_per_search():
    p = run_cli(["benchmarks/seed_batch.py", "--cases", "nb201", "--stack", "4", "--rounds", "1",
                 "--tiny-steps", "1"], timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    lone, s4 = out["kernels"]["nb201"]["lone"], out["kernels"]["nb201"]["S4"]
    assert s4["seeds"] == 4 and s4["kernels_per_search"] == pytest.approx(s4["kernels"] / 4, abs=0.051)
    assert s4["kernels_per_search"] < lone["kernels"]
    # `_unsafe_view` counted as a view: never more than the strict count, which counts it as a kernel
    assert s4["kernels"] <= s4["kernels_strict"]
    assert out["throughput"] == {}
