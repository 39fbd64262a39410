"""The backbone registry: a name and a weights tag in, a model with its
preprocessing and a verifiable weights identity out.

Names are torchvision's classification models (`resnet50`, `convnext_tiny` ...),
quadrant's own EfficientNet-Lite (`efficientnet_lite0` .. `lite4`) and, with
the optional timm extra, any timm model as `timm/<model>[.<pretrained tag>]`
(see `features.backbones.timm_backbones`). Weights are "default", a
torchvision enum name ("IMAGENET1K_V2"), "random" (seeded), or the path of a
local weights file (a state_dict, or safetensors).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, list_models

from features.atomic import read_torch, require_file
from features.backbones import efficientnet_lite, timm_backbones, torchvision_weights
from features.errors import BackboneError, WeightsNotFoundError
from features.transforms import Preprocessing

RANDOM = "random"
DEFAULT = "default"
_LITE_PREFIX = "efficientnet_lite"


@dataclass(frozen=True)
class Backbone:
    """A network ready for extraction or fine-tuning.

    Attributes:
        name: the registry name.
        model: the network, in eval mode, on the CPU.
        preprocessing: the input pipeline the weights expect.
        weights: the weights tag as configured ("default", an enum name,
            "random" or a path).
        weights_file: the file the weights came from, if any.
        weights_sha256: sha256 of that file (or "random:seed=N").
        extras: further identity entries (timm: the resolved model and tag,
            the hub repository and revision, the pretrained data config).
    """

    name: str
    model: nn.Module
    preprocessing: Preprocessing
    weights: str
    weights_file: Path | None
    weights_sha256: str
    extras: Mapping[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What makes these weights these weights (for provenance and cache keys)."""
        return {
            "name": self.name,
            "weights": self.weights,
            "weights_file": str(self.weights_file) if self.weights_file else None,
            "weights_sha256": self.weights_sha256,
            "num_classes": _num_classes(self.model),
            **self.extras,
        }


@functools.cache
def available_backbones() -> tuple[str, ...]:
    """Every name `build_backbone` accepts, but timm's (`timm/<model>`)."""
    lite = tuple(f"{_LITE_PREFIX}{v[-1]}" for v in efficientnet_lite.VARIANTS)
    return tuple(sorted(list_models(module=torchvision.models))) + lite


def check_backbone_name(name: str) -> None:
    """Refuse a name `build_backbone` would not accept, before any work.

    timm names are checked against timm's registry (timm is imported only
    for them).

    Raises:
        BackboneError: unknown name, unknown timm model or tag, or a timm
            name without timm installed.
    """
    if timm_backbones.is_timm_name(name):
        timm_backbones.check_name(name)
        return
    if name not in available_backbones():
        raise BackboneError(
            f"unknown backbone {name!r}; run `quadrant layers --list` for the "
            "names, or use a timm model as timm/<model>[.<tag>]."
            + timm_backbones.suggest(name)
        )


def build_backbone(
    name: str,
    weights: str = DEFAULT,
    *,
    seed: int = 0,
    preprocessing: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
) -> Backbone:
    """Build a backbone with its weights and preprocessing.

    Args:
        name: a name from `available_backbones()`.
        weights: "default", a torchvision weights enum name, "random" or a path.
        seed: seeds the initialisation of random weights and of new heads.
        preprocessing: overrides (input_size, resize_size, mean, std,
            interpolation); None entries keep the backbone's own.
        num_classes: a new classifier size; None keeps the weights' own.

    Raises:
        BackboneError: unknown name or weights tag, or a checkpoint that does
            not fit the architecture.
        WeightsNotFoundError: pretrained weights neither on disk nor downloadable.
    """
    check_backbone_name(name)
    prep = _native_preprocessing(name, weights).updated(preprocessing or {})
    check_input_size(name, weights, prep.input_size)
    extras: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if timm_backbones.is_timm_name(name):
            model, file, digest, extras = _load_timm(
                name, weights, prep.input_size, num_classes, seed
            )
        else:
            model, file, digest = _load(
                name, weights, prep.input_size, num_classes, seed
            )
    return Backbone(name, model.eval(), prep, weights, file, digest, extras)


def fixed_input_size(name: str, weights: str) -> int | None:
    """The only input side the backbone takes (a torchvision ViT or MaxViT),
    or None when it takes any; timm ViTs are rebuilt for the side asked."""
    if timm_backbones.is_timm_name(name) or name.startswith(_LITE_PREFIX):
        return None
    return torchvision_weights.fixed_input_size(name, _torchvision_tag(weights))


