"""torchvision's pretrained weights: the enum, the hub cache, the download.

torchvision downloads weights into the torch hub cache
(`$TORCH_HOME/hub/checkpoints`, default `~/.cache/torch/hub/checkpoints`) and
loads them from there on later calls. quadrant keeps that behaviour for users
who are online, and offline turns the failed download into an error that names
the file and where to put it.
"""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import WeightsEnum, get_model_weights

from features.errors import BackboneError, WeightsNotFoundError
from features.transforms import Preprocessing

# torch.hub's convention: "<name>-<first hex digits of the sha256>.pth".
_HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.")


def weights_enum(name: str, tag: str) -> WeightsEnum:
    """The torchvision weights enum member for "default" or an enum name.

    Raises:
        BackboneError: for a tag the model does not have, listing those it has.
    """
    enum = get_model_weights(name)
    if tag == "default":
        return enum.DEFAULT
    try:
        return enum[tag]
    except KeyError:
        valid = [m for m in enum.__members__ if m != "DEFAULT"]
        raise BackboneError(
            f"{name} has no weights {tag!r}; valid: ['default', 'random', "
            f"{', '.join(repr(v) for v in valid)}] or a state_dict path"
        ) from None


def preprocessing(name: str, tag: str) -> Preprocessing:
    """The resize, crop and normalisation the weights were trained with.

    Callers pass "default" for random and local weights: the architecture's
    usual input.
    """
    transform = weights_enum(name, tag).transforms()
    try:
        return Preprocessing(
            input_size=int(transform.crop_size[0]),
            resize_size=int(transform.resize_size[0]),
            mean=tuple(transform.mean),
            std=tuple(transform.std),
            interpolation=transform.interpolation.value,
        )
    except AttributeError:  # a weights transform of another kind
        return Preprocessing()


# Architectures whose layers are sized for one input side: a ViT learns one
# position embedding per patch of that side, MaxViT partitions its feature
# maps into fixed 7x7 windows. Any other side fails inside forward().
_FIXED_SIZE_PREFIXES = ("vit_", "maxvit_")


def fixed_input_size(name: str, tag: str) -> int | None:
    """The only input side `name` with weights `tag` takes, or None for any.

    Callers pass "default" for random and local weights: the architecture's
    usual side.
    """
    if not name.startswith(_FIXED_SIZE_PREFIXES):
        return None
    return int(weights_enum(name, tag).meta["min_size"][0])


def cache_path(url: str) -> Path:
    """Where torch hub keeps (or would keep) the file of `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def weights_file(name: str, tag: str) -> Path:
    """The local weights file, downloaded into the torch hub cache if needed.

    Raises:
        WeightsNotFoundError: when the file is not cached and cannot be
            downloaded (offline), naming the file, the URL and where to put it.
    """
    return cached_download(weights_enum(name, tag).url, f"{name} ({tag})")


def cached_download(url: str, label: str) -> Path:
    """The torch hub cache's file of `url`, downloaded there if missing.

    Raises:
        WeightsNotFoundError: not cached and the download failed, naming the
            file, the URL and where to put it.
    """
    file = cache_path(url)
    if file.is_file():
        return file
    file.parent.mkdir(parents=True, exist_ok=True)
    match = _HASH_PREFIX.search(file.name)
    try:
        torch.hub.download_url_to_file(
            url, str(file), hash_prefix=match.group(1) if match else None
        )
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise WeightsNotFoundError(
            f"pretrained weights for {label} are not in the torch hub cache "
            f"and the download failed ({err}). Fix: on a machine with internet, "
            f"download {url} and put it at {file} (set TORCH_HOME to use another "
            "cache folder), or set backbone.weights to a local state_dict path, "
            "or backbone.weights = 'random'."
        ) from err
    return file
