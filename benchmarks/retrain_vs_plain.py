"""Is the retrain the recipe? `retrain.train.run_retrain` (DeepSpeed) against a plain PyTorch loop of
the DARTS CIFAR recipe, side by side over seeds, on real CIFAR-10.

Both sides, per seed: the shipped config `configs/retrain/cifar10.yaml` (lr 0.025 at batch 128 scaled
to the batch, cosine per epoch, momentum 0.9, weight decay 3e-4, clip 5, aux 0.4, drop-path 0.3 ramp,
Cutout 16) at the network size and epochs given here; the same training images and augmentation
(both read `retrain.data.build_loaders`), the same initial weights (`torch.manual_seed(seed)` then
the network, as `run_retrain` does). The plain loop is DARTS' train.py: `torch.optim.SGD`,
`CosineAnnealingLR`, `clip_grad_norm_`, `F.cross_entropy + 0.4 * F.cross_entropy(aux)`. Both final
networks are evaluated by the same code on the same test images.

Prints one row per seed (final test top-1 of each, paired difference, wall times), mean +- std of
each side, the paired difference's mean, std, t statistic and 95% interval, then one JSON line.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python benchmarks/retrain_vs_plain.py --seeds 0,1,2,3,4,5 \
        --epochs 4 --train 2000 --test 2000 --C 8 --layers 5
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import ROOT, SHARED_DATA, machine  # noqa: E402  (puts the repo on sys.path)

from retrain.config import RetrainConfig, load  # noqa: E402
from retrain.data import EvalLoader, build_loaders  # noqa: E402
from retrain.model import NetworkCIFAR  # noqa: E402
from retrain.train import run_retrain  # noqa: E402
from sdarts.data.sources import cifar10_split  # noqa: E402
from sdarts.genotype import LITERATURE  # noqa: E402

GENOTYPE = LITERATURE["darts_v2"]


def config(args, seed: int, n_train_split: int) -> RetrainConfig:
    over = [f"seed={seed}", f"epochs={args.epochs}", f"model.C={args.C}", f"model.layers={args.layers}",
            f"data.root={args.root}", f"data.micro_batch={args.batch}", "data.max_per_split=0",
            f"data.fraction={min(1.0, args.train / n_train_split)}", "log.progress=false",
            "log.tensorboard=false", f"log.every_steps={10 ** 6}", "precision=fp32",
            "data.holdout=0"]  # both sides train on every image of the fraction
    return load(ROOT / "configs/retrain/cifar10.yaml", over)


def train_loader(cfg):
    """The training loader the retrain builds."""
    return build_loaders(cfg, 0, 1, torch.device("cpu")).train


@torch.no_grad()
def top1(net: torch.nn.Module, loader: EvalLoader) -> float:
    net.eval()
    correct = seen = 0
    for b in loader:
        logits, _ = net(b.x)
        real = b.ids >= 0
        correct += int(((logits.argmax(1) == b.y) & real).sum())
        seen += int(real.sum())
    return 100.0 * correct / seen


def plain(cfg: RetrainConfig) -> torch.nn.Module:
    """DARTS' train.py, in plain PyTorch."""
    torch.manual_seed(cfg.seed)
    train = train_loader(cfg)
    m, w = cfg.model, cfg.optim.w
    net = NetworkCIFAR(m.C, 10, m.layers, m.auxiliary, GENOTYPE)
    lr = w.lr * cfg.data.micro_batch / w.reference_batch
    opt = torch.optim.SGD(net.parameters(), lr, momentum=w.momentum, weight_decay=w.weight_decay,
                          nesterov=w.nesterov)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs, eta_min=w.lr_min)
    ls, aux_w = cfg.loss.label_smoothing, cfg.loss.auxiliary_weight
    for epoch in range(cfg.epochs):
        net.train()
        net.drop_path_prob = m.drop_path * epoch / cfg.epochs
        train.set_epoch(epoch)
        for b in train:
            logits, aux = net(b.x)
            loss = F.cross_entropy(logits, b.y, label_smoothing=ls)
            loss = loss + aux_w * F.cross_entropy(aux, b.y, label_smoothing=ls)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), w.grad_clip)
            opt.step()
        sched.step()
    return net


