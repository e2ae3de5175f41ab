"""The retrain recipe: lr formula, label smoothing, EMA, accuracy counts, configs."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from retrain.config import RetrainConfig, load
from sdarts.errors import ConfigError
from retrain.recipe import Ema, drop_path_at, lr_at, smoothed_cross_entropy, topk_correct
from sdarts.config import build


def test_label_smoothing_equals_the_textbook_formula_on_a_hand_case():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    eps, K = 0.1, 3
    z = math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)
    logp = [2.0 - math.log(z), 0.0 - math.log(z), -1.0 - math.log(z)]
    q = [1 - eps + eps / K, eps / K, eps / K]  # target class 0
    hand = -sum(qi * lpi for qi, lpi in zip(q, logp))
    got = smoothed_cross_entropy(logits, torch.tensor([0]), eps)
    assert got.item() == pytest.approx(hand, rel=1e-6)
    # and it is torch's own label smoothing, batch-averaged
    x, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert torch.allclose(smoothed_cross_entropy(x, y, eps), F.cross_entropy(x, y, label_smoothing=eps))
    assert torch.allclose(smoothed_cross_entropy(x, y, 0.0), F.cross_entropy(x, y))


def test_imagenet_lr_warmup_then_linear_decay_exactly():
    cfg = load(ROOT / "configs/retrain/imagenet.yaml")
    w, E = cfg.optim.w, cfg.epochs
    assert (E, w.warmup_epochs, w.schedule, w.lr, w.reference_batch) == (250, 5, "linear", 0.5, 1024)
    base = cfg.base_lr(world=8)  # 8 x 128 = 1024: the reference batch
    assert base == 0.5

    def lr(e):
        return lr_at(e, E, base, w.schedule, w.warmup_epochs, w.lr_min)
    assert [lr(e) for e in range(5)] == [0.5 * (e + 1) / 5 for e in range(5)]
    assert lr(4) == 0.5 and lr(5) == 0.5
    for e in (6, 100, 127, 249):
        assert lr(e) == 0.5 * (1 - (e - 5) / 245)
    assert lr(127) == pytest.approx(0.5 * 123 / 245) and lr(249) == pytest.approx(0.5 / 245)
    cos = lr_at(127, E, base, "cosine", 5)
    assert cos == 0.5 * (1 + math.cos(math.pi * 122 / 245)) / 2


def test_cifar_lr_cosine_to_zero_and_drop_path_ramp():
    cfg = load(ROOT / "configs/retrain/cifar10.yaml")
    w, E = cfg.optim.w, cfg.epochs
    assert (E, cfg.model.C, cfg.model.layers, cfg.data.cutout, cfg.model.drop_path) == (600, 36, 14, 16, 0.3)
    base = cfg.base_lr(world=1)
    assert base == 0.025
    for e in (0, 150, 300, 599):
        assert lr_at(e, E, base, w.schedule, w.warmup_epochs, w.lr_min) == 0.025 * (1 + math.cos(math.pi * e / 600)) / 2
    assert lr_at(300, E, base, "cosine") == pytest.approx(0.0125)
    assert drop_path_at(0, E, 0.3) == 0.0 and drop_path_at(300, E, 0.3) == 0.15


def test_lr_scales_linearly_with_the_global_batch():
    cfg = build(RetrainConfig, {"optim": {"w": {"lr": 0.5, "reference_batch": 1024}},
                                "data": {"micro_batch": 96}, "engine": {"grad_accum": 2}})
    assert cfg.global_batch(4) == 768 and cfg.base_lr(4) == 0.375  # the paper's 2080 Ti setting
    assert build(RetrainConfig, {"optim": {"w": {"lr": 0.1}}}).base_lr(64) == 0.1  # no reference: as is


def test_ema_update_formula():
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = Ema(m, 0.9)
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update(m)
    assert torch.allclose(ema.state["weight"], torch.full((1, 2), 0.9 * 1.0 + 0.1 * 3.0))
    other = torch.nn.Linear(2, 1)
    ema.copy_to(other)
    assert torch.allclose(other.weight, torch.full((1, 2), 1.2))


def test_topk_counts_skip_padding():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    y = torch.tensor([0, 0, 0])
    c1, c5 = topk_correct(logits, y, valid=torch.tensor([True, True, False]))
    assert (int(c1), int(c5)) == (1, 1)
    c1, c5 = topk_correct(logits, torch.tensor([1, 1, 1]))
    assert (int(c1), int(c5)) == (0, 3)


def test_config_errors_are_one_line_naming_the_key():
    with pytest.raises(ConfigError, match="unknown key 'optim.w.lrr'"):
        load(ROOT / "configs/retrain/cifar10.yaml", ["optim.w.lrr=0.1"])
    with pytest.raises(ConfigError, match="zero_stage 0"):
        load(ROOT / "configs/retrain/cifar10.yaml", ["precision=fp16", "engine.zero_stage=1"])
    with pytest.raises(ConfigError, match="engine.autocast"):
        load(ROOT / "configs/retrain/cifar10.yaml", ["precision=bf16", "engine.autocast=false"])
    with pytest.raises(ConfigError, match="schedule"):
        load(ROOT / "configs/retrain/cifar10.yaml", ["optim.w.schedule=step"])
