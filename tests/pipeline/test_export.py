"""ONNX export of both paths, batch prediction, and the onnxruntime engine."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from features import load_codes
from features.errors import DataError, ExportParityError, StageInputError
from features.onnx_engine import session
from pipeline import evaluate, export, extract, finetune, inputs, predict, sweep, train
from pipeline.config import Config
from tests.conftest import write_png

MakeConfig = Callable[..., Config]


@pytest.fixture
def three_classes(tmp_path: Path) -> Path:
    root = tmp_path / "three"
    for c, name in enumerate(["a", "b", "c"]):
        for i in range(12):
            write_png(root / name / f"{i:02d}.png", seed=1000 * c + i)
    return root


def _labels_of(model: Path, images: list[Path], cfg: Config) -> np.ndarray:
    pixels = inputs.load_pixels(cfg, images, inputs.load_backbone(cfg).preprocessing)
    return session(model).run(["label"], {"images": pixels})[0]


@pytest.mark.parametrize("classifier", ["logistic", "linear_svm", "svm", "sgd"])
@pytest.mark.parametrize("classes", [2, 3])
def test_codes_path_export_matches_the_head(
    image_folder: Path,
    three_classes: Path,
    make_config: MakeConfig,
    classifier: str,
    classes: int,
) -> None:
    root = image_folder if classes == 2 else three_classes
    cfg = make_config(
        root,
        f"train.classifier={classifier}",
        "train.cv_folds=2",
        "train.C=[1.0]",
        "extract.layers=['top', 'layer3']",
        "train.layer=layer3",
    )
    train.run(cfg)
    result = export.run(cfg)
    model_dir = cfg.run.out / "models" / "codes"
    assert result.path == model_dir / "model.onnx" and result.labels_equal
    if classifier == "logistic":  # probabilities; margins are checked relatively
        assert result.max_abs_diff < 1e-4
    model = onnx.load(result.path)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["label_names"]) == sorted(p.name for p in root.iterdir())
    assert json.loads(props["preprocessing"])["input_size"] == 32
    # How the training pixels were decoded travels with the model.
    assert json.loads(props["preprocessing"])["decode"] == "fast"
    kind = "probability" if classifier == "logistic" else "margin"
    assert props["score_kind"] == kind
    # The exported graph predicts what the trained pipeline predicts on the codes.
    codes = load_codes(extract.locate_codes(cfg), "layer3", "avg")
    from pipeline.models import load_model

    expected = load_model(cfg.layout.model("codes")).head.predict(codes.X)
    got = _labels_of(result.path, [root / p for p in codes.paths], cfg)
    np.testing.assert_array_equal(got, expected)


def test_finetuned_export_matches_the_network(
    tmp_path: Path, image_folder: Path
) -> None:
    from tests.pipeline.finetune.conftest import config

    cfg = config(
        image_folder,
        tmp_path / "run",
        "finetune.epochs=1",
        "finetune.batch_size=4",
        "export.parity_images=8",
    )
    finetune.run(cfg)
    result = export.run(cfg)
    assert result.kind == "finetune" and result.max_abs_diff < 1e-4
    sess = session(result.path)
    assert [i.name for i in sess.get_inputs()] == ["images"]
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    scores, _ = sess.run(
        ["scores", "label"], {"images": np.zeros((3, 3, 32, 32), dtype=np.uint8)}
    )
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)  # softmax


def test_a_fine_tune_at_another_input_size_exports_at_that_size(
    tmp_path: Path, image_folder: Path
) -> None:
    from tests.pipeline.finetune.conftest import config

    cfg = config(
        image_folder,
        tmp_path / "run",
        "finetune.epochs=1",
        "finetune.batch_size=4",
        "finetune.input_size=48",
        "export.parity_images=8",
    )
    finetune.run(cfg)
    result = export.run(cfg)  # the parity check ran at 48 px
    assert result.parity_images == 8 and result.max_abs_diff < 1e-4
    meta = session(result.path).get_modelmeta().custom_metadata_map
    assert json.loads(meta["preprocessing"])["input_size"] == 48
    assert json.loads(meta["input"])["shape"] == ["batch", 3, 48, 48]
    evaluation = evaluate.run(cfg)  # and evaluation feeds it 48 px
    assert evaluation.n_test > 0


@pytest.mark.parametrize(
    "backbone, layers, pooling",
    [
        ("timm/resnet18", ["top", "layer3"], ["avg"]),
        ("timm/efficientnet_b0", ["top", "blocks.4"], ["avg+max"]),
        ("timm/vit_tiny_patch16_224", ["top", "blocks.5"], ["cls+patch_avg"]),
    ],
)
def test_timm_backbones_from_extraction_to_a_checked_export(
    image_folder: Path,
    make_config: MakeConfig,
    backbone: str,
    layers: list[str],
    pooling: list[str],
) -> None:
    cfg = make_config(
        image_folder,
        f"backbone.name='{backbone}'",
        f"extract.layers={layers}",
        f"extract.pooling={pooling}",
        "train.layer=best",
        "train.cv_folds=2",
        "train.C=[1.0]",
        "sweep.cv_folds=2",
        "export.parity_images=8",
    )
    codes = extract.run(cfg)
    assert [s.layer for s in codes.specs] == [layers[1], "top"]
    swept = sweep.run(cfg)
    assert {(r.layer, r.pooling) for r in swept.rows} == {
        (s.layer, s.pooling) for s in codes.specs
    }
    trained = train.run(cfg)
    assert (trained.layer, trained.pooling) == (swept.best.layer, swept.best.pooling)
    result = export.run(cfg)
    assert result.labels_equal and result.max_abs_diff < 1e-4
    props = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert json.loads(props["backbone"])["name"] == backbone
    # evaluate (PyTorch + scikit-learn) and predict (the ONNX file) agree on
    # the test images.
    evaluated = evaluate.run(cfg)
    images = inputs.load_images(cfg)
    test = {
        str(image_folder / r.path): images.label_names[r.label]
        for r in images.records
        if r.split == "test"
    }
    out = cfg.layout.root / "predictions.csv"
    predicted = predict.run(result.path, [image_folder], out=out)
    assert predicted.failed == 0 and evaluated.n_test == len(test) > 0
    with open(out) as handle:
        labels = {r["path"]: r["label"] for r in csv.DictReader(handle)}
    right = sum(labels[path] == truth for path, truth in test.items())
    assert evaluated.accuracy == pytest.approx(right / len(test))


def test_finetuned_timm_vit_exports_attention_and_all(
    tmp_path: Path, image_folder: Path
) -> None:
    from tests.pipeline.finetune.conftest import config

    cfg = config(
        image_folder,
        tmp_path / "run",
        "backbone.name='timm/vit_tiny_patch16_224'",
        "finetune.epochs=1",
        "finetune.batch_size=4",
        "finetune.layer_decay=0.75",
        "export.parity_images=8",
    )
    finetune.run(cfg)
    result = export.run(cfg)
    assert result.kind == "finetune" and result.max_abs_diff < 1e-4
    ops = {n.op_type for n in onnx.load(result.path).graph.node}
    assert {"Softmax", "MatMul", "LayerNormalization"} <= ops  # attention inside


def test_float_input_export(image_folder: Path, make_config: MakeConfig) -> None:
    cfg = make_config(image_folder, "export.input_dtype=float32", "train.cv_folds=2")
    train.run(cfg)
    result = export.run(cfg)
    assert session(result.path).get_inputs()[0].type == "tensor(float)"


def test_a_mismatching_export_is_not_left_as_good(
    image_folder: Path, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(image_folder, "train.cv_folds=2")
    train.run(cfg)
    export.run(cfg)  # a good one first: it must not survive a failed export
    from features.heads import Scores
    from pipeline.models import CodesModel

    real = CodesModel.scores

    def off_by_a_little(self: CodesModel, codes: np.ndarray) -> Scores:
        scores = real(self, codes)
        return Scores(scores.values + 0.01, scores.labels, scores.kind)

    monkeypatch.setattr(CodesModel, "scores", off_by_a_little)
    with pytest.raises(
        ExportParityError,
        match=r"scores: onnxruntime and the reference "
        r"differ by up to 0.01 at \(\d+, \d\) \(tolerance atol=0.0001",
    ):
        export.run(cfg)
    files = cfg.layout.model("codes")
    assert not files.onnx.exists() and not files.export_summary.exists()
    assert files.onnx_failed.exists()


def test_fp16_and_int8_variants_report_accuracy(
    three_classes: Path, make_config: MakeConfig
) -> None:
    cfg = make_config(
        three_classes,
        "train.cv_folds=2",
        "export.fp16=true",
        "export.int8=static",
        "export.calibration_images=8",
    )
    train.run(cfg)
    result = export.run(cfg)
    assert set(result.variants) == {"fp16", "int8"}
    for variant in result.variants.values():
        assert variant.path.is_file() and 0 <= variant.accuracy <= 1
        assert variant.fp32_accuracy == result.variants["fp16"].fp32_accuracy
    saved = json.loads(cfg.layout.model("codes").export_summary.read_text())
    assert set(saved["variants"]) == {"fp16", "int8"}


def test_copies_without_a_test_split_are_refused_before_any_file_changes(
    three_classes: Path, make_config: MakeConfig
) -> None:
    cfg = make_config(three_classes, "train.cv_folds=2")
    train.run(cfg)
    export.run(cfg)
    files = cfg.layout.model("codes")
    before = {p: p.read_bytes() for p in (files.onnx, files.export_summary)}
    no_test = replace(
        cfg,
        data=replace(cfg.data, test_fraction=0.0),
        export=replace(cfg.export, fp16=True, int8="dynamic"),
    )
    with pytest.raises(
        DataError,
        match=r"checked for accuracy on the test split, and the data has no test "
        r"images: set data.test_fraction > 0 \(or add a test/ folder\), or set "
        r"export.fp16 = false and export.int8 = 'none'",
    ):
        export.run(no_test)
    assert {p: p.read_bytes() for p in before} == before


def test_a_failed_copy_leaves_no_record_of_the_old_export(
    three_classes: Path, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(three_classes, "train.cv_folds=2")
    train.run(cfg)
    export.run(cfg)

    def broken(path: Path, out: Path) -> Path:
        raise OSError("the converter failed")

    monkeypatch.setattr(export, "_to_fp16", broken)
    with pytest.raises(OSError, match="the converter failed"):
        export.run(replace(cfg, export=replace(cfg.export, fp16=True)))
    files = cfg.layout.model("codes")
    assert files.onnx.is_file() and not files.export_summary.exists()


@pytest.mark.parametrize("int8", ["static", "dynamic"])
@pytest.mark.parametrize("classifier", ["linear_svm", "svm"])
def test_fp16_and_int8_copies_keep_the_scikit_learn_head_in_float(
    three_classes: Path, make_config: MakeConfig, classifier: str, int8: str
) -> None:
    cfg = make_config(
        three_classes,
        f"train.classifier={classifier}",
        "train.cv_folds=2",
        "train.C=[1.0]",
        "export.fp16=true",
        f"export.int8={int8}",
        "export.calibration_images=8",
    )
    train.run(cfg)
    variants = export.run(cfg).variants
    assert 0 <= variants["fp16"].accuracy <= 1  # onnxruntime loaded and ran it
    variant = variants["int8"]
    nodes = onnx.load(variant.path).graph.node
    assert any("Quantize" in n.op_type or "Integer" in n.op_type for n in nodes)
    head = [n for n in nodes if n.name.startswith("head/")]
    assert head and not any("Quantize" in n.op_type for n in head)
    assert 0 <= variant.accuracy <= 1


def test_export_before_training_says_what_to_run(
    image_folder: Path, make_config: MakeConfig
) -> None:
    with pytest.raises(
        StageInputError,
        match=r"run `quadrant train` \(codes path\) or `quadrant finetune`",
    ):
        export.run(make_config(image_folder))


def test_predict_writes_a_row_per_image_and_reports_unreadable_ones(
    image_folder: Path, make_config: MakeConfig, tmp_path: Path
) -> None:
    cfg = make_config(image_folder, "train.cv_folds=2")
    train.run(cfg)
    model = export.run(cfg).path
    folder = tmp_path / "incoming"
    folder.mkdir()
    for name in ("cat/00.png", "dog/05.png"):
        (folder / name.replace("/", "-")).write_bytes(
            (image_folder / name).read_bytes()
        )
    (folder / "broken.png").write_bytes(b"not really a picture")
    out = tmp_path / "preds.csv"
    result = predict.run(
        model, [folder], out=out, options=predict.PredictOptions(top_k=2)
    )
    assert (result.predicted, result.failed) == (2, 1)
    with open(out) as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert "not an image" in rows["broken.png"]["error"]
    good = rows["cat-00.png"]
    assert good["label"] in ("cat", "dog") and good["error"] == ""
    assert len(good["top_k"].split(";")) == 2 and 0 <= float(good["score"]) <= 1
    expected = _labels_of(model, [image_folder / "cat/00.png"], cfg)
    assert good["label"] == ["cat", "dog"][int(expected[0])]


def _identity_model() -> onnx.ModelProto:
    """A valid ONNX model that is not quadrant's: y = x."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_predict_refuses_a_foreign_onnx_file(tmp_path: Path) -> None:
    onnx.save(_identity_model(), tmp_path / "other.onnx")
    with pytest.raises(StageInputError, match="has no quadrant metadata"):
        predict.run(tmp_path / "other.onnx", [tmp_path], out=tmp_path / "p.csv")


