"""Tests for `quadrant predict` as a batch job: parts that resume, Parquet,
exit codes, and every bad input one clean error (issue 20)."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pyarrow.parquet as pq
import pytest

from features.errors import OutputError, StageInputError
from pipeline import export, predict, predictions, train
from pipeline.cli import main
from pipeline.config import load_config
from tests.conftest import TINY, write_png

CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A codes-path model of three classes of random 32x32 PNGs, exported."""
    tmp = tmp_path_factory.mktemp("model")
    for c, name in enumerate(CLASSES):
        for i in range(8):
            write_png(tmp / "images" / name / f"{i:02d}.png", seed=100 * c + i)
    base = [f"data.root='{tmp / 'images'}'", f"run.out='{tmp / 'run'}'"]
    cfg = load_config(None, [*base, *TINY, "train.cv_folds=2"], cwd=tmp)
    train.run(cfg)
    return export.run(cfg).path


def _images(folder: Path, count: int, seed: int = 0) -> Path:
    for i in range(count):
        write_png(folder / f"{i:04d}.png", seed=seed + i)
    return folder


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out, newline="") as handle:
        return list(csv.DictReader(handle))


def _without_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "predicted_at"} for r in rows]


def test_rows_in_input_order_with_the_models_identity(
    model: Path, tmp_path: Path
) -> None:
    folder = _images(tmp_path / "in", 7)
    out = tmp_path / "p.csv"
    result = predict.run(model, [folder], out=out)
    rows = _rows(out)
    assert [Path(r["path"]).name for r in rows] == [f"{i:04d}.png" for i in range(7)]
    assert {r["model_sha256"] for r in rows} == {result_sha(model)}
    assert all(len(r["top_k"].split(";")) == 3 and r["error"] == "" for r in rows)
    summary = json.loads(result.summary.read_text())
    assert summary["rows"] == 7 and summary["failed"] == 0
    assert result.summary == tmp_path / "p.summary.json"
    assert not (tmp_path / ".p.csv.parts").exists()


def result_sha(path: Path) -> str:
    from features.backbones import sha256_of

    return sha256_of(path)


def test_parquet_has_typed_columns_and_every_score(model: Path, tmp_path: Path) -> None:
    folder = _images(tmp_path / "in", 5)
    (folder / "broken.png").write_bytes(b"not a picture")
    options = predict.PredictOptions(top_k=2, all_scores=True)
    predict.run(model, [folder], out=tmp_path / "p.parquet", options=options)
    table = pq.read_table(tmp_path / "p.parquet")
    types = {f.name: str(f.type) for f in table.schema}
    assert types == {
        "path": "string",
        "label": "string",
        "label_index": "int32",
        "score": "float",
        "top_labels": "list<element: string>",
        "top_scores": "list<element: float>",
        "score_cat": "float",
        "score_dog": "float",
        "score_owl": "float",
        "error": "string",
        "model_sha256": "string",
        "predicted_at": "timestamp[ms, tz=UTC]",
    }
    rows = table.to_pylist()
    broken = next(r for r in rows if r["path"].endswith("broken.png"))
    assert broken["label"] is None and "not an image" in broken["error"]
    good = [r for r in rows if r["error"] is None]
    for r in good:
        scores = [r["score_cat"], r["score_dog"], r["score_owl"]]
        assert r["label"] == CLASSES[r["label_index"]]
        assert r["top_scores"][0] == pytest.approx(max(scores))
        assert r["score"] == pytest.approx(scores[r["label_index"]])


def test_a_folder_is_a_parquet_dataset_with_the_same_rows(
    model: Path, tmp_path: Path
) -> None:
    folder = _images(tmp_path / "in", 9)
    options = predict.PredictOptions(part_rows=4)
    predict.run(model, [folder], out=tmp_path / "p.parquet", options=options)
    predict.run(model, [folder], out=tmp_path / "ds", options=options)
    parts = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert parts == [
        "part-000000.parquet",
        "part-000001.parquet",
        "part-000002.parquet",
    ]
    whole = pq.read_table(tmp_path / "p.parquet").drop(["predicted_at"])
    dataset = pq.read_table(tmp_path / "ds").drop(["predicted_at"])
    assert dataset.to_pylist() == whole.to_pylist()
    # A rerun replaces its own dataset; a folder of anything else is refused.
    predict.run(model, [folder], out=tmp_path / "ds", options=options)
    with pytest.raises(OutputError, match=r"is a folder holding other files"):
        predict.run(model, [folder], out=folder)


