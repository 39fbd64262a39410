"""`CNNCodes`: a scikit-learn transformer from images to CNN codes.

It follows the estimator contract (parameters stored in `__init__`, validated
in `fit`, learned state ending in `_`), so it composes with `Pipeline` and
`GridSearchCV`. Paths go through quadrant's extraction and, with `cache_dir`,
its HDF5 cache; in-memory images run through the same code model directly.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from features.codes import load_codes
from features.layers import TOP
from features.limits import Check, Limits, OneOf, Parses, check_limits
from features.names import DECODE_MODES
from features.pooling import parse_pooling
from features.settings import DEVICE, ExtractOptions

# Parameters are checked in `fit` (the estimator contract), with the same
# limits and wording as conf.toml's keys of the same meaning.
_LIMITS: Limits = {
    "pooling": Parses(parse_pooling, "mean"),
    "decode": OneOf(DECODE_MODES),
    "batch_size": Check(
        lambda n: isinstance(n, int) and not isinstance(n, bool) and n >= 1,
        "must be a positive int",
        0,
    ),
    "device": DEVICE,
}


class CNNCodes(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: images in, CNN codes of one layer out.

    `X` is a sequence of image paths, or of images (PIL images or HxWxC /
    HxW uint8 arrays). Paths go through quadrant's extraction (robust decoding,
    the HDF5 cache when `cache_dir` is set, so a second `transform` of the
    same files runs no forward pass); in-memory images are decoded and run
    directly.

    Args:
        backbone: a name from `quadrant layers --list`, or a timm model as
            "timm/<model>[.<pretrained tag>]".
        weights: "default", a torchvision weights enum name, "random" or a
            state_dict path.
        layer: "top" or a layer name from `quadrant layers`.
        pooling: avg, max, avg+max or grid:K (spatial layers); cls,
            patch_avg or cls+patch_avg (a vision transformer's blocks).
        batch_size: images per forward batch.
        device: auto, cpu, cuda, cuda:N or mps.
        cache_dir: folder for code caches (None: no cache kept).
        input_size: overrides the backbone's input size.
        seed: seeds random weights.
        progress: show a progress bar.
        decode: "fast" decodes large image files small (JPEG DCT scaling,
            box reduction) before the resize, "full" decodes every pixel.

    Example:
        >>> from sklearn.pipeline import make_pipeline
        >>> from sklearn.linear_model import LogisticRegression
        >>> model = make_pipeline(CNNCodes(layer="top"), LogisticRegression())
        >>> model.fit(train_paths, train_labels).score(test_paths, test_labels)
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        weights: str = "default",
        layer: str = TOP,
        pooling: str = "avg",
        batch_size: int = 64,
        device: str = "auto",
        cache_dir: str | Path | None = None,
        input_size: int | None = None,
        seed: int = 0,
        progress: bool = False,
        decode: str = "fast",
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.layer = layer
        self.pooling = pooling
        self.batch_size = batch_size
        self.device = device
        self.cache_dir = cache_dir
        self.input_size = input_size
        self.seed = seed
        self.progress = progress
        self.decode = decode

    def fit(self, X: Any = None, y: Any = None) -> CNNCodes:
        """Build the frozen backbone cut at `layer` (nothing is learned).

        Raises:
            ConfigError: (a ValueError) a parameter is out of range or unknown.
        """
        self._validate()
        self._build()
        self.n_features_out_ = int(self.model_.specs[0].dims)
        return self

    def _validate(self) -> None:
        check_limits("CNNCodes:", self, _LIMITS)

    def _build(self) -> None:
        self.backbone_, self.model_ = _code_model(
            self.backbone,
            self.weights,
            _weights_identity(self.weights),
            self.seed,
            self.input_size,
            self.decode,
            self.layer,
            self.pooling,
            self.device,
        )

    def transform(self, X: Any) -> npt.NDArray[np.float32]:
        """Codes of every image in `X`, in order: shape (len(X), n_features_out_).

        Raises:
            NotFittedError: `fit` was not called.
            ImageDecodeError: an image could not be read (all listed).
        """
        check_is_fitted(self, "n_features_out_")
        if not hasattr(self, "model_"):  # unpickled: weights were not pickled
            self._build()
        items = list(X)
        if items and all(isinstance(i, str | Path) for i in items):
            paths = [Path(i) for i in items]
            return _codes_of_paths(self, paths, _options(self))
        return _codes_of_images(self, items, _options(self))

    def get_feature_names_out(self, input_features: Any = None) -> npt.NDArray[np.str_]:
        """Names `<layer>_<i>` of the output columns."""
        check_is_fitted(self, "n_features_out_")
        return np.array([f"{self.layer}_{i}" for i in range(self.n_features_out_)])

    def __getstate__(self) -> dict[str, Any]:
        # NOTE: torch weights stay out of pickles (joblib.dump of a pipeline);
        # `transform` rebuilds them from the parameters after unpickling.
        state = dict(self.__dict__)
        state.pop("backbone_", None)
        state.pop("model_", None)
        return state


@functools.lru_cache(maxsize=8)
def _code_model(
    backbone: str,
    weights: str,
    weights_id: str,
    seed: int,
    input_size: int | None,
    decode: str,
    layer: str,
    pooling: str,
    device: str,
) -> tuple[Any, Any]:
    """The frozen network cut at `layer`, built once per process.

    A `GridSearchCV` or `cross_val_score` fits a clone per fold and per
    candidate: building the network each time (2.4-3.6 s for
    EfficientNet-Lite0 on a CPU) was most of a cached search's time. The
    model is only ever run in inference, so the clones can share it; the
    device is part of the key since extraction moves the model to it.
    """
    from features.backbones import build_backbone
    from features.extractor import CodeModel

    prep = {"input_size": input_size, "decode": decode}
    built = build_backbone(backbone, weights, seed=seed, preprocessing=prep)
    return built, CodeModel(built, [layer], [pooling])


def _weights_identity(weights: str) -> str:
    """What names the weights' content: a file's sha256, else the name."""
    from features.backbones import sha256_of

    path = Path(weights)
    return sha256_of(path) if path.is_file() else weights


def _options(est: CNNCodes) -> ExtractOptions:
    return ExtractOptions(
        batch_size=est.batch_size,
        device=est.device,
        num_workers=0,
        # NOTE: without cache_dir every transform extracts into a fresh
        # temporary folder, where the onnxruntime engine would be exported
        # again each time.
        engine="torch",
    )


def _codes_of_paths(
    est: CNNCodes, paths: list[Path], options: ExtractOptions
) -> npt.NDArray[np.float32]:
    """Image files through quadrant's extraction (and cache, with cache_dir)."""
    import tempfile

    from features.data import images_from_paths
    from features.errors import ImageDecodeError
    from features.extractor import extract_codes

    images = images_from_paths(paths)
    with tempfile.TemporaryDirectory() as tmp:
        result = extract_codes(
            images,
            est.model_,
            options=options,
            cache_dir=Path(est.cache_dir or tmp),
            progress=est.progress,
        )
        if result.skipped:
            listed = "; ".join(f"{p}: {r}" for p, r in result.skipped[:5])
            raise ImageDecodeError(
                f"{len(result.skipped)} image(s) could not be read ({listed}); "
                "remove or fix them: a transformer must return one row per image"
            )
        codes = load_codes(result.path, est.layer)
    row = {str(images.base / p): i for i, p in enumerate(codes.paths)}
    return codes.X[[row[str(p.resolve())] for p in paths]]


def _codes_of_images(
    est: CNNCodes, items: list[Any], options: ExtractOptions
) -> npt.NDArray[np.float32]:
    """In-memory images through the code model, batch by batch."""
    import torch

    from features.devices import resolve_device, resolve_precision
    from features.extractor import CodeRunner
    from features.images import reduce_to, to_rgb
    from features.settings import Decoding
    from features.transforms import eval_transform

    device = resolve_device(options.device)
    runner = CodeRunner(
        est.model_, options, device, resolve_precision(options.precision, device)
    )
    prepare = eval_transform(est.model_.preprocessing)
    side = Decoding().for_input(est.model_.preprocessing).side
    out = []
    for start in range(0, len(items), est.batch_size):
        batch = [
            prepare(to_rgb(item) if side is None else reduce_to(to_rgb(item), side))
            for item in items[start : start + est.batch_size]
        ]
        codes = runner(torch.stack(batch))
        out.append(next(iter(codes.values())))
    if not out:
        return np.zeros((0, est.n_features_out_), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)
