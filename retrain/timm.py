"""timm registration of the found architectures: `import retrain.timm`, then `timm.create_model(...)`.

The exported networks are the retrain networks of `retrain.model` (same modules, same state-dict keys,
so a retrained checkpoint loads as it is, minus the auxiliary head) dressed in timm's model contract:
- one tensor in, one tensor out: the auxiliary head is a training-time part and is never built here;
- `forward_features` (the unpooled last map), `forward_head(x, pre_logits)`, `num_classes`,
  `num_features`, `get_classifier`, `reset_classifier(n, global_pool)` (`(0, '')` gives unpooled maps),
  `drop_rate` (dropout before the classifier), `drop_path_rate` (the cells' drop-path probability; one
  rate for every cell, as DARTS trains it), `set_grad_checkpointing` (cell by cell);
- `features_only=True` through forward hooks, as timm does for its own cell-based NAS nets (PNASNet,
  NASNet): cells take two inputs, so they cannot be re-chained by timm's feature wrappers. One feature
  per stride, the last module that runs at that stride (see `feature_info`).

Entrypoints (model args: the genotype and the size):
- `sdarts_darts_imagenet(genotype, C=48, layers=14, num_classes=1000)`: DARTS macro, 224x224 mobile setting;
- `sdarts_darts_cifar(genotype, C=36, layers=20, num_classes=10)`: DARTS CIFAR network, 32x32;
- `sdarts_nb201(genotype, C=16, N=5, num_classes=10)`: NAS-Bench-201's network, 32x32;
- one per literature genotype of `sdarts.zoo`, e.g. `sdarts_darts_v2_imagenet`, `sdarts_pdarts_cifar`,
  `sdarts_pc_darts_imagenet`, `sdarts_nb201_single_darts` (the genotype is fixed by the name).

`genotype` may be a genotype object, its JSON dict (what `config.json` of an export stores), a literature
name (`darts_v2`), genotype text (JSON, an NB201 arch string, a DARTS `Genotype(...)` string; parsed,
never evaluated) or a path to a genotype file. No entry ships weights: weights come from an export
(`sdarts export`, then `timm.create_model("local-dir:DIR", pretrained=True)`), which refuses any
weights file but `model.safetensors`, so loading an export never unpickles anything.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureHookNet
from timm.models._manipulate import checkpoint

from sdarts.data.constants import CIFAR_MEAN, CIFAR_STD
from sdarts.errors import CheckpointError, GenotypeError
from sdarts.genotype import DartsGenotype, Genotype, NB201Genotype, from_json, parse
from sdarts.genotype import LITERATURE
from sdarts.genotype import load as load_genotype

from retrain.model import NB201Cell, NB201Network, NetworkCIFAR, NetworkImageNet, drop_path

__all__ = ["SdartsDartsCifar", "SdartsDartsImageNet", "SdartsNB201",
           "WEIGHTS_FILE", "resolve_genotype"]

#: the only weights file an export holds and the only one `local-dir:` loading accepts
WEIGHTS_FILE = "model.safetensors"


def resolve_genotype(genotype: Any, space: str, architecture: str) -> Genotype:
    """A genotype object of `space` from any accepted form (object, JSON dict, name, text, file path)."""
    if isinstance(genotype, (DartsGenotype, NB201Genotype)):
        g = genotype
    elif isinstance(genotype, dict):
        g = from_json(genotype)
    elif isinstance(genotype, str):
        text = genotype.strip()
        if text in LITERATURE:
            g = LITERATURE[text]
        elif text.startswith(("{", "|", "Genotype(")):
            g = parse(text)
        else:
            g = load_genotype(text)
    else:
        raise GenotypeError(f"{architecture}: genotype must be a genotype, its JSON dict, a literature name "
                            f"or genotype text, got {type(genotype).__name__}")
    if g.space != space:
        raise GenotypeError(f"{architecture} needs a {space} genotype, got a {g.space} genotype")
    return g


class _TimmContract:
    """The timm model contract on top of a retrain network whose last map is `forward_features(x)`.

    Subclasses set `num_features`, `feature_info`, the classifier via `_init_head`, and implement
    `forward_features`."""

    num_classes: int
    num_features: int
    feature_info: list[dict]

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_classes = num_classes
        self.num_features = num_features
        self.drop_rate = float(drop_rate)
        self.grad_checkpointing = False
        # replaces the retrain network's Linear; same name (`classifier`) so its weights load unchanged
        self.global_pool, self.head_drop, self.classifier = create_classifier(
            num_features, num_classes, pool_type=global_pool, drop_rate=self.drop_rate)
        self.head_hidden_size = num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^cells\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recomputes each cell in backward instead of storing its activations (RNG state is kept,
        so drop-path masks are the same in the recomputation)."""
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, device=None, dtype=None) -> None:
        """New head for `num_classes` (0 = none: `forward` gives pooled features; with
        `global_pool=''` it gives the unpooled last map). The new head follows the model's device/dtype."""
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        ref = next(iter(self.parameters()))
        self.num_classes = num_classes
        self.global_pool, self.classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool,
            device=device or ref.device, dtype=dtype or ref.dtype)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.classifier.train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _run_cell(self, cell: nn.Module, *args) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(cell, *args)
        return cell(*args)


