"""Typed retrain configuration (`configs/retrain/*.yaml`), validated like the search config.

Key names follow the search config where the two overlap (`seed`, `epochs`, `precision`,
`data.root`, `data.micro_batch`, `optim.w.*`, `engine.*`, `checkpoint.*`, `log.*`), so a user who
knows one knows the other. Loading and `--set` overrides reuse `sdarts.config.build`: an unknown key
or a wrong type is one `ConfigError` line naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator

from sdarts.config import RunSections, _Strict, build, read_yaml
from sdarts.errors import ConfigError

__all__ = ["DEFAULT_GENOTYPE", "RECIPES", "RetrainConfig", "check_genotype", "load"]

NUM_CLASSES = {"cifar10": 10, "imagenet": 1000}


class RetrainModel(_Strict):
    #: the search space whose cells this recipe retrains: 'darts' (NetworkCIFAR / NetworkImageNet) or
    #: 'nb201' (NAS-Bench-201's network; CIFAR-10 only, no auxiliary head, no drop-path). A genotype of
    #: the other space is refused (`check_genotype`), never reinterpreted.
    space: Literal["darts", "nb201"] = "darts"
    #: initial channels (DARTS CIFAR 36, ImageNet mobile setting 48; NB201 16)
    C: int = Field(default=36, gt=0)
    #: DARTS: number of cells (CIFAR 20 in DARTS, 14 in the paper; ImageNet 14). NB201: cells per stage.
    layers: int = Field(default=20, gt=0)
    #: auxiliary tower after the second reduction (its loss is weighted by loss.auxiliary_weight)
    auxiliary: bool = True
    #: final drop-path probability; ramped linearly from 0 at epoch 0 (prob = drop_path * epoch / epochs)
    drop_path: float = Field(default=0.0, ge=0, lt=1)
    #: default: 10 for cifar10, 1000 for imagenet
    num_classes: Optional[int] = Field(default=None, gt=1)


class RetrainWeightOptim(_Strict):
    #: learning rate for a global batch of `reference_batch` images (scaled linearly to the real batch)
    lr: float = Field(default=0.025, gt=0)
    #: the global batch `lr` was tuned for; null = use `lr` as is for any batch
    reference_batch: Optional[int] = Field(default=None, gt=0)
    lr_min: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=3e-4, ge=0)
    nesterov: bool = False
    #: decay after warmup: 'linear' (P-DARTS ImageNet), 'cosine' (DARTS CIFAR) or 'constant'
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    #: epochs of linear warmup: lr * (epoch + 1) / warmup_epochs (a run shorter than this is all warmup)
    warmup_epochs: int = Field(default=0, ge=0)
    #: gradient-norm clip (DeepSpeed `gradient_clipping`); 0 = off
    grad_clip: float = Field(default=5.0, ge=0)


class RetrainOptim(_Strict):
    w: RetrainWeightOptim = RetrainWeightOptim()


class LossConfig(_Strict):
    #: label smoothing of the training loss only (evaluation uses plain cross-entropy)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    auxiliary_weight: float = Field(default=0.4, ge=0)


class EmaConfig(_Strict):
    #: exponential moving average of the weights, updated every optimizer step; 0 = off.
    #: When on, the EMA weights are evaluated too and choose (and fill) the best checkpoint.
    decay: float = Field(default=0.0, ge=0, lt=1)


class RetrainData(_Strict):
    dataset: Literal["cifar10", "imagenet"] = "cifar10"
    #: cifar10: folder of train-*.tar / test-*.tar shards, or an npz; imagenet: ImageFolder tree
    #: (train/, val/) or folder of train-*.tar / val-*.tar shards
    root: Optional[str] = None
    micro_batch: int = Field(default=128, gt=0)
    #: per-rank evaluation batch; default micro_batch
    eval_micro_batch: Optional[int] = Field(default=None, gt=0)
    #: per-class deterministic fraction of the training data (1.0 = all)
    fraction: float = Field(default=1.0, gt=0, le=1)
    #: cap on images per split (train and test), class-balanced; 0 = no cap (short runs and tests)
    max_per_split: int = Field(default=0, ge=0)
    #: images per class removed from the training split and used to select the checkpoint (best.pt);
    #: null = a tenth of the smallest class, at most 500 (CIFAR-10: 5k) or 10 (ImageNet: 10k);
    #: 0 = no holdout: the test/val set then selects, with a warning (the DARTS reference code's flaw)
    holdout: Optional[int] = Field(default=None, ge=0)
    #: evaluate the test/val set every epoch (reported, never selects); false = once, after the last epoch
    eval_each_epoch: bool = True
    #: CIFAR Cutout square side (DARTS: 16); 0 = off
    cutout: int = Field(default=0, ge=0)
    #: ImageNet training crop (eval: resize to resolution * 256/224, centre crop)
    resolution: int = Field(default=224, gt=0)
    #: ImageNet label order (classes.tsv: index, wnid, names); default: sorted folder names
    classes_file: Optional[str] = None
    backend: Literal["auto", "dali", "torch"] = "auto"
    #: where augmentation runs: 'auto' = the training device
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(default=2, ge=0)
    on_bad_sample: Literal["error", "skip"] = "error"


class RetrainConfig(RunSections):
    seed: int = 0
    epochs: int = Field(default=600, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: stop (with a checkpoint) after this many optimizer steps in all; 0 = run every epoch.
    #: A capped run is resumable with --resume and a larger cap (or 0).
    max_steps: int = Field(default=0, ge=0)
    model: RetrainModel = RetrainModel()
    optim: RetrainOptim = RetrainOptim()
    loss: LossConfig = LossConfig()
    ema: EmaConfig = EmaConfig()
    data: RetrainData = RetrainData()

    @model_validator(mode="after")
    def _precision(self):
        if self.precision != "fp32" and not self.engine.autocast:
            raise ValueError("engine.autocast: retrain keeps BatchNorm in fp32, so bf16/fp16 run through "
                             "torch autocast (set engine.autocast true)")
        if self.precision == "fp16" and self.engine.zero_stage != 0:
            raise ValueError("precision fp16 uses DeepSpeed's GradScaler, which needs engine.zero_stage 0")
        return self

    @property
    def num_classes(self) -> int:
        return self.model.num_classes or NUM_CLASSES[self.data.dataset]

    def global_batch(self, world: int) -> int:
        return self.data.micro_batch * self.engine.grad_accum * world

    def base_lr(self, world: int) -> float:
        """`optim.w.lr` scaled linearly from `reference_batch` to this run's global batch."""
        w = self.optim.w
        return w.lr if w.reference_batch is None else w.lr * self.global_batch(world) / w.reference_batch

    def check_genotype(self, genotype, config_path: str | Path | None = None, genotype_name: str | None = None
                       ) -> None:
        """Refuses a genotype this recipe is not for (`retrain.config.check_genotype`)."""
        check_genotype(self, genotype, config_path, genotype_name)