def check_input_size(name: str, weights: str, input_size: int | None) -> None:
    """Refuse an input side the architecture cannot run before any image is read.

    Raises:
        BackboneError: naming the side the backbone takes and the fix.
    """
    fixed = None if input_size is None else fixed_input_size(name, weights)
    if fixed is not None and input_size != fixed:
        raise BackboneError(
            f"{name} takes only {fixed}x{fixed} inputs (its layers are sized for "
            f"that side), got input_size {input_size}; remove the input_size "
            f"setting or set it to {fixed}, or pick a backbone that takes any "
            "size (a CNN, or timm/<vit model>, which is rebuilt for the size)"
        )


def _torchvision_tag(weights: str) -> str:
    """The weights enum tag; random and local weights use the default's shapes."""
    return weights if weights != RANDOM and not is_weights_path(weights) else DEFAULT


def _native_preprocessing(name: str, weights: str) -> Preprocessing:
    if timm_backbones.is_timm_name(name):
        return timm_backbones.preprocessing(name)
    if name.startswith(_LITE_PREFIX):
        native = efficientnet_lite.preprocessing(_lite_variant(name))
        return Preprocessing(**native)  # type: ignore[arg-type]
    return torchvision_weights.preprocessing(name, _torchvision_tag(weights))


def _lite_variant(name: str) -> str:
    return "lite" + name.removeprefix(_LITE_PREFIX)


def _load(
    name: str, weights: str, input_size: int, num_classes: int | None, seed: int
) -> tuple[nn.Module, Path | None, str]:
    if weights == RANDOM:
        model = _architecture(name, input_size, num_classes)
        if num_classes is not None:
            init_new_head(model)
        return model, None, f"random:seed={seed}"
    if is_weights_path(weights):
        return _load_checkpoint(name, Path(weights), input_size, num_classes)
    file = _pretrained_file(name, weights)
    model = _architecture(name, input_size, None)
    _load_state(model, _read_state_dict(file), name, file)
    if num_classes is not None and num_classes != _num_classes(model):
        model = _with_new_head(model, name, input_size, num_classes)
    return model, file, sha256_of(file)


def _load_timm(
    name: str, weights: str, input_size: int, num_classes: int | None, seed: int
) -> tuple[nn.Module, Path | None, str, dict[str, Any]]:
    """A timm backbone: random, from the hub cache, or from a local file."""
    extras = timm_backbones.identity_extras(name)
    if weights == RANDOM:
        model = timm_backbones.create(
            name, input_size=input_size, num_classes=num_classes
        )
        if num_classes is not None:
            init_new_head(model)
        return model, None, f"random:seed={seed}", extras
    if is_weights_path(weights):
        file = Path(weights)
        state = _read_state_dict(file)
        classes = timm_backbones.state_classes(name, state)
        model = timm_backbones.create(
            name, input_size=input_size, state=state, state_classes=classes
        )
        file = file.resolve()
    elif weights == DEFAULT:
        file, source = timm_backbones.hub_weights(name)
        extras["weights_source"] = source
        model = timm_backbones.create(
            name, input_size=input_size, state=_read_state_dict(file)
        )
    else:
        raise BackboneError(
            f"{name}: timm weights are chosen by the tag in the name "
            f"({timm_backbones.PREFIX}<model>.<tag>); backbone.weights is 'default', "
            f"'random' or a file path, got {weights!r}"
        )
    if num_classes is not None and num_classes != _num_classes(model):
        model.reset_classifier(num_classes)  # type: ignore[operator]
        init_new_head(model)
    return model, file, sha256_of(file), extras


def is_weights_path(weights: str) -> bool:
    """Whether a `backbone.weights` value names a file rather than a tag."""
    return (
        "/" in weights
        or "\\" in weights
        or weights.endswith((".pth", ".pt", ".bin", ".safetensors"))
    )


def _pretrained_file(name: str, weights: str) -> Path:
    if name.startswith(_LITE_PREFIX):
        if weights not in (DEFAULT, "IMAGENET1K"):
            raise BackboneError(
                f"{name} has weights 'default' (ImageNet-1k), 'random' or a file "
                f"path; got {weights!r}"
            )
        return efficientnet_lite.pretrained_weights_path(_lite_variant(name))
    return torchvision_weights.weights_file(name, weights)


def _architecture(name: str, input_size: int, num_classes: int | None) -> nn.Module:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if name.startswith(_LITE_PREFIX):
        return efficientnet_lite.EfficientNetLite(
            _lite_variant(name), image_size=input_size, **kwargs
        )
    if name.startswith("vit_"):
        # NOTE: torchvision builds every ViT for 224 px unless told; vit_h_14's
        # weights are for 518 px (`check_input_size` has made the sides agree).
        kwargs["image_size"] = input_size
    return get_model(name, weights=None, **kwargs)


