"""conf.toml: one parser, typed and frozen.

`load_config` reads the file once, applies `--set section.key=value` overrides and
returns a `Config` of frozen dataclasses. Unknown sections and keys, wrong types
and out-of-range values fail here, before any image is read or any GPU time is
spent. Stages never read TOML, argparse or the environment themselves.
"""

from __future__ import annotations

import math
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from features.errors import ConfigError
from features.images import DECODE_MODES, DEFAULT_MAX_PIXELS
from features.pooling import parse_pooling
from pipeline.layout import MODEL_KINDS, RunLayout

T = TypeVar("T")

DEVICES = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STORAGE_DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "lzf", "gzip")
DECODERS = ("auto", "pillow", "nvjpeg")
ENGINES = ("auto", "torch", "onnxruntime")
FINGERPRINTS = ("stat", "content")
STRATEGIES = {
    "auto": "auto",
    "1": "1",
    "2": "2",
    "3": "3",
    "4": "4",
    "linear_top": "1",
    "linear_early": "2",
    "finetune": "3",
    "scratch": "4",
}
LOG_LEVELS = ("debug", "info", "warning", "error")
CLASSIFIERS = ("logistic", "linear_svm", "svm", "sgd")
PREPROCESS_STEPS = ("standardize", "l2", "pca")
CLASS_WEIGHTS = ("none", "balanced")
SCORINGS = ("accuracy", "balanced_accuracy", "f1_macro")
OPTIMIZERS = ("adamw", "sgd")
AUGMENTS = ("standard", "trivialaugment", "none")
MONITORS = ("accuracy", "balanced_accuracy", "loss")
# Keys earlier versions accepted, with what replaces them.
RETIRED = {
    ("advise", "large_per_class"): "the advisor measures size with a pilot "
    "fine-tune above advise.small_per_class (docs/advisor.md)",
}


def _check_choice(section: str, key: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(
            f"[{section}] {key} = {value!r} is not one of {list(choices)}"
        )


def _check_seed(section: str, key: str, value: int) -> None:
    # NOTE: numpy's legacy generators (scikit-learn's random_state) take
    # 0 <= seed < 2**32 and fail deep inside a fit otherwise.
    if not 0 <= value < 2**32:
        raise ConfigError(
            f"[{section}] {key} must be an integer in 0..{2**32 - 1}, got {value}"
        )


def _check_fraction(section: str, key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"[{section}] {key} must be in [0, 1), got {value}")


@dataclass(frozen=True)
class DataConfig:
    """Where the labelled images are and how they are split.

    `root` is a folder of class subfolders (optionally under train/ val/ test/)
    or a CSV manifest with columns `path,label[,split]`. Splits that the data
    does not provide are carved out of the training images, per class, with a
    seeded shuffle.
    """

    root: Path = Path("data/digits")
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    background: tuple[int, ...] = (255, 255, 255)
    fingerprint: str = "stat"
    decode: str = "fast"

    def __post_init__(self) -> None:
        _check_fraction("data", "val_fraction", self.val_fraction)
        _check_fraction("data", "test_fraction", self.test_fraction)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                "[data] val_fraction + test_fraction must leave images for "
                f"training, got {self.val_fraction} + {self.test_fraction} >= 1"
            )
        if self.max_pixels <= 0:
            raise ConfigError(f"[data] max_pixels must be > 0, got {self.max_pixels}")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ConfigError(
                "[data] background must be three integers in 0..255 (an RGB "
                f"colour), got {list(self.background)}"
            )
        _check_choice("data", "fingerprint", self.fingerprint, FINGERPRINTS)
        _check_seed("data", "seed", self.seed)
        _check_choice("data", "decode", self.decode, DECODE_MODES)


