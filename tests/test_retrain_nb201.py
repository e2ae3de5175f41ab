"""NB201 cells retrain in NAS-Bench-201's own setting (`configs/retrain/nb201_cifar10.yaml`), and a
recipe refuses a cell of the other space (`model.space`) instead of reinterpreting it."""
import json
import math

import pytest

from conftest import ROOT, need_data, run_cli
from retrain.config import RetrainConfig, check_genotype, load
from retrain.model import NB201Network, build_network
from retrain.recipe import lr_at
from retrain.summary import count_flops, count_params, summarize
from sdarts.config import build
from sdarts.errors import ConfigError
from sdarts.genotype import LITERATURE, parse, save as save_genotype

NB201_YAML = ROOT / "configs/retrain/nb201_cifar10.yaml"
DARTS_CIFAR = "configs/retrain/cifar10.yaml"
ALL_3X3 = parse("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|")
NB201_CELL, DARTS_CELL = LITERATURE["nb201_single_darts"], LITERATURE["darts_v2"]


def test_the_recipe_is_the_benchmarks_200_epoch_recipe():
    """The values of AutoDL-Projects configs/nas-benchmark/CIFAR.config (= hyper-opts/200E.config),
    exps/NAS-Bench-201/functions.py and the train scripts (C 16, N 5); cited in the YAML."""
    cfg = load(NB201_YAML)
    m, w, d = cfg.model, cfg.optim.w, cfg.data
    assert (m.space, m.C, m.layers, m.auxiliary, m.drop_path) == ("nb201", 16, 5, False, 0.0)
    assert cfg.epochs == 200 and cfg.precision == "fp32" and cfg.seed == 777
    assert (w.lr, w.reference_batch, w.lr_min, w.schedule, w.warmup_epochs) == (0.1, 256, 0.0, "cosine", 0)
    assert (w.momentum, w.nesterov, w.weight_decay, w.grad_clip) == (0.9, True, 0.0005, 0.0)
    assert cfg.loss.label_smoothing == 0.0 and cfg.ema.decay == 0.0
    assert (d.dataset, d.micro_batch, d.cutout, d.fraction, d.max_per_split) == ("cifar10", 256, 0, 1.0, 0)
    assert d.holdout == 0  # NB201 trains on all 50k training images
    assert cfg.global_batch(1) == 256 and cfg.base_lr(1) == 0.1
    # NB201's CosineAnnealingLR(T_max=200, eta_min=0), stepped per epoch
    assert [lr_at(e, cfg.epochs, cfg.base_lr(1), w.schedule, w.warmup_epochs, w.lr_min) for e in (0, 100, 199)] \
        == pytest.approx([0.1, 0.05, 0.05 * (1 + math.cos(math.pi * 199 / 200))])
    for name in ("cifar10", "imagenet"):
        assert load(ROOT / f"configs/retrain/{name}.yaml").model.space == "darts"
    assert RetrainConfig().model.space == "darts"  # a recipe that does not say is a DARTS-space one


def test_the_recipe_builds_the_benchmarks_network():
    cfg = load(NB201_YAML)
    net = build_network(ALL_3X3, cfg.data.dataset, cfg.model.C, cfg.model.layers, cfg.num_classes,
                        cfg.model.auxiliary, cfg.model.drop_path)
    assert isinstance(net, NB201Network) and len(net.cells) == 3 * 5 + 2  # 3 stages x N=5, 2 reduction blocks
    # NB201's largest CIFAR-10 network (the all-3x3 cell): 1.531546 MB params, 220.11969 M FLOPs
    assert count_params(net) == 1_531_546
    assert round(count_flops(net, 32) / 1e6, 2) == 220.12
    # `sdarts summary --dataset cifar10` reports this same network for an NB201 cell
    assert summarize(ALL_3X3, "cifar10")["params"] == 1_531_546
    # what the README's old command built: cifar10.yaml's C=36, layers=14 as NB201's C and N
    assert count_params(build_network(ALL_3X3, "cifar10", 36, 14, 10)) > 9 * 1_531_546


