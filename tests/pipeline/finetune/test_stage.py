"""Tests for pipeline/finetune/stage.py: a real short fine-tune, exact resume,
DDP, bad input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from features.errors import CheckpointError, DataError, TrainingError
from pipeline import evaluate, finetune
from pipeline.config import load_config
from pipeline.finetune import loop, stage
from pipeline.finetune.checkpoints import History
from tests.conftest import write_png
from tests.pipeline.finetune.conftest import (
    TINY,
    config,
    final_weights,
    needs_fashion,
    write_classes,
)


@needs_fashion
def test_finetune_learns_and_evaluates(fashion: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f"data.root='{fashion}'",
            f"run.out='{tmp_path}'",
            "backbone.name=efficientnet_lite0",
            "backbone.input_size=32",
            "finetune.epochs=4",
            "finetune.batch_size=9",
            "finetune.num_workers=0",
            "finetune.warmup_epochs=0.5",
            "run.progress=false",
        ],
    )
    result = finetune.run(cfg)
    model = tmp_path / "models" / "finetune"
    history = json.loads((model / "finetune.json").read_text())["epochs"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result.epochs_run == 4 and result.best_value > 0.6  # chance: 1/3
    for name in (
        "models/finetune/model.pt",
        "models/finetune/model.json",
        "models/finetune/finetune.csv",
        "models/finetune/training_curves.png",
        "finetune/last.pt",
        "finetune/best.pt",
    ):
        assert (tmp_path / name).is_file(), name
    metrics = evaluate.run(cfg)
    assert metrics.accuracy > 0.6 and metrics.n_test == 15
    assert json.loads((model / "metrics.json").read_text())["n_test"] == 15


def test_resume_gives_the_same_weights_as_a_straight_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_classes(tmp_path / "data")
    extra = ("finetune.epochs=2", "finetune.deterministic=true")
    finetune.run(config(root, tmp_path / "straight", *extra))

    real = History.write

    def killed_after_first_epoch(*args: object) -> None:
        raise KeyboardInterrupt  # the checkpoint of epoch 1 is already on disk

    monkeypatch.setattr(History, "write", killed_after_first_epoch)
    cfg = config(root, tmp_path / "resumed", *extra)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg)
    assert (
        torch.load(tmp_path / "resumed" / "finetune" / "last.pt", weights_only=True)[
            "epoch"
        ]
        == 1
    )
    monkeypatch.setattr(History, "write", real)
    finetune.run(cfg, resume=True)
    straight, resumed = (
        final_weights(tmp_path / "straight"),
        final_weights(tmp_path / "resumed"),
    )
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


class _Planted:
    """A pickle that would leave a marker file if anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_by_name_and_never_runs(tmp_path: Path) -> None:
    from features.backbones import sha256_of
    from features.errors import RecordError
    from pipeline import export

    root = write_classes(tmp_path / "data")
    cfg = config(root, tmp_path / "run", "finetune.epochs=1")
    finetune.run(cfg)
    model = tmp_path / "run" / "models" / "finetune"
    marker = tmp_path / "ran"
    torch.save({"x": _Planted(marker)}, model / "model.pt")
    record = json.loads((model / "model.json").read_text())
    record["weights"]["sha256"] = sha256_of(model / "model.pt")
    (model / "model.json").write_text(json.dumps(record))
    for command in (evaluate.run, export.run):
        with pytest.raises(
            RecordError,
            match=r"model\.pt is not the fine-tuned weights quadrant wrote that "
            r"loads safely \(UnpicklingError: .*\); run `quadrant finetune "
            r"--restart` again",
        ):
            command(cfg)
    assert not marker.exists()


@pytest.mark.skipif(
    subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True).returncode,
    reason="needs `unshare -r -m` to mount a small tmpfs",
)
def test_a_disk_that_fills_while_fine_tuning_is_one_clear_error(
    tmp_path: Path,
) -> None:
    root = write_classes(tmp_path / "data")
    disk = tmp_path / "disk"
    disk.mkdir()
    repo = Path(__file__).resolve().parents[3]
    # A tmpfs of 2 MB takes the run folder's records but not the 45 MB
    # checkpoint of resnet18, which torch.save writes in pieces.
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {disk} && cd {repo} && "
        f"{sys.executable} -m pipeline finetune --set data.root='{root}' "
        f"--set run.out='{disk}/run' "
        + " ".join(f'--set "{s}"' for s in (*TINY, "finetune.epochs=1"))
        + f"; echo exit=$?; find {disk} -name '*.pt*'"
    )
    result = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True
    )
    assert "exit=1" in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "no space left on that disk" in result.stderr, result.stderr
    assert ".pt" not in result.stdout.split("exit=1")[1]  # no partial checkpoint


