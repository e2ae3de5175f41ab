"""Measurements behind the memory model: real training steps, and a count of activation bytes.

Two ways to know what one training step needs, both for one job config at one micro-batch:

- `measure(...)`: build the real thing (model, DeepSpeed engine, the search strategy or the retrain
  loss) on the local device, run a few steps on random inputs of the configured shape, and report the
  peak: `torch.cuda.max_memory_allocated()` on a GPU, the process's peak RSS (`ru_maxrss`) on a CPU.
  Run it in a fresh process per micro-batch (`python launcher/memory_probe.py ...`, which
  `memory.probe` does), so an earlier, larger peak cannot hide a smaller one.
- `count_saved_bytes(...)`: run one forward and add up the tensors autograd keeps for the backward
  (`torch.autograd.graph.saved_tensors_hooks`, each storage counted once, parameters excluded), at a
  precision: bf16/fp16 run under autocast as DeepSpeed's `torch_autocast` does. This is the documented
  model used to derive per-sample bytes for a GPU we cannot measure (see `memory.derive`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from launcher.job import Job, load as load_job  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _overrides(micro_batch: int, precision: str) -> list[str]:
    return [f"data.micro_batch={micro_batch}", f"precision={precision}", "engine.grad_accum=1"]


def build_network(job: Job, genotype: str | None = None) -> torch.nn.Module:
    """The job's network, in training mode, on the CPU (no engine)."""
    if job.kind == "search":
        from sdarts.spaces.build import build_supernet
        return build_supernet(job.cfg).train()
    from retrain.config import DEFAULT_GENOTYPE as DEFAULTS
    from retrain.model import build_network as build
    from sdarts import genotype as G
    c = job.cfg
    name = genotype or DEFAULTS[c.model.space]  # memory depends on the cell
    g = G.load(name)
    c.check_genotype(g, job.path, name)  # the recipe's space, as launcher/retrain.py would refuse it
    return build(g, c.data.dataset, c.model.C, c.model.layers, c.num_classes,
                 auxiliary=c.model.auxiliary, drop_path_prob=c.model.drop_path).train()


def _loss(job: Job, out, y: torch.Tensor) -> torch.Tensor:
    if isinstance(out, tuple):  # retrain networks return (logits, logits_aux)
        logits, aux = out
        loss = F.cross_entropy(logits.float(), y)
        if aux is not None:
            loss = loss + job.cfg.loss.auxiliary_weight * F.cross_entropy(aux.float(), y)
        return loss
    return F.cross_entropy(out.float(), y)


def input_resolution(job: Job) -> int:
    """Search configs name their resolution; retrain CIFAR runs at 32 (data.resolution is ImageNet's crop)."""
    if job.kind == "retrain" and job.cfg.data.dataset == "cifar10":
        return 32
    return job.cfg.data.resolution


def _input(job: Job, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    r = input_resolution(job)
    num_classes = job.cfg.model.num_classes if job.kind == "search" else job.cfg.num_classes
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, r, r, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return x, y


def count_saved_bytes(job: Job, batch: int, precision: str, genotype: str | None = None) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of `batch` samples (CPU)."""
    torch.manual_seed(0)
    model = build_network(job, genotype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = s.nbytes()
        return t

    x, y = _input(job, batch, "cpu")
    dtype = DTYPES[precision]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=precision != "fp32"):
            _loss(job, model(x), y)
    return sum(seen.values())


def parameter_count(job: Job, genotype: str | None = None) -> int:
    return sum(p.numel() for p in build_network(job, genotype).parameters())


# -- real steps ---------------------------------------------------------------------------------
def _search_stepper(job: Job, world: int, device):
    from sdarts.data import Batch
    from sdarts.engine import SearchEngine
    from sdarts.search.strategies import make_strategy
    from sdarts.spaces.build import build_supernet
    cfg = job.cfg
    engine = SearchEngine(cfg, build_supernet(cfg), world, device)
    engine.set_epoch_lr(0)
    strategy = make_strategy(cfg.strategy, engine, 1)
    mb = cfg.data.micro_batch

    def batches():
        i = 0
        while True:
            x, y = _input(job, mb, device)
            yield Batch(x, y, torch.arange(i, i + mb))
            i += mb

    it = batches()
    return lambda: strategy.step(it, it)


def _retrain_stepper(job: Job, world: int, device, genotype: str | None):
    import deepspeed
    from sdarts.engine import ds_config
    cfg = job.cfg
    model = build_network(job, genotype)
    w = cfg.optim.w
    opt = torch.optim.SGD(model.parameters(), lr=w.lr, momentum=w.momentum, weight_decay=w.weight_decay)
    conf = ds_config(cfg.data.micro_batch, 1, world, cfg.precision, cfg.engine.autocast, cfg.engine.zero_stage)
    conf["gradient_clipping"] = w.grad_clip
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=conf)

    def step():
        x, y = _input(job, cfg.data.micro_batch, device)
        loss = _loss(job, ds_engine(x), y)
        ds_engine.backward(loss)
        ds_engine.step()
    return step


def measure(config: str, micro_batch: int, precision: str, overrides: list[str] | None = None,
            steps: int = 3, genotype: str | None = None) -> dict:
    """Peak memory of `steps` real training steps at `micro_batch` (call in a fresh process)."""
    from sdarts.distributed import init
    job = load_job(config, list(overrides or []) + _overrides(micro_batch, precision))
    rank, _, world, device = init(job.cfg.engine.device)
    torch.manual_seed(job.cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = _search_stepper(job, world, device) if job.kind == "search" else \
        _retrain_stepper(job, world, device, genotype)
    t0 = time.time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        name = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        name = "cpu"
    return {"job": job.name, "micro_batch": micro_batch, "precision": precision, "peak_bytes": int(peak),
            "device": name, "device_kind": device.type, "steps": steps,
            "seconds_per_step": (time.time() - t0) / steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="memory_probe.py",
                                description="peak memory of real training steps at one micro-batch (JSON line)")
    p.add_argument("--job", required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--precision", required=True, choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--genotype", default=None, help="retrain jobs: genotype (default by model.space: darts_v2, or nb201_single_darts)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from launcher.common import fail_cleanly, setup_logging
    setup_logging()
    with fail_cleanly():
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        rec = measure(args.job, args.micro_batch, args.precision, args.overrides, args.steps, args.genotype)
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
