"""Typed configs: shipped configs validate; bad input is one line naming the culprit, exit 2, nothing written."""
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from sdarts import config as C

SEARCH_CONFIGS = sorted((ROOT / "configs" / "search").glob("*.yaml"))


@pytest.mark.parametrize("path", SEARCH_CONFIGS, ids=lambda p: p.name)
def test_shipped_search_configs_validate_and_are_commented(path):
    cfg = C.load(path)
    assert cfg.epochs > 0
    assert path.read_text().lstrip().startswith("#")


def test_paper_settings():
    nb = C.load(ROOT / "configs/search/nb201_cifar10.yaml")
    assert (nb.model.C, nb.model.cells_per_stage, nb.data.micro_batch, nb.epochs) == (16, 5, 64, 50)
    assert (nb.optim.alpha.optimizer, nb.optim.alpha.lr, nb.optim.alpha.betas, nb.optim.alpha.weight_decay) == \
        ("adam", 3e-4, (0.5, 0.999), 0.0)
    im = C.load(ROOT / "configs/search/darts_imagenet.yaml")
    assert im.arch.activation == "sigmoid" and abs(im.arch.init + 1.9459101) < 1e-6
    assert im.model.stem == "imagenet" and im.optim.w.lr == 0.025


def test_overrides_are_typed():
    cfg = C.load(ROOT / "configs/search/smoke.yaml", ["optim.w.lr=0.01", "arch.activation=sigmoid",
                                                      "analysis.cells=[0, 2]"])
    assert cfg.optim.w.lr == 0.01 and cfg.arch.activation == "sigmoid" and cfg.analysis.cells == [0, 2]


BAD = [
    (["--set", "optim.w.lrr=0.1"], "optim.w.lrr"),
    (["--set", "data.micro_batch=abc"], "data.micro_batch"),
    (["--set", "data.micro_batch=-4"], "data.micro_batch"),
    (["--set", "strategy=trilevel"], "strategy"),
    (["--set", "arch.init=ln"], "arch.init"),
    (["--set", "nolevel"], "nolevel"),
    (["--set", "engine.cuda_graphs=maybe"], "engine.cuda_graphs"),
    (["--set", "model.impl=grouped"], "model.impl"),  # the smoke config is NB201: grouped is DARTS-only
    (["--set", "data.dataset=cifar10", "--set", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
]


@pytest.mark.parametrize("args,culprit", BAD, ids=[b[1] for b in BAD])
def test_bad_overrides_exit_2_with_one_line(args, culprit, tmp_path):
    run = tmp_path / "run"
    r = run_cli(["launcher/search.py", "--config", "configs/search/smoke.yaml", "--run-dir", str(run), *args])
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and culprit in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


def test_missing_and_malformed_config_files(tmp_path):
    r = run_cli(["launcher/search.py", "--config", str(tmp_path / "nope.yaml")])
    assert r.returncode == 2 and "nope.yaml" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\nseed: 0\n")
    r = run_cli(["launcher/search.py", "--config", str(bad)])
    assert r.returncode == 2 and "malformed YAML" in r.stderr and "Traceback" not in r.stderr


def test_finished_run_dir_is_not_clobbered(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    r = run_cli(["launcher/search.py", "--config", "configs/search/smoke.yaml", "--run-dir", str(run)])
    assert r.returncode == 2 and "--resume" in r.stderr
    assert (run / "summary.json").read_text() == "{}"


def test_divergence_stops_with_step_and_checkpoint(tmp_path):
    run = tmp_path / "run"
    r = run_cli(["launcher/search.py", "--config", "configs/search/smoke.yaml", "--run-dir", str(run),
                 "--set", "optim.w.lr=1e30", "--set", "optim.w.grad_clip=0", "--set", "epochs=3",
                 "--set", "log.progress=false"])
    assert r.returncode == 3, r.stderr[-2000:]
    line = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "step" in line[0] and "last good checkpoint" in line[0], r.stderr[-1000:]
    assert "Traceback" not in r.stderr
