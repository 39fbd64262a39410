"""timm's models as backbones: `timm/<model>[.<pretrained tag>]`.

timm is an optional extra (`pip install "quadrant[timm]"`): this module
imports it inside its functions, so quadrant imports, and its other
backbones work, without it.

- Names: `timm/convnext_tiny.fb_in22k`, `timm/vit_small_patch14_dinov2.lvd142m`,
  `timm/resnet50` (timm's default tag). Checked against timm's registry
  without listing it.
- Weights: "default" is the tag's weights from the Hugging Face hub cache,
  downloaded there when missing (timm's own source); a local file
  (safetensors, or a state_dict read with `torch.load(weights_only=True)`);
  or "random". Every file is read here (never with an unrestricted
  unpickler) and handed to timm's own loader as a state_dict, so timm's
  checkpoint conversions (position embeddings resampled for another input
  size, original-format checkpoints) and its classifier handling still apply.
- Preprocessing: the tag's pretrained config through timm's
  `resolve_data_config` (input size, crop fraction, interpolation, mean, std).
- The model helpers (`graph_node_names`, `feature_extractor`,
  `classifier_names`, `stage_names`) tell `features.layers` and the
  fine-tune stage what timm knows about the network.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import fx, nn

from features.errors import BackboneError, WeightsNotFoundError
from features.names import INTERPOLATIONS
from features.transforms import Preprocessing

log = logging.getLogger(__name__)

PREFIX = "timm/"
INSTALL = 'pip install "quadrant[timm]"'
# timm's own order: the safetensors file first, the pickle-format file second
# (read here with weights_only=True).
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_SAFE_TWINS = {
    "pytorch_model.bin": "model.safetensors",
    "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
}
_DEFAULT_CROP_PCT = 0.875
_DATA_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def is_timm_name(name: str) -> bool:
    """Whether a backbone name asks for a timm model."""
    return name.startswith(PREFIX)


def model_name(name: str) -> str:
    """timm's name of a backbone: "timm/resnet50.a1_in1k" -> "resnet50.a1_in1k"."""
    return name.removeprefix(PREFIX)


def import_timm(name: str = "") -> ModuleType:
    """timm, or the error that says how to install it.

    Raises:
        BackboneError: timm is not installed.
    """
    try:
        import timm
    except ImportError:
        what = f"backbone {name!r}" if name else "timm backbones"
        raise BackboneError(
            f"{what} needs timm, an optional extra of quadrant: run `{INSTALL}` "
            "(or pick a torchvision backbone, `quadrant layers --list`)"
        ) from None
    return timm


def check_name(name: str) -> None:
    """Refuse a timm name that timm does not know, with close matches.

    Raises:
        BackboneError: timm missing, unknown model, or unknown pretrained tag.
    """
    timm = import_timm(name)
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(model_name(name))
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f" Did you mean {[PREFIX + c for c in close]}?" if close else ""
        raise BackboneError(
            f"timm has no model {arch!r} (backbone {name!r}).{hint} List names with "
            f"`python -c \"import timm; print(timm.list_models('*{arch[:6]}*'))\"`"
        )
    try:
        get_pretrained_cfg(model_name(name))
    except RuntimeError:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        raise BackboneError(
            f"timm model {arch} has no pretrained tag {tag!r}; its tags: {tags} "
            f"(write the backbone as {PREFIX}{arch}.<tag>, or {PREFIX}{arch} for "
            "timm's default)"
        ) from None


def suggest(name: str) -> str:
    """ " Did you mean 'timm/<name>'?" when timm is installed and knows `name`."""
    try:
        timm = import_timm()
    except BackboneError:
        return ""
    from timm.models import split_model_name_tag

    if timm.is_model(split_model_name_tag(name)[0]):
        return f" Did you mean {PREFIX + name!r}?"
    return ""


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of the name's tag (or its default tag); {} if none."""
    import_timm(name)
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name(name))
    except RuntimeError as err:
        raise BackboneError(f"{name}: {err}") from None
    return cfg.to_dict() if cfg is not None else {}


def data_config(name: str) -> dict[str, Any]:
    """timm's resolved data config: input_size, interpolation, mean, std, crop."""
    from timm.data import resolve_data_config

    data: dict[str, Any] = resolve_data_config(pretrained_cfg=pretrained_cfg(name))
    return data


def preprocessing(name: str) -> Preprocessing:
    """The evaluation preprocessing timm gives the name's pretrained weights.

    As timm's `transforms_factory`: the shorter side is resized to
    floor(input_size / crop_pct), then the centre input_size square is
    cropped. timm's "squash" and "border" crop modes and interpolations
    other than nearest, bilinear and bicubic are replaced by the centre crop
    and bicubic, with a warning.
    """
    data = data_config(name)
    size = int(data["input_size"][-1])
    crop_pct = float(data.get("crop_pct") or _DEFAULT_CROP_PCT)
    interpolation = str(data.get("interpolation", "bicubic"))
    if interpolation not in INTERPOLATIONS:
        log.warning("%s: interpolation %r read as bicubic", name, interpolation)
        interpolation = "bicubic"
    if data.get("crop_mode", "center") != "center":
        log.warning(
            "%s: timm evaluates with crop_mode %r; quadrant resizes the shorter "
            "side and crops the centre",
            name,
            data["crop_mode"],
        )
    return Preprocessing(
        input_size=size,
        resize_size=math.floor(size / crop_pct),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        interpolation=interpolation,
    )


