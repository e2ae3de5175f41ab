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

from sdarts.config import CheckpointConfig, EngineConfig, LogConfig, _Strict, build, read_yaml
from sdarts.errors import ConfigError

__all__ = ["RetrainConfig", "load"]

NUM_CLASSES = {"cifar10": 10, "imagenet": 1000}


class RetrainModel(_Strict):
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


class RetrainConfig(_Strict):
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
    engine: EngineConfig = EngineConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()

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


def load(path: str | Path, overrides: list[str] | None = None) -> RetrainConfig:
    """Loads a retrain config from YAML with `--set` overrides applied."""
    return build(RetrainConfig, read_yaml(path), overrides, source=str(path))
