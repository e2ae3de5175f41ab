"""`sdarts nb201 --genotype G.json --table PATH`: the six NAS-Bench-201 accuracies of a found cell, as JSON.

`--genotype` takes a genotype file (JSON or NB201 arch string), a literature name (`nb201_single_darts`)
or the arch string itself (`'|nor_conv_3x3~0|+...'`).
"""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("nb201", help="NAS-Bench-201 accuracies of an NB201 genotype (JSON on stdout)",
                              description=__doc__)
    p.add_argument("--genotype", required=True, help="genotype file, literature name, or NB201 arch string")
    p.add_argument("--table", required=True, help="nb201_accuracies.csv.gz (all 15,625 cells)")


def run(args) -> int:
    from sdarts import genotype as G
    from sdarts.errors import GenotypeError
    from sdarts.nasbench201.table import index_of, lookup
    text = str(args.genotype)
    if text.strip().startswith("|") and not Path(text).exists():
        genotype = G.parse(text)
    else:
        genotype = G.load(text)
    if genotype.space != "nb201":
        raise GenotypeError(f"{args.genotype}: a {genotype.space} genotype has no NAS-Bench-201 entry "
                            f"(needs an nb201 genotype)")
    out = {"arch": genotype.to_arch_str(), **lookup(genotype, args.table)}
    idx = index_of(genotype, args.table)
    if idx is not None:
        out["nb201_index"] = idx
    print(json.dumps(out))
    return 0