def identity_extras(name: str) -> dict[str, Any]:
    """What the backbone's identity records beyond name and weights."""
    cfg = pretrained_cfg(name)
    arch = model_name(name).partition(".")[0]
    tag = cfg.get("tag")
    return {
        "timm_model": f"{arch}.{tag}" if tag else arch,
        "pretrained_data": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in cfg.items()
            if k in _DATA_KEYS
        },
    }


# ---------------------------------------------------------------------------
# Building


def create(
    name: str,
    *,
    input_size: int,
    num_classes: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    state_classes: int | None = None,
) -> nn.Module:
    """The timm model, randomly initialised or filled from `state`, in eval mode.

    Args:
        name: the backbone name.
        input_size: the input side; fixed-size models (ViTs) are built for it.
        num_classes: classifier size; None keeps the pretrained config's.
        state: weights to load through timm's loader (its checkpoint filter
            and classifier handling); None for random weights.
        state_classes: the classifier size `state` was saved with, when it
            is not the pretrained config's (a fine-tuned or headless file).

    Raises:
        BackboneError: the weights do not fit the architecture, or timm
            cannot build the model for this input size.
    """
    timm = import_timm(name)
    kwargs = _size_kwargs(name, input_size)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if state is not None:
        overlay: dict[str, Any] = {"state_dict": dict(state)}
        if state_classes is not None:
            overlay["num_classes"] = state_classes
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    try:
        model = timm.create_model(model_name(name), **kwargs)
    except RuntimeError as err:  # load_state_dict's mismatch report
        if state is None:
            raise
        raise BackboneError(
            f"the weights do not fit backbone {name!r}: {_first_lines(err)}. Hint: "
            "check that backbone.name is the architecture the file was saved from"
        ) from err
    except (AssertionError, ValueError, TypeError) as err:
        raise BackboneError(
            f"timm cannot build {name} for input_size {input_size} "
            f"({type(err).__name__}: {_first_lines(err)}); try the model's own "
            f"size, {pretrained_cfg(name).get('input_size', '?')}"
        ) from err
    return _checked_size(model.eval(), name, input_size)


def _size_kwargs(name: str, input_size: int) -> dict[str, Any]:
    """img_size for models built for one input size (ViTs), when it is another."""
    cfg = pretrained_cfg(name)
    native = cfg.get("input_size") or (3, 224, 224)
    if cfg.get("fixed_input_size") and input_size != int(native[-1]):
        return {"img_size": input_size}
    return {}


def _checked_size(model: nn.Module, name: str, input_size: int) -> nn.Module:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        side = int(patch[0]) if isinstance(patch, Sequence) else int(patch)
        if input_size % side:
            raise BackboneError(
                f"{name} cuts images into {side}x{side} patches, so its input size "
                f"must be a multiple of {side}; got {input_size}. Set "
                f"backbone.input_size to e.g. {max(side, input_size // side * side)}"
            )
    return model


def _first_lines(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) < 400 else text[:400] + " ..."