@dataclass(frozen=True)
class BackboneConfig:
    """Which network, which weights, and overrides of its preprocessing.

    `name` is a torchvision model, `efficientnet_lite0`..`4`, or a timm model
    as "timm/<model>[.<pretrained tag>]" (timm is imported only then).
    `weights` is "default" (the backbone's best pretrained weights; for timm
    the tag's, from the Hugging Face hub cache), a torchvision weights enum
    name such as "IMAGENET1K_V2", "random", or the path of a local state_dict
    or safetensors file.
    """

    name: str = "efficientnet_lite0"
    weights: str = "default"
    input_size: int | None = None
    resize_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None

    def __post_init__(self) -> None:
        self._check_name()
        for key in ("input_size", "resize_size"):
            value = getattr(self, key)
            if value is not None and value < 8:
                raise ConfigError(f"[backbone] {key} must be >= 8, got {value}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != 3:
                raise ConfigError(
                    f"[backbone] {key} must have 3 values (R, G, B), got {list(value)}"
                )
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"[backbone] std must be > 0, got {list(self.std)}")
        if self.interpolation is not None:
            _check_choice(
                "backbone",
                "interpolation",
                self.interpolation,
                ("nearest", "bilinear", "bicubic"),
            )

    def _check_name(self) -> None:
        # NOTE: imported here: reading the config module stays torch-free, and
        # timm is imported only for timm names.
        from features.backbones import available_backbones, timm_backbones
        from features.errors import BackboneError

        if timm_backbones.is_timm_name(self.name):
            try:
                timm_backbones.check_name(self.name)
            except BackboneError as err:
                raise ConfigError(f"[backbone] name = {self.name!r}: {err}") from None
            return
        names = available_backbones()
        if self.name not in names:
            raise ConfigError(
                f"[backbone] name = {self.name!r} is not a known backbone; run "
                "`quadrant layers --list` for the names, e.g. "
                f"{[n for n in names if 'lite' in n or n.startswith('resnet')]}, "
                "or a timm model as 'timm/<model>[.<tag>]'."
                + timm_backbones.suggest(self.name)
            )

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing overrides (None keeps the backbone's own)."""
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "mean": self.mean,
            "std": self.std,
            "interpolation": self.interpolation,
        }