def retrain(cfg: RetrainConfig, run_dir: Path) -> tuple[torch.nn.Module, dict]:
    res = run_retrain(cfg, GENOTYPE, run_dir)
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    sd = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    m = cfg.model
    net = NetworkCIFAR(m.C, 10, m.layers, m.auxiliary, GENOTYPE)
    net.load_state_dict(sd)
    return net, res.summary


def own_top1(summary: dict) -> float | None:
    """The retrain's own last-epoch eval top-1 (summary 'final')."""
    return summary["final"]["top1"]


def t_crit_975(df: int) -> float:
    try:
        from scipy import stats
        return float(stats.t.ppf(0.975, df))
    except ImportError:
        return {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}.get(df, 2.0)


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train", type=int, default=2000, help="training images (class-balanced)")
    ap.add_argument("--test", type=int, default=2000, help="test images (class-balanced; 0 = the whole split)")
    ap.add_argument("--C", type=int, default=8)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64, help="micro-batch (lr scales from 0.025 at 128)")
    ap.add_argument("--root", default=str(SHARED_DATA / "cifar10-subset" / "cifar10_subset.npz"),
                    help="CIFAR-10 npz or WebDataset folder")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    seeds = [int(s) for s in args.seeds.split(",") if s]
    n_train_split = len(cifar10_split(args.root, "train"))
    test = cifar10_split(args.root, "test", 1.0, args.test)
    test_loader = EvalLoader(test, 500)
    rows = []
    print(f"# {machine('cpu', torch.get_num_threads())}; torch {torch.__version__}")
    print(f"# darts_v2, C={args.C}, layers={args.layers}, {args.epochs} epochs, batch {args.batch}, "
          f"train {min(args.train, n_train_split)} / test {len(test)} images of {args.root}")
    print(f"{'seed':>4} | {'retrain top1':>12} | {'plain top1':>10} | {'diff':>6} | {'retrain s':>9} | {'plain s':>7}")
    for seed in seeds:
        cfg = config(args, seed, n_train_split)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.time()
            net_r, summary = retrain(cfg, Path(d) / "run")
            t_r = time.time() - t0
        t0 = time.time()
        net_p = plain(cfg)
        t_p = time.time() - t0
        a, b = top1(net_r, test_loader), top1(net_p, test_loader)
        rows.append({"seed": seed, "retrain_top1": a, "plain_top1": b, "diff": a - b, "retrain_s": t_r,
                     "plain_s": t_p, "train_images": summary["steps"] * cfg.data.micro_batch // args.epochs,
                     "retrain_own_top1": own_top1(summary)})
        print(f"{seed:>4} | {a:>12.2f} | {b:>10.2f} | {a - b:>+6.2f} | {t_r:>9.0f} | {t_p:>7.0f}", flush=True)
    ra, pa, da = ([r[k] for r in rows] for k in ("retrain_top1", "plain_top1", "diff"))
    (mr, sr), (mp, sp), (md, sd) = mean_std(ra), mean_std(pa), mean_std(da)
    n = len(rows)
    se = sd / math.sqrt(n) if n > 1 else float("nan")
    t = md / se if n > 1 and se > 0 else float("nan")
    half = t_crit_975(n - 1) * se if n > 1 else float("nan")
    print(f"retrain: {mr:.2f} +- {sr:.2f} | plain: {mp:.2f} +- {sp:.2f} (mean +- std over {n} seeds)")
    tt = f"t = {t:.2f} (df {n - 1})" if t == t else "t undefined (no spread: the same top-1 on every seed)"
    print(f"paired diff (retrain - plain): {md:+.2f} +- {sd:.2f}, {tt}, 95% CI [{md - half:+.2f}, {md + half:+.2f}]")
    print(json.dumps({"bench": "retrain_vs_plain", "seeds": seeds, "epochs": args.epochs, "C": args.C,
                      "layers": args.layers, "batch": args.batch, "train": rows[0]["train_images"],
                      "test": len(test), "root": args.root, "rows": rows, "retrain_mean": mr, "retrain_std": sr,
                      "plain_mean": mp, "plain_std": sp, "diff_mean": md, "diff_std": sd, "t": t if t == t else None,
                      "ci95": [md - half, md + half] if half == half else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