def test_onnxruntime_engine_writes_the_same_codes(
    image_folder: Path, make_config: MakeConfig
) -> None:
    layers = ("extract.layers=['top', 'layer2']", "extract.pooling=['avg', 'grid:2']")
    torch_run = extract.run(make_config(image_folder, *layers))
    ort_run = extract.run(
        make_config(image_folder, *layers, "extract.engine=onnxruntime")
    )
    assert ort_run.key != torch_run.key
    from features.cache import read_provenance

    assert read_provenance(ort_run.path)["compute"]["engine"] == "onnxruntime"
    for name in ("top/none", "layer2/avg", "layer2/grid:2"):
        layer, pooling = name.split("/")
        a = load_codes(torch_run.path, layer, pooling).X
        b = load_codes(ort_run.path, layer, pooling).X
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # The engine's graph is exported once, beside the caches.
    assert len(list(ort_run.path.parent.glob("engine-*.onnx"))) == 1


def test_parity_tolerance_is_relative_to_each_rows_scale() -> None:
    from features.onnx_engine import check_parity

    expected = np.array([[5600.0, 0.001, -3000.0], [0.5, 0.3, 0.2]])
    # float32 rounding on large margins: 0.03 is 5e-6 of its row.
    shifted = expected + [[0.03, 0.03, 0.0], [0.0, 0.0, 0.0]]
    assert check_parity(expected, shifted, what="scores") == pytest.approx(0.03)
    # The same tolerance is tight on a row of probabilities.
    with pytest.raises(ExportParityError, match=r"differ by up to 0.001 at \(1, 0\)"):
        check_parity(expected, expected + [[0, 0, 0], [1e-3, 0, 0]], what="scores")