def test_a_killed_run_resumes_to_the_same_output(model: Path, tmp_path: Path) -> None:
    """SIGKILL at three moments; each rerun ends as an uninterrupted run."""
    folder = _images(tmp_path / "in", 240)
    straight = tmp_path / "straight.csv"
    args = ["--part-rows", "20", "--batch-size", "4", "-q"]
    assert (
        main(["predict", str(model), str(folder), "--out", str(straight), *args]) == 0
    )
    out = tmp_path / "p.csv"
    command = [sys.executable, "-m", "pipeline", "predict", str(model), str(folder)]
    command += ["--out", str(out), *args]
    index = tmp_path / ".p.csv.parts" / "index.json"
    for moment in (1, 5, 10):
        proc = subprocess.Popen(command, cwd=tmp_path, env=_one_thread())
        deadline = time.monotonic() + 120
        while proc.poll() is None and _committed(index) < moment:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists()
    assert main(["predict", str(model), str(folder), "--out", str(out), *args]) == 0
    assert _without_time(_rows(out)) == _without_time(_rows(straight))
    assert json.loads((tmp_path / "p.summary.json").read_text())["resumed_parts"] >= 10
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def _one_thread() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _committed(index: Path) -> int:
    """Parts committed so far: each has its record beside the index."""
    return len(list(index.parent.glob("part-*.json")))


def test_another_job_never_reuses_the_parts(model: Path, tmp_path: Path) -> None:
    folder = _images(tmp_path / "in", 6)
    out = tmp_path / "p.csv"
    options = predict.PredictOptions(part_rows=2)
    predict.run(model, [folder], out=out, options=options)
    first = _rows(out)
    # Plant parts of another job (top-k 1) under the output's parts folder.
    job = predictions.Job("0" * 64, "x", 6, 1, False, CLASSES, 2)
    predictions.PartStore(out, job).open()
    result = predict.run(model, [folder], out=out, options=options)
    assert result.resumed_parts == 0
    assert _without_time(_rows(out)) == _without_time(first)


