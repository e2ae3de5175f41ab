"""A validation split carved from the training data, for model selection without test data.

The retrain picks its checkpoint (`best.pt`) on images it never trained on and that are not the test set:
`per_class` images of every class, chosen by a permutation seeded by (seed, class), are removed from the
training split and evaluated like the test set. The same seed gives the same holdout on every machine
and every backend; the in-memory CIFAR split (by sample id) and the streaming ImageNet listing (by
position in its sorted listing) use the same rule. Plain numpy, no torch.
"""
from __future__ import annotations

import numpy as np

from sdarts.errors import DataError

#: mixed into the seed so the holdout does not share its draws with the data order or the weights
HOLDOUT_SALT = 7919


def auto_per_class(counts: np.ndarray, cap: int) -> int:
    """The default holdout: a tenth of the smallest class's training images, rounded, at most `cap` per
    class (CIFAR-10: 500 = 5k images; ImageNet: 10 = 10k images, a "minival"). 0 for a split too small
    to spare one image of its smallest class (fewer than 5)."""
    return min(cap, int(round(0.1 * int(counts.min()))))


def split_holdout(labels: np.ndarray, per_class: int, seed: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, holdout indices) into `labels`, both sorted: `per_class` of every class held out.

    A class with `per_class` or fewer images would keep none for training: one `DataError` naming
    `data.holdout`, the class and `where` (the split it was carved from)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    short = counts <= per_class
    if short.any():
        c = int(classes[short][0])
        raise DataError(f"data.holdout: {per_class} images per class would leave class {c} of {where} "
                        f"({int(counts[short][0])} images) nothing to train on; lower data.holdout or set it to 0")
    held = []
    for c in classes.tolist():
        members = np.flatnonzero(labels == c)
        order = np.random.default_rng([seed, HOLDOUT_SALT, c]).permutation(len(members))
        held.append(members[order[:per_class]])
    holdout = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    keep = np.ones(len(labels), bool)
    keep[holdout] = False
    return np.flatnonzero(keep), holdout
