"""CUDA graphs for the supernet's training forward and backward (`engine.cuda_graphs`).

Why: the NB201 supernet at the paper's batch of 64 is tiny work per kernel (32x32, 16-64 channels),
so on a GPU a step costs what Python, autograd and dispatching ~4400 ops cost (forward + backward,
`benchmarks/dispatch_count.py`), not what the kernels cost (an H200 ran it 8.4x faster recorded). A recorded graph replays the whole forward (and, through autograd, the whole backward) with one
launch each. The optimizer step, the loss and DeepSpeed's bookkeeping stay eager, so accumulation,
clipping, the all-reduce and checkpoints are unchanged.

What the recording fixes: the input shape and dtype (a batch of any other shape, or a call with extra
arguments such as the analysis' `weights=`, runs eagerly), the parameters' storage (optimizers update
them in place, as ours do) and training mode (in eval mode the module runs eagerly).
`torch.cuda.make_graphed_callables` runs warm-up passes that would move BatchNorm's running
statistics; they are put back, so the recorded run follows the same trajectory as the eager one.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger("sdarts")


class _Whole(nn.Module):
    """The supernet's own forward as a hook-free module: DeepSpeed hooks the supernet itself, and
    `make_graphed_callables` refuses a module with hooks. Parameters are the supernet's, in order."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._eager = type(net).forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._eager(self.net, x)


def install(module: nn.Module, sample: torch.Tensor, autocast_dtype: torch.dtype | None = None,
            warmup: int = 3) -> bool:
    """Records `module`'s training forward+backward for inputs shaped like `sample` and routes
    `module(x)` to the replay from now on. Returns False (module untouched, a warning logged) when
    recording fails, so a search runs on eagerly rather than stopping."""
    if sample.device.type != "cuda":
        raise ValueError(f"engine.cuda_graphs needs a CUDA device, the input is on {sample.device}")
    saved = [b.detach().clone() for b in module.buffers()]
    whole = _Whole(module)
    ctx = (torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False) if autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        with ctx:
            graphed = torch.cuda.make_graphed_callables(whole, (sample.detach(),), num_warmup_iters=warmup)
    except Exception as e:  # noqa: BLE001 - any capture failure: fall back to eager, say why
        log.warning("engine.cuda_graphs: recording failed (%s: %s); running eagerly",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return False
    finally:
        with torch.no_grad():
            for b, s in zip(module.buffers(), saved):
                b.copy_(s)
        for p in module.parameters():  # warm-up used autograd.grad, but be sure nothing leaks into .grad
            p.grad = None
    shape, dtype, eager = tuple(sample.shape), sample.dtype, type(module).forward

    def forward(x, *args, **kwargs):
        if module.training and not args and not kwargs and tuple(x.shape) == shape and x.dtype == dtype:
            return graphed(x)
        return eager(module, x, *args, **kwargs)

    module.forward = forward  # instance attribute: state_dict, hooks and parameters are unaffected
    return True