def test_existing_checkpoint_needs_resume_or_restart(tmp_path: Path) -> None:
    root = write_classes(tmp_path / "data")
    cfg = config(root, tmp_path / "run", "finetune.epochs=1")
    finetune.run(cfg)
    with pytest.raises(
        CheckpointError,
        match=r"after epoch 1 exists .*--resume .*"
        r"--restart",
    ):
        finetune.run(cfg)
    assert finetune.run(cfg, restart=True).epochs_run == 1


def test_resume_refuses_a_checkpoint_of_another_backbone(tmp_path: Path) -> None:
    root = write_classes(tmp_path / "data")
    finetune.run(config(root, tmp_path / "run", "finetune.epochs=2"))
    other = config(
        root, tmp_path / "run", "finetune.epochs=2", "backbone.name=resnet34"
    )
    with pytest.raises(
        CheckpointError,
        match=r"belongs to another setup:\n  "
        r"backbone.name: expected 'resnet34', found 'resnet18'",
    ):
        finetune.run(other, resume=True)


def test_resume_refuses_another_class_list(tmp_path: Path) -> None:
    root = write_classes(tmp_path / "data")
    finetune.run(config(root, tmp_path / "run", "finetune.epochs=2"))
    write_classes(tmp_path / "data", classes=3)
    with pytest.raises(
        CheckpointError,
        match=r"trained on classes \['c0', 'c1'\], the "
        r"data now has \['c0', 'c1', 'c2'\]",
    ):
        finetune.run(config(root, tmp_path / "run", "finetune.epochs=2"), resume=True)


def test_a_batch_larger_than_the_data_is_cut_to_fit_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_classes(tmp_path / "data")  # 2 classes x 12: 18 for training
    cfg = config(root, tmp_path / "run", "finetune.batch_size=64", "finetune.epochs=1")
    with caplog.at_level(logging.INFO):
        result = finetune.run(cfg)
    assert result.epochs_run == 1
    assert (
        "finetune.batch_size = 64 is more than the 18 training images per process: "
        "using batches of 18" in caplog.text
    )
    record = json.loads((tmp_path / "run/models/finetune/model.json").read_text())
    assert record["config"]["finetune"]["batch_size"] == 18


def test_too_few_images_for_the_processes(tmp_path: Path) -> None:
    from pipeline.inputs import load_images

    for c in ("a", "b"):
        for split in ("train", "val", "test"):
            write_png(tmp_path / "data" / split / c / "0.png", seed=ord(c))
    cfg = config(tmp_path / "data", tmp_path / "run")
    four = loop.Dist(rank=0, world=4, local_rank=0)
    with pytest.raises(
        DataError,
        match=r"2 images for 4 process\(es\); fine-tuning needs at least two per",
    ):
        stage._fitting_batch(cfg, load_images(cfg), four)


def test_class_missing_from_validation(tmp_path: Path) -> None:
    for split, classes in (
        ("train", ("a", "b")),
        ("val", ("a",)),
        ("test", ("a", "b")),
    ):
        for c in classes:
            for i in range(10 if split == "train" else 2):
                write_png(tmp_path / "data" / split / c / f"{i}.png", seed=i)
    with pytest.raises(DataError, match=r"\['b'\] have no validation images"):
        finetune.run(config(tmp_path / "data", tmp_path / "run"))


def test_out_of_memory_keeps_the_checkpoint_and_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loop.Trainer, "train_one_epoch", oom)
    with pytest.raises(
        TrainingError,
        match=r"out of GPU memory at finetune.batch_size "
        r"= 8: lower it, and raise finetune.accumulate.*--resume",
    ):
        finetune.run(config(write_classes(tmp_path / "data"), tmp_path / "run"))


def test_ddp_with_two_gloo_processes(tmp_path: Path) -> None:
    """torchrun --nproc-per-node 2 on the CPU: gloo, rank 0 writes."""
    root = write_classes(tmp_path / "data", per_class=20)
    (tmp_path / "conf.toml").write_text(
        f'[data]\nroot = "{root}"\n[run]\nout = "run"\n'
    )
    sets = [
        a
        for item in [*TINY, "finetune.epochs=2", "finetune.batch_size=4"]
        for a in ("--set", item)
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "pipeline",
            "finetune",
            *sets,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "effective batch 8 (4 x 1 accumulation x 2 processes)" in done.stderr
    assert done.stdout.count("fine-tuned resnet18") == 1  # only rank 0 reports
    record = tmp_path / "run" / "models" / "finetune" / "finetune.json"
    history = json.loads(record.read_text())["epochs"]
    assert len(history) == 2
    state = torch.load(tmp_path / "run" / "finetune" / "last.pt", weights_only=True)
    assert state["epoch"] == 2


def test_model_stamp_changes_with_the_decoding(
    image_folder: Path, tmp_path: Path
) -> None:
    from pipeline.inputs import load_images

    fast = config(image_folder, tmp_path / "a")
    full = config(image_folder, tmp_path / "a", "data.decode='full'")
    images = load_images(fast)
    assert finetune.model_stamp(fast, images) != finetune.model_stamp(full, images)
