"""S searches in one module: S supernets of one configuration, stacked along a leading seed axis.

`seeds: [s1, s2, ...]` in a search config trains S independent searches (one per seed) in one process
and one set of kernels. `SeedStack` holds one copy of the supernet whose every parameter and buffer has
a leading axis of size S (seed k's tensors are `t[k]`), and maps the supernet's own forward over that
axis with `torch.func.vmap`. Under vmap:

- a convolution whose input and weight both carry the seed axis runs as one grouped convolution: the
  S supernets stacked along the channel axis, one group per seed (groups x S for depthwise convs);
- BatchNorm runs per channel on the stacked channels (its running statistics are the stacked buffers,
  updated in place), ReLU and pooling are unchanged, the classifier is one batched matmul;
- alpha's activation (softmax over an edge's ops, or sigmoid) is per seed: alpha is [S, edges, ops].

Parameters are disjoint per seed, so the gradient of the summed loss with respect to seed k's slice is
seed k's own gradient; what couples parameters in the update (gradient clipping, the finite-difference
step of the second-order strategy) is made per seed in `sdarts.engine` / `sdarts.search.strategies`.
`num_batches_tracked` stays outside the map: every seed takes the same steps, so one add per counter
(the supernet's own deferred count, or BN's) steps all S of them.

`seed_net(k)` copies seed k's state into a lone supernet (for the genotype, the alpha record and the
analysis hook, which then run exactly as in a lone search).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.func import functional_call, vmap

from sdarts.spaces.functional import batch_norm
from sdarts.spaces.supernet import Supernet

#: buffers every seed steps alike; left out of the vmap (see the module docstring)
_SHARED = "num_batches_tracked"


class SeedStack(nn.Module):
    def __init__(self, nets: list[Supernet]):
        super().__init__()
        if not nets:
            raise ValueError("SeedStack needs at least one supernet")
        self.size = len(nets)
        net = copy.deepcopy(nets[0])  # the skeleton; its tensors are replaced by the stacked ones
        params = [dict(m.named_parameters()) for m in nets]
        buffers = [dict(m.named_buffers()) for m in nets]
        for name in params[0]:
            _set(net, name, nn.Parameter(_stacked([p[name].detach() for p in params])), parameter=True)
        for name in buffers[0]:
            _set(net, name, _stacked([b[name] for b in buffers]), parameter=False)
        net.channels_last = False  # memory formats cannot be asked for inside vmap
        for m in net.modules():  # BNs called as modules fold the seeds too (`_StackedBatchNorm`)
            if type(m) is nn.BatchNorm2d:
                m.__class__ = _StackedBatchNorm
        self.net = net
        # a lone supernet that `seed_net` fills: a plain attribute, not a submodule (not in state_dict)
        object.__setattr__(self, "_lone", copy.deepcopy(nets[0]))
        object.__setattr__(self, "_mapped_cache", None)
        self.space, self.op_names, self.edge_names = net.space, net.op_names, net.edge_names

    # -- what the engine and the strategies use, as on a lone supernet ------------------------------
    @property
    def arch(self):
        return self.net.arch

    def get_alphas(self) -> list[nn.Parameter]:
        return self.net.get_alphas()

    def get_weights(self) -> list[nn.Parameter]:
        return self.net.get_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [S, B, ...] (seed k's batch is x[k]) -> logits [S, B, classes]."""
        if x.shape[0] != self.size:
            raise ValueError(f"SeedStack of {self.size} seeds got a batch for {x.shape[0]}")
        return vmap(self._one, in_dims=(0, 0), randomness="error")(self._mapped(), x)

    def _one(self, mapped: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, mapped, (x,), strict=False)

    def _mapped(self) -> dict[str, torch.Tensor]:
        """The tensors the vmap maps over, by name; collected once (not a module walk per step) and
        again after `_apply`, which may replace buffers."""
        if self._mapped_cache is None:
            mapped = dict(self.net.named_parameters())
            mapped.update({n: t for n, t in self.net.named_buffers() if not n.endswith(_SHARED)})
            object.__setattr__(self, "_mapped_cache", mapped)
        return self._mapped_cache

    def _apply(self, fn, recurse=True):
        """`.to()`, `.double()`, `.cuda()`: the lone copy follows the stack's device and dtype."""
        super()._apply(fn, recurse)
        self._lone._apply(fn, recurse)
        object.__setattr__(self, "_mapped_cache", None)
        return self

    # -- one seed as a lone supernet ---------------------------------------------------------------
    @torch.no_grad()
    def seed_net(self, k: int, weights: bool = True) -> Supernet:
        """A lone supernet holding seed k's current state (a copy: changes to it are not written back);
        `weights=False` copies alpha only (enough for the genotype and the alpha record). Its mode
        follows this module's."""
        lone = self._lone
        if not weights:
            for dst, src in zip(lone.get_alphas(), self.get_alphas()):
                dst.copy_(src[k])
            return lone.train(self.training)
        for (_, dst), (_, src) in zip(lone.named_parameters(), self.net.named_parameters()):
            dst.copy_(src[k])
        for (_, dst), (_, src) in zip(lone.named_buffers(), self.net.named_buffers()):
            dst.copy_(src[k])
        return lone.train(self.training)

    def genotype(self, k: int):
        return self.seed_net(k, weights=False).genotype()


class _StackedBatchNorm(nn.BatchNorm2d):
    """A `BatchNorm2d` module of the stacked supernet: its forward goes through `functional.batch_norm`,
    which folds the seeds into the channels (`seed_batch_norm`), as the cells' own BN calls do; vmap's
    rule for a module's BN would add a weight multiply, a bias add and their gradients per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_norm(x, self)


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The seeds' tensors stacked along a new dim 0, in plain row-major strides. `contiguous()` alone
    keeps a channels_last 1x1 conv weight's strides (its size-1 dims make it count as contiguous both
    ways), and a convolution with such a weight returns channels_last even from NCHW activations: the
    stack's NCHW layout then breaks, and BN and the seed ops copy to mend it (DARTS fused: 7185 -> 6957
    kernels per step of 4 seeds, benchmarks/seed_batch.py)."""
    return torch.stack(tensors).clone(memory_format=torch.contiguous_format)


def _set(module: nn.Module, dotted: str, value: torch.Tensor, parameter: bool) -> None:
    *path, leaf = dotted.split(".")
    owner = module
    for p in path:
        owner = getattr(owner, p)
    if parameter:
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value