@dataclass(frozen=True)
class ExtractConfig:
    """How CNN codes are computed and cached.

    `layers` are names from `quadrant layers` ("top" is the input of the
    backbone's classifier); every layer is pooled with every entry of
    `pooling` (avg, max, avg+max, grid:K; for transformer blocks also cls,
    patch_avg, cls+patch_avg). `views` > 1 adds augmented views of
    each training image. `cache_dir` defaults to `<run.out>/cache`.
    """

    layers: tuple[str, ...] = ("top",)
    pooling: tuple[str, ...] = ("avg",)
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    num_workers: int = -1
    dtype: str = "float32"
    compression: str = "none"
    views: int = 1
    shard_size: int = 1024
    engine: str = "auto"
    cache_dir: Path | None = None
    decoder: str = "auto"
    threads: int = -1

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError(
                '[extract] layers must name at least one layer, e.g. ["top"]'
            )
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"[extract] layers has duplicates: {list(self.layers)}")
        if not self.pooling:
            raise ConfigError('[extract] pooling must name at least one, e.g. ["avg"]')
        for spec in self.pooling:
            try:
                parse_pooling(spec)
            except ValueError as err:
                raise ConfigError(f"[extract] pooling: {err}") from None
        if self.batch_size <= 0:
            raise ConfigError(
                f"[extract] batch_size must be > 0, got {self.batch_size}"
            )
        if not DEVICES.match(self.device):
            raise ConfigError(
                f"[extract] device = {self.device!r} is not one of auto, cpu, "
                "cuda, cuda:N, mps"
            )
        _check_choice("extract", "precision", self.precision, PRECISIONS)
        _check_choice("extract", "dtype", self.dtype, STORAGE_DTYPES)
        _check_choice("extract", "compression", self.compression, COMPRESSIONS)
        _check_choice("extract", "engine", self.engine, ENGINES)
        if self.num_workers < -1:
            raise ConfigError(
                "[extract] num_workers must be -1 (auto), 0 (main process) or "
                f"more, got {self.num_workers}"
            )
        if self.views < 1:
            raise ConfigError(f"[extract] views must be >= 1, got {self.views}")
        if self.shard_size <= 0:
            raise ConfigError(
                f"[extract] shard_size must be > 0, got {self.shard_size}"
            )
        _check_choice("extract", "decoder", self.decoder, DECODERS)
        if self.threads < -1 or self.threads == 0:
            raise ConfigError(
                "[extract] threads must be -1 (chosen with the loader workers) or "
                f">= 1, got {self.threads}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """A scikit-learn classifier on cached codes (the codes path, cases 1-2).

    `layer` is a layer of extract.layers, or "best" for the layer the sweep
    ranks first. Hyper-parameters are chosen by stratified cross-validation
    on the training split over the grids `C` (logistic, linear_svm, svm),
    `gamma` (svm) and `alpha` (sgd).
    """

    classifier: str = "logistic"
    layer: str = "top"
    pooling: str | None = None
    preprocess: tuple[str, ...] = ("standardize",)
    pca_components: float = 0.95
    C: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    gamma: tuple[str | float, ...] = ("scale",)
    alpha: tuple[float, ...] = (1e-5, 1e-4, 1e-3)
    class_weight: str = "none"
    scoring: str = "accuracy"
    cv_folds: int = 5
    n_jobs: int = -1
    max_iter: int = 2000
    views: str = "first"
    epochs: int = 5
    buffer_mib: int = 256
    codes: Path | None = None

    def __post_init__(self) -> None:
        _check_choice("train", "classifier", self.classifier, CLASSIFIERS)
        for step in self.preprocess:
            _check_choice("train", "preprocess", step, PREPROCESS_STEPS)
        if len(set(self.preprocess)) != len(self.preprocess):
            raise ConfigError(
                f"[train] preprocess has duplicates: {list(self.preprocess)}"
            )
        if self.pca_components <= 0 or (
            self.pca_components >= 1 and not float(self.pca_components).is_integer()
        ):
            raise ConfigError(
                "[train] pca_components must be a share of variance in (0, 1) or a "
                f"whole number of components, got {self.pca_components}"
            )
        for key in ("C", "alpha"):
            values = getattr(self, key)
            if not values or min(values) <= 0:
                raise ConfigError(
                    f"[train] {key} must be positive numbers, got {list(values)}"
                )
        for g in self.gamma:
            if (
                isinstance(g, str)
                and g not in ("scale", "auto")
                or (not isinstance(g, str) and g <= 0)
            ):
                raise ConfigError(
                    f"[train] gamma values must be 'scale', 'auto' or > 0, got {g!r}"
                )
        _check_choice("train", "class_weight", self.class_weight, CLASS_WEIGHTS)
        _check_choice("train", "scoring", self.scoring, SCORINGS)
        _check_choice("train", "views", self.views, ("first", "all"))
        for key in ("cv_folds",):
            if getattr(self, key) < 2:
                raise ConfigError(
                    f"[train] {key} must be >= 2, got {getattr(self, key)}"
                )
        for key in ("max_iter", "epochs", "buffer_mib"):
            if getattr(self, key) < 1:
                raise ConfigError(
                    f"[train] {key} must be >= 1, got {getattr(self, key)}"
                )


@dataclass(frozen=True)
class SweepConfig:
    """The layer sweep: a linear probe and LogME for every cached layer.

    `max_images` caps the training images the probe sees (a stratified,
    seeded subset), which keeps the sweep quick on large data sets.
    """

    cv_folds: int = 5
    C: float = 1.0
    max_images: int = 5000

    def __post_init__(self) -> None:
        if self.cv_folds < 2:
            raise ConfigError(f"[sweep] cv_folds must be >= 2, got {self.cv_folds}")
        if self.C <= 0:
            raise ConfigError(f"[sweep] C must be > 0, got {self.C}")
        if self.max_images < 10:
            raise ConfigError(
                f"[sweep] max_images must be >= 10, got {self.max_images}"
            )


@dataclass(frozen=True)
class FinetuneConfig:
    """Full fine-tuning of the backbone with a new head (cases 3 and 4).

    `init` "pretrained" starts from backbone.weights, "scratch" from random
    weights. The first `head_epochs` of `epochs` train the new head only
    (body and its BatchNorm statistics frozen). `layer_decay` < 1 gives each
    earlier layer a learning rate `layer_decay` times the next one's.
    `bn_momentum` replaces the BatchNorm momentum of the network: weights
    ported from TensorFlow (EfficientNet-Lite) come with 0.01, which leaves
    the running statistics far behind the weights in a short fine-tune.
    `channels_last` applies on CUDA only: on the CPU it made training slower.
    """

    epochs: int = 10
    init: str = "pretrained"
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    layer_decay: float = 1.0
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    head_epochs: int = 0
    label_smoothing: float = 0.1
    accumulate: int = 1
    clip_grad: float = 0.0
    augment: str = "standard"
    bn_momentum: float = 0.1
    monitor: str = "accuracy"
    patience: int = 0
    lr_scaling: str = "none"
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    num_workers: int = -1
    deterministic: bool = False

    def __post_init__(self) -> None:
        _check_choice("finetune", "init", self.init, ("pretrained", "scratch"))
        _check_choice("finetune", "optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("finetune", "augment", self.augment, AUGMENTS)
        _check_choice("finetune", "monitor", self.monitor, MONITORS)
        _check_choice("finetune", "lr_scaling", self.lr_scaling, ("none", "linear"))
        _check_choice("finetune", "precision", self.precision, PRECISIONS)
        if not DEVICES.match(self.device):
            raise ConfigError(
                f"[finetune] device = {self.device!r} is not one of auto, cpu, "
                "cuda, cuda:N, mps"
            )
        for key in ("epochs", "batch_size", "accumulate"):
            if getattr(self, key) < 1:
                raise ConfigError(
                    f"[finetune] {key} must be >= 1, got {getattr(self, key)}"
                )
        for key in ("head_epochs", "patience"):
            if getattr(self, key) < 0:
                raise ConfigError(
                    f"[finetune] {key} must be >= 0, got {getattr(self, key)}"
                )
        if self.head_epochs >= self.epochs:
            raise ConfigError(
                f"[finetune] head_epochs ({self.head_epochs}) must be < epochs "
                f"({self.epochs}): the last epochs train the whole network"
            )
        if self.lr <= 0 or not 0 < self.layer_decay <= 1:
            raise ConfigError(
                "[finetune] lr must be > 0 and layer_decay in (0, 1], got "
                f"lr={self.lr}, layer_decay={self.layer_decay}"
            )
        for key in ("weight_decay", "warmup_epochs", "clip_grad"):
            if getattr(self, key) < 0:
                raise ConfigError(
                    f"[finetune] {key} must be >= 0, got {getattr(self, key)}"
                )
        _check_fraction("finetune", "label_smoothing", self.label_smoothing)
        if not 0 <= self.bn_momentum <= 1:
            raise ConfigError(
                f"[finetune] bn_momentum must be in [0, 1], got {self.bn_momentum}"
            )
        if self.num_workers < -1:
            raise ConfigError(
                f"[finetune] num_workers must be >= -1, got {self.num_workers}"
            )


@dataclass(frozen=True)
class ExportConfig:
    """One ONNX file: images in, class scores and the label index out.

    Every export is checked (onnx.checker, then onnxruntime against the
    PyTorch / scikit-learn model on `parity_images` held-out images, within
    `atol` / `rtol`). `fp16` and `int8` also write converted copies and
    report their accuracy change on the test split. `int8 = "static"`
    calibrates activation ranges on `calibration_images` training images (QDQ,
    per-channel weights); "dynamic" quantises weights only, which suits
    MatMul-heavy models and measured far worse on CNNs (docs/benchmarks.md).
    """

    opset: int = 17
    input_dtype: str = "uint8"
    fp16: bool = False
    int8: str = "none"
    calibration_images: int = 64
    parity_images: int = 32
    atol: float = 1e-4
    rtol: float = 1e-4

    def __post_init__(self) -> None:
        if not 13 <= self.opset <= 21:
            raise ConfigError(f"[export] opset must be in 13..21, got {self.opset}")
        _check_choice("export", "input_dtype", self.input_dtype, ("uint8", "float32"))
        _check_choice("export", "int8", self.int8, ("none", "static", "dynamic"))
        if self.calibration_images < 1:
            raise ConfigError(
                "[export] calibration_images must be >= 1, got "
                f"{self.calibration_images}"
            )
        if self.parity_images < 1:
            raise ConfigError(
                f"[export] parity_images must be >= 1, got {self.parity_images}"
            )
        if self.atol <= 0 or self.rtol < 0:
            raise ConfigError(
                f"[export] atol must be > 0 and rtol >= 0, got {self.atol}, {self.rtol}"
            )


@dataclass(frozen=True)
class AdviseConfig:
    """How the advisor measures size and similarity (docs/advisor.md).

    Similarity: every probed layer is scored by a linear probe on the same
    `cv_repeats` x `cv_folds` stratified folds of at most `sample` training
    images, at `depths` depths besides top; the data is "different" when the
    lower end of the `confidence` interval of the best earlier layer's gain
    over top clears `top_margin` (accuracy, 0..1), "similar" when its upper
    end does not reach it, and "undecided" otherwise.

    Size: below a median of `small_per_class` training images per class the
    data is small; above it, a pilot fine-tune of `pilot_share` of the full
    fine-tune's cost (images processed), validated at `pilot_points` even
    steps, is set against the frozen codes on the validation split.
    """

    top_margin: float = 0.01
    sample: int = 2000
    depths: int = 5
    statistics_images: int = 256
    small_per_class: int = 100
    cv_folds: int = 5
    cv_repeats: int = 3
    confidence: float = 0.95
    pilot_share: float = 0.25
    pilot_points: int = 4

    def __post_init__(self) -> None:
        for key in ("sample", "depths", "statistics_images", "cv_repeats"):
            if getattr(self, key) < 1:
                raise ConfigError(
                    f"[advise] {key} must be >= 1, got {getattr(self, key)}"
                )
        for key in ("cv_folds", "pilot_points"):
            if getattr(self, key) < 2:
                raise ConfigError(
                    f"[advise] {key} must be >= 2, got {getattr(self, key)}"
                )
        if self.small_per_class < 0:
            raise ConfigError(
                f"[advise] small_per_class must be >= 0, got {self.small_per_class}"
            )
        _check_fraction("advise", "top_margin", self.top_margin)
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(
                f"[advise] confidence must be in [0.5, 1), got {self.confidence}"
            )
        if not 0 < self.pilot_share <= 1:
            raise ConfigError(
                f"[advise] pilot_share must be in (0, 1] (a share of the full "
                f"fine-tune's cost), got {self.pilot_share}"
            )


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes, which case it runs and how it talks.

    `model` picks the trained model that evaluate, export and report work on:
    "latest" (the one trained last), "codes" or "finetune".
    """

    out: Path = Path("runs/demo")
    # `strategy = 2` and `strategy = "2"` mean the same; stored as the string.
    strategy: str | int = "auto"
    model: str = "latest"
    seed: int = 0
    progress: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", str(self.strategy))
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"[run] strategy = {self.strategy!r} is not one of {list(STRATEGIES)}"
            )
        _check_choice("run", "model", self.model, ("latest", *MODEL_KINDS))
        _check_seed("run", "seed", self.seed)
        _check_choice("run", "log_level", self.log_level, LOG_LEVELS)

    @property
    def case(self) -> int | None:
        """The case this strategy names, or None for `auto` (the advisor picks)."""
        code = STRATEGIES[str(self.strategy)]
        return None if code == "auto" else int(code)


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration; `source` is the file it came from."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    advise: AdviseConfig = field(default_factory=AdviseConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: Path | None = None

    @property
    def cache_dir(self) -> Path:
        """The folder of code caches (`extract.cache_dir`, else `<run.out>/cache`)."""
        return self.extract.cache_dir or self.run.out / "cache"

    @property
    def layout(self) -> RunLayout:
        """Every path the run folder holds."""
        return RunLayout.of(self.run.out, self.cache_dir)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "backbone": BackboneConfig,
    "extract": ExtractConfig,
    "sweep": SweepConfig,
    "train": TrainConfig,
    "finetune": FinetuneConfig,
    "export": ExportConfig,
    "advise": AdviseConfig,
    "run": RunConfig,
}


