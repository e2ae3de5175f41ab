"""Size of a retrained network: parameters and FLOPs, counted the way the NAS papers count them.

- `params`: all parameters except the auxiliary head (it is dropped after training; DARTS'
  `count_parameters_in_MB` skips names containing "auxiliary").
- `flops`: multiply-accumulates of the conv and linear layers for one image, in eval mode (the
  auxiliary head does not run). This is what the reference implementations of DARTS, P-DARTS and
  PC-DARTS give for their networks: 530M / 543M / 582M at 14 layers, 48 channels, 224x224.
- `flops_thop`: the convention the P-DARTS and PC-DARTS papers printed (557M / 597M), which is what
  the early `thop` profiler counted: conv and linear MACs, plus 2 operations per BatchNorm output
  element (eval: scale and shift) and 1 per ReLU output element. It reproduces both papers exactly
  (557.1M, 597.1M). DARTS' printed 574M is not explained by it (544.0M here); DARTS' counter is
  unpublished, so that figure stays unexplained.

Counting runs the network once on one image on the CPU (measured faster than the `meta` device for
these many small ops), well under a second, which makes `fit_flops` (the largest channel count under a
FLOPs budget, the mobile-setting rule) a cheap bisection.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from sdarts.genotype import Genotype, NB201Genotype

from retrain.model import build_network

#: dataset -> (image size, classes, default layers, default channels) of the published settings
DATASETS: dict[str, tuple[int, int, int, int]] = {
    "imagenet": (224, 1000, 14, 48),   # mobile setting (DARTS, P-DARTS, PC-DARTS)
    "cifar10": (32, 10, 20, 36),       # DARTS CIFAR-10 evaluation network
}
NB201_DEFAULTS = (16, 5)  # C, cells per stage (the benchmark's network; configs/retrain/nb201_cifar10.yaml)


def count_params(model: nn.Module) -> int:
    """Parameters without the auxiliary head."""
    params = model.main_parameters() if hasattr(model, "main_parameters") else list(model.parameters())
    return int(sum(p.numel() for p in params))


def count_flops(model: nn.Module, resolution: int, batchnorm_relu: bool = False) -> int:
    """MACs of conv + linear layers for one `resolution`^2 image (eval mode; aux head off).

    With `batchnorm_relu`, adds 2 per BatchNorm output element and 1 per ReLU output element (the
    P-DARTS / PC-DARTS papers' counter)."""
    total = 0

    def hook(mod: nn.Module, inputs, out) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            total += out.numel() * (mod.in_channels // mod.groups) * k
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features
        elif batchnorm_relu and isinstance(mod, nn.BatchNorm2d):
            total += 2 * out.numel()
        elif batchnorm_relu and isinstance(mod, nn.ReLU):
            total += out.numel()

    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, resolution, resolution, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)


def _defaults(genotype: Genotype, dataset: str, layers: int | None, channels: int | None
              ) -> tuple[int, int, int, int]:
    if dataset not in DATASETS:
        raise ValueError(f"dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    res, classes, L, C = DATASETS[dataset]
    if isinstance(genotype, NB201Genotype):
        if dataset != "cifar10":
            raise ValueError("an NB201 genotype defines a CIFAR-sized network; use dataset cifar10")
        C, L = NB201_DEFAULTS
    layers = L if layers is None else layers
    channels = C if channels is None else channels
    if layers < (1 if isinstance(genotype, NB201Genotype) else 3):
        raise ValueError(f"layers must be at least 3 for a DARTS network, got {layers}")
    if channels < 2 or channels % 2:
        raise ValueError(f"channels must be an even number >= 2 (the stem halves it), got {channels}")
    return res, classes, layers, channels


def _network(genotype: Genotype, dataset: str, C: int, layers: int, classes: int,
             auxiliary: bool = False) -> nn.Module:
    with torch.device("cpu"):
        return build_network(genotype, dataset, C, layers, classes, auxiliary=auxiliary)


def summarize(genotype: Genotype, dataset: str = "imagenet", layers: int | None = None,
              channels: int | None = None) -> dict:
    """`{"params", "flops", "flops_thop", "params_aux", ...}` for the genotype's network."""
    res, classes, layers, channels = _defaults(genotype, dataset, layers, channels)
    model = _network(genotype, dataset, channels, layers, classes, auxiliary=True)
    total = int(sum(p.numel() for p in model.parameters()))
    params = count_params(model)
    return {"params": params, "flops": count_flops(model, res),
            "flops_thop": count_flops(model, res, batchnorm_relu=True),
            "params_aux": total - params, "dataset": dataset, "resolution": res, "num_classes": classes,
            "layers": layers, "channels": channels, "space": genotype.space}


def fit_flops(genotype: Genotype, budget: int, dataset: str = "imagenet", layers: int | None = None,
              max_channels: int = 1024) -> int:
    """The largest even channel count whose network stays within `budget` FLOPs (conv + linear MACs).

    FLOPs grow monotonically with the channel count, so a bisection over even counts finds it."""
    res, classes, layers, _ = _defaults(genotype, dataset, layers, None)

    def flops(c: int) -> int:
        return count_flops(_network(genotype, dataset, c, layers, classes), res)

    # grow an upper bound by doubling (never building a network far above the budget), then bisect;
    # counts are in units of 2 channels
    if flops(2) > budget:
        raise ValueError(f"FLOPs budget {budget} is below the smallest network ({flops(2)} at 2 channels)")
    lo, hi = 1, 2
    while flops(2 * hi) <= budget:
        if 2 * hi >= max_channels:
            raise ValueError(f"FLOPs budget {budget} allows {max_channels} channels or more")
        lo, hi = hi, min(2 * hi, max_channels // 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if flops(2 * mid) <= budget:
            lo = mid
        else:
            hi = mid
    return 2 * lo


_UNITS = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}


def parse_count(text: str) -> int:
    """'600M', '0.6G', '600000000' -> int; anything else is a ValueError naming the text."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"FLOPs budget {text!r}: expected a number with an optional K/M/G suffix, e.g. 600M")
    return int(round(float(m.group(1)) * _UNITS[m.group(2).upper()]))
