"""The codes path end to end: sweep, train, evaluate, and their bad inputs."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from features.cache import _digest_dataset, _shard_stats
from features.errors import CacheMismatchError, DataError
from pipeline import evaluate, extract, sweep, train
from pipeline.cli import main
from pipeline.config import Config
from pipeline.demo import demo_config
from pipeline.models import load_model
from tests.conftest import write_digits_subset, write_png

MakeConfig = Callable[..., Config]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Real EfficientNet-Lite0 codes of 30 digits per class, extracted once."""
    base = tmp_path_factory.mktemp("digits-run")
    subset = write_digits_subset(base, 30)
    cfg = demo_config(
        [
            f"data.root='{subset}'",
            f"run.out='{base / 'run'}'",
            "run.progress=false",
            "sweep.cv_folds=3",
            "train.cv_folds=3",
            "train.C=[0.1, 1.0]",
            "extract.layers=['_blocks.2', '_blocks.4', '_blocks.7', '_blocks.10',"
            " '_blocks.14', 'top']",
            "train.layer='best'",
        ]
    )
    extract.run(cfg)
    return cfg


def test_sweep_ranks_layers_and_draws_the_curve(digits_run: Config) -> None:
    result = sweep.run(digits_run)
    assert [r.layer for r in result.rows] == [
        "_blocks.2",
        "_blocks.4",
        "_blocks.7",
        "_blocks.10",
        "_blocks.14",
        "top",
    ]
    assert result.best.accuracy == max(r.accuracy for r in result.rows)
    assert result.best.accuracy > 0.6  # ten classes: chance is 0.1
    assert result.rows[0].accuracy < result.best.accuracy  # early layers do worse
    out = digits_run.run.out
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["best"]["name"] == result.best.name
    assert (out / "sweep.png").stat().st_size > 10_000
    with open(out / "sweep.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 6


def test_train_on_best_layer_beats_chance_and_saves_model(digits_run: Config) -> None:
    result = train.run(digits_run)
    assert (result.layer, result.pooling) == sweep.best_layer(
        digits_run, extract.locate_codes(digits_run)
    )
    assert result.cv_score > 0.7 and result.best_params["C"] in (0.1, 1.0)
    folder = digits_run.run.out / "models" / "codes"
    assert result.model_dir == folder
    assert {p.name for p in folder.iterdir()} == {
        "model.json",
        "head.skops",
        "train.json",
        "train_cv.png",
    }
    model = load_model(digits_run.layout.model("codes"))
    assert model.label_names == tuple(str(d) for d in range(10))
    assert (model.layer, model.pooling) == (result.layer, result.pooling)
    assert model.record["config"]["train"]["layer"] == "best"  # its own settings
    saved = json.loads((folder / "train.json").read_text())
    assert saved["cv"]["best_score"] == pytest.approx(result.cv_score)


def test_evaluate_writes_the_numbers_it_prints(
    digits_run: Config,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    train.run(digits_run)
    conf = digits_run.run.out / "config.toml"
    from pipeline.config import config_to_dict, dump_toml

    conf.write_text(dump_toml(config_to_dict(digits_run)))
    assert main(["evaluate", "-c", str(conf)]) == 0
    printed = capsys.readouterr().out
    accuracy = float(re.search(r"accuracy (\d\.\d+)", printed).group(1))  # type: ignore[union-attr]
    model = digits_run.run.out / "models" / "codes"
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert metrics["accuracy"] > 0.7
    assert set(metrics["per_class"]["3"]) >= {
        "precision",
        "recall",
        "f1-score",
        "support",
    }
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n_test"]
    raw = (model / "misclassified.csv").read_bytes()
    assert b"\r\n" not in raw  # LF line ends, as every CSV quadrant writes
    with open(model / "misclassified.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "true", "predicted", "score"]
    wrong = int(re.search(r"misclassified: (\d+)", printed).group(1))  # type: ignore[union-attr]
    assert len(rows) == wrong
    assert all(r["true"] != r["predicted"] for r in rows)
    assert (model / "confusion_matrix.png").stat().st_size > 10_000


@pytest.mark.parametrize("classifier", ["linear_svm", "svm", "sgd"])
def test_every_classifier_learns_the_digits(
    digits_run: Config, tmp_path: Path, classifier: str
) -> None:
    from pipeline.config import load_config

    cfg = load_config(
        None,
        _overrides(
            digits_run, tmp_path, f"train.classifier={classifier}", "train.layer=top"
        ),
    )
    result = train.run(cfg)
    assert result.cv_score > 0.6
    assert evaluate.run(cfg).accuracy > 0.6


def _overrides(cfg: Config, out: Path, *extra: str) -> list[str]:
    return [
        f"data.root='{cfg.data.root}'",
        f"run.out='{out}'",
        f"extract.cache_dir='{cfg.cache_dir}'",
        "extract.layers=" + json.dumps(list(cfg.extract.layers)),
        "run.progress=false",
        "train.cv_folds=3",
        "train.C=[1.0, 10.0]",
        *extra,
    ]


# ---------------------------------------------------------------------------
# Bad input, on a tiny random network


def test_codes_from_another_backbone_are_refused(
    image_folder: Path, make_config: MakeConfig
) -> None:
    other = extract.run(make_config(image_folder, "backbone.name=resnet34")).path
    cfg = make_config(image_folder, f"train.codes='{other}'")
    with pytest.raises(
        CacheMismatchError,
        match=r"holds other codes than conf.toml "
        r"asks for:\n  backbone.name: expected 'resnet18', found 'resnet34'",
    ):
        train.run(cfg)


def test_layer_missing_from_the_cache_names_the_fix(
    image_folder: Path, make_config: MakeConfig
) -> None:
    cfg = make_config(image_folder, "train.layer=layer3")
    with pytest.raises(
        CacheMismatchError,
        match=r"layer 'layer3' is not in .*holds "
        r"\['top/none'\]\. Add it to extract.layers",
    ):
        train.run(cfg)


def test_one_class_only_is_refused(tmp_path: Path, make_config: MakeConfig) -> None:
    for i in range(6):
        write_png(tmp_path / "one" / "only" / f"{i}.png", seed=i)
    with pytest.raises(DataError, match=r"one class only \('only'\).*at least two"):
        train.run(make_config(tmp_path / "one"))


def test_non_finite_codes_are_refused(
    image_folder: Path, make_config: MakeConfig
) -> None:
    cfg = make_config(image_folder)
    path = extract.run(cfg).path
    # As if the network computed them (fp16 overflow): NaN in a shard whose
    # checksum and recorded file times say it was written so.
    shard = path.with_suffix(".shards") / "shard-000000.h5"
    with h5py.File(shard, "r+") as h5:
        h5["codes/top/none"][2, :3] = np.nan
        h5["codes/top/none"].attrs["sha256"] = _digest_dataset(h5["codes/top/none"])
    with h5py.File(path, "r+") as h5:
        h5.attrs["shard_stats"] = json.dumps(_shard_stats(shard.parent, 1))
    with pytest.raises(
        DataError,
        match=r"top/none: 1 of \d+ code rows hold NaN or "
        r"infinite values.*extract.dtype",
    ):
        train.run(cfg)


def test_evaluate_uses_the_models_own_codes_whatever_the_config_says_now(
    image_folder: Path, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model trained on a layer set of its own (as `quadrant run` does) is
    evaluated on those codes, not re-extracted with today's [extract]."""
    trained = make_config(
        image_folder,
        "train.cv_folds=2",
        "extract.layers=['layer2', 'top']",
        "train.layer=layer2",
    )
    train.run(trained)
    first = evaluate.run(trained)
    monkeypatch.setattr(
        "features.extractor._forward",
        lambda *a, **k: pytest.fail("codes were extracted again"),
    )
    later = make_config(image_folder, "backbone.input_size=40")  # [extract] default
    assert evaluate.run(later).accuracy == first.accuracy


def test_evaluate_refuses_data_of_other_classes(
    image_folder: Path, make_config: MakeConfig, tmp_path: Path
) -> None:
    train.run(make_config(image_folder, "train.cv_folds=2"))
    for c in ("cat", "cow"):
        for i in range(6):
            write_png(tmp_path / "other" / c / f"{i}.png", seed=i)
    with pytest.raises(
        CacheMismatchError,
        match=r"trained on classes \['cat', 'dog'\], the data has \['cat', 'cow'\]",
    ):
        evaluate.run(make_config(tmp_path / "other"))


def test_codes_from_a_gpu_run_are_reused_for_training(
    image_folder: Path, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Codes that differ only in compute settings serve training elsewhere."""
    cfg = make_config(image_folder, "train.cv_folds=2")
    first = extract.run(cfg).path
    moved = first.with_name("codes-fromgpu00000000.h5")
    with h5py.File(first, "r+") as h5:
        provenance = json.loads(h5.attrs["provenance"])
        provenance["compute"] = {"device": "cuda", "precision": "bf16"}
        h5.attrs["provenance"] = json.dumps(provenance)
    first.rename(moved)
    monkeypatch.setattr(
        "features.extractor._forward",
        lambda *a, **k: pytest.fail("codes were extracted again"),
    )
    assert train.run(cfg).n_train > 0
