"""The candidate operations of each space, by name (the papers' names, in the papers' order).

Only names, so that genotypes can be parsed, derived and looked up without torch (`sdarts nb201`
answers from a CSV); the modules behind the names are in `sdarts.spaces.ops`.
"""
from __future__ import annotations

NB201_OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
DARTS_OPS: tuple[str, ...] = (
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
)
#: ops with no parameters: the ones a collapsing search drifts to.
PARAMETER_FREE: frozenset[str] = frozenset({"none", "skip_connect", "avg_pool_3x3", "max_pool_3x3"})
