"""`sdarts summary --genotype G.json|name --dataset imagenet|cifar10 [--layers L --channels C] [--fit-flops 600M]`

Prints one JSON object: `params` (without the auxiliary head), `flops` (conv + linear MACs for one
image, the reference implementations' count), `flops_thop` (the P-DARTS/PC-DARTS papers' count), and
the setting they were measured in. `--fit-flops B` first picks the largest channel count whose
network stays within B FLOPs (the mobile-setting rule) and reports that network.
"""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("summary", help="parameters and FLOPs of a genotype's retrain network",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genotype", required=True, help="genotype JSON file or a literature name (e.g. darts_v2)")
    p.add_argument("--dataset", choices=("imagenet", "cifar10"), default="imagenet",
                   help="imagenet: 224x224, 1000 classes (default 14 layers, 48 channels); "
                        "cifar10: 32x32, 10 classes (default 20 layers, 36 channels; an NB201 cell: "
                        "C 16, 5 cells per stage, the network of configs/retrain/nb201_cifar10.yaml)")
    p.add_argument("--layers", type=int, default=None, help="number of cells (NB201: cells per stage)")
    p.add_argument("--channels", type=int, default=None, help="initial channels C")
    p.add_argument("--fit-flops", default=None, metavar="BUDGET",
                   help="largest channel count within this FLOPs budget, e.g. 600M (conflicts with --channels)")


def run(args) -> int:
    from retrain.summary import fit_flops, parse_count, summarize
    from sdarts.genotype import load
    genotype = load(args.genotype)
    channels = args.channels
    extra = {}
    if args.fit_flops is not None:
        if channels is not None:
            raise ValueError("--fit-flops chooses the channel count; drop --channels")
        budget = parse_count(args.fit_flops)
        channels = fit_flops(genotype, budget, args.dataset, args.layers)
        extra = {"fit_flops_budget": budget}
    out = summarize(genotype, args.dataset, args.layers, channels) | extra
    print(json.dumps(out))
    return 0