def load(path: str | Path, overrides: list[str] | None = None) -> RetrainConfig:
    """Loads a retrain config from YAML with `--set` overrides applied."""
    return build(RetrainConfig, read_yaml(path), overrides, source=str(path))


#: the shipped recipe for each (space, dataset): what a refusal tells the user to use instead
RECIPES = {("darts", "cifar10"): "configs/retrain/cifar10.yaml",
           ("darts", "imagenet"): "configs/retrain/imagenet.yaml",
           ("nb201", "cifar10"): "configs/retrain/nb201_cifar10.yaml"}
#: the cell a tool builds a recipe's network with when it is given none (memory probes)
DEFAULT_GENOTYPE = {"darts": "darts_v2", "nb201": "nb201_single_darts"}
_A_CELL = {"darts": "a DARTS cell", "nb201": "an NB201 cell"}
_A_RECIPE = {"darts": "a DARTS-space recipe", "nb201": "an NB201 recipe"}


def _recipe_for(space: str, dataset: str) -> str:
    if (space, dataset) in RECIPES:
        return RECIPES[(space, dataset)]
    return f"{RECIPES[(space, 'cifar10')]} ({space} cells retrain on cifar10 only)"


def check_genotype(cfg: RetrainConfig, genotype, config_path: str | Path | None = None,
                   genotype_name: str | None = None) -> None:
    """Refuses, with one `ConfigError` line naming the recipe to use, a genotype of another space than
    the recipe's `model.space` (an NB201 cell in a DARTS recipe would silently become a 14M-parameter
    NB201Network with C=36, N=14), and an NB201 recipe asking for what NB201's network has not."""
    source = str(config_path) if config_path else "this retrain config"
    space, m = cfg.model.space, cfg.model
    if genotype.space != space:
        # unnamed: an NB201 cell prints as its short arch string; a DARTS cell's string is long
        name = genotype_name or (str(genotype) if genotype.space == "nb201" else None)
        what = f"genotype {name}" if name else "this genotype"
        raise ConfigError(f"{what} is {_A_CELL[genotype.space]}; {source} is {_A_RECIPE[space]} "
                          f"(model.space {space}): use {_recipe_for(genotype.space, cfg.data.dataset)}")
    if space != "nb201":
        return
    if cfg.data.dataset != "cifar10":
        raise ConfigError(f"{source}: data.dataset {cfg.data.dataset}: model.space nb201 builds NAS-Bench-201's "
                          f"32x32 CIFAR network; use {RECIPES[('nb201', 'cifar10')]}")
    if m.auxiliary:
        raise ConfigError(f"{source}: model.auxiliary true: NAS-Bench-201's network has no auxiliary head "
                          f"(model.space nb201); set it false")
    if m.drop_path > 0:
        raise ConfigError(f"{source}: model.drop_path {m.drop_path}: NAS-Bench-201's network has no drop-path "
                          f"(model.space nb201); set it 0")