def test_a_few_real_cifar_steps_through_run_retrain(tmp_path):
    npz = need_data("cifar10-subset", "cifar10_subset.npz")
    from retrain.train import run_retrain
    cfg = load(NB201_YAML, [f"data.root={npz}", "epochs=2", "data.micro_batch=16", "data.max_per_split=40",
                            "log.progress=false", "log.tensorboard=false", "log.every_steps=1"])
    run = tmp_path / "run"
    result = run_retrain(cfg, ALL_3X3, run)
    s = result.summary
    assert result.finished and s["steps"] == 4 and s["network"] == "NB201Network" and s["params"] == 1_531_546
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["images"] for r in recs if r.get("split") == "eval"] == [40, 40]  # every test image, each epoch
    train = [r for r in recs if r.get("split") == "train"]
    assert len(train) == 4 and all(r["drop_path"] == 0.0 for r in train)
    # lr 0.1 for 256, scaled to the global batch of 16; cosine over the 2 epochs
    assert [r["lr_w"] for r in train] == pytest.approx([0.1 * 16 / 256] * 2 + [0.1 * 16 / 256 / 2] * 2)
    assert json.loads((run / "ds_config.json").read_text())["gradient_clipping"] == 0.0
    assert load(run / "config.yaml").model.space == "nb201"


def _refusal(r, right: str) -> str:
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and r.stderr.strip().endswith(errors[0]), r.stderr[-2000:]
    assert f"use {right}" in errors[0], errors
    return errors[0]


def test_the_cli_refuses_a_cell_of_the_other_space_both_ways(tmp_path):
    nb201 = tmp_path / "nb201" / "genotype.json"  # what `launcher/search.py --run-dir runs/nb201` leaves
    nb201.parent.mkdir()
    save_genotype(NB201_CELL, nb201)
    r = run_cli(["launcher/retrain.py", "--config", DARTS_CIFAR, "--genotype", str(nb201),
                 "--run-dir", str(tmp_path / "a")])
    line = _refusal(r, "configs/retrain/nb201_cifar10.yaml")
    assert str(nb201) in line and "NB201 cell" in line and DARTS_CIFAR in line and "model.space darts" in line
    r = run_cli(["launcher/retrain.py", "--config", "configs/retrain/nb201_cifar10.yaml", "--genotype", "darts_v2",
                 "--run-dir", str(tmp_path / "b")])
    line = _refusal(r, DARTS_CIFAR)
    assert "darts_v2 is a DARTS cell" in line and "model.space nb201" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_library_callers_are_refused_too(tmp_path):
    from retrain.train import run_retrain
    with pytest.raises(ConfigError, match="use configs/retrain/nb201_cifar10.yaml"):
        run_retrain(load(ROOT / DARTS_CIFAR), NB201_CELL, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"imagenet.yaml is a DARTS-space recipe.*cifar10 only"):
        check_genotype(load(ROOT / "configs/retrain/imagenet.yaml"), NB201_CELL, "configs/retrain/imagenet.yaml")
    check_genotype(load(NB201_YAML), NB201_CELL)  # the right pair passes
    check_genotype(load(ROOT / DARTS_CIFAR), DARTS_CELL)


@pytest.mark.parametrize("override, key", [("model.auxiliary=true", "model.auxiliary"),
                                           ("model.drop_path=0.2", "model.drop_path"),
                                           ("data.dataset=imagenet", "data.dataset")])
def test_an_nb201_recipe_refuses_what_the_network_has_not(override, key):
    cfg = build(RetrainConfig, {"model": {"space": "nb201", "C": 16, "layers": 5, "auxiliary": False}},
                [override])
    with pytest.raises(ConfigError, match=key):
        check_genotype(cfg, NB201_CELL, "x.yaml")


def test_build_network_refuses_an_nb201_cell_on_imagenet():
    with pytest.raises(ConfigError, match="nb201_cifar10.yaml"):
        build_network(NB201_CELL, "imagenet", 16, 5, 1000)


def test_planner_and_memory_probe_use_the_recipes_space():
    from launcher import memory_probe, plan
    from launcher.job import load as load_job
    job = load_job(NB201_YAML)
    assert isinstance(memory_probe.build_network(job), NB201Network)  # default cell follows model.space
    with pytest.raises(ConfigError, match="use configs/retrain/cifar10.yaml"):
        memory_probe.build_network(job, "darts_v2")
    with pytest.raises(ConfigError, match="use configs/retrain/nb201_cifar10.yaml"):
        plan._check_genotype(load_job(ROOT / DARTS_CIFAR), "nb201_single_darts")
    plan._check_genotype(job, "runs/not-searched-yet/genotype.json")  # a file to come is not read
