"""The training configuration: one YAML file holds the model, data, optimisation and curriculum.

Every section is a frozen dataclass with a docstring per field and is validated when built, so a
typo or an impossible value fails before any model is loaded. Relative paths in the file are
resolved against the directory of the file itself.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from realcustom.models import SPECS
from realcustom.training.references import ReferenceAugmentation

REFERENCE_SOURCES = ("self", "multiview")
MIXED_PRECISION = ("no", "bf16", "fp16")
VISION_INITS = ("keep", "from_text")
EXPORT_FORMATS = ("safetensors", "pth")


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone to train on and how the added weights start."""

    base: str = "tiny"
    """`tiny`, `tiny-sd15`, `sdxl-random`, `sd15-random`, or a directory in the official layout,
    with or without RealCustom weights (without: a new backbone, the added weights start fresh)."""
    seed: int = 0
    """Seed of the random weights of `tiny` / `*-random` bases."""
    init_weights: str | None = None
    """Optional RealCustom weights (file or checkpoint directory) to start from, e.g. a release."""
    vision_init: str = "keep"
    """`keep` the added weights as built, or `from_text`: copy each layer's to_k/to_v into
    to_k_vision/to_v_vision (IP-Adapter's initialisation; needs image-token dim = text dim)."""

    def __post_init__(self) -> None:
        if self.vision_init not in VISION_INITS:
            raise ValueError(f"model.vision_init must be one of {VISION_INITS}, got {self.vision_init!r}")


@dataclass(frozen=True)
class DreamBenchViews:
    """Build a small manifest from single DreamBench photos, with synthesised views (tests, tiny)."""

    source: str
    """Folder with `<subject>.jpg` files and the README table of class words."""
    views_per_subject: int = 4
    """Views synthesised per photo (view 0 is the photo itself)."""
    max_size: int = 256
    """Longer side of the written images."""

    def __post_init__(self) -> None:
        if self.views_per_subject < 2:
            raise ValueError("data.dreambench.views_per_subject must be at least 2 (a target and a view)")


@dataclass(frozen=True)
class DataConfig:
    """Where the training records come from (format: docs/TRAINING.md, realcustom/training/data.py)."""

    manifest: str | None = None
    """JSONL manifest; relative image paths inside it are relative to the manifest's folder."""
    dreambench: DreamBenchViews | None = None
    """Alternative to `manifest`: write one under OUTPUT_DIR/data from DreamBench photos."""
    num_workers: int = 0
    """DataLoader worker processes per device."""

    def __post_init__(self) -> None:
        if (self.manifest is None) == (self.dreambench is None):
            raise ValueError("give exactly one of data.manifest and data.dreambench")


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation, precision, EMA, logging and checkpoint cadence."""

    batch_size: int = 1
    """Samples per device per micro-step."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    """Linear learning-rate warm-up from 0 at the start of training."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    """`no`, `bf16` or `fp16`; with bf16/fp16 the frozen weights are stored in that dtype."""
    gradient_checkpointing: bool = False
    image_dropout: float = 0.1
    """Probability that a sample's reference is the black image (the CFG negative at inference)."""
    ema_decay: float | None = 0.9999
    """EMA of the trainable weights (None: no EMA); warmed up as min(decay, (1+n)/(10+n))."""
    log_every: int = 10
    checkpoint_every: int = 1000
    """Also written at the end of every stage."""
    export_format: str = "safetensors"
    """File type of the exported weights: `safetensors`, or `pth` (a torch pickle, what the
    official inference code's `torch.load` reads)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("training.batch_size and gradient_accumulation_steps must be at least 1")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"training.mixed_precision must be one of {MIXED_PRECISION}")
        if not 0 <= self.image_dropout < 1:
            raise ValueError("training.image_dropout must be in [0, 1)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError("training.ema_decay must be in (0, 1) or null")
        if self.export_format not in EXPORT_FORMATS:
            raise ValueError(f"training.export_format must be one of {EXPORT_FORMATS}")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise ValueError("training.log_every and checkpoint_every must be at least 1")


@dataclass(frozen=True)
class ReferenceSource:
    """One entry of a stage's data mix: where a sample's reference comes from and how it is built."""

    kind: str
    """`self`: the target photo itself (easy, reconstruction-like); `multiview`: another view of
    the same subject from the record's `references` (hard, re-contextualisation)."""
    weight: float = 1.0
    """Relative share of this source in the stage's samples."""
    reference: ReferenceAugmentation = field(default_factory=ReferenceAugmentation)

    def __post_init__(self) -> None:
        if self.kind not in REFERENCE_SOURCES:
            raise ValueError(f"source kind must be one of {REFERENCE_SOURCES}, got {self.kind!r}")
        if self.weight <= 0:
            raise ValueError("source weight must be positive")