def test_exit_codes_and_the_log(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _images(tmp_path / "in", 3)
    out = tmp_path / "out" / "p.csv"
    assert main(["predict", str(model), str(folder), "--out", str(out), "-q"]) == 0
    (folder / "broken.png").write_bytes(b"junk")
    argv = ["predict", str(model), str(folder), "--out", str(out), "-q"]
    assert main(argv) == predict.EXIT_SOME_FAILED == 3
    assert "3 images (1 unreadable" in capsys.readouterr().out
    log = (tmp_path / "out" / "quadrant.log").read_text()
    assert "predict: 4 rows written, 1 failed ->" in log.splitlines()[-1]
    assert main([*argv, "--max-failures", "0"]) == 1
    err = capsys.readouterr().err
    assert "1 images failed, more than --max-failures 0 allows" in err
    assert "broken.png: " in err and "run the same command again" in err


def _onnx_with(model: Path, tmp_path: Path, edit: object) -> Path:
    proto = onnx.load(model)
    edit(proto)  # type: ignore[operator]
    path = tmp_path / "edited.onnx"
    onnx.save(proto, path)
    return path


def _set_metadata(key: str, value: object) -> object:
    def edit(proto: onnx.ModelProto) -> None:
        for prop in proto.metadata_props:
            if prop.key == key:
                data = json.loads(prop.value)
                prop.value = json.dumps(
                    data | value if isinstance(value, dict) else value
                )

    return edit


def _drop_output(name: str) -> object:
    def edit(proto: onnx.ModelProto) -> None:
        kept = [o for o in proto.graph.output if o.name != name]
        del proto.graph.output[:]
        proto.graph.output.extend(kept)

    return edit


def test_metadata_that_disagrees_with_the_graph_is_refused_first(
    model: Path, tmp_path: Path
) -> None:
    # 100000 px batches would be allocated before the first forward.
    path = _onnx_with(
        model, tmp_path, _set_metadata("preprocessing", {"input_size": 100000})
    )
    with pytest.raises(
        StageInputError,
        match=r"metadata says input_size 100000 .* but its graph takes 32x32",
    ):
        predict.run(path, [tmp_path], out=tmp_path / "p.csv")


def test_a_model_without_its_label_output_is_refused(
    model: Path, tmp_path: Path
) -> None:
    path = _onnx_with(model, tmp_path, _drop_output("label"))
    with pytest.raises(StageInputError, match=r"lacks \['label'\]"):
        predict.run(path, [tmp_path], out=tmp_path / "p.csv")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-k", "-1"], "--top-k -1: give how many of the best classes"),
        (["--top-k", "99"], "--top-k 99: the model has 3 classes; give at most 3"),
        (["--batch-size", "0"], "--batch-size 0: give a positive number"),
        (["--max-failures", "many"], "--max-failures 'many': give a count"),
        (["--part-rows", "0"], "--part-rows 0: give a positive number"),
        (["--out", "p.txt"], "cannot tell the format from '.txt'"),
    ],
)
def test_bad_arguments_are_one_clean_error(
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    folder = _images(tmp_path / "in", 2)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(model), str(folder), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "predictions.csv").exists()


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="this machine has CUDA"
)
def test_cuda_without_a_gpu_is_refused(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", str(model), str(tmp_path), "--device", "cuda"]
    assert main([*argv, "--out", str(tmp_path / "p.csv")]) == 1
    assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.parametrize(
    "given, message",
    [
        ("s3://bucket/images", "URLs and object storage are not read"),
        ("https://example.com/a.jpg", "URLs and object storage are not read"),
        ("empty", "no image files found"),
    ],
)
def test_urls_and_empty_inputs_are_refused(
    model: Path, tmp_path: Path, given: str, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    path = given if "://" in given else str(tmp_path / given)
    with pytest.raises(StageInputError, match=message):
        predict.run(model, [path], out=tmp_path / "p.csv")


def test_every_entry_gets_a_row_even_fifos_and_broken_links(
    model: Path, tmp_path: Path
) -> None:
    folder = _images(tmp_path / "in", 2)
    os.mkfifo(folder / "pipe.png")
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "loop-a.png").symlink_to(folder / "loop-b.png")
    (folder / "loop-b.png").symlink_to(folder / "loop-a.png")
    result = predict.run(model, [folder], out=tmp_path / "p.csv")
    errors = {Path(r["path"]).name: r["error"] for r in _rows(tmp_path / "p.csv")}
    assert len(errors) == 6 and (result.predicted, result.failed) == (2, 4)
    assert errors["pipe.png"] == "not a regular file (a FIFO, socket or device)"
    assert errors["dangling.png"] == "a link to a missing file"
    assert "Too many levels of symbolic links" in errors["loop-a.png"]


def test_every_image_failing_is_an_error_and_writes_nothing(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_text("text, not pixels")
    out = tmp_path / "p.csv"
    assert main(["predict", str(model), str(folder), "--out", str(out), "-q"]) == 1
    assert "none of the 2 images could be read, e.g." in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / ".p.csv.parts").exists()


def test_paths_from_stdin(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _images(tmp_path / "in", 3)
    listed = [str(folder / "0002.png"), str(folder / "0000.png")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(listed) + "\n"))
    predict.run(model, ["-"], out=tmp_path / "p.csv")
    assert [r["path"] for r in _rows(tmp_path / "p.csv")] == listed


def test_a_full_disk_names_the_out_option(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(predictions.pq, "write_table", full)
    folder = _images(tmp_path / "in", 2)
    with pytest.raises(OutputError, match=r"free space there, or set --out to"):
        predict.run(model, [folder], out=tmp_path / "p.csv")


def test_a_manifests_columns_go_along_to_the_output(
    model: Path, tmp_path: Path
) -> None:
    folder = _images(tmp_path / "in", 2)
    manifest = tmp_path / "list.csv"
    manifest.write_text("id,path,label\nA-7,in/0001.png,dog\nB-9,in/0000.png,cat\n")
    predict.run(model, [manifest], out=tmp_path / "p.csv")
    rows = _rows(tmp_path / "p.csv")
    assert list(rows[0])[:4] == ["path", "id", "input_label", "label"]
    assert [(r["id"], r["input_label"]) for r in rows] == [
        ("A-7", "dog"),
        ("B-9", "cat"),
    ]
    predict.run(model, [manifest, folder], out=tmp_path / "p.parquet")
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.column("id").to_pylist() == ["A-7", "B-9", None, None]


def test_torchrun_two_processes_write_the_one_process_rows(
    model: Path, tmp_path: Path
) -> None:
    from tests.features.test_distributed import _free_port

    folder = _images(tmp_path / "in", 50)
    args = ["--part-rows", "8", "-q"]
    one = tmp_path / "one.parquet"
    assert main(["predict", str(model), str(folder), "--out", str(one), *args]) == 0
    two = tmp_path / "two.parquet"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(_free_port()), "-m", "pipeline", "predict"]
    command += [str(model), str(folder), "--out", str(two), *args]
    done = subprocess.run(
        command, cwd=tmp_path, env=_one_thread(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("predicted 50 images (0 unreadable") == 1
    rows = [pq.read_table(p).drop(["predicted_at"]).to_pylist() for p in (one, two)]
    assert rows[0] == rows[1] and len(rows[0]) == 50
    assert not (tmp_path / ".two.parquet.parts").exists()


def test_each_torchrun_rank_takes_its_own_gpu() -> None:
    from features.distributed import World
    from features.onnx_engine import cuda_options

    assert cuda_options("cuda") == {"device_id": 0}
    assert cuda_options("cuda:3") == {"device_id": 3}
    one, second = World(), World(rank=1, size=2, local_rank=1, local_size=2)
    assert predict._rank_device("auto", one) == "auto"
    assert predict._rank_device("cpu", second) == "cpu"
    gpu = "cuda:1" if __import__("torch").cuda.is_available() else "auto"
    assert predict._rank_device("auto", second) == gpu
