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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from features.atomic import require_file
from features.errors import ConfigError
from features.images import DEFAULT_MAX_PIXELS
from features.limits import (
    Check,
    Each,
    Interval,
    Limits,
    OneOf,
    Parses,
    Rule,
    Unique,
    check_limits,
)
from features.names import (
    AUGMENTS,
    BATCHNORMS,
    CLASS_WEIGHTS,
    CLASSIFIERS,
    FINGERPRINTS,
    HEAD_INITS,
    INITS,
    INPUT_DTYPES,
    INT8_MODES,
    INTERPOLATIONS,
    LOG_LEVELS,
    LR_SCALINGS,
    MODEL_CHOICES,
    MONITORS,
    OPTIMIZERS,
    PRECISIONS,
    PREPROCESS_STEPS,
    SCORINGS,
    STRATEGIES,
    TRAIN_VIEWS,
)
from features.pooling import parse_pooling
from features.settings import DECODING_LIMITS, DEVICE, Decoding, ExtractOptions
from pipeline.layout import RunLayout

T = TypeVar("T")

# Keys earlier versions accepted, with what replaces them.
RETIRED = {
    ("advise", "large_per_class"): "the advisor measures size with a pilot "
    "fine-tune above advise.small_per_class (docs/advisor.md)",
}

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def parse_budget(text: str) -> float | None:
    """Seconds of a duration such as "10m", "2h", "1h30m" or "90s"; None for "none".

    Raises:
        ValueError: any other spelling, or a budget of zero.
    """
    if text.strip().lower() == "none":
        return None
    parts = _DURATION.findall(text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise ValueError(
            f"{text!r} is not a duration; use e.g. '10m', '2h', '1h30m', '90s' "
            "or 'none'"
        )
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r} is no time at all; give a positive duration")
    return seconds


# Limits several sections share.
# NOTE: numpy's legacy generators (scikit-learn's random_state) take
# 0 <= seed < 2**32 and fail deep inside a fit otherwise.
SEED = Interval(0, 2**32 - 1, what="an integer")
FRACTION = Interval(0, 1, closed="left")
POSITIVE = Interval(0, None, closed="neither")
AT_LEAST_1 = Interval(1, None)
AT_LEAST_2 = Interval(2, None)
NOT_NEGATIVE = Interval(0, None)


