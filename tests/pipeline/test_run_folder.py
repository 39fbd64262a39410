"""The run folder never lies: what it holds is what the commands say they made.

One model abstraction, one layout, one atomic writer, no pickle: each test
here is a defect that the earlier layout had (issue 9), driven as a user
would meet it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest

from pipeline import evaluate, export, finetune, report, train
from pipeline.cli import main
from pipeline.config import Config, config_to_dict, dump_toml
from pipeline.logs import run_log, setup_console
from tests.conftest import TINY, Planted

MakeConfig = Callable[..., Config]
REPO = Path(__file__).resolve().parents[2]


def conf_file(cfg: Config, folder: Path) -> Path:
    """The config as a conf.toml, for driving the command line."""
    path = folder / "conf.toml"
    path.write_text(dump_toml(config_to_dict(cfg)))
    return path


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The figures pipeline.plots draws, kept open to inspect, closed after."""
    from pipeline import plots

    shown: list[Any] = []
    close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", shown.append)
    yield shown
    for fig in shown:
        close(fig)


# ---------------------------------------------------------------------------
# 1. No command unpickles anything


def test_no_command_runs_a_planted_pickle(
    image_folder: Path,
    make_config: MakeConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = make_config(image_folder, "train.classifier=svm", "train.cv_folds=2")
    train.run(cfg)
    conf = conf_file(cfg, tmp_path)
    marker = tmp_path / "ran"
    head = cfg.layout.model("codes").head
    head.write_bytes(pickle.dumps(Planted(marker)))
    for command in ("evaluate", "export"):
        assert main([command, "-c", str(conf)]) == 1
        err = capsys.readouterr().err
        assert "not a readable skops file" in err and "quadrant train" in err
    assert not marker.exists()

    # quadrant 0.1's layout: a joblib head whose sha256 sits beside it.
    shutil.rmtree(cfg.layout.models)
    legacy = cfg.layout.legacy_model
    legacy.mkdir()
    payload = pickle.dumps(Planted(marker))
    (legacy / "model.joblib").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    (legacy / "model.json").write_text(
        json.dumps(
            {"format": "quadrant-head", "format_version": 1, "joblib_sha256": sha}
        )
    )
    for command in ("evaluate", "export", "report"):
        assert main([command, "-c", str(conf)]) == 1
        err = capsys.readouterr().err
        assert "layout of quadrant 0.1" in err and "Retrain" in err
    assert not marker.exists()


def test_the_source_never_loads_pickle() -> None:
    banned = re.compile(
        r"joblib\.load|pickle\.loads?\(|allow_pickle=True|torch\.load\((?![^)]*weights_only=True)"
    )
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for folder in ("features", "pipeline")
        for path in sorted((REPO / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if banned.search(line) and not line.lstrip().startswith("#")
    ]
    assert found == []


# ---------------------------------------------------------------------------
# 2. A failed command changes no record; artefacts keep their settings


def test_a_failed_command_leaves_config_toml_as_it_was(
    image_folder: Path, make_config: MakeConfig, tmp_path: Path
) -> None:
    cfg = make_config(image_folder, "train.cv_folds=2")
    conf = conf_file(cfg, tmp_path)
    assert main(["train", "-c", str(conf)]) == 0
    recorded = cfg.layout.config.read_text()
    assert "[train]" in recorded
    assert main(["advise", "-c", str(conf), "--set", "data.root='/nope'"]) == 1
    assert cfg.layout.config.read_text() == recorded
    record = json.loads(cfg.layout.model("codes").record.read_text())
    assert record["config"] == config_to_dict(cfg)  # the settings it was made from


# ---------------------------------------------------------------------------
# 3. Stages find the model's codes from the model's own record


def test_export_needs_no_codes_and_no_extraction(
    image_folder: Path, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As after `quadrant run`: trained on a layer set of its own."""
    trained = make_config(
        image_folder,
        "train.cv_folds=2",
        "extract.layers=['layer1', 'layer3', 'top']",
        "train.layer=layer3",
    )
    train.run(trained)
    monkeypatch.setattr(
        "features.extractor._forward",
        lambda *a, **k: pytest.fail("codes were extracted again"),
    )
    result = export.run(make_config(image_folder))  # [extract] layers = ["top"]
    assert result.path == trained.layout.model("codes").onnx


# ---------------------------------------------------------------------------
# 4. A codes model and a fine-tuned model never overwrite each other


def test_codes_and_finetuned_models_live_side_by_side(
    image_folder: Path, make_config: MakeConfig
) -> None:
    cfg = make_config(
        image_folder,
        "train.cv_folds=2",
        "finetune.epochs=1",
        "finetune.batch_size=4",
        "finetune.init=scratch",
        "finetune.num_workers=0",
    )
    train.run(cfg)
    evaluate.run(cfg)
    codes = cfg.layout.model("codes")
    before = {p.name: p.read_bytes() for p in codes.folder.iterdir()}
    finetune.run(cfg)
    evaluate.run(cfg)  # run.model = "latest": the fine-tuned one
    assert {p.name: p.read_bytes() for p in codes.folder.iterdir()} == before
    tuned = cfg.layout.model("finetune")
    assert tuned.metrics.is_file() and tuned.weights.is_file()

    html = report.write(cfg).read_text()
    assert "Model: fine-tuned resnet18 (scratch)" in html
    assert "linear classifier on codes" not in html and "Case " not in html
    assert "Layer sweep" not in html and "Timings" in html  # no run: no timings rows

    from dataclasses import replace

    as_codes = replace(cfg, run=replace(cfg.run, model="codes"))
    html = report.write(as_codes).read_text()
    assert "Model: logistic on top/none" in html and "fine-tuned" not in html


# ---------------------------------------------------------------------------
# 5. Output paths: one clear error, exit 1, the path and the fix


def test_run_out_that_is_a_file(
    image_folder: Path,
    make_config: MakeConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "taken").write_text("a file")
    cfg = make_config(image_folder, f"run.out='{tmp_path / 'taken'}'")
    assert main(["extract", "-c", str(conf_file(cfg, tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "run.out" in err
    assert "Traceback" not in err


def test_predict_out_that_is_a_folder_of_other_files(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A folder is a Parquet dataset's place, replaced whole: never a user's.
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    argv = ["predict", str(model), str(image_folder), "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"--out {tmp_path} is a folder holding other files" in err
    assert "Traceback" not in err and model.exists()


def _can_mount() -> bool:
    try:
        done = subprocess.run(
            ["unshare", "-r", "-m", "true"], capture_output=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


needs_mount = pytest.mark.skipif(
    not _can_mount(), reason="needs `unshare -r -m` to mount a small tmpfs"
)


@needs_mount
def test_read_only_folders_and_a_full_disk_are_clear_errors(
    image_folder: Path, tmp_path: Path
) -> None:
    """Real conditions, in a private mount namespace: a read-only run.out,
    a read-only extract.cache_dir, and a cache_dir on a disk too small for
    the codes. The full-disk run leaves nothing behind, and once the disk
    has room the same command finishes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    sets = " ".join(f"--set {item!r}" for item in TINY)
    sets += f" --set \"data.root='{image_folder}'\""
    sets += " --set \"extract.layers=['layer1']\" --set \"extract.pooling=['grid:4']\""
    sets += " --set extract.shard_size=8"
    quadrant = f"2>&1 {sys.executable} -m pipeline extract -q {sets}"
    script = f"""
set -u
mount -t tmpfs -o size=1m tmpfs {disk}
mkdir -p {disk}/ro && mount -t tmpfs -o size=1m,ro tmpfs {disk}/ro
echo "== ro out"; {quadrant} --set "run.out='{disk}/ro/run'"; echo "rc=$?"
echo "== ro cache"; {quadrant} --set "run.out='{tmp_path}/run1'" \\
  --set "extract.cache_dir='{disk}/ro/cache'"; echo "rc=$?"
mkdir -p {disk}/small && mount -t tmpfs -o size=120k tmpfs {disk}/small
echo "== full"; {quadrant} --set "run.out='{tmp_path}/run2'" \\
  --set "extract.cache_dir='{disk}/small'"; echo "rc=$?"
echo "== left"; find {disk}/small -name '.*tmp*' | wc -l
mount -o remount,size=10m {disk}/small
echo "== again"; {quadrant} --set "run.out='{tmp_path}/run2'" \\
  --set "extract.cache_dir='{disk}/small'"; echo "rc=$?"
"""
    (tmp_path / "conf.toml").write_text("")
    done = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    parts = dict(
        (chunk.split("\n", 1) + [""])[:2] for chunk in done.stdout.split("== ")[1:]
    )
    for name in ("ro out", "ro cache", "full"):
        text = parts[name]
        assert "rc=1" in text and "Traceback" not in text, text
        assert "quadrant extract: error: cannot write" in text, text
    assert "Read-only file system" in parts["ro out"] and "run.out" in parts["ro out"]
    assert "extract.cache_dir" in parts["ro cache"]
    # Known before the forward pass: the codes need more than the disk has.
    assert re.search(r"MiB free, about [\d.]+ MiB needed", parts["full"])
    assert parts["left"].strip() == "0"  # the partial file was removed
    assert "rc=0" in parts["again"], parts["again"]


def test_leftovers_of_killed_runs_are_removed_by_the_next_command(
    image_folder: Path, make_config: MakeConfig, tmp_path: Path
) -> None:
    import socket

    cfg = make_config(image_folder, "train.cv_folds=2")
    train.run(cfg)
    host = socket.gethostname()
    dead = 2**22 + 12345  # above Linux's default pid_max: never a live process
    folder = cfg.layout.model("codes").folder
    stale = folder / f".model.onnx.tmp-{dead}-0@{host}"
    stale.write_bytes(b"half an onnx file")
    other = folder / f".model.onnx.tmp-{dead}-0@elsewhere"  # another machine's
    other.write_bytes(b"")
    # Killed between the two renames that replace a model folder: the old
    # folder sits aside under a hidden name and no model is in place.
    aside = cfg.layout.models / f".codes.old-{dead}-0@{host}"
    folder.rename(aside)
    conf = conf_file(cfg, tmp_path)
    assert main(["evaluate", "-c", str(conf)]) == 0  # the model is back in place
    assert not stale.exists() and other.exists() and not aside.exists()


# ---------------------------------------------------------------------------
# 11. Third-party chatter stays out of the console and the log


def test_export_logs_no_third_party_chatter(
    image_folder: Path,
    make_config: MakeConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = make_config(
        image_folder, "train.cv_folds=2", "export.int8=static", "export.fp16=true"
    )
    conf = conf_file(cfg, tmp_path)
    assert main(["train", "-c", str(conf)]) == 0
    capsys.readouterr()
    assert main(["export", "-c", str(conf)]) == 0
    console = capsys.readouterr().err
    log = cfg.layout.log.read_text()
    for text in (console, log):
        assert "skl2onnx" not in text and "onnxruntime" not in text
        assert "pre-processing before quantization" not in text
    assert "int8: test accuracy" in log  # quadrant's own lines are kept


# ---------------------------------------------------------------------------
# 13. No command writes into the working folder


def test_export_leaves_the_working_folder_as_it_was(
    image_folder: Path,
    make_config: MakeConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = make_config(
        image_folder,
        "train.cv_folds=2",
        "export.fp16=true",
        "export.int8=static",
        "export.calibration_images=8",
    )
    train.run(cfg)
    empty = tmp_path / "cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)
    export.run(cfg)
    cfg2 = make_config(image_folder, "export.int8=dynamic")
    export.run(cfg2)
    assert list(empty.iterdir()) == []


# ---------------------------------------------------------------------------
# Done when: kill `quadrant export` at several moments


def test_a_killed_export_never_leaves_a_truncated_file_and_reruns_identically(
    image_folder: Path, make_config: MakeConfig, tmp_path: Path
) -> None:
    cfg = make_config(
        image_folder,
        "train.cv_folds=2",
        "export.fp16=true",
        "export.int8=static",
        "export.calibration_images=8",
    )
    train.run(cfg)
    files = cfg.layout.model("codes")
    finals = [files.onnx, files.variant("fp16"), files.variant("int8")]
    export.run(cfg)
    straight = {p: p.read_bytes() for p in [*finals, files.export_summary]}
    for p in straight:
        p.unlink()
    conf = conf_file(cfg, tmp_path)
    command = [sys.executable, "-m", "pipeline", "export", "-q", "-c", str(conf)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Kill it while each file is being written, and once after the last.
    moments = [".model.onnx.tmp-", ".model.fp16.onnx.tmp-", ".model.int8.onnx.tmp-"]
    for moment in [*moments, "model.int8.onnx"]:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not any(
            p.name.startswith(moment) for p in files.folder.iterdir()
        ):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for path in finals:  # anything under a final name is whole
            if path.exists():
                onnx.checker.check_model(str(path), full_check=True)
        if files.export_summary.exists():
            json.loads(files.export_summary.read_text())
    assert main(["export", "-q", "-c", str(conf)]) == 0
    for path, data in straight.items():
        assert path.read_bytes() == data, path.name
    leftovers = [p.name for p in files.folder.iterdir() if p.name.startswith(".")]
    assert leftovers == []


# ---------------------------------------------------------------------------
# 12. Frictions


def test_extraction_leaves_no_lock_file_beside_a_finished_cache(
    image_folder: Path, make_config: MakeConfig
) -> None:
    from pipeline import extract

    cfg = make_config(image_folder)
    extract.run(cfg)
    # The cache is the file and the shards it links (format 2); no lock.
    assert sorted(p.suffix for p in cfg.cache_dir.iterdir()) == [".h5", ".shards"]


def test_sweep_and_predictions_are_lf_csv(
    image_folder: Path, make_config: MakeConfig, tmp_path: Path
) -> None:
    from pipeline import predict, sweep

    cfg = make_config(
        image_folder,
        "train.cv_folds=2",
        "sweep.cv_folds=2",
        "extract.layers=['layer2', 'top']",
    )
    sweep.run(cfg)
    train.run(cfg)
    model = export.run(cfg).path
    out = tmp_path / "p.csv"
    predict.run(model, [image_folder], out=out)
    for path in (cfg.layout.sweep_csv, out):
        assert b"\r\n" not in path.read_bytes() and path.read_text().count("\n") > 2


def test_the_chosen_c_is_marked_and_an_edge_of_the_grid_is_said(
    image_folder: Path,
    make_config: MakeConfig,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    figures: list[Any],
) -> None:
    cfg = make_config(image_folder, "train.C=[0.01, 0.1, 1.0]")
    candidates = [
        {"params": {"C": c}, "mean": m, "std": 0.01}
        for c, m in ((0.01, 0.7), (0.1, 0.8), (1.0, 0.9))
    ]
    summary = {"best_params": {"C": 1.0}, "candidates": candidates}
    train._cv_plot(cfg, summary, tmp_path / "cv.png")
    assert "the chosen C = 1.0 is the largest value of train.C" in caplog.text
    assert "extend the grid that way" in caplog.text
    caplog.clear()
    summary["best_params"] = {"C": 0.1}
    train._cv_plot(cfg, summary, tmp_path / "cv.png")
    assert "the chosen C" not in caplog.text
    # The star sits on the chosen value, and the legend names it.
    ax = figures[-1].axes[0]
    star = next(line for line in ax.get_lines() if line.get_marker() == "*")
    assert list(star.get_xdata()) == [1] and list(star.get_ydata()) == [0.8]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["chosen: C = 0.1"]


def test_plots_keep_titles_whole_and_epochs_whole(
    tmp_path: Path, figures: list[Any]
) -> None:
    import numpy as np

    from pipeline import plots

    rows = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1 / e,
            "train_accuracy": e / 4,
            "val_accuracy": e / 4,
        }
        for e in (1, 2, 3)
    ]
    plots.training_curves(rows, tmp_path / "c.png", title="curves")
    ticks = figures[-1].axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)
    title = "fine-tuned efficientnet_lite0 (pretrained): accuracy 0.987"
    plots.confusion_plot(
        np.eye(2, dtype=int), ["a", "b"], tmp_path / "m.png", title=title
    )
    axes_title = figures[-1].axes[0].get_title()
    assert axes_title.replace("\n", " ") == title and "\n" in axes_title
    renderer = figures[-1].canvas.get_renderer()
    box = figures[-1].axes[0].title.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= figures[-1].bbox.width  # inside the figure


@pytest.mark.parametrize("level, kept", [("info", False), ("debug", True)])
def test_other_libraries_details_reach_the_log_only_at_debug(
    image_folder: Path, make_config: MakeConfig, level: str, kept: bool
) -> None:
    cfg = make_config(image_folder, f"run.log_level='{level}'")
    setup_console()
    with run_log(cfg, "test"):
        logging.getLogger("skl2onnx").debug("a library's detail")
        logging.getLogger("pipeline.export").debug("quadrant's own detail")
    log = cfg.layout.log.read_text()
    assert ("a library's detail" in log) is kept
    assert "quadrant's own detail" in log
