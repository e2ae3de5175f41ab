"""`build_supernet(cfg)`: the supernet (with its alpha) for `cfg.space` and `cfg.model.impl`; with
`cfg.seeds`, the `SeedStack` of one such supernet per seed, each initialised as its lone search's."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing a submodule (candidates: op names only) must not import torch
    import torch

    from sdarts.config import SearchConfig


def build_supernet(cfg: SearchConfig) -> torch.nn.Module:
    if cfg.seeds is not None:
        import torch

        from sdarts.spaces.seedstack import SeedStack
        nets = []
        for s in cfg.seeds:
            torch.manual_seed(s)  # what `Run.prepare` does before a lone search builds its supernet
            nets.append(_build_one(cfg.lone(s)))
        return SeedStack(nets)
    return _build_one(cfg)


def _build_one(cfg: SearchConfig) -> torch.nn.Module:
    import torch
    # alpha noise from its own generator so it does not depend on how many weights were initialised
    g = torch.Generator().manual_seed(cfg.seed + 1)
    a = dict(activation=cfg.arch.activation, init=cfg.arch.init, init_std=cfg.arch.init_std, generator=g)
    m = cfg.model
    channels_last = m.channels_last if m.channels_last is not None else m.impl != "classic"
    a.update(channels_last=channels_last, checkpoint_cells=m.checkpoint_cells)
    if cfg.space == "nb201":
        from sdarts.spaces.nb201 import NB201Supernet
        return NB201Supernet(m.C, m.cells_per_stage, m.num_classes, impl=m.impl, **a)
    from sdarts.spaces.darts import DartsSupernet
    return DartsSupernet(m.C, m.layers, m.num_classes, stem=m.stem, impl=m.impl, **a)
