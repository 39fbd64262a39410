"""The fine-tune path: a real short fine-tune, exact resume, DDP, bad input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from features import datasets
from features.errors import CheckpointError, DataError, TrainingError
from pipeline import evaluate, finetune
from pipeline.config import Config, load_config
from tests.conftest import write_png

FASHION = datasets.DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"
needs_fashion = pytest.mark.skipif(
    not FASHION.exists(),
    reason="apt-get install dataset-fashion-mnist (CI installs it)",
)

# resnet18 from scratch at 32 px: seconds per epoch on a CPU.
TINY = [
    "backbone.name=resnet18",
    "backbone.input_size=32",
    "backbone.resize_size=32",
    "finetune.init=scratch",
    "finetune.batch_size=8",
    "finetune.num_workers=0",
    "finetune.warmup_epochs=0",
    "run.progress=false",
]


def config(root: Path, out: Path, *extra: str) -> Config:
    return load_config(None, [f"data.root='{root}'", f"run.out='{out}'", *TINY, *extra])


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FASHION.exists():
        pytest.skip("apt-get install dataset-fashion-mnist (CI installs it)")
    root = tmp_path_factory.mktemp("fashion") / "fm"
    return datasets.write_fashion_mnist(
        root, classes=["trouser", "bag", "sneaker"], per_class=30, split="both"
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
            "finetune.lr=0.002",
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


def _images(root: Path, classes: int = 2, per_class: int = 12) -> Path:
    for c in range(classes):
        for i in range(per_class):
            write_png(root / f"c{c}" / f"{i:02d}.png", seed=100 * c + i)
    return root


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    state = torch.load(out / "finetune" / "last.pt", weights_only=True)
    return state["model"]


def test_resume_gives_the_same_weights_as_a_straight_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _images(tmp_path / "data")
    extra = ("finetune.epochs=2", "finetune.deterministic=true")
    finetune.run(config(root, tmp_path / "straight", *extra))

    real = finetune.write_history

    def killed_after_first_epoch(*args: object) -> None:
        raise KeyboardInterrupt  # the checkpoint of epoch 1 is already on disk

    monkeypatch.setattr(finetune, "write_history", killed_after_first_epoch)
    cfg = config(root, tmp_path / "resumed", *extra)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg)
    assert (
        torch.load(tmp_path / "resumed" / "finetune" / "last.pt", weights_only=True)[
            "epoch"
        ]
        == 1
    )
    monkeypatch.setattr(finetune, "write_history", real)
    finetune.run(cfg, resume=True)
    straight, resumed = (
        _final_weights(tmp_path / "straight"),
        _final_weights(tmp_path / "resumed"),
    )
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_existing_checkpoint_needs_resume_or_restart(tmp_path: Path) -> None:
    root = _images(tmp_path / "data")
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
    root = _images(tmp_path / "data")
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
    root = _images(tmp_path / "data")
    finetune.run(config(root, tmp_path / "run", "finetune.epochs=2"))
    _images(tmp_path / "data", classes=3)
    with pytest.raises(
        CheckpointError,
        match=r"trained on classes \['c0', 'c1'\], the "
        r"data now has \['c0', 'c1', 'c2'\]",
    ):
        finetune.run(config(root, tmp_path / "run", "finetune.epochs=2"), resume=True)


def test_a_batch_larger_than_the_data_is_cut_to_fit_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _images(tmp_path / "data")  # 2 classes x 12: 18 for training
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


def test_dropping_the_last_partial_batch_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _images(tmp_path / "data")
    cfg = config(root, tmp_path / "run", "finetune.batch_size=5", "finetune.epochs=1")
    with caplog.at_level(logging.INFO):
        finetune.run(cfg)
    assert "each epoch trains on 15 of the 18 training images" in caplog.text


def test_too_few_images_for_the_processes(tmp_path: Path) -> None:
    from pipeline.inputs import load_images

    for c in ("a", "b"):
        for split in ("train", "val", "test"):
            write_png(tmp_path / "data" / split / c / "0.png", seed=ord(c))
    cfg = config(tmp_path / "data", tmp_path / "run")
    four = finetune.Dist(rank=0, world=4, local_rank=0)
    with pytest.raises(
        DataError,
        match=r"2 images for 4 process\(es\); fine-tuning needs at least two per",
    ):
        finetune._fitting_batch(cfg, load_images(cfg), four)


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

    monkeypatch.setattr(finetune, "train_one_epoch", oom)
    with pytest.raises(
        TrainingError,
        match=r"out of GPU memory at finetune.batch_size "
        r"= 8: lower it, and raise finetune.accumulate.*--resume",
    ):
        finetune.run(config(_images(tmp_path / "data"), tmp_path / "run"))


def test_head_only_epochs_leave_the_body_untouched(tmp_path: Path) -> None:
    root = _images(tmp_path / "data")
    cfg = config(
        root,
        tmp_path / "run",
        "finetune.epochs=2",
        "finetune.head_epochs=1",
        "finetune.init=pretrained",
        "backbone.weights=random",
    )
    model, _, _ = finetune.build_model(cfg, 2, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with finetune._frozen_body(model):
        trainable = [n for n, p in model.net.named_parameters() if p.requires_grad]
        assert trainable == ["fc.weight", "fc.bias"]
        assert not model.net.bn1.training or not model.training
        model.train()
        with finetune._frozen_body(model):
            assert not model.net.layer1[0].bn1.training  # statistics frozen
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_param_groups_decay_the_learning_rate_towards_the_input() -> None:
    from torchvision.models import resnet18

    model = resnet18()
    groups = finetune.param_groups(model, lr=1.0, layer_decay=0.5, weight_decay=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.fc.weight)]["lr"] == 1.0
    assert by_param[id(model.layer4[1].conv1.weight)]["lr"] == 0.5
    assert (
        by_param[id(model.conv1.weight)]["lr"]
        < by_param[id(model.layer1[0].conv1.weight)]["lr"]
    )
    assert by_param[id(model.fc.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.fc.weight)]["weight_decay"] == 0.1


def test_scheduler_warms_up_linearly_then_decays_to_zero() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = finetune.build_scheduler(optimizer, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[3] > lrs[6] > lrs[9] >= 0


def test_ddp_with_two_gloo_processes(tmp_path: Path) -> None:
    """torchrun --nproc-per-node 2 on the CPU: gloo, rank 0 writes."""
    root = _images(tmp_path / "data", per_class=20)
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


def test_param_groups_of_a_timm_vit_decay_by_block() -> None:
    # timm's own helper groups a ViT: embeddings, one group per block, head.
    from features.backbones import build_backbone

    net = build_backbone(
        "timm/vit_tiny_patch16_224",
        "random",
        preprocessing={"input_size": 32},
        num_classes=3,
    ).model
    groups = finetune.param_groups(net, lr=1.0, layer_decay=0.5, weight_decay=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}

    def lr(param: torch.nn.Parameter) -> float:
        return float(by_param[id(param)]["lr"])

    assert lr(net.head.weight) == 1.0
    assert lr(net.blocks[11].mlp.fc1.weight) == 0.5
    assert lr(net.blocks[10].mlp.fc1.weight) == 0.25
    assert lr(net.blocks[0].attn.qkv.weight) == 0.5**12
    assert lr(net.patch_embed.proj.weight) == lr(net.cls_token) == 0.5**13
    assert by_param[id(net.pos_embed)]["weight_decay"] == 0.0  # timm's no-decay list
    assert by_param[id(net.blocks[0].attn.qkv.weight)]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


# ---------------------------------------------------------------------------
# The advisor's budgeted pilot


def _counting_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every training batch that reaches the network."""
    seen: list[int] = []
    real = finetune._step

    def step(t, images, labels, criterion, *, sync):  # type: ignore[no-untyped-def]
        seen.append(len(labels))
        return real(t, images, labels, criterion, sync=sync)

    monkeypatch.setattr(finetune, "_step", step)
    return seen