class _Section:
    """A conf.toml table: its name and its declared limits, checked when made."""

    NAME: ClassVar[str]
    LIMITS: ClassVar[Limits] = {}
    RULES: ClassVar[tuple[Rule, ...]] = ()

    def __post_init__(self) -> None:
        check_limits(f"[{self.NAME}]", self, self.LIMITS, self.RULES)


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the labelled images are and how they are split.

    `root` is a folder of class subfolders (optionally under train/ val/ test/)
    or a CSV manifest with columns `path,label[,split]`. Splits that the data
    does not provide are carved out of the training images, per class, with a
    seeded shuffle. `decode`, `max_pixels` and `background` are the decode
    recipe (`decoding`).
    """

    root: Path = Path("data/digits")
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    background: tuple[int, ...] = (255, 255, 255)
    fingerprint: str = "stat"
    decode: str = "fast"

    NAME: ClassVar[str] = "data"
    LIMITS: ClassVar[Limits] = {
        "val_fraction": FRACTION,
        "test_fraction": FRACTION,
        "seed": SEED,
        "fingerprint": OneOf(FINGERPRINTS),
        **DECODING_LIMITS,
    }
    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ("val_fraction", "test_fraction"),
            lambda val, test: val + test < 1,
            "must leave images for training (their sum below 1)",
        ),
    )

    @property
    def decoding(self) -> Decoding:
        """The decode recipe; `Decoding.for_input` sets its side per network."""
        return Decoding(self.decode, self.max_pixels, self.background)


@dataclass(frozen=True)
class BackboneConfig(_Section):
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

    NAME: ClassVar[str] = "backbone"
    LIMITS: ClassVar[Limits] = {
        "input_size": Interval(8, None),
        "resize_size": Interval(8, None),
        "mean": Check(lambda v: len(v) == 3, "must have 3 values (R, G, B)", (0.5,)),
        "std": Check(
            lambda v: len(v) == 3 and min(v) > 0,
            "must have 3 values (R, G, B), each > 0",
            (0.5, 0.5, 0.0),
        ),
        "interpolation": OneOf(INTERPOLATIONS),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_name()
        self.check_input_size(self.input_size, "[backbone] input_size")

    def check_input_size(self, size: int | None, setting: str) -> None:
        """Refuse a side this backbone cannot take (a torchvision ViT's other
        than its own) now, not as a traceback inside the first forward pass."""
        from features.backbones import check_input_size
        from features.errors import BackboneError

        try:
            check_input_size(self.name, self.weights, size)
        except BackboneError as err:
            raise ConfigError(f"{setting}: {err}") from None

    def _check_name(self) -> None:
        # NOTE: imported here: reading the config module stays torch-free, and
        # timm is imported only for timm names.
        from features.backbones import (
            available_backbones,
            check_timm_name,
            is_timm_name,
            suggest_timm_names,
        )
        from features.errors import BackboneError

        if is_timm_name(self.name):
            try:
                check_timm_name(self.name)
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
                + suggest_timm_names(self.name)
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


def _pooling_spec(spec: str) -> None:
    parse_pooling(spec)  # raises ValueError naming the valid spellings


@dataclass(frozen=True)
class ExtractConfig(_Section, ExtractOptions):
    """How CNN codes are computed and cached: `ExtractOptions` and the layers.

    `layers` are names from `quadrant layers` ("top" is the input of the
    backbone's classifier); every layer is pooled with every entry of
    `pooling` (avg, max, avg+max, grid:K; for transformer blocks also cls,
    patch_avg, cls+patch_avg). `views` > 1 adds augmented views of
    each training image. `cache_dir` defaults to `<run.out>/cache`.
    """

    layers: tuple[str, ...] = ("top",)
    pooling: tuple[str, ...] = ("avg",)
    cache_dir: Path | None = None

    NAME: ClassVar[str] = "extract"
    LIMITS: ClassVar[Limits] = {
        "layers": Unique(
            Each(
                Check(
                    lambda name: bool(name.strip()),
                    "must be layer names from `quadrant layers`",
                    " ",
                ),
                empty=False,
                hint=' layer, e.g. ["top"]',
            )
        ),
        "pooling": Each(
            Parses(_pooling_spec, "mean"), empty=False, hint=', e.g. ["avg"]'
        ),
        **ExtractOptions.LIMITS,
    }


@dataclass(frozen=True)
class TrainConfig(_Section):
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

    NAME: ClassVar[str] = "train"
    LIMITS: ClassVar[Limits] = {
        "classifier": OneOf(CLASSIFIERS),
        "pooling": Parses(_pooling_spec, "mean"),
        "preprocess": Unique(Each(OneOf(PREPROCESS_STEPS))),
        "pca_components": Check(
            lambda v: 0 < v < 1 or (v >= 1 and float(v).is_integer()),
            "must be a share of variance in (0, 1) or a whole number of components",
            1.5,
        ),
        "C": Each(POSITIVE, empty=False, hint=" value, e.g. [1.0]"),
        "gamma": Each(
            Check(
                lambda g: g in ("scale", "auto") if isinstance(g, str) else g > 0,
                "values must be 'scale', 'auto' or > 0",
                "often",
            ),
            empty=False,
            hint=' value, e.g. ["scale"]',
        ),
        "alpha": Each(POSITIVE, empty=False, hint=" value, e.g. [1e-4]"),
        "class_weight": OneOf(CLASS_WEIGHTS),
        "scoring": OneOf(SCORINGS),
        "cv_folds": AT_LEAST_2,
        # NOTE: joblib's n_jobs: -1 every core, -2 all but one, ...; 0 is none.
        "n_jobs": Check(
            lambda n: n != 0,
            "must be a number of parallel jobs, or -1 for every core (-2: all "
            "but one); 0 runs nothing",
            0,
        ),
        "max_iter": AT_LEAST_1,
        "views": OneOf(TRAIN_VIEWS),
        "epochs": AT_LEAST_1,
        "buffer_mib": AT_LEAST_1,
    }


@dataclass(frozen=True)
class SweepConfig(_Section):
    """The layer sweep: a linear probe and LogME for every cached layer.

    `max_images` caps the training images the probe sees (a stratified,
    seeded subset), which keeps the sweep quick on large data sets.
    """

    cv_folds: int = 5
    C: float = 1.0
    max_images: int = 5000

    NAME: ClassVar[str] = "sweep"
    LIMITS: ClassVar[Limits] = {
        "cv_folds": AT_LEAST_2,
        "C": POSITIVE,
        "max_images": Interval(10, None),
    }


@dataclass(frozen=True)
class FinetuneConfig(_Section):
    """Full fine-tuning of the backbone with a new head (cases 3 and 4).

    `init` "pretrained" starts from backbone.weights, "scratch" from random
    weights. The first `head_epochs` of `epochs` train the new head only
    (body and its BatchNorm statistics frozen). `layer_decay` < 1 gives each
    earlier layer a learning rate `layer_decay` times the next one's.
    `bn_momentum` replaces the BatchNorm momentum of the network: weights
    ported from TensorFlow (EfficientNet-Lite) come with 0.01, which leaves
    the running statistics far behind the weights in a short fine-tune.
    `channels_last` applies on CUDA only: on the CPU it made training slower.
    `input_size` fine-tunes at another input size than the backbone's (small
    native images need not be blown up to 224 px); `train_from` freezes every
    layer before it (partial fine-tuning); `head_init` "probe" starts the new
    head from a linear probe on the top-layer codes (LP-FT, Kumar et al. 2022).
    """

    epochs: int = 10
    init: str = "pretrained"
    head_init: str = "auto"
    input_size: int | None = None
    train_from: str | None = None
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
    augment: str = "auto"
    batchnorm: str = "auto"
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

    NAME: ClassVar[str] = "finetune"
    LIMITS: ClassVar[Limits] = {
        "epochs": AT_LEAST_1,
        "init": OneOf(INITS),
        "head_init": OneOf(HEAD_INITS),
        "input_size": Interval(8, None),
        "train_from": Check(
            lambda name: bool(name.strip()),
            "must be a layer name from `quadrant layers`",
            " ",
        ),
        "batch_size": AT_LEAST_1,
        "optimizer": OneOf(OPTIMIZERS),
        "lr": POSITIVE,
        "layer_decay": Interval(0, 1, closed="right"),
        "weight_decay": NOT_NEGATIVE,
        "momentum": Interval(0, 1, closed="left"),
        "warmup_epochs": NOT_NEGATIVE,
        "head_epochs": NOT_NEGATIVE,
        "label_smoothing": FRACTION,
        "accumulate": AT_LEAST_1,
        "clip_grad": NOT_NEGATIVE,
        "augment": OneOf(AUGMENTS),
        "batchnorm": OneOf(BATCHNORMS),
        "bn_momentum": Interval(0, 1),
        "monitor": OneOf(MONITORS),
        "patience": NOT_NEGATIVE,
        "lr_scaling": OneOf(LR_SCALINGS),
        "device": DEVICE,
        "precision": OneOf(PRECISIONS),
        "num_workers": Interval(-1, None),
    }

    @property
    def probe_head(self) -> bool:
        """Whether the new head starts from a linear probe (LP-FT)."""
        return self.head_init == "probe" or (
            self.head_init == "auto" and self.init == "pretrained"
        )

    @property
    def frozen_batchnorm(self) -> bool:
        """Whether BatchNorm keeps the pretrained statistics while training.

        NOTE: a probe head was fitted on the codes of the running statistics;
        with batch statistics those codes move at once and the head with
        them. On the digits at 32 px (LP-FT, no augmentation) the test
        accuracy was 0.969 with training statistics and 0.992 with frozen
        ones (docs/benchmarks.md).
        """
        return self.batchnorm == "frozen" or (
            self.batchnorm == "auto" and self.probe_head
        )

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ("head_init", "init"),
            lambda head, init: not (head == "probe" and init == "scratch"),
            "a probe head needs the pretrained network (init = 'pretrained')",
        ),
        Rule(
            ("head_epochs", "epochs"),
            lambda head, epochs: head < epochs,
            "head_epochs must be < epochs: the last epochs train the whole network",
        ),
    )


@dataclass(frozen=True)
class ExportConfig(_Section):
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

    NAME: ClassVar[str] = "export"
    LIMITS: ClassVar[Limits] = {
        "opset": Interval(13, 21, what="an integer"),
        "input_dtype": OneOf(INPUT_DTYPES),
        "int8": OneOf(INT8_MODES),
        "calibration_images": AT_LEAST_1,
        "parity_images": AT_LEAST_1,
        "atol": POSITIVE,
        "rtol": NOT_NEGATIVE,
    }


@dataclass(frozen=True)
class AdviseConfig(_Section):
    """How the advisor measures size and similarity (docs/advisor.md).

    Similarity: every probed layer is scored by a linear probe on the same
    `cv_repeats` x `cv_folds` stratified folds of at most `sample` training
    images, at `depths` depths besides top; the data is "different" when the
    lower end of the `confidence` interval of the best earlier layer's gain
    over top clears `top_margin` (accuracy, 0..1), "similar" when its upper
    end does not reach it, and "undecided" otherwise.

    Size: below a median of `small_per_class` training images per class the
    data is small; above it, pilot fine-tunes of `pilot_share` of their full
    fine-tune's cost (images processed), validated at `pilot_points` even
    steps, are set against the codes path on the validation split, as many
    as `budget_share` of run.budget pays for.
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
    budget_share: float = 0.4

    NAME: ClassVar[str] = "advise"
    LIMITS: ClassVar[Limits] = {
        "top_margin": FRACTION,
        "sample": AT_LEAST_1,
        "depths": AT_LEAST_1,
        "statistics_images": AT_LEAST_1,
        "small_per_class": NOT_NEGATIVE,
        "cv_folds": AT_LEAST_2,
        "cv_repeats": AT_LEAST_1,
        "confidence": Interval(0.5, 1, closed="left"),
        # A share of the full fine-tune's cost (training images processed).
        "pilot_share": Interval(0, 1, closed="right"),
        "pilot_points": AT_LEAST_2,
        # The share of run.budget the advice may spend (pilots are skipped
        # rather than exceed it).
        "budget_share": Interval(0, 1, closed="right"),
    }


