"""Typed configuration: YAML files validated by pydantic models, with `--set a.b=v` overrides.

Every key is declared here with its type and default, so an unknown key, a wrong type or a missing
file is one `ConfigError` line naming it (the CLI turns it into exit code 2) instead of a run that
silently ignores a typo. The key names are an interface (the YAML files in configs/, `--set` and the
resolved `config.yaml` of every run use them): a renamed key breaks every file that names it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdarts.arch import parse_init
from sdarts.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ArchConfig(_Strict):
    activation: Literal["softmax", "sigmoid"] = "softmax"
    #: constant alpha init: a number, or '-ln 7' (sigmoid 0.125, the paper's DARTS-space ImageNet init)
    init: Union[float, str] = 0.0
    #: std of Gaussian noise added to the init (DARTS uses 1e-3); 0 = all edges start tied
    init_std: float = Field(default=0.0, ge=0)

    @field_validator("init")
    @classmethod
    def _init(cls, v):
        return parse_init(v)


class WeightOptim(_Strict):
    lr: float = Field(default=0.025, gt=0)
    lr_min: float = Field(default=0.001, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=3e-4, ge=0)
    nesterov: bool = False
    #: 'cosine' (per epoch, DARTS/NB201 reference) or 'constant'
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(default=5.0, ge=0)


class AlphaOptim(_Strict):
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(default=3e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    eps: float = 1e-8
    momentum: float = Field(default=0.9, ge=0, lt=1)
    #: the paper sets 0: with sigmoid, `none` gets no loss gradient, so decay alone would move it
    weight_decay: float = Field(default=0.0, ge=0)


class OptimConfig(_Strict):
    w: WeightOptim = WeightOptim()
    alpha: AlphaOptim = AlphaOptim()


class ModelConfig(_Strict):
    #: initial channels (NB201 16, DARTS 16)
    C: int = Field(default=16, gt=0)
    #: NB201: cells per stage (5 in the benchmark)
    cells_per_stage: int = Field(default=5, gt=0)
    #: DARTS space: number of cells (8 in search), reductions at 1/3 and 2/3
    layers: int = Field(default=8, ge=3)
    #: DARTS space stem: 'cifar' (3x3 conv) or 'imagenet' (three stride-2 convs, 8x downsampling)
    stem: Literal["cifar", "imagenet"] = "cifar"
    num_classes: int = Field(default=10, gt=1)
    #: supernet implementation: 'fused' (default, fast), 'grouped' (DARTS space: a node's edges, and both
    #: input nodes' edges together, as grouped convs: 0.44x the kernels of fused per
    #: DARTS step, benchmarks/dispatch_count.py, for GPUs) or 'classic'
    #: (op-by-op reference)
    impl: Literal["fused", "grouped", "classic"] = "fused"
    #: NHWC activations and conv weights; unset = on for impl 'fused'/'grouped', off for 'classic' (NHWC
    #: made the fused supernets ~1.5x faster on CPU, the classic one slower; docs/performance.md)
    channels_last: Optional[bool] = None
    #: recompute each search cell in backward, keeping only its inputs (less memory, ~1 extra forward)
    checkpoint_cells: bool = False


class DataConfig(_Strict):
    #: 'cifar10' (WebDataset shards or npz under root), 'imagenet', 'digits' (sklearn, no download),
    #: 'synthetic' (random, for smoke runs)
    dataset: Literal["cifar10", "imagenet", "digits", "synthetic"] = "cifar10"
    root: Optional[str] = None
    micro_batch: int = Field(default=64, gt=0)
    #: per-class deterministic fraction of the search data (1.0 = all)
    fraction: float = Field(default=1.0, gt=0, le=1)
    #: cap on images per split after `fraction` (0 = no cap); the CPU proxy uses it
    max_per_split: int = Field(default=0, ge=0)
    #: search resolution (CIFAR 32; digits are upsampled to it)
    resolution: int = Field(default=32, gt=0)
    augment: bool = True
    #: 'auto' = DALI when installed and the dataset is on disk, else torch
    backend: Literal["auto", "dali", "torch"] = "torch"
    #: where augmentation runs for in-memory data: 'auto' = the training device
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(default=2, ge=0)
    synthetic_size: int = Field(default=512, gt=0)
    #: what to do with an undecodable image: 'error' names it and stops, 'skip' counts it in the log
    on_bad_sample: Literal["error", "skip"] = "error"
    #: class-index file for ImageFolder labels (ImageNet's classes.tsv); default: root/classes.tsv if
    #: present, else the folders of root/train
    classes_file: Optional[str] = None
    #: output dtype of the streaming (DALI / torch DataLoader) loaders
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"


class EngineConfig(_Strict):
    zero_stage: int = Field(default=0, ge=0, le=2)
    grad_accum: int = Field(default=1, ge=1)
    #: bf16/fp16 through torch autocast (BN stays fp32) instead of casting the whole module
    autocast: bool = True
    #: 'auto' picks cuda when available
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: record the supernet's training forward+backward as CUDA graphs (sdarts/graphs.py): pays where the
    #: step is launch-bound (NB201 at batch 64: 8.4x on an H200). 'auto': on for NB201 on CUDA where the
    #: settings allow it (the measured path); true: any space (CUDA only, fp32 or bf16); false: off
    cuda_graphs: Union[bool, Literal["auto"]] = "auto"


class CheckpointConfig(_Strict):
    every_steps: int = Field(default=0, ge=0)  # 0 = only at epoch ends
    keep: int = Field(default=2, ge=1)


class LogConfig(_Strict):
    every_steps: int = Field(default=10, ge=1)
    all_ranks: bool = False
    tensorboard: bool = True
    progress: bool = True
    #: profile this many optimizer steps (torch.profiler; `<run_dir>/profile/`, sdarts/profiling.py); 0 = off
    profile_steps: int = Field(default=0, ge=0)
    #: steps this process takes before the profile starts; at least 1: a process's first step carries its
    #: one-time costs (cuDNN autotuning, CUDA-graph recording, which a running profiler would also disturb)
    profile_warmup: int = Field(default=10, ge=1)


class AnalysisConfig(_Strict):
    #: log the eq. 8 gradient correlation every N steps (0 = off)
    grad_corr_every: int = Field(default=0, ge=0)
    #: log dL/dp per op per edge every N steps (0 = off)
    grad_p_every: int = Field(default=0, ge=0)
    #: which cells (indices among search cells) to analyse
    cells: list[int] = [0]


class RunSections(_Strict):
    """The sections every run config has, search and retrain alike: how it runs (`engine`), its
    checkpoints and its logs (what `sdarts.run.Run` reads)."""
    engine: EngineConfig = EngineConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()


class SearchConfig(RunSections):
    seed: int = 0
    #: S independent searches of this config in one process (sdarts/spaces/seedstack.py), one per seed,
    #: each exactly the search `seed: s` would run; output RUN/seed_<s>/ each. Unset: one search (`seed`)
    seeds: Optional[list[int]] = None
    epochs: int = Field(default=50, gt=0)
    strategy: Literal["single_level", "bilevel", "bilevel_second_order", "two_batch"] = "single_level"
    space: Literal["nb201", "darts"] = "nb201"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: NAS-Bench-201 accuracy table; when set, every epoch's genotype is scored
    nb201_table: Optional[str] = None
    #: finite-difference step scale for bilevel_second_order (DARTS: 0.01 / ||grad||)
    unrolled_eps: float = Field(default=0.01, gt=0)
    arch: ArchConfig = ArchConfig()
    optim: OptimConfig = OptimConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    analysis: AnalysisConfig = AnalysisConfig()

    @model_validator(mode="after")
    def _second_order(self):
        if self.strategy == "bilevel_second_order":
            if self.precision != "fp32":
                raise ValueError("strategy: bilevel_second_order runs in fp32 only (precision must be fp32)")
            if self.engine.zero_stage != 0:
                raise ValueError("strategy: bilevel_second_order needs engine.zero_stage 0")
        if self.model.impl == "grouped" and self.space != "darts":
            raise ValueError("model.impl: grouped is for the DARTS space (NB201's fused cell already groups "
                             "its convs per node)")
        if self.engine.cuda_graphs is True and self._graphs_blocked_by():
            raise ValueError(f"engine.cuda_graphs: {self._graphs_blocked_by()}")
        if self.seeds is not None and self._seeds_blocked_by():
            raise ValueError(f"seeds: {self._seeds_blocked_by()}")
        return self

    def _seeds_blocked_by(self) -> str | None:
        """Why these settings cannot batch seeds (None: they can): each refusal is a setting that would
        couple the seeds or that the seed axis cannot run under."""
        seeds = self.seeds
        if not seeds:
            return "needs at least one seed"
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            return f"must be distinct non-negative integers, got {seeds}"
        if self.seed != 0:
            return f"sets every search's seed, so seed {self.seed} would be ignored; drop seed or list it in seeds"
        if self.precision == "fp16":
            return "fp16's loss scaler is shared, so one seed's overflow would skip every seed's step; use bf16 or fp32"
        if self.precision == "bf16" and not self.engine.autocast:
            return "bf16 needs engine.autocast true (DeepSpeed's bf16 optimizer flattens the seed axis away)"
        if self.engine.zero_stage != 0:
            return "needs engine.zero_stage 0 (ZeRO partitions flatten the seed axis away)"
        if self.model.checkpoint_cells:
            return "model.checkpoint_cells cannot run inside the seed axis (vmap); turn one off"
        return None

    def lone(self, seed: int) -> "SearchConfig":
        """The config of the one search `seed` of a batched run would be on its own."""
        return self.model_copy(update={"seed": seed, "seeds": None})

    def _graphs_blocked_by(self) -> str | None:
        """Why these settings cannot record the step as CUDA graphs (None: they can)."""
        if self.strategy == "bilevel_second_order":
            return "strategy bilevel_second_order perturbs weights between passes; use it without graphs"
        if self.precision == "fp16":
            return "fp16 (dynamic loss scaling) is not supported; use bf16 or fp32"
        if self.model.checkpoint_cells:
            return "model.checkpoint_cells cannot be recorded; turn one off"
        return None

    def cuda_graphs_on(self, device_type: str) -> bool:
        """Whether the search records its step (`engine.cuda_graphs`; 'auto' resolved for this device:
        on for NB201 on CUDA, the path measured and tested on a GPU)."""
        g = self.engine.cuda_graphs
        if g != "auto":
            return bool(g)
        return device_type == "cuda" and self.space == "nb201" and self._graphs_blocked_by() is None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"--set {dotted}: empty key segment")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`a.b=v` strings to (key, value); values are YAML scalars or lists (safe_load, never eval)."""
    out = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def _format_error(e: ValidationError, source: str) -> str:
    errs = e.errors()
    err = errs[0]
    loc = err["loc"]
    # a Union field (e.g. engine.cuda_graphs: bool | 'auto') reports one error per member, each with the
    # member's type tag appended to the key: name the key, and say every form it accepts
    tags = ("bool", "int", "float", "str")
    if len(loc) > 1 and isinstance(loc[-1], str) and (loc[-1] in tags or "[" in loc[-1]):
        members = [x for x in errs if x["loc"][:-1] == loc[:-1]]
        loc = loc[:-1]
        err = dict(err, msg=" or ".join(x["msg"] for x in members))
    key = ".".join(str(x) for x in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    if err["type"] == "missing":
        return f"{source}: missing key '{key}'"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check across keys: its message names them; the input would be the whole config
        return f"{source}: {msg}"
    return f"{source}: key '{key}': {msg} (got {err.get('input')!r})"


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: malformed YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of keys")
    return data


def build(model: type[BaseModel], tree: dict, overrides: list[str] | None = None, source: str = "config"):
    """Validates a raw dict (plus overrides) into `model`; errors become one ConfigError line."""
    tree = dict(tree)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def load(path: str | Path, overrides: list[str] | None = None) -> SearchConfig:
    """Loads a search config from YAML with `--set` overrides applied."""
    return build(SearchConfig, read_yaml(path), overrides, source=str(path))


def dump(cfg: BaseModel) -> str:
    """The resolved config as YAML (written to the run directory); the shared run sections last."""
    d = cfg.model_dump(mode="json")
    shared = [k for k in RunSections.model_fields if k in d]
    return yaml.safe_dump({k: v for k, v in d.items() if k not in shared} | {k: d[k] for k in shared},
                          sort_keys=False)
