"""Export a found architecture as a timm model folder: `DIR/config.json` + `DIR/model.safetensors`.

The folder is what `timm.create_model("local-dir:DIR", pretrained=True)` reads (after
`import retrain.timm`, which registers the architectures): `config.json` in timm's hub layout
(`architecture`, `num_classes`, `model_args` with the genotype as JSON, `pretrained_cfg` with the data
config the network was trained with) and the weights as safetensors (no pickle anywhere).

Two sources:
- a retrain run directory (`retrain/train.py`): `config.yaml` (size, dataset, resolution),
  `genotype.json`, and one checkpoint: the last DeepSpeed one (`checkpoints/latest` names the tag;
  weights under `module`, the EMA of the weights under the client key `ema` when `ema.decay` was on,
  preferred unless `ema=False`), a given tag, or `checkpoints/best.pt`. Checkpoints are read with
  `torch.load(weights_only=True)`: a file holding any pickled object other than tensors and plain
  containers is refused;
- a genotype alone (random initialisation from a seed), for sharing an architecture before training.

With `formats` containing "onnx", `write` also (or only) writes `DIR/model.onnx`: the same network
with the same weights, exported with torch's dynamo ONNX exporter and checked with onnxruntime against
the eager model on real images before the folder appears (`retrain/onnx_export.py`).

The state dict is cleaned (no auxiliary head: a training-time part; no `module.`/`_orig_mod.` prefixes;
fp32) and strictly loaded into the timm model before anything is written, so an export that is written
always loads. The folder appears whole or not at all (built beside it, then renamed).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdarts.config import build, read_yaml
from sdarts.data.constants import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from sdarts.errors import CheckpointError, ConfigError, ExportError, GenotypeError, first_line
from sdarts.genotype import DartsGenotype, Genotype, NB201Genotype
from sdarts.genotype import load as load_genotype

from retrain import onnx_export
from retrain import timm as sdarts_timm
from retrain.timm import WEIGHTS_FILE

__all__ = ["CONFIG_FILE", "FORMATS", "Export", "ExportError", "from_genotype", "from_run_dir", "load", "model_spec", "write"]

CONFIG_FILE = "config.json"
DS_MODEL_FILE = "mp_rank_00_model_states.pt"
#: prefixes a wrapped module adds to state-dict keys (DDP / DeepSpeed wrappers, torch.compile)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_TRAINING_ONLY_PREFIXES = ("auxiliary_head.",)
_DATASETS = ("imagenet", "cifar10")
#: what `write` can write: the timm folder and/or `model.onnx`
FORMATS = ("timm", "onnx")


@dataclass
class Export:
    """Everything an export folder holds, before it is written."""
    architecture: str
    model_args: dict[str, Any]
    pretrained_cfg: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)



def model_spec(genotype: Genotype, dataset: str = "imagenet", C: int | None = None, layers: int | None = None,
               num_classes: int | None = None, resolution: int | None = None
               ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(timm architecture, model_args, pretrained_cfg) for a genotype trained on `dataset`.

    NB201 genotypes give `sdarts_nb201` (`layers` = cells per stage); DARTS genotypes give
    `sdarts_darts_imagenet` for 'imagenet' and `sdarts_darts_cifar` for 'cifar10'. Sizes left out take the
    entrypoint's defaults (ImageNet: C 48, 14 layers; CIFAR: C 36, 20 layers; NB201: C 16, N 5)."""
    if dataset not in _DATASETS:
        raise ExportError(f"dataset must be one of {', '.join(_DATASETS)}, got {dataset!r}")
    if isinstance(genotype, NB201Genotype):
        arch, size = "sdarts_nb201", {"C": C or 16, "N": layers or 5}
    elif isinstance(genotype, DartsGenotype):
        arch = "sdarts_darts_imagenet" if dataset == "imagenet" else "sdarts_darts_cifar"
        default_C, default_layers = (48, 14) if dataset == "imagenet" else (36, 20)
        size = {"C": C or default_C, "layers": layers or default_layers}
    else:
        raise GenotypeError(f"not a genotype: {type(genotype).__name__}")
    if num_classes is None:
        num_classes = 1000 if dataset == "imagenet" else 10
    model_args = {"genotype": genotype.to_json(), **size, "num_classes": int(num_classes)}
    return arch, model_args, _data_cfg(arch, dataset, int(num_classes), resolution)


def _data_cfg(arch: str, dataset: str, num_classes: int, resolution: int | None) -> dict[str, Any]:
    """The pretrained_cfg of an export: how the retrain pipelines fed the network (`retrain/data.py`)."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(arch).to_dict(remove_source=True)
    for key in ("architecture", "tag", "custom_load"):
        cfg.pop(key, None)
    if dataset == "imagenet":
        r = resolution or 224
        # eval: resize the short side to r * 256/224, centre crop r, bilinear, ImageNet statistics
        cfg.update(input_size=(3, r, r), crop_pct=0.875, interpolation="bilinear",
                   mean=IMAGENET_MEAN, std=IMAGENET_STD)
    else:
        # CIFAR-10: 32x32 images used whole, normalised with CIFAR statistics
        cfg.update(input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear", mean=CIFAR_MEAN, std=CIFAR_STD)
    cfg["num_classes"] = num_classes
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def build_model(architecture: str, model_args: dict[str, Any]) -> torch.nn.Module:
    import timm
    return timm.create_model(architecture, **model_args)


def clean_state_dict(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Training checkpoint weights -> a timm state dict: no wrapper prefixes, no auxiliary head, fp32."""
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint weights: entry {key!r} is not a tensor")
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(_TRAINING_ONLY_PREFIXES):
            continue
        if value.is_floating_point():
            value = value.float()
        out[key] = value.detach().cpu().contiguous().clone()
    return out