def _read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    require_file(
        file,
        what="weights file",
        fix="set backbone.weights in conf.toml to a state_dict or safetensors "
        "file, 'default' or 'random'",
        error=WeightsNotFoundError,
    )
    if file.suffix == ".safetensors":
        return _read_safetensors(file)
    state = read_torch(
        file,
        what="a PyTorch weights file",
        fix="save weights with torch.save(model.state_dict(), path)",
        error=BackboneError,
    )
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise BackboneError(
            f"{file} holds a {type(state).__name__}, not a state_dict of tensors. "
            "Save weights with torch.save(model.state_dict(), path)."
        )
    # NOTE: checkpoints saved from DistributedDataParallel prefix every key.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("net.") for k in state) and "normalize.scale" in state:
        # A model quadrant fine-tuned (normalisation + network): the network.
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    return state


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (the format holds tensors only: no pickle)."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise BackboneError(
            f"{file} is a safetensors file: run `pip install safetensors` (timm's "
            f"extra brings it: {timm_backbones.INSTALL})"
        ) from None
    try:
        state = load_file(file, device="cpu")
    except (SafetensorError, OSError) as err:
        raise BackboneError(
            f"{file} is not a readable safetensors file ({err})"
        ) from err
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_checkpoint(
    name: str, file: Path, input_size: int, num_classes: int | None
) -> tuple[nn.Module, Path, str]:
    state = _read_state_dict(file)
    model = _architecture(name, input_size, None)
    head = head_name(model)
    stored = state.get(f"{head}.weight")
    if stored is not None and stored.shape[0] != _num_classes(model):
        # A checkpoint fine-tuned to k classes: rebuild the head to fit it.
        model = _architecture(name, input_size, int(stored.shape[0]))
    _load_state(model, state, name, file)
    if num_classes is not None and num_classes != _num_classes(model):
        model = _with_new_head(model, name, input_size, num_classes)
    return model, file.resolve(), sha256_of(file)


def _load_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], name: str, file: Path
) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise BackboneError(
            f"{file} does not fit backbone {name!r}: "
            + _key_report(missing, unexpected, wrong)
            + ". Hint: check that backbone.name is the architecture the file was "
            "saved from."
        )
    model.load_state_dict(state)


def _key_report(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    parts = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", wrong),
    ):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {label} key(s) {keys[:3]}{more}")
    return "; ".join(parts)


def head_name(model: nn.Module) -> str:
    """The module name of the network's final linear classifier.

    timm models say which module it is (their pretrained config's
    "classifier"); for others it is the last linear layer.

    Raises:
        BackboneError: the network has no linear classifier.
    """
    modules = dict(model.named_modules())
    if timm_backbones.is_timm_model(model):
        for head in timm_backbones.classifier_names(model):
            if isinstance(modules.get(head), nn.Linear):
                return head
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears or timm_backbones.is_timm_model(model):
        raise BackboneError(f"{type(model).__name__} has no linear classifier")
    return linears[-1]


def _num_classes(model: nn.Module) -> int:
    if timm_backbones.is_timm_model(model):
        return timm_backbones.num_classes(model)
    head = dict(model.named_modules())[head_name(model)]
    return int(head.out_features)


def _with_new_head(
    model: nn.Module, name: str, input_size: int, num_classes: int
) -> nn.Module:
    """Copy every weight but the classifier's into a model with a new head."""
    fresh = _architecture(name, input_size, num_classes)
    head = head_name(fresh)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}
    fresh.load_state_dict(body, strict=False)
    init_new_head(fresh)
    return fresh


def init_new_head(model: nn.Module) -> None:
    """Small random weights and zero bias for a newly created classifier.

    NOTE: architectures initialise their classifier for 1000 classes; some
    (EfficientNet's uniform(1/sqrt(classes))) scale the weights with the class
    count, which for a handful of classes gives logits large enough to
    swamp the first epochs of fine-tuning. A truncated normal with std 0.01,
    as MAE and DeiT use for new heads, starts near uniform predictions.
    """
    head = dict(model.named_modules())[head_name(model)]
    assert isinstance(head, nn.Linear)
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)


def sha256_of(file: Path) -> str:
    """sha256 of a file's bytes, read every time.

    NOTE: not memoised: a memo keyed on (path, size, mtime) goes stale when a
    file is replaced by one of the same size and mtime (copied with its
    times, or within the clock's resolution), and hashing even large
    backbone weights costs well under a second.
    """
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