def _metadata_only_model(path: Path, preprocessing: dict[str, object]) -> Path:
    from onnx import helper

    model = _identity_model()
    helper.set_model_props(
        model,
        {"label_names": json.dumps(["a"]), "preprocessing": json.dumps(preprocessing)},
    )
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    "recorded, decode",
    [({"decode": "fast"}, "fast"), ({"decode": "full"}, "full"), ({}, "full")],
)
def test_predict_decodes_as_the_model_was_trained(
    tmp_path: Path, recorded: dict[str, str], decode: str
) -> None:
    # A model exported before fast decoding existed says nothing: full decoding.
    path = _metadata_only_model(tmp_path / "m.onnx", {"input_size": 32, **recorded})
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert predict.model_metadata(path, props)[1].decode == decode


def test_predict_refuses_an_unknown_decoding(tmp_path: Path) -> None:
    path = _metadata_only_model(tmp_path / "m.onnx", {"decode": "nvdec"})
    with pytest.raises(StageInputError, match="asks for decoding 'nvdec'"):
        predict.run(path, [tmp_path], out=tmp_path / "p.csv")


def test_predict_prepares_photos_with_the_models_decoding(tmp_path: Path) -> None:
    from features.images import decode_image
    from features.settings import Decoding
    from features.transforms import Preprocessing, eval_transform
    from tests.conftest import write_photo

    photo = write_photo(tmp_path / "cat.jpg", (1600, 1200))
    prep = Preprocessing(input_size=32, resize_size=36)
    transform = eval_transform(prep)
    fast = predict._prepare(photo, transform, Decoding(side=36))
    full = predict._prepare(photo, transform, Decoding(decode="full"))
    assert isinstance(fast, np.ndarray) and isinstance(full, np.ndarray)
    expected = transform(decode_image(photo, min_side=36)).numpy()
    np.testing.assert_array_equal(fast, expected)
    assert not np.array_equal(fast, full)