def state_classes(name: str, state: Mapping[str, torch.Tensor]) -> int:
    """The classifier size a state_dict was saved with (0: saved without one)."""
    for head in _cfg_classifiers(pretrained_cfg(name)):
        weight = state.get(f"{head}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return 0


def hub_weights(name: str) -> tuple[Path, str]:
    """The pretrained weights file of a timm name, and where it came from.

    The Hugging Face hub cache is read first, with no network request, so a
    cached file is used as it is (and runs are reproducible offline); a
    missing file is downloaded into that cache, as timm does. Models whose
    weights have a URL and no hub repository use torch hub's cache.

    Returns:
        (file, source): source is "hf-hub:<repo>@<revision>/<file>" or the URL.

    Raises:
        WeightsNotFoundError: not cached and not downloadable (offline).
        BackboneError: the model has no pretrained weights.
    """
    cfg = pretrained_cfg(name)
    if cfg.get("custom_load") == "hf":
        raise BackboneError(
            f"{name}: timm loads these weights with a model-specific loader that "
            "quadrant does not run; pick another tag or backbone.weights = 'random'"
        )
    repo = cfg.get("hf_hub_id")
    if repo:
        return _hf_file(name, repo, _hub_files(cfg))
    if cfg.get("url"):
        from features.backbones.torchvision_weights import cached_download

        return cached_download(cfg["url"], name), str(cfg["url"])
    raise BackboneError(
        f"timm has no pretrained weights for {name}; use backbone.weights = "
        "'random' or the path of a weights file"
    )


def _hub_files(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    custom = cfg.get("hf_hub_filename")
    if not custom:
        return _HUB_FILES
    # As timm: a safetensors twin of a .bin file is tried first.
    twin = _SAFE_TWINS.get(custom) or (
        custom.removesuffix(".bin") + ".safetensors" if custom.endswith(".bin") else ""
    )
    return (twin, custom) if twin else (custom,)


def _hf_file(name: str, repo: str, files: Sequence[str]) -> tuple[Path, str]:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    for file in files:
        cached = try_to_load_from_cache(repo, file)
        if isinstance(cached, str):
            return Path(cached), _hf_source(repo, Path(cached))
    reason: BaseException | None = None
    for file in files:
        try:
            path = Path(hf_hub_download(repo, file))
        except LocalEntryNotFoundError as err:  # offline, or no connection
            reason = err
            break  # NOTE: the next file cannot be reached either
        except EntryNotFoundError:  # online: the repository has no such file
            continue
        except OSError as err:  # HTTP errors, a full disk ...
            reason = err
        else:
            return path, _hf_source(repo, path)
    raise WeightsNotFoundError(
        _offline_message(name, repo, files, reason, Path(constants.HF_HUB_CACHE))
    )


def _hf_source(repo: str, path: Path) -> str:
    # NOTE: the cache keeps files under snapshots/<commit hash>/<file>.
    revision = path.parent.name if path.parent.parent.name == "snapshots" else "?"
    return f"hf-hub:{repo}@{revision}/{path.name}"


def _offline_message(
    name: str,
    repo: str,
    files: Sequence[str],
    reason: BaseException | None,
    cache: Path,
) -> str:
    from huggingface_hub import constants

    why = (
        "HF_HUB_OFFLINE is set"
        if constants.HF_HUB_OFFLINE
        else f"the download failed: {_first_lines(reason) if reason else 'no file'}"
    )
    folder = cache / f"models--{repo.replace('/', '--')}"
    return (
        f"pretrained weights for {name} are not in the Hugging Face hub cache and "
        f"were not downloaded ({why}). Looked for {' or '.join(files)} of the hub "
        f"repository {repo} in {folder}. Fix: when online, unset HF_HUB_OFFLINE "
        "and run again (the file is downloaded into the cache); or, on a machine "
        'with internet, run `python -c "from huggingface_hub import hf_hub_download; '
        f"print(hf_hub_download('{repo}', '{files[0]}'))\"` and copy the cache "
        f"folder {cache} here (HF_HOME or HF_HUB_CACHE choose another), or set "
        "backbone.weights to that file's path, or backbone.weights = 'random'."
    )


# ---------------------------------------------------------------------------
# What timm knows about a built model


def is_timm_model(model: nn.Module) -> bool:
    """Whether `model` is one of timm's networks."""
    return type(model).__module__.startswith("timm.")


def _cfg_classifiers(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    heads = cfg.get("classifier")
    if not heads:
        return ()
    return (heads,) if isinstance(heads, str) else tuple(heads)


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier(s), as timm's pretrained config names them."""
    return _cfg_classifiers(getattr(model, "pretrained_cfg", None) or {})


def num_classes(model: nn.Module) -> int:
    """The classifier size; 0 for models built without one (DINOv2, SigLIP)."""
    return int(getattr(model, "num_classes", 0) or 0)


def stage_names(model: nn.Module) -> list[str]:
    """timm's feature stages (CNN stages, transformer blocks), input to output."""
    info = getattr(model, "feature_info", None) or []
    return [str(f["module"]) for f in info if isinstance(f, Mapping) and "module" in f]


def stage_reductions(model: nn.Module) -> dict[str, int]:
    """Each stage's stride relative to the input, as timm's feature_info gives it."""
    info = getattr(model, "feature_info", None) or []
    return {
        str(f["module"]): int(f.get("reduction", 0))
        for f in info
        if isinstance(f, Mapping) and "module" in f
    }


def graph_node_names(model: nn.Module) -> list[str]:
    """FX node names in eval mode, traced with timm's leaf modules."""
    from timm.models import get_graph_node_names

    with _eval_names_only():
        _, names = get_graph_node_names(model)
    return list(names)


@contextlib.contextmanager
def _eval_names_only() -> Iterator[None]:
    with warnings.catch_warnings():
        # NOTE: torchvision warns whenever the train-mode graph has more nodes
        # (dropout, stochastic depth): quadrant asks for eval-mode nodes only.
        warnings.filterwarnings("ignore", message=".*subsequence of those obtained")
        yield


def feature_extractor(model: nn.Module, return_nodes: dict[str, str]) -> fx.GraphModule:
    """torchvision's FX feature extractor, traced with timm's leaf modules."""
    from timm.models import create_feature_extractor

    with _eval_names_only():
        extractor: fx.GraphModule = create_feature_extractor(model, return_nodes)
    return extractor
