"""scripts/nb201_evidence.py: eq. 8 means per block of epochs, from an analysis.jsonl."""
from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import nb201_evidence as ev  # noqa: E402


def test_eq8_blocks_average_each_block_of_epochs_and_leave_gaps_empty(tmp_path):
    recs = [{"kind": "grad_corr", "epoch": e, "same_step": {"mean_cos": c}, "prev_w": None if e == 0 else
             {"mean_cos": -c}} for e, c in [(0, 0.2), (1, 0.4), (2, 0.9), (5, 0.1), (5, 0.3)]]
    recs.append({"kind": "dl_dp", "epoch": 0})
    (tmp_path / "analysis.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = ev.eq8_blocks(tmp_path, block=2, epochs=8)
    assert out["same_step"] == [0.30000000000000004, 0.9, 0.2, None]
    assert out["prev_w"] == [-0.4, -0.9, -0.2, None]


def test_seed_dirs_of_a_batch_and_of_a_lone_search(tmp_path):
    (tmp_path / "batch" / "seed_3").mkdir(parents=True)
    (tmp_path / "batch" / "seed_1").mkdir()
    (tmp_path / "lone").mkdir()
    assert [d.name for d in ev.seed_dirs(tmp_path / "batch")] == ["seed_1", "seed_3"]
    assert ev.seed_dirs(tmp_path / "lone") == [tmp_path / "lone"]
    assert ev.main([str(tmp_path / "missing")]) == 2
