"""NAS-Bench-201 lookups: the six accuracies of a cell from the table of all 15,625 cells.

The table is a gzip CSV (`arch`, `cifar10_valid_val`, `cifar10_test`, `cifar100_val`, `cifar100_test`,
`imagenet16_val`, `imagenet16_test`, `nb201_index`, ...); its path is configured (`nb201_table`), never
bundled. Accuracies are percent after NB201's 200-epoch training; `cifar10_valid_val` is the search
signal (trained on 25k, evaluated on the other 25k of CIFAR-10 train), `cifar10_test` the reported score.
"""
from __future__ import annotations

import csv
import gzip
from functools import lru_cache
from pathlib import Path

from sdarts.errors import GenotypeError, TableError
from sdarts.genotype import NB201Genotype

COLUMNS = ("cifar10_valid_val", "cifar10_test", "cifar100_val", "cifar100_test", "imagenet16_val",
           "imagenet16_test")


@lru_cache(maxsize=4)
def load_table(path: str) -> dict[str, dict[str, float]]:
    p = Path(path)
    if not p.is_file():
        raise TableError(f"NB201 table not found: {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("arch",) + COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise TableError(f"{p}: not an NB201 accuracy table (missing column {missing[0]!r})")
            has_index = "nb201_index" in (reader.fieldnames or [])
            table = {row["arch"]: {**{c: float(row[c]) for c in COLUMNS},
                                   **({"nb201_index": int(row["nb201_index"])} if has_index else {})}
                     for row in reader}
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as e:
        raise TableError(f"{p}: unreadable NB201 table ({e})") from None
    if len(table) != 5 ** 6:
        raise TableError(f"{p}: expected 15625 cells, found {len(table)}")
    return table


def lookup(genotype: NB201Genotype, table_path: str) -> dict[str, float]:
    """The six NB201 accuracies (percent) of `genotype`."""
    if not isinstance(genotype, NB201Genotype):
        raise GenotypeError("NB201 lookup needs an NB201 genotype")
    row = load_table(str(table_path))[genotype.to_arch_str()]
    return {c: row[c] for c in COLUMNS}


def index_of(genotype: NB201Genotype, table_path: str) -> int | None:
    """The official NB201 architecture index (0..15624) when the table carries it."""
    return load_table(str(table_path))[genotype.to_arch_str()].get("nb201_index")


def best(column: str, table_path: str) -> tuple[str, float]:
    """The best cell of the benchmark by `column` (e.g. the optimum a search is compared with)."""
    if column not in COLUMNS:
        raise TableError(f"unknown NB201 column {column!r}; expected one of {', '.join(COLUMNS)}")
    table = load_table(str(table_path))
    arch = max(table, key=lambda a: table[a][column])
    return arch, table[arch][column]