def load_config(
    path: Path | None = None,
    overrides: Sequence[str] = (),
    *,
    cwd: Path | None = None,
) -> Config:
    """Read conf.toml, apply `section.key=value` overrides and validate.

    Relative paths in the file resolve against the file's folder; relative
    paths given as overrides resolve against `cwd` (the shell's folder), which
    is what a user typing a path expects.

    Args:
        path: the TOML file, or None for the built-in defaults.
        overrides: strings `section.key=value`; the value uses TOML syntax and
            falls back to a plain string (`--set backbone.name=resnet50`).
        cwd: folder for relative paths in overrides and, without a file, for
            the defaults; the process's working folder when None.

    Raises:
        ConfigError: on a missing or malformed file, an unknown section or key,
            or a value of the wrong type or range.
    """
    cwd = (cwd or Path.cwd()).resolve()
    tables = _read_toml(path) if path is not None else {}
    base = path.resolve().parent if path is not None else cwd
    file_paths = _paths_of(tables, base)
    override_tables = _parse_overrides(overrides)
    override_paths = _paths_of(override_tables, cwd)
    merged = _merge(tables, override_tables)
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        table = merged.get(name, {})
        roots = {**file_paths.get(name, {}), **override_paths.get(name, {})}
        sections[name] = _build(cls, table, name, roots, default_base=base)
    return Config(**sections, source=path.resolve() if path is not None else None)


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"config file {path} not found; pass -c PATH, or copy conf.toml from "
            "the quadrant README into this folder"
        )
    try:
        with open(path, "rb") as handle:
            tables = tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    unknown = set(tables) - set(SECTIONS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {sorted(unknown)}; valid: {list(SECTIONS)}"
        )
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"{path}: {name} must be a table ([{name}] with keys below it), "
                f"got {table!r}"
            )
    return tables


