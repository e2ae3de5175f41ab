"""The retrain selects its checkpoint on a holdout carved from the training data, never on test data."""
import json

import numpy as np
import pytest
import torch

from conftest import need_data, run_cli
from reliability_runs import retrain_cmd
from sdarts.data.holdout import auto_per_class, split_holdout
from sdarts.errors import DataError
from sdarts.genotype import LITERATURE


def test_holdout_is_class_balanced_disjoint_and_fixed_by_the_seed():
    labels = np.repeat(np.arange(10), 50)[np.random.default_rng(0).permutation(500)]
    train, held = split_holdout(labels, 5, seed=3, where="x")
    assert len(held) == 50 and np.bincount(labels[held], minlength=10).tolist() == [5] * 10
    assert set(train.tolist()).isdisjoint(held.tolist()) and len(train) + len(held) == 500
    again, held_again = split_holdout(labels, 5, seed=3, where="x")
    assert np.array_equal(held, held_again) and np.array_equal(train, again)
    other = split_holdout(labels, 5, seed=4, where="x")[1]
    assert not np.array_equal(held, other)


def test_holdout_that_would_empty_a_class_is_one_error_naming_the_key():
    labels = np.array([0, 0, 0, 1, 1])
    with pytest.raises(DataError, match=r"data.holdout: 2 images per class would leave class 1 of shards/train"):
        split_holdout(labels, 2, seed=0, where="shards/train")


def test_default_holdout_sizes():
    assert auto_per_class(np.full(10, 5000), 500) == 500      # CIFAR-10: 5k
    assert auto_per_class(np.full(1000, 1300), 10) == 10      # ImageNet: 10k, a minival
    assert auto_per_class(np.array([9, 12]), 500) == 1        # a tiny run still holds one out
    assert auto_per_class(np.array([4, 12]), 500) == 0        # ... unless its smallest class cannot spare one


def _events(monkeypatch):
    """Every batch the retrain's loaders hand out, in order: ("train" | "eval", ids)."""
    from retrain import data as rd
    from sdarts.data.loader import TensorLoader
    events = []
    orig_train, orig_eval = TensorLoader.__iter__, rd.EvalLoader.__iter__

    def train_iter(self):
        for b in orig_train(self):
            events.append(("train", set(b.ids.tolist())))
            yield b

    def eval_iter(self):
        for b in orig_eval(self):
            events.append(("eval", set(b.ids[b.ids >= 0].tolist())))
            yield b
    monkeypatch.setattr(TensorLoader, "__iter__", train_iter)
    monkeypatch.setattr(rd.EvalLoader, "__iter__", eval_iter)
    return events


def _tiny(npz, **over):
    from retrain.config import RetrainConfig
    from sdarts.config import build
    tree = {"epochs": 3, "model": {"C": 4, "layers": 3, "auxiliary": True}, "ema": {"decay": 0.5},
            "data": {"root": str(npz), "micro_batch": 16, "max_per_split": 120, "holdout": 2},
            "log": {"progress": False, "tensorboard": False, "every_steps": 1}}
    return build(RetrainConfig, tree, [f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("each_epoch", [True, False])
def test_training_and_selection_never_read_a_test_image(tmp_path, monkeypatch, each_epoch):
    wds = need_data("cifar10-wds")  # real CIFAR-10 shards: sample ids are key hashes, unique across splits
    from retrain.train import run_retrain
    from sdarts.data.sources import cifar10_split
    test_ids = set(cifar10_split(str(wds), "test", 1.0, 120).ids.tolist())
    events = _events(monkeypatch)
    res = run_retrain(_tiny(wds, **{"data.eval_each_epoch": each_epoch}), LITERATURE["darts_v2"], tmp_path / "r")
    trained = set().union(*(ids for kind, ids in events if kind == "train"))
    read = [(i, kind, ids) for i, (kind, ids) in enumerate(events)]
    with_test = [i for i, kind, ids in read if ids & test_ids]
    holdout_ids = set().union(*(ids for kind, ids in events if kind == "eval" and not ids & test_ids))
    assert trained and not trained & test_ids and not trained & holdout_ids
    assert len(holdout_ids) == 20  # 2 per class, read each epoch
    assert all(events[i][0] == "eval" for i in with_test)
    test_batches = len(with_test) // (3 if each_epoch else 1)
    last_train = max(i for i, kind, _ in read if kind == "train")
    if each_epoch:   # the test set is read once per epoch (model + EMA), after that epoch's training
        assert len(with_test) == 3 * test_batches
    else:            # ... or only after the last epoch: the final weights and the selected ones
        assert min(with_test) > last_train
    # the selection is the epoch of the best holdout top-1 of the EMA weights, whatever the test says
    recs = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    hold = [r["top1"] for r in recs if r["split"] == "holdout_ema"]
    sel = res.summary["selected"]
    assert sel["on"] == "holdout" and sel["epoch"] == 1 + int(np.argmax(hold))
    assert sel["holdout"]["top1"] == max(hold) and sel["eval"] is not None
    assert res.summary["final"]["epoch"] == 3 and res.summary["final"]["top1"] is not None
    best = torch.load(tmp_path / "r" / "checkpoints" / "best.pt", weights_only=True)
    assert best["selected"] == sel


def test_no_holdout_warns_that_the_test_set_selects(tmp_path):
    out = run_cli(retrain_cmd() + ["--run-dir", str(tmp_path / "r"), "--set", "epochs=1", "--set", "data.holdout=0"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "data.holdout 0: the checkpoint (best.pt, summary 'selected') is chosen on the eval split" in out.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["selected"]["on"] == "eval" and summary["holdout_per_class"] == 0


def test_resume_with_another_holdout_is_refused_in_one_line(tmp_path):
    args = retrain_cmd() + ["--run-dir", str(tmp_path / "r"), "--set", "max_steps=1"]  # default holdout: 1/class
    assert run_cli(args).returncode == 0
    out = run_cli(args + ["--set", "data.holdout=2", "--resume"])
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "trained with data.holdout 1, this config gives 2" in lines[0]
    assert "--set data.holdout=1" in lines[0] and "Traceback" not in out.stderr


def test_a_checkpoint_from_before_the_holdout_is_refused_as_an_older_layout():
    from retrain.train import refuse_other_network
    g = LITERATURE["darts_v2"].to_json()
    old = {"kind": "retrain", "genotype": g, "best": {"top1": 50.0, "top5": 90.0, "epoch": 3, "source": "model"}}
    assert "an older layout, from before the holdout" in refuse_other_network(g, 500)(old)
    assert refuse_other_network(g, 0)(old) is None  # data.holdout=0 continues it, as it was trained