@dataclass(frozen=True)
class RunConfig(_Section):
    """Where a run writes, which case it runs and how it talks.

    `model` picks the trained model that evaluate, export and report work on:
    "latest" (the one trained last), "codes" or "finetune". `budget` is the
    wall time `quadrant run` may take ("10m", "2h", "none"): the advisor
    picks the best expected accuracy that fits, and a fine-tune that would
    run over stops at its best checkpoint.
    """

    out: Path = Path("runs/demo")
    # `strategy = 2` and `strategy = "2"` mean the same; stored as the string.
    strategy: str | int = "auto"
    model: str = "latest"
    seed: int = 0
    progress: bool = True
    log_level: str = "info"
    budget: str = "10m"

    NAME: ClassVar[str] = "run"
    LIMITS: ClassVar[Limits] = {
        "strategy": OneOf(tuple(STRATEGIES)),
        "model": OneOf(MODEL_CHOICES),
        "seed": SEED,
        "log_level": OneOf(LOG_LEVELS),
        "budget": Parses(parse_budget, "10 minutes"),
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", str(self.strategy))
        super().__post_init__()

    @property
    def budget_seconds(self) -> float | None:
        """`budget` in seconds; None for "none" (no limit)."""
        return parse_budget(self.budget)

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

    def __post_init__(self) -> None:
        self.backbone.check_input_size(
            self.finetune.input_size, "[finetune] input_size"
        )

    @property
    def cache_dir(self) -> Path:
        """The folder of code caches (`extract.cache_dir`, else `<run.out>/cache`)."""
        return self.extract.cache_dir or self.run.out / "cache"

    @property
    def layout(self) -> RunLayout:
        """Every path the run folder holds."""
        return RunLayout.of(self.run.out, self.cache_dir)


# The tables of conf.toml, in the order config.toml is written.
SECTIONS: dict[str, type[_Section]] = {
    cls.NAME: cls
    for cls in (
        DataConfig,
        BackboneConfig,
        ExtractConfig,
        SweepConfig,
        TrainConfig,
        FinetuneConfig,
        ExportConfig,
        AdviseConfig,
        RunConfig,
    )
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
    require_file(
        path,
        what="config file",
        fix="pass -c PATH of a conf.toml, or copy conf.toml from the quadrant "
        "README into this folder",
        error=ConfigError,
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
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise ConfigError(f"cannot write {value!r} as TOML")