def _parse_overrides(overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    tables: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(
                f"--set {item!r} must look like section.key=value, e.g. "
                "--set extract.batch_size=128"
            )
        if section not in SECTIONS:
            raise ConfigError(
                f"--set {item!r}: unknown section {section!r}; valid: {list(SECTIONS)}"
            )
        tables.setdefault(section, {})[name] = _parse_value(raw.strip())
    return tables


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        # NOTE: a bare word (`--set backbone.name=resnet50`) is not valid TOML;
        # taking it as a string spares users shell-quoting every string.
        return raw


def _merge(
    base: Mapping[str, Mapping[str, Any]], top: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    merged = {name: dict(table) for name, table in base.items()}
    for name, table in top.items():
        merged.setdefault(name, {}).update(table)
    return merged


def _paths_of(
    tables: Mapping[str, Mapping[str, Any]], base: Path
) -> dict[str, dict[str, Path]]:
    """Remember which folder each section's relative paths resolve against."""
    return {name: {key: base for key in table} for name, table in tables.items()}


def _build(
    cls: type[T],
    table: Mapping[str, Any],
    section: str,
    bases: Mapping[str, Path],
    *,
    default_base: Path,
) -> T:
    valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = set(table) - set(valid)
    if unknown:
        retired = "".join(
            f"; {key} is retired: {RETIRED[(section, key)]}"
            for key in sorted(unknown)
            if (section, key) in RETIRED
        )
        raise ConfigError(
            f"[{section}] unknown key(s) {sorted(unknown)}; valid: {valid}{retired}"
        )
    hints = typing.get_type_hints(cls)
    values = {
        key: _coerce(value, hints[key], f"[{section}] {key}")
        for key, value in table.items()
    }
    built = cls(**values)
    # Relative paths (given or default) are anchored to the folder they came from.
    anchored = {}
    for f in fields(cls):  # type: ignore[arg-type]
        value = getattr(built, f.name)
        if isinstance(value, Path) and not value.is_absolute():
            anchored[f.name] = (bases.get(f.name, default_base) / value).resolve()
    return replace(built, **anchored) if anchored else built  # type: ignore[type-var]


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a TOML value to the annotated type, or explain the mismatch."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        for option in options[:-1]:  # the last option's error explains best
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        return _coerce(value, options[-1], where)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        items = value if isinstance(value, list) else [value]
        return tuple(_coerce(v, item, where) for v in items)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a path string, got {value!r}")
        return Path(value).expanduser()
    raise AssertionError(f"no coercion for {hint!r}")  # internal: a new field type


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The resolved configuration as TOML-ready tables (paths as strings, no Nones)."""
    out: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        table = asdict(getattr(cfg, name))
        out[name] = {k: _plain(v) for k, v in table.items() if v is not None}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def dump_toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """Write flat TOML tables of scalars and lists.

    NOTE: conf.toml is flat by contract (tables of scalars and lists), so this
    few-line writer replaces a dependency (tomli-w) that the offline GPU
    machines would have to be sent as a wheel.
    """
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} as TOML")