def test_pilot_keeps_its_budget_and_is_the_start_of_the_full_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _images(tmp_path / "data", per_class=20)
    extra = ("finetune.epochs=2", "finetune.deterministic=true")
    finetune.run(config(root, tmp_path / "straight", *extra))
    cfg = config(root, tmp_path / "pilot", *extra)
    seen = _counting_steps(monkeypatch)
    run = finetune.pilot(cfg, share=0.5, points=4)
    # A share of half of 2 epochs: exactly the first epoch, batch by batch.
    assert sum(seen) == run.images == run.budget == run.full // 2
    assert run.epochs == 1 and run.resumable
    steps = [t for t, _ in run.curve]
    assert steps == sorted(set(steps)) and steps[-1] == run.images and len(steps) >= 3
    assert all(0 <= acc <= 1 for _, acc in run.curve)
    assert len(run.val_paths) == len(run.val_correct) > 0
    assert run.curve[-1][1] == pytest.approx(
        sum(run.val_correct) / len(run.val_correct)
    )
    # The full fine-tune continues the pilot's checkpoint to the same weights
    # as a straight run: the pilot's validations changed nothing.
    finetune.run(cfg, resume=True)
    straight, continued = (
        _final_weights(tmp_path / "straight"),
        _final_weights(tmp_path / "pilot"),
    )
    for key in straight:
        assert torch.equal(straight[key], continued[key]), key


def test_a_pilot_under_one_epoch_stops_part_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _images(tmp_path / "data")
    cfg = config(root, tmp_path / "pilot", "finetune.epochs=2")
    seen = _counting_steps(monkeypatch)
    run = finetune.pilot(cfg, share=0.25, points=2)
    assert sum(seen) == run.images == run.budget == 8 <= run.full // 4
    assert run.epochs == 0 and not run.resumable
    assert not (tmp_path / "pilot" / "finetune" / "last.pt").exists()


@pytest.mark.parametrize(
    "share, epochs, per_epoch, batch, budget",
    [
        (0.25, 4, 100, 10, 100),  # one whole epoch
        (0.25, 10, 100, 10, 200),  # 2.5 epochs -> 2 whole epochs, never more
        (0.25, 2, 100, 10, 50),  # half an epoch, in whole batches
        (0.25, 2, 100, 32, 32),
        (0.01, 1, 100, 32, 32),  # at least one batch
    ],
)
def test_pilot_budget(
    share: float, epochs: int, per_epoch: int, batch: int, budget: int
) -> None:
    assert finetune.pilot_budget(share, epochs, per_epoch, batch) == budget


def test_model_stamp_changes_with_the_decoding(
    image_folder: Path, tmp_path: Path
) -> None:
    from pipeline.inputs import load_images

    fast = config(image_folder, tmp_path / "a")
    full = config(image_folder, tmp_path / "a", "data.decode='full'")
    images = load_images(fast)
    assert finetune.model_stamp(fast, images) != finetune.model_stamp(full, images)
