"""A job: a search or retrain config file, recognised by which typed config validates it.

The planner, the memory probe and the SLURM renderer all need the same three facts about a config
file: what kind of job it is (which entry script runs it), its name in the calibration table
(`search/darts_imagenet`, `retrain/imagenet`), and the memory-relevant part of its settings (to
refuse a calibration measured for another network).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from sdarts.config import SearchConfig, build, read_yaml
from sdarts.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
Kind = Literal["search", "retrain"]
SCRIPTS = {"search": "launcher/search.py", "retrain": "launcher/retrain.py"}

#: settings that change the memory of a training step (besides micro-batch and precision)
_SHAPE_KEYS = {
    "search": ("space", "strategy", "model.C", "model.cells_per_stage", "model.layers", "model.stem",
               "model.num_classes", "model.impl", "data.resolution"),
    "retrain": ("data.dataset", "model.C", "model.layers", "model.auxiliary", "model.num_classes",
                "data.resolution"),
}


def _retrain_model() -> type[BaseModel] | None:
    try:
        from retrain.config import RetrainConfig
    except ImportError:
        return None
    return RetrainConfig


@dataclass
class Job:
    path: str
    kind: Kind
    cfg: Any  # SearchConfig | RetrainConfig

    @property
    def name(self) -> str:
        """Key in the calibration table: `<kind>/<file stem>`."""
        return f"{self.kind}/{Path(self.path).stem}"

    @property
    def script(self) -> str:
        return SCRIPTS[self.kind]

    def get(self, dotted: str) -> Any:
        node: Any = self.cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def shape(self) -> dict[str, Any]:
        """The memory-relevant settings, flat (`{'model.C': 16, ...}`)."""
        out = {}
        skip = {"nb201": ("model.layers", "model.stem"), "darts": ("model.cells_per_stage",)}
        for key in _SHAPE_KEYS[self.kind]:
            if self.kind == "search" and key in skip[self.cfg.space]:
                continue
            if self.kind == "retrain" and key == "data.resolution" and self.cfg.data.dataset != "imagenet":
                continue  # CIFAR retrains at 32x32 whatever data.resolution (ImageNet's crop) says
            v = self.get(key)
            out[key] = v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
        if self.kind == "retrain" and out.get("model.num_classes") is None:
            out["model.num_classes"] = self.cfg.num_classes
        return out

    def reference_batch(self) -> int | None:
        """The global batch the config's lr was tuned for, when the config says (retrain does)."""
        return getattr(self.cfg.optim.w, "reference_batch", None)


def load(path: str | Path, overrides: list[str] | None = None) -> Job:
    """Loads a job config; the kind is the typed config that validates it. The one whose own top-level
    keys the file uses (`space`/`arch` for search, `loss`/`ema` for retrain) is tried first, so an
    error names the key of the right kind of config."""
    tree = read_yaml(path)
    models: list[tuple[Kind, type[BaseModel] | None]] = [("search", SearchConfig), ("retrain", _retrain_model())]
    fields = {k: set(m.model_fields) if m else set() for k, m in models}

    def own_keys(kind: str) -> int:
        other = fields["retrain" if kind == "search" else "search"]
        return len(set(tree) & (fields[kind] - other)) + ("retrain" in Path(path).parts and kind == "retrain")
    models.sort(key=lambda km: -own_keys(km[0]))
    first_error: ConfigError | None = None
    for kind, model in models:
        if model is None:
            continue
        try:
            return Job(str(path), kind, build(model, tree, overrides, source=str(path)))
        except ConfigError as e:
            first_error = first_error or e
    raise first_error or ConfigError(f"{path}: neither a search nor a retrain config")