def from_genotype(genotype: Any, dataset: str = "imagenet", C: int | None = None, layers: int | None = None,
                  num_classes: int | None = None, seed: int = 0) -> Export:
    """An untrained export (weights initialised from `seed`) of a genotype file, name or object."""
    if isinstance(genotype, (str, Path)):
        genotype = load_genotype(genotype)
    arch, model_args, cfg = model_spec(genotype, dataset, C, layers, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, model_args)
    return Export(arch, model_args, cfg, clean_state_dict(model.state_dict()),
                  {"weights": "random", "seed": seed})


def _load_checkpoint_file(path: Path) -> dict:
    """A checkpoint file read with weights_only=True; anything else is one CheckpointError line."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure to read is the same user error
        text = str(e)
        if not (head[:1] == b"\x80" or head == b"PK\x03\x04"):  # neither a pickle nor torch.save's zip
            raise CheckpointError(f"{path}: not a checkpoint (not a torch.save file)") from None
        if text.startswith("Weights only load failed"):
            # a pickle that needs more than tensors and plain containers: possibly code, never run
            body = re.sub(r"(?s)^.*WeightsUnpickler error:", "", text.split("\n", 1)[-1])
            lines = [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.startswith("Check the doc")]
            detail = lines[0][:120] if lines else "unsupported content"
            raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain containers "
                                  f"(read with weights_only=True: {detail})") from None
        raise CheckpointError(f"{path}: not a checkpoint ({first_line(e, 200)})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("module"), dict):
        raise CheckpointError(f"{path}: not a retrain checkpoint (no 'module' weights)")
    return obj


def _run_config(run: Path):
    from retrain.config import RetrainConfig
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError(f"{run}: no config.yaml (not a retrain run directory)")
    tree = read_yaml(cfg_path)
    if "strategy" in tree or "space" in tree:
        raise ExportError(f"{run} is a search run (its weights are the supernet's): export its cell with "
                          f"--genotype {run / 'genotype.json'}, or retrain it first")
    try:
        return build(RetrainConfig, tree, source=str(cfg_path))
    except ConfigError as e:
        raise ConfigError(f"{e} (is {run} a retrain run directory?)") from None


def from_run_dir(run_dir: str | Path, checkpoint: str = "last", ema: bool = True) -> Export:
    """An export of a retrain run: `checkpoint` is 'last' (the tag `checkpoints/latest` names), 'best'
    (`checkpoints/best.pt`) or a tag; with `ema`, the EMA weights when the checkpoint has them."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"run directory not found: {run}")
    cfg = _run_config(run)
    gpath = run / "genotype.json"
    if not gpath.is_file():
        raise ExportError(f"{run}: no genotype.json (not a retrain run directory)")
    genotype = load_genotype(gpath)
    ckpt_dir = run / "checkpoints"
    if checkpoint == "best":
        path = ckpt_dir / "best.pt"
        obj = _load_checkpoint_file(path)
        # best.pt: the selected epoch's weights, its metadata under "selected" (before the holdout: top level)
        meta = obj.get("selected", obj)
        source = str(meta.get("source", "model"))
        if source == "ema" and not ema:
            raise ExportError(f"{path} holds the EMA weights (ema.decay was on); use the last checkpoint "
                              f"without EMA for the raw weights")
        state, weights = obj["module"], source
        info = {k: meta[k] for k in ("epoch", "top1", "top5") if isinstance(meta.get(k), (int, float))}
        if isinstance(meta.get("eval"), dict):  # the selected epoch's eval-split accuracy
            info |= {k: meta["eval"][k] for k in ("top1", "top5") if isinstance(meta["eval"].get(k), (int, float))}
    else:
        tag = checkpoint
        if checkpoint == "last":
            latest = ckpt_dir / "latest"
            if not latest.is_file():
                raise CheckpointError(f"{latest}: missing (the run has not saved a checkpoint yet)")
            tag = latest.read_text().strip()
        if not tag or "/" in tag or tag.startswith("."):
            raise CheckpointError(f"{ckpt_dir}: bad checkpoint tag {tag!r}")
        path = ckpt_dir / tag / DS_MODEL_FILE
        obj = _load_checkpoint_file(path)
        if obj.get("kind", "retrain") != "retrain":
            raise CheckpointError(f"{path}: not a retrain checkpoint (kind {obj.get('kind')!r})")
        state, weights = dict(obj["module"]), "model"
        ema_state = obj.get("ema")
        if ema and isinstance(ema_state, dict) and isinstance(ema_state.get("state"), dict):
            # the EMA covers the floating-point state; integer buffers (BN batch counts) stay the model's
            missing = [k for k in ema_state["state"] if k not in state]
            if missing:
                raise CheckpointError(f"{path}: EMA entry {missing[0]!r} is not a weight of the network")
            state.update(ema_state["state"])
            weights = "ema"
        info = {k: obj[k] for k in ("epoch", "step") if isinstance(obj.get(k), int)}
    if obj.get("genotype") is not None and obj["genotype"] != genotype.to_json():
        raise CheckpointError(f"{path}: trained with another genotype than {gpath}")
    arch, model_args, pcfg = model_spec(genotype, cfg.data.dataset, cfg.model.C, cfg.model.layers,
                                        cfg.num_classes, cfg.data.resolution)
    # the run directory by name only: an export is meant to be shared, local paths are not
    provenance = {"weights": weights, "run": run.resolve().name, "checkpoint": str(path.relative_to(run)),
                  "dataset": cfg.data.dataset, **info}
    return Export(arch, model_args, pcfg, clean_state_dict(state), provenance)


