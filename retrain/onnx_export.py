"""ONNX export of a found network: `model.onnx`, checked with onnxruntime against the eager model.

The eager model is the export's timm model (the retrain network without its auxiliary head) in eval
mode, drop-path off. It goes through `torch.onnx.export(dynamo=True)` (the torch.export-based exporter,
torch's default since 2.9; the TorchScript-based one is deprecated) at opset `OPSET`, with a dynamic
batch axis: input `input` [batch, 3, H, W] (H, W fixed at the export's input size), output `logits`
[batch, num_classes]. The graph is traced at batch `TRACE_BATCH` and checked at other batch sizes.

Before the file counts as written, onnxruntime (CPU) runs it on real images, preprocessed with the
export's data config, and its logits are compared with the eager model's: a max abs difference over
`ATOL` (fp32) fails the export with one line. The images are a folder given by the caller (the first
`MAX_IMAGES` JPEG/PNG files, sorted) or the two photographs scikit-learn ships (`china.jpg`,
`flower.jpg`); each image is used as it is and mirrored. The result of the check is stored in the
file's metadata (`metadata_props`, key `sdarts`) next to the architecture, genotype and data config.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdarts.errors import DataError, ExportError, first_line

__all__ = ["ATOL", "ONNX_FILE", "OPSET", "check_images", "require", "verify", "write_onnx"]

ONNX_FILE = "model.onnx"
#: the ONNX opset written: torchlib's native opset (no version conversion pass), read by onnxruntime
#: >= 1.14 and by ONNX Runtime Mobile
OPSET = 18
#: the largest max abs difference (fp32 logits) between onnxruntime and eager that an export accepts
ATOL = 1e-4
TRACE_BATCH = 2
MAX_IMAGES = 8
INSTALL_HINT = "pip install 'sdarts[onnx]'"
_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def require() -> None:
    """Imports the ONNX stack, or one ExportError line naming what is missing and the install command."""
    missing = []
    for name in _PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)} (not installed): {INSTALL_HINT}")


def _default_image_files() -> list[Path]:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return []
    return sorted((Path(spec.origin).parent / "datasets" / "images").glob("*.jpg"))


def _image_files(source: str | Path | None) -> list[Path]:
    if source is None:
        files = _default_image_files()
        if not files:
            raise ExportError("no images to check the ONNX file on (scikit-learn's sample photos are missing); "
                              "pass --check-images DIR")
        return files
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"--check-images {root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"--check-images {root}: no .jpg/.jpeg/.png files in it")
    return files[:MAX_IMAGES]


def _preprocess(path: Path, cfg: dict[str, Any]) -> np.ndarray:
    """timm's eval transform for the export's data config: the short side resized to
    floor(size / crop_pct) (bilinear), a centre crop of the input size, mean/std normalisation."""
    from PIL import Image
    _, h, w = cfg["input_size"]
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any unreadable image is the same user error
        raise DataError(f"{path}: not a readable image ({type(e).__name__})") from None
    scale = math.floor(max(h, w) / float(cfg.get("crop_pct") or 1.0))
    iw, ih = img.size
    f = scale / min(iw, ih)
    img = img.resize((max(w, round(iw * f)), max(h, round(ih * f))), Image.BILINEAR)
    left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
    arr = np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
    return arr.transpose(2, 0, 1)


def check_images(pretrained_cfg: dict[str, Any], source: str | Path | None = None) -> tuple[torch.Tensor, str]:
    """(images [N, 3, H, W] float32, where they came from): each file as it is and mirrored."""
    files = _image_files(source)
    arrays = [_preprocess(p, pretrained_cfg) for p in files]
    arrays += [a[:, :, ::-1] for a in arrays]
    where = str(source) if source is not None else "scikit-learn sample photos"
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays))), f"{where} ({len(files)} files, mirrored too)"



def _inference_mode(model: torch.nn.Module) -> torch.nn.Module:
    """eval(), and every drop-path probability at 0: the graph must hold no random op."""
    model.eval()
    for m in model.modules():
        for attr in ("drop_path_prob", "drop_prob"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress on stdout, its optimizer logs each rewrite at INFO and both warn
    about their internals: the command's output is one JSON line."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torch_export(model: torch.nn.Module, input_size: list[int], name: str):
    x = torch.zeros(TRACE_BATCH, *input_size)
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet():
            return torch.onnx.export(model, (x,), dynamo=True, opset_version=OPSET, input_names=["input"],
                                     output_names=["logits"], dynamic_shapes=({0: batch},), external_data=False,
                                     optimize=True, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter's many failure types: one line naming the network
        raise ExportError(f"torch.onnx.export (dynamo, opset {OPSET}) failed for {name}: {first_line(e, 200)}") from None


def verify(onnx_model: str | Path | bytes, model: torch.nn.Module, images: torch.Tensor,
           name: str | None = None) -> dict[str, Any]:
    """Runs `onnx_model` (a file, or the serialized model) with onnxruntime (CPU) on the whole batch and
    on its first image, compares with the eager model; returns the check's record, or raises one
    ExportError line past ATOL (`name`: what the messages call it, default the path)."""
    import onnxruntime as ort
    model = _inference_mode(model)
    path = name or (ONNX_FILE if isinstance(onnx_model, bytes) else str(onnx_model))
    try:
        source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
        sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: onnxruntime cannot load it: {first_line(e, 200)}") from None
    worst, scale, batches = 0.0, 0.0, []
    for x in (images, images[:1]):
        with torch.no_grad():
            ref = model(x).float().numpy()
        out = sess.run(["logits"], {"input": x.numpy()})[0]
        if out.shape != ref.shape or not np.isfinite(out).all():
            raise ExportError(f"{path}: onnxruntime gave logits of shape {out.shape} (finite: "
                              f"{bool(np.isfinite(out).all())}), eager {ref.shape}")
        worst = max(worst, float(np.abs(out - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        batches.append(int(x.shape[0]))
    if not worst <= ATOL:
        raise ExportError(f"ONNX check failed: onnxruntime and eager logits differ by up to {worst:.3g} "
                          f"(max |logit| {scale:.3g}) on {len(images)} images, over the {ATOL:g} allowed")
    return {"max_abs_diff": worst, "max_abs_logit": scale, "atol": ATOL, "batches": batches,
            "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider"}


def write_onnx(model: torch.nn.Module, path: str | Path, name: str, pretrained_cfg: dict[str, Any],
               metadata: dict[str, Any], images: str | Path | None = None) -> dict[str, Any]:
    """Exports `model` to `path`, checks it (`verify`) and stores the check in the file's metadata
    (`metadata` plus the check, as JSON under the key `sdarts`). Returns the check's record."""
    require()
    model = _inference_mode(model)
    x, where = check_images(pretrained_cfg, images)
    program = _torch_export(model, list(pretrained_cfg["input_size"]), name)
    check = verify(program.model_proto.SerializeToString(), model, x, name=str(path))  # checked before written
    record = {"file": Path(path).name, "opset": OPSET, "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
              "input": "input", "output": "logits", "dynamic_axes": {"input": [0], "logits": [0]},
              "trace_batch": TRACE_BATCH, **check, "images": where}
    program.model.metadata_props["sdarts"] = json.dumps({**metadata, "onnx_check": record})
    program.save(str(path), external_data=False)
    return record
