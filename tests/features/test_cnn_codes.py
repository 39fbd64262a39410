"""CNNCodes follows the scikit-learn estimator contract where it applies.

The checks that feed random numeric matrices as X (check_transformer_general,
check_fit2d_*, check_estimators_dtypes, NaN/inf checks ...) do not apply:
CNNCodes takes images or image paths, not feature matrices. docs/codes-path.md
lists them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils import estimator_checks as checks

from features import CNNCodes
from features.errors import ImageDecodeError

TINY = dict(
    backbone="resnet18", weights="random", input_size=32, batch_size=4, device="cpu"
)

APPLICABLE = [
    checks.check_no_attributes_set_in_init,
    checks.check_parameters_default_constructible,
    checks.check_get_params_invariance,
    checks.check_set_params,
    checks.check_estimator_cloneable,
    checks.check_estimator_repr,
    checks.check_mixin_order,
    checks.check_do_not_raise_errors_in_init_or_set_params,
    checks.check_estimator_tags_renamed,
    checks.check_valid_tag_types,
]


@pytest.mark.parametrize("check", APPLICABLE, ids=lambda c: c.__name__)
def test_cnn_codes_passes_the_applicable_sklearn_checks(check) -> None:  # type: ignore[no-untyped-def]
    check("CNNCodes", CNNCodes(**TINY))


def test_cnn_codes_clone_and_get_params_round_trip() -> None:
    codes = CNNCodes(layer="layer3", pooling="max", **TINY)
    again = clone(codes)
    assert again.get_params() == codes.get_params()
    assert again.set_params(pooling="grid:2").pooling == "grid:2"


def test_cnn_codes_transform_before_fit_raises_not_fitted(image_folder: Path) -> None:
    with pytest.raises(NotFittedError, match="not fitted yet. Call 'fit'"):
        CNNCodes(**TINY).transform([image_folder / "cat" / "00.png"])


def test_cnn_codes_fit_validates_parameters() -> None:
    with pytest.raises(ValueError, match="is not a pooling"):
        CNNCodes(pooling="mean", **TINY).fit()


def test_cnn_codes_paths_and_arrays_give_the_same_codes(image_folder: Path) -> None:
    paths = sorted(image_folder.rglob("*.png"))[:5]
    codes = CNNCodes(layer="layer2", **TINY).fit()
    from_paths = codes.transform([str(p) for p in reversed(paths)])[::-1]
    from_arrays = codes.transform([np.array(Image.open(p)) for p in paths])
    assert from_paths.shape == (5, codes.n_features_out_) == (5, 128)
    np.testing.assert_allclose(from_paths, from_arrays, rtol=1e-5, atol=1e-6)
    assert list(codes.get_feature_names_out()[:2]) == ["layer2_0", "layer2_1"]


def test_cnn_codes_caches_codes_of_paths(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = sorted(image_folder.rglob("*.png"))
    codes = CNNCodes(cache_dir=tmp_path / "cache", **TINY).fit()
    first = codes.transform(paths)
    monkeypatch.setattr(
        "features.extractor._forward",
        lambda *a, **k: pytest.fail("forward pass on a cache hit"),
    )
    np.testing.assert_array_equal(codes.transform(paths), first)


def test_cnn_codes_works_in_pipeline_and_grid_search(image_folder: Path) -> None:
    paths = sorted(str(p) for p in image_folder.rglob("*.png"))
    y = np.array([0 if "/cat/" in p else 1 for p in paths])
    model = make_pipeline(CNNCodes(**TINY), LogisticRegression(max_iter=500))
    search = GridSearchCV(model, {"logisticregression__C": [0.1, 1.0]}, cv=2)
    search.fit(paths, y)
    assert search.predict(paths).shape == (20,)
    assert search.best_params_["logisticregression__C"] in (0.1, 1.0)


def test_cnn_codes_pickles_without_weights(image_folder: Path) -> None:
    codes = CNNCodes(**TINY).fit()
    blob = pickle.dumps(codes)
    assert len(blob) < 10_000  # parameters only, no resnet18 weights
    restored = pickle.loads(blob)
    path = [image_folder / "dog" / "01.png"]
    np.testing.assert_array_equal(restored.transform(path), codes.transform(path))


def test_cnn_codes_refuses_unreadable_images(image_folder: Path) -> None:
    bad = image_folder / "cat" / "00.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(ImageDecodeError, match="1 image\\(s\\) could not be read"):
        CNNCodes(**TINY).fit().transform([bad, image_folder / "cat" / "01.png"])


def test_cnn_codes_with_a_timm_vit_class_token(image_folder: Path) -> None:
    codes = CNNCodes(
        backbone="timm/vit_tiny_patch16_224",
        weights="random",
        layer="blocks.3",
        pooling="cls",
        input_size=32,
        batch_size=4,
        device="cpu",
    )
    paths = sorted(image_folder.rglob("*.png"))[:3]
    assert codes.fit().transform(paths).shape == (3, 192)


def test_clones_share_one_network_per_process(tmp_path: Path) -> None:
    """A search fits a clone per fold and candidate: the network is built once."""
    from sklearn.base import clone

    first = CNNCodes(**TINY).fit()
    again = clone(first).fit()
    assert again.model_ is first.model_
    assert CNNCodes(**{**TINY, "layer": "layer2"}).fit().model_ is not first.model_
    # Weights given as a file are known by their content, not their name.
    weights = tmp_path / "w.pt"
    torch.save(first.backbone_.model.state_dict(), weights)
    from_file = CNNCodes(**{**TINY, "weights": str(weights)}).fit()
    torch.save(
        {k: v + 1 for k, v in first.backbone_.model.state_dict().items()}, weights
    )
    changed = CNNCodes(**{**TINY, "weights": str(weights)}).fit()
    assert changed.model_ is not from_file.model_