def _verified_model(export: Export) -> torch.nn.Module:
    """The timm model with the export's weights loaded strictly (what `local-dir:` will rebuild)."""
    try:
        model = build_model(export.architecture, export.model_args)
    except (GenotypeError, ValueError, TypeError) as e:
        raise ExportError(f"cannot build {export.architecture}: {first_line(e, 200)}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in export.state_dict]
    unexpected = [k for k in export.state_dict if k not in expected]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(f"weights do not fit {export.architecture} built from the run's config and "
                              f"genotype ({len(missing)} missing, {len(unexpected)} unexpected; {what})")
    for k, v in expected.items():
        if v.shape != export.state_dict[k].shape:
            raise CheckpointError(f"weights do not fit {export.architecture}: {k!r} has shape "
                                  f"{tuple(export.state_dict[k].shape)}, the network {tuple(v.shape)}")
    model.load_state_dict(export.state_dict, strict=True)
    return model


def _json_text(obj: dict) -> str:
    """Indented JSON with innermost lists on one line (genotype pairs, sizes, mean/std stay readable)."""
    text = re.sub(r"\[\s+([^\[\]{}\"]*(?:\"[^\"\n]*\"[^\[\]{}\"]*)*)\s+\]",
                  lambda m: "[" + re.sub(r",\s+", ", ", m.group(1).strip()) + "]", json.dumps(obj, indent=2))
    if json.loads(text) != json.loads(json.dumps(obj)):  # the compaction must never change a value
        text = json.dumps(obj, indent=2)
    return text + "\n"


def write(export: Export, out_dir: str | Path, force: bool = False, formats: tuple[str, ...] = ("timm",),
          check_images: str | Path | None = None) -> Path:
    """Writes the export's `formats`, all or nothing: "timm" is `out_dir/config.json` +
    `out_dir/model.safetensors`, "onnx" is `out_dir/model.onnx`, checked with onnxruntime against the
    eager model on real images (`retrain.onnx_export`; `check_images` a folder, default scikit-learn's
    sample photos) and the check recorded in `export.provenance["onnx"]`.

    An existing non-empty `out_dir` is refused unless `force` (then it is replaced as a whole)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"export format must be one of {', '.join(FORMATS)}, got {bad[0] if bad else 'none'!r}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"output directory {out} is not empty; pass --force to replace it")
    if "onnx" in formats:
        onnx_export.require()  # before any work: a missing extra is one line, and nothing is written
    elif check_images is not None:
        raise ExportError("--check-images applies to --format onnx|both only")
    model = _verified_model(export)
    # the last map's size at the input size (stride-2 convs round up)
    reduction = model.feature_info[-1]["reduction"]
    export.pretrained_cfg["pool_size"] = [-(-s // reduction) for s in export.pretrained_cfg["input_size"][1:]]
    config = {
        "architecture": export.architecture,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": "avg",
        "model_args": export.model_args,
        "pretrained_cfg": export.pretrained_cfg,
        "sdarts": export.provenance,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if "onnx" in formats:
            meta = {k: config[k] for k in ("architecture", "num_classes", "model_args", "pretrained_cfg", "sdarts")}
            export.provenance["onnx"] = onnx_export.write_onnx(
                model, tmp / onnx_export.ONNX_FILE, export.architecture, export.pretrained_cfg, meta, check_images)
        if "timm" in formats:
            (tmp / CONFIG_FILE).write_text(_json_text(config))
            save_file(export.state_dict, str(tmp / WEIGHTS_FILE),
                      metadata={"format": "pt", "architecture": export.architecture,
                                "genotype": json.dumps(export.model_args["genotype"])})
        if out.is_dir() and any(out.iterdir()):
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # a missing or empty directory is replaced in one rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load(out_dir: str | Path, **kwargs) -> torch.nn.Module:
    """The exported model with its weights: `timm.create_model("local-dir:DIR", pretrained=True)`."""
    import timm
    assert sdarts_timm  # registration happens on import
    return timm.create_model(f"local-dir:{Path(out_dir)}", pretrained=True, **kwargs)
