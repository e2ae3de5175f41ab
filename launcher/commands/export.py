"""`sdarts export --run-dir D --out DIR` | `sdarts export --genotype G --out DIR`: a timm model folder
and/or an ONNX file (`--format timm|onnx|both`, default timm).

timm: DIR gets `config.json` + `model.safetensors`; `import retrain.timm` then
`timm.create_model("local-dir:DIR", pretrained=True)` rebuilds the network with its weights.
onnx: DIR gets `model.onnx` (opset 18, dynamic batch), checked with onnxruntime against the eager model
on real images (`--check-images DIR`, default scikit-learn's sample photos) before anything is written.
Prints one JSON line (folder, architecture, weights source, parameter count, the ONNX check). Argument
parsing only: the work is in `retrain.export` and `retrain.onnx_export`.
"""
from __future__ import annotations

import argparse
import json

_RUN_ONLY = ("checkpoint", "no_ema")
_GENOTYPE_ONLY = ("dataset", "layers", "channels", "num_classes", "seed")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a found architecture (and its retrained weights) as a timm model folder",
        description="Writes OUT/config.json and OUT/model.safetensors; load them with `import retrain.timm; "
                    "timm.create_model('local-dir:OUT', pretrained=True)`.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="a retrain run directory (launcher/retrain.py)")
    src.add_argument("--genotype", help="genotype JSON file or literature name (e.g. darts_v2): random init")
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--format", choices=("timm", "onnx", "both"), default="timm",
                   help="timm: config.json + model.safetensors (default); onnx: model.onnx, checked with "
                        "onnxruntime (needs pip install 'sdarts[onnx]'); both: all three files")
    p.add_argument("--check-images", default=None, metavar="DIR",
                   help="with --format onnx|both: real images (the first 8 .jpg/.png files) to check the ONNX "
                        "file on; default scikit-learn's two sample photos")
    run = p.add_argument_group("with --run-dir")
    run.add_argument("--checkpoint", default=None,
                     help="'last' (default: the tag checkpoints/latest names), 'best' (checkpoints/best.pt) or a tag")
    run.add_argument("--no-ema", action="store_true", help="export the raw weights even when the run kept an EMA")
    gen = p.add_argument_group("with --genotype")
    gen.add_argument("--dataset", choices=("imagenet", "cifar10"), default=None,
                     help="network macro and data config for a DARTS genotype (default imagenet)")
    gen.add_argument("--layers", type=int, default=None,
                     help="DARTS: cells (default 14 imagenet, 20 cifar10); NB201: cells per stage (default 5)")
    gen.add_argument("--channels", type=int, default=None,
                     help="initial channels C (default 48 imagenet, 36 cifar10, 16 NB201)")
    gen.add_argument("--num-classes", type=int, default=None, help="default 1000 imagenet, 10 cifar10")
    gen.add_argument("--seed", type=int, default=None, help="weight initialisation seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from retrain.export import from_genotype, from_run_dir, write
    from sdarts.errors import ExportError
    if args.run_dir is not None:
        stray = [k for k in _GENOTYPE_ONLY if getattr(args, k) is not None]
        if stray:
            raise ExportError(f"--{stray[0].replace('_', '-')} applies to --genotype only; a run directory "
                              f"fixes the network")
        export = from_run_dir(args.run_dir, checkpoint=args.checkpoint or "last", ema=not args.no_ema)
    else:
        if args.checkpoint is not None or args.no_ema:
            raise ExportError("--checkpoint and --no-ema apply to --run-dir only")
        for key in ("layers", "channels", "num_classes"):
            value = getattr(args, key)
            if value is not None and value <= (1 if key == "num_classes" else 0):
                raise ExportError(f"--{key.replace('_', '-')} must be a positive count, got {value}")
        export = from_genotype(args.genotype, dataset=args.dataset or "imagenet", C=args.channels,
                               layers=args.layers, num_classes=args.num_classes, seed=args.seed or 0)
    formats = ("timm", "onnx") if args.format == "both" else (args.format,)
    out = write(export, args.out, force=args.force, formats=formats, check_images=args.check_images)
    params = sum(v.numel() for k, v in export.state_dict.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    print(json.dumps({"out": str(out), "formats": list(formats), "architecture": export.architecture,
                      "params": params, **export.provenance}))
    return 0
