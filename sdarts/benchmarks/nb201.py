"""NAS-Bench-201 lookups: the six accuracies of a cell from the table of all 15,625 cells.

The table is a gzip CSV (`arch`, `cifar10_valid_val`, `cifar10_test`, `cifar100_val`, `cifar100_test`,
`imagenet16_val`, `imagenet16_test`, ...); its path is configured (`nb201_table`), never bundled.
"""
from __future__ import annotations

import csv
import gzip
from functools import lru_cache
from pathlib import Path

from sdarts.genotype import GenotypeError, NB201Genotype

COLUMNS = ("cifar10_valid_val", "cifar10_test", "cifar100_val", "cifar100_test", "imagenet16_val",
           "imagenet16_test")


class TableError(ValueError):
    pass


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
            table = {row["arch"]: {c: float(row[c]) for c in COLUMNS} for row in reader}
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as e:
        raise TableError(f"{p}: unreadable NB201 table ({e})") from None
    if len(table) != 5 ** 6:
        raise TableError(f"{p}: expected 15625 cells, found {len(table)}")
    return table


def lookup(genotype: NB201Genotype, table_path: str) -> dict[str, float]:
    """The six NB201 accuracies (percent) of `genotype`."""
    if not isinstance(genotype, NB201Genotype):
        raise GenotypeError("NB201 lookup needs an NB201 genotype")
    return dict(load_table(str(table_path))[genotype.to_arch_str()])