@dataclass(frozen=True)
class StageConfig:
    """One curriculum stage."""

    name: str
    steps: int
    """Optimizer steps in this stage."""
    resolution: int
    """Side of the square target images (pixels, multiple of 32)."""
    sources: tuple[ReferenceSource, ...]

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"stage {self.name!r}: steps must be at least 1")
        if self.resolution < 32 or self.resolution % 32:
            raise ValueError(f"stage {self.name!r}: resolution must be a positive multiple of 32")
        if not self.sources:
            raise ValueError(f"stage {self.name!r}: give at least one reference source")


@dataclass(frozen=True)
class SamplingConfig:
    """The sample image drawn with the EMA weights at the end of every stage."""

    prompt: str
    target: str
    """Target phrase of `prompt` the reference is bound to."""
    reference: str | None = None
    """Reference photo; None: the first record's image."""
    steps: int = 25
    size: int | None = None
    """Image side; None: the model's default size."""
    seed: int = 0


@dataclass(frozen=True)
class EvaluationConfig:
    """A held-out loss: fixed samples of the last stage's data mix, fixed noise and timesteps, no
    dropout, (EMA) weights; measured at the start and at every checkpoint into eval.jsonl."""

    samples: int = 16

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError("evaluation.samples must be at least 1")


@dataclass(frozen=True)
class TrainConfig:
    """The whole training run."""

    stages: tuple[StageConfig, ...]
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    training: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig | None = None
    evaluation: EvaluationConfig | None = None
    seed: int = 0
    """Seed of every random draw of the run (data, noise, timesteps, dropout)."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("give at least one stage")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML training config; relative paths become relative to the file."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    config = build(TrainConfig, raw, "config")
    return resolve_paths(config, path.resolve().parent)


def resolve_paths(config: TrainConfig, base: Path) -> TrainConfig:
    """Make the file paths of `config` absolute against `base`."""

    def absolute(value: str | None) -> str | None:
        return None if value is None else str((base / value).resolve())

    data = config.data
    data = dataclasses.replace(
        data,
        manifest=absolute(data.manifest),
        dreambench=None
        if data.dreambench is None
        else dataclasses.replace(data.dreambench, source=absolute(data.dreambench.source)),
    )
    model = config.model
    if not is_model_name(model.base):  # a checkpoint directory
        model = dataclasses.replace(model, base=absolute(model.base))
    model = dataclasses.replace(model, init_weights=absolute(model.init_weights))
    sampling = config.sampling
    if sampling is not None:
        sampling = dataclasses.replace(sampling, reference=absolute(sampling.reference))
    return dataclasses.replace(config, data=data, model=model, sampling=sampling)


def is_model_name(base: str) -> bool:
    """`tiny`, `sdxl-random`, ...: a model built from a spec rather than read from a directory."""
    return base in SPECS or base.removesuffix("-random") in SPECS


def build(cls: type, value: object, where: str):
    """Build dataclass `cls` from nested mappings/lists, rejecting unknown keys with their location."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {name: _convert(hints[name], item, f"{where}.{name}") for name, item in value.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:  # a missing required field
        raise ValueError(f"{where}: {error}") from error


def _convert(hint: object, value: object, where: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        return None if value is None else _convert(options[0], value, where)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list")
        args = typing.get_args(hint)
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ValueError(f"{where}: expected {len(item_types)} values, got {len(value)}")
        pairs = enumerate(zip(item_types, value, strict=True))
        return tuple(_convert(item_type, item, f"{where}[{i}]") for i, (item_type, item) in pairs)
    if hint is float and not isinstance(value, bool):
        try:  # YAML reads "1e-5" (no dot) as a string
            return float(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: expected a number, got {value!r}") from error
    if hint in (int, str, bool) and not isinstance(value, hint):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ValueError(f"{where}: expected int, got {value!r}")
    return value
