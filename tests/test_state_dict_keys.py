"""State-dict keys and shapes of every supernet impl and retrained network stay those checkpoints have.

Search checkpoints, retrain checkpoints and exported timm weights are loaded by key, so a refactor of
the ops or cells (e.g. naming an op's layers, moving a cell to its own module) must not rename, add,
drop, reshape or reorder a single entry. Each case's digest is the sha256 of its state_dict's
"key:shape" lines in state_dict order, for small but complete models (every op of each space).

The expected digests were generated from the code before the ops got named layers and the DARTS/NB201
cells their own modules (commit 7e26e8c) by running this file as a script in a checkout of that commit:
    cp tests/test_state_dict_keys.py /tmp/ && cd <checkout of 7e26e8c> &&
    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python /tmp/test_state_dict_keys.py
(it prints one `case: digest` line per case, as in `EXPECTED`). Regenerate them only for a change that means to change
checkpoints, and say so.
"""
from __future__ import annotations

import hashlib
import sys

import pytest

#: case -> sha256 of its "key:shape" lines (see the module docstring for how they were generated)
EXPECTED = {
    'darts_classic_cifar': '2d8aad3a890c5e1277953960ba202ee1ae016eb1ad23f721f9df38825da2f1dc',
    'darts_classic_imagenet': '987fde9312f1a0ed7bdd240545b216c3c55e8ef2692b4c532150a6163bf50f8d',
    'darts_fused_cifar': 'b0aa7c6b5cf662555dd84baec76bca2e137fafa45660c498e8f586f8dcad2524',
    'darts_fused_imagenet': 'a9d9e95a957eadf8b09539a7c31845c76c5eb8e263f6fa45b138221c5bd9e304',
    'darts_grouped_cifar': '4edbe1f88159545dfea0f52324c03589764a498d105a48765a2fec0601c7953a',
    'darts_grouped_imagenet': '48c9d95876b511b33af5a9da612aae61b20f7230da9e49fa014917e779e0cbc4',
    'nb201_classic': '20c319486f84fdd8f460690c6ce903e460d9d79659c487804985af9f26f28313',
    'nb201_fused': '28d30871395ba4a85904157918350a60a7d53344d51c59d1c74af348cfdd3a48',
    'retrain_cifar10': 'bfe4bc68911d3c9ef79429ae998ffbf7eb9f118b473ce5ddee08cc5c73f059c5',
    'retrain_imagenet': '163342b09c274f34ebc00c575ef27684c7623db866a18cfce97f1a29837019c9',
    'retrain_nb201': 'fa5e6fb27fffdf0a14dcd3ae64496b09c872efd00df19ac872776e62ccbd0a5f',
}

DARTS_ALL_OPS = ["max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                 "dil_conv_3x3", "dil_conv_5x5", "sep_conv_3x3"]
NB201_ARCH = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|"


def build(case: str):
    """The model of one case (small sizes; the keys depend on the structure, the shapes on C)."""
    from retrain.model import build_network
    from sdarts.genotype import from_json
    from sdarts.spaces.darts import DartsSupernet
    from sdarts.spaces.nb201 import NB201Supernet
    kind, variant, *rest = case.split("_")
    if kind == "darts":
        return DartsSupernet(4, 5, 10, rest[0], impl=variant)
    if kind == "nb201":
        return NB201Supernet(4, 2, 10, impl=variant)
    if variant == "nb201":
        return build_network(from_json({"space": "nb201", "arch": NB201_ARCH}), "cifar10", 4, 2, 10)
    genotype = from_json({"space": "darts", "normal": [[o, k % 2] for k, o in enumerate(DARTS_ALL_OPS)],
                          "normal_concat": [2, 3, 4, 5], "reduce_concat": [2, 3, 4, 5],
                          "reduce": [[o, k % 2] for k, o in enumerate(reversed(DARTS_ALL_OPS))]})
    return build_network(genotype, variant, 8, 5, 10, auxiliary=True)


CASES = [f"darts_{impl}_{stem}" for impl in ("classic", "fused", "grouped") for stem in ("cifar", "imagenet")]
CASES += ["nb201_classic", "nb201_fused", "retrain_cifar10", "retrain_imagenet", "retrain_nb201"]


def digest(case: str) -> str:
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in build(case).state_dict().items())
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("case", CASES)
def test_state_dict_keys_and_shapes_unchanged(case):
    assert digest(case) == EXPECTED[case]


if __name__ == "__main__":
    sys.path.insert(0, ".")  # the tree this runs in (see the module docstring)
    for c in CASES:
        print(f"    {c!r}: {digest(c)!r},")