def _feature_taps(stages: list[tuple[str, int, int]]) -> list[dict]:
    """One feature per stride: the last module (in forward order) that runs at that stride.

    `stages` lists (module name, reduction, channels) in forward order."""
    taps: dict[int, dict] = {}
    for name, reduction, chs in stages:
        taps[reduction] = dict(num_chs=chs, reduction=reduction, module=name)
    return [taps[r] for r in sorted(taps)]


def _cell_channels(cell: nn.Module) -> int:
    """Output channels of a DARTS cell: its nodes' channels (preprocess1's BN) times the concat count."""
    return cell.multiplier * cell.preprocess1[-1].num_features


class _DartsTimm(_TimmContract):
    """Shared forward of the two DARTS-macro networks (retrain.model._DartsNetwork without the aux head)."""

    def _darts_stages(self, stem: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        reduction = stem[-1][1]
        stages = list(stem)
        for i, cell in enumerate(self.cells):
            if cell.reduction:
                reduction *= 2
            stages.append((f"cells.{i}", reduction, _cell_channels(cell)))
        return stages

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        s0, s1 = self._stem(x)
        drop_prob = self.drop_path_prob
        for cell in self.cells:
            s0, s1 = s1, self._run_cell(cell, s0, s1, drop_prob)
        return s1


class SdartsDartsImageNet(_DartsTimm, NetworkImageNet):
    """A found DARTS-space cell in the ImageNet mobile-setting macro (8x stem, `layers` cells)."""

    def __init__(self, genotype: Any = "darts_v2", C: int = 48, layers: int = 14, num_classes: int = 1000,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        g = resolve_genotype(genotype, "darts", "sdarts_darts_imagenet")
        NetworkImageNet.__init__(self, C, max(num_classes, 1), layers, False, g, drop_path_rate)
        self.in_chans = in_chans
        if in_chans != 3:
            self.stem0[0] = nn.Conv2d(in_chans, C // 2, 3, stride=2, padding=1, bias=False)
        stages = self._darts_stages([("stem0.2", 2, C // 2), ("stem0", 4, C), ("stem1", 8, C)])
        self.feature_info = _feature_taps(stages)
        self._init_head(stages[-1][2], num_classes, global_pool, drop_rate)


class SdartsDartsCifar(_DartsTimm, NetworkCIFAR):
    """A found DARTS-space cell in the CIFAR macro (3x3 stem to 3C, `layers` cells)."""

    def __init__(self, genotype: Any = "darts_v2", C: int = 36, layers: int = 20, num_classes: int = 10,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, stem_multiplier: int = 3):
        g = resolve_genotype(genotype, "darts", "sdarts_darts_cifar")
        NetworkCIFAR.__init__(self, C, max(num_classes, 1), layers, False, g, drop_path_rate, stem_multiplier)
        self.in_chans = in_chans
        if in_chans != 3:
            self.stem[0] = nn.Conv2d(in_chans, stem_multiplier * C, 3, padding=1, bias=False)
        stages = self._darts_stages([("stem", 1, stem_multiplier * C)])
        self.feature_info = _feature_taps(stages)
        self._init_head(stages[-1][2], num_classes, global_pool, drop_rate)


class _DropPathNB201Cell(NB201Cell):
    """NB201Cell with drop-path on every edge that is not an identity (same modules, same keys)."""

    drop_prob: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.drop_prob > 0.0):
            return super().forward(x)
        nodes = [x]
        for i in range(1, 4):
            outs = []
            for j in range(i):
                op = self.edges[f"{i}_{j}"] if f"{i}_{j}" in self.edges else None
                if op is not None:
                    h = op(nodes[j])
                    outs.append(h if isinstance(op, nn.Identity) else drop_path(h, self.drop_prob))
            nodes.append(sum(outs) if outs else torch.zeros_like(x))
        return nodes[-1]


class SdartsNB201(_TimmContract, NB201Network):
    """A NAS-Bench-201 cell in the benchmark's network (3 stages of N cells, residual reductions)."""

    def __init__(self, genotype: Any = "nb201_single_darts", C: int = 16, N: int = 5, num_classes: int = 10,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        g = resolve_genotype(genotype, "nb201", "sdarts_nb201")
        NB201Network.__init__(self, C, N, g, max(num_classes, 1))
        self.in_chans = in_chans
        if in_chans != 3:
            self.stem[0] = nn.Conv2d(in_chans, C, 3, padding=1, bias=False)
        self.drop_path_prob = float(drop_path_rate)
        stages, reduction, chs = [("stem", 1, C)], 1, C
        for k, cell in enumerate(self.cells):
            if isinstance(cell, NB201Cell):
                dp_cell = _DropPathNB201Cell(g, chs)
                dp_cell.load_state_dict(cell.state_dict())
                dp_cell.drop_prob = self.drop_path_prob
                self.cells[k] = dp_cell
            else:  # the residual reduction block between stages
                reduction, chs = reduction * 2, chs * 2
            stages.append((f"cells.{k}", reduction, chs))
        stages.append(("lastact", reduction, chs))
        self.feature_info = _feature_taps(stages)
        self._init_head(chs, num_classes, global_pool, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for cell in self.cells:
            x = self._run_cell(cell, x)
        return self.lastact(x)


# -- registry ---------------------------------------------------------------------------------------
_CIFAR_INPUT = dict(input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, interpolation="bilinear",
                    mean=CIFAR_MEAN, std=CIFAR_STD, first_conv="stem.0", classifier="classifier")


def _cfg(dataset: str, **over) -> dict:
    """Honest data config: what the sdarts retrain pipelines feed these networks."""
    paper = dict(paper_name="Single-DARTS: Towards Stable Architecture Search",
                 license="apache-2.0")
    if dataset == "imagenet":
        # eval: resize the short side to 256, center crop 224 (crop_pct 224/256), bilinear, ImageNet stats
        base = dict(input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bilinear",
                    mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, num_classes=1000,
                    first_conv="stem0.0", classifier="classifier")
    else:
        base = dict(_CIFAR_INPUT, num_classes=10)  # 32x32 images used whole (no crop)
    return {**base, **paper, **over}


#: the three generic entrypoints: architecture name -> (model class, dataset, genotype space)
ARCHITECTURES: dict[str, tuple[type, str, str]] = {
    "sdarts_darts_imagenet": (SdartsDartsImageNet, "imagenet", "darts"),
    "sdarts_darts_cifar": (SdartsDartsCifar, "cifar10", "darts"),
    "sdarts_nb201": (SdartsNB201, "cifar10", "nb201"),
}


def _literature_names() -> dict[str, tuple[str, str]]:
    """Convenience entrypoint name -> (generic architecture, literature genotype name)."""
    out = {}
    for name, g in LITERATURE.items():
        if isinstance(g, NB201Genotype):
            out[f"sdarts_{name}"] = ("sdarts_nb201", name)
            continue
        for suffix, arch in (("imagenet", "sdarts_darts_imagenet"), ("cifar", "sdarts_darts_cifar")):
            if name.endswith(("_imagenet", "_cifar")):  # a dataset-specific cell: only its own dataset
                if name.endswith("_" + suffix):
                    out[f"sdarts_{name}"] = (arch, name)
            else:
                out[f"sdarts_{name}_{suffix}"] = (arch, name)
    return out


LITERATURE_MODELS = _literature_names()

default_cfgs = generate_default_cfgs({
    **{arch: _cfg(dataset) for arch, (_, dataset, _) in ARCHITECTURES.items()},
    **{name: _cfg(ARCHITECTURES[arch][1]) for name, (arch, _) in LITERATURE_MODELS.items()},
})


def _check_local_weights(pretrained: bool, pretrained_cfg: Any) -> None:
    """An export directory must hold `model.safetensors`: timm would otherwise fall back to any `.bin` /
    `.pth` file it finds there and unpickle it. We refuse before timm looks."""
    if not pretrained or pretrained_cfg is None:
        return
    get = pretrained_cfg.get if isinstance(pretrained_cfg, dict) else lambda k: getattr(pretrained_cfg, k, None)
    if get("source") != "local-dir":
        return
    folder = Path(str(get("file")))
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (sdarts exports load from safetensors only; "
                              f"pickled .bin/.pth weights are refused)")


class CellFeatures(FeatureHookNet):
    """`features_only=True`: forward hooks on the modules named in `feature_info`, the model left as it is
    (cells take two inputs, so timm cannot re-chain them; PNASNet and NASNet do the same). Without
    `out_indices`, every entry of `feature_info` (how many depends on the macro and the depth)."""

    def __init__(self, model: nn.Module, out_indices=None, **kwargs):
        if out_indices is None:
            out_indices = tuple(range(len(model.feature_info)))
        kwargs.setdefault("no_rewrite", True)
        super().__init__(model, out_indices=out_indices, **kwargs)


def _create(architecture: str, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    cls, _, _ = ARCHITECTURES[architecture]
    _check_local_weights(pretrained, kwargs.get("pretrained_cfg"))
    # out_indices=None is kept by build_model_with_cfg (it only fills a missing key): all features
    return build_model_with_cfg(cls, variant, pretrained,
                                feature_cfg=dict(feature_cls=CellFeatures, out_indices=None), **kwargs)


@register_model
def sdarts_darts_imagenet(pretrained: bool = False, **kwargs) -> SdartsDartsImageNet:
    """A DARTS-space genotype in the ImageNet mobile-setting network (default: DARTS V2, C=48, 14 layers)."""
    return _create("sdarts_darts_imagenet", "sdarts_darts_imagenet", pretrained, **kwargs)


@register_model
def sdarts_darts_cifar(pretrained: bool = False, **kwargs) -> SdartsDartsCifar:
    """A DARTS-space genotype in the CIFAR network (default: DARTS V2, C=36, 20 layers)."""
    return _create("sdarts_darts_cifar", "sdarts_darts_cifar", pretrained, **kwargs)


@register_model
def sdarts_nb201(pretrained: bool = False, **kwargs) -> SdartsNB201:
    """An NB201 genotype in the benchmark's network (default: the Single-DARTS cell, C=16, N=5)."""
    return _create("sdarts_nb201", "sdarts_nb201", pretrained, **kwargs)


def _literature_entrypoint(model_name: str, architecture: str, genotype_name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        if "genotype" in kwargs:
            raise GenotypeError(f"{model_name} fixes its genotype ({genotype_name}); use "
                                f"{architecture}(genotype=...) for another one")
        return _create(architecture, model_name, pretrained, genotype=genotype_name, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = model_name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"`{architecture}` with the literature genotype `{genotype_name}` (sdarts.zoo)."
    return entrypoint


for _name, (_arch, _genotype) in LITERATURE_MODELS.items():
    setattr(sys.modules[__name__], _name, register_model(_literature_entrypoint(_name, _arch, _genotype)))
