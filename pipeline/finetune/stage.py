"""The fine-tune stage: train the whole network with a new head (cases 3, 4).

`run` reads like a table of contents: prepare (the data, the model with its
new head, the trainer, restored or fresh), fit, publish. The same command
runs under `torchrun --nproc-per-node N` with DistributedDataParallel; only
rank 0 writes files.

While training, the work folder `<run.out>/finetune/` holds `last.pt` (the
full training state, every epoch, for --resume), `best.pt` (the best weights
so far) and the metrics per epoch (`finetune.json`, `finetune.csv`,
`training_curves.png`, to watch a long run). When training ends, the model
is published as one folder, `<run.out>/models/finetune/`: the record
(`model.json`), the best weights (`model.pt`) and the metrics.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from features.atomic import staged_folder, write_json
from features.backbones import Backbone, build_backbone, sha256_of
from features.data import ImageSet
from features.devices import PRECISION_DTYPES, resolve_device, resolve_precision
from features.errors import DataError, TrainingError
from features.transforms import Preprocessing
from pipeline.config import Config, FinetuneConfig
from pipeline.finetune import data, memory
from pipeline.finetune.checkpoints import (
    BestModel,
    CheckpointSaver,
    EarlyStopping,
    History,
)
from pipeline.finetune.head import ProbeHead, init_from_probe
from pipeline.finetune.loop import (
    Dist,
    Keepers,
    Trainer,
    channels_last,
    freeze_before,
)
from pipeline.finetune.optim import Optimization
from pipeline.inputs import load_images, preprocessing_overrides
from pipeline.layout import ModelFiles
from pipeline.models import ImageClassifier, new_record
from pipeline.stamps import stamp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    """What the fine-tune stage trained and how it scored."""

    model_dir: Path
    epochs_run: int
    best_epoch: int
    best_value: float
    monitor: str
    stopped_early: bool
    seconds: float
    effective_batch: int
    out_of_time: bool = False  # run.budget stopped it before its last epoch


@dataclass(frozen=True)
class Prepared:
    """A fine-tune ready to fit: its config (batch cut to fit), data, trainer."""

    cfg: Config
    images: ImageSet
    settings: str  # the model stamp
    identity: dict[str, Any]
    trainer: Trainer
    head: ProbeHead | None = None  # LP-FT's probe; None for a random head


def run(
    cfg: Config,
    *,
    resume: bool = False,
    restart: bool = False,
    deadline: float | None = None,
) -> FinetuneResult:
    """Fine-tune the configured backbone on the training split; publish the model.

    Args:
        cfg: the configuration.
        resume: continue from `<run.out>/finetune/last.pt` exactly (model,
            optimizer, scheduler, scaler, epoch and RNG states).
        restart: discard an existing checkpoint and start over.
        deadline: a `time.monotonic()` time: no epoch starts that would end
            after it (the model is then the best epoch so far).

    Raises:
        DataError: fewer than two training images per process, a class
            without validation images.
        CheckpointError: a checkpoint exists and neither resume nor restart
            was asked for, or the checkpoint belongs to another setup.
        TrainingError: a training step would not fit in memory (said before
            the first epoch), or out of GPU memory (the last checkpoint is kept).
    """
    start = time.perf_counter()
    world = _init_distributed()
    prepared = prepare(cfg, world, resume=resume, restart=restart)
    cfg, trainer = prepared.cfg, prepared.trainer
    trainer.deadline = deadline
    try:
        stopped = trainer.fit()
    except torch.cuda.OutOfMemoryError as err:
        raise TrainingError(
            f"out of GPU memory at finetune.batch_size = {cfg.finetune.batch_size}: "
            "lower it, and raise finetune.accumulate to keep the effective batch; "
            f"the last checkpoint ({cfg.layout.checkpoint}) is kept, continue with "
            "--resume"
        ) from err
    finally:
        if world.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if world.main:
        publish(prepared, stopped)
    best = trainer.keepers.best
    return FinetuneResult(
        cfg.layout.model("finetune").folder,
        len(trainer.keepers.history.epochs),
        best.epoch,
        float(best.value or 0.0),
        cfg.finetune.monitor,
        stopped,
        time.perf_counter() - start,
        _effective_batch(cfg.finetune, world),
        trainer.out_of_time,
    )


def prepare(cfg: Config, world: Dist, *, resume: bool, restart: bool) -> Prepared:
    """The data, the model and the trainer, restored or fresh.

    The stamp is written before training so that a killed run's checkpoint
    can be matched to its settings on --resume.

    Raises:
        DataError, CheckpointError: as `run`; TrainingError: a training step
            would not fit in memory.
    """
    device = _device(cfg.finetune, world)
    images = load_images(cfg)
    images.require_classes("fine-tuning")
    settings = model_stamp(cfg, images)
    cfg = _fitting_batch(cfg, images, world)
    backbone, model, identity = _build(cfg, len(images.label_names), device)
    _require_memory(cfg.finetune, model, backbone.preprocessing, device)
    CheckpointSaver(cfg.layout.checkpoint, identity, images.label_names).check_unasked(
        resume=resume, restart=restart
    )
    head = None
    if cfg.finetune.probe_head and not resume:
        head = init_from_probe(cfg, backbone, images, seed=cfg.run.seed)
    prep = backbone.preprocessing
    trainer = _trainer(cfg, model, prep, images, identity, device, world)
    if resume:
        trainer.keepers.restore(trainer)
        log.info("resumed from %s after epoch %d", cfg.layout.checkpoint, trainer.epoch)
    if world.main:
        write_json(cfg.layout.finetune_stamp, {"stamp": settings})
    return Prepared(cfg, images, settings, identity, trainer, head)


def _require_memory(
    ft: FinetuneConfig, model: nn.Module, prep: Preprocessing, device: torch.device
) -> None:
    """Refuse, before the first epoch, a batch whose step would not fit."""
    need = memory.step_memory(model, prep.input_size, ft, device)
    log.info(
        "a training step of %d images at %d px holds about %.2f GiB",
        ft.batch_size,
        prep.input_size,
        need.bytes_for(ft.batch_size) / memory.GIB,
    )
    memory.require_fits(
        need, ft, prep.input_size, device, memory.available_bytes(device)
    )


def model_stamp(cfg: Config, images: ImageSet) -> str:
    """The stamp of a fine-tuned model: the images and every setting it used.

    `quadrant run` reuses a model whose record holds the same stamp, and
    resumes a checkpoint made under it.
    """
    return stamp(
        asdict(cfg.finetune),
        asdict(cfg.backbone),
        cfg.data.decode,
        images.fingerprint,
        cfg.run.seed,
    )


def _init_distributed() -> Dist:
    # NOTE: torchrun describes the job in these variables (env:// rendezvous).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def _device(ft: FinetuneConfig, world: Dist) -> torch.device:
    device = resolve_device(ft.device)
    if device.type == "cuda" and world.world > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def _fitting_batch(cfg: Config, images: ImageSet, world: Dist) -> Config:
    """The config with a batch size the training split can fill, checked data.

    A batch larger than the training images of one process would leave every
    epoch empty (the last partial batch is dropped): it is cut to fit, and
    the log says so.

    Raises:
        DataError: fewer than two training images per process (BatchNorm
            needs two), or a class without validation images.
    """
    ft = cfg.finetune
    counts = images.counts()
    per_process = sum(counts["train"].values()) // world.world
    if per_process < 2:
        raise DataError(
            f"the training split has {sum(counts['train'].values())} images for "
            f"{world.world} process(es); fine-tuning needs at least two per process"
        )
    missing = [n for n in images.label_names if counts["val"][n] == 0]
    if missing:
        raise DataError(
            f"class(es) {missing} have no validation images, so validation would "
            "not measure them; add val images or set data.val_fraction > 0"
        )
    if ft.batch_size <= per_process:
        return cfg
    if world.main:
        log.warning(
            "finetune.batch_size = %d is more than the %d training images per "
            "process: using batches of %d",
            ft.batch_size,
            per_process,
            per_process,
        )
    return replace(cfg, finetune=replace(ft, batch_size=per_process))


def build_model(
    cfg: Config, num_classes: int, device: torch.device
) -> tuple[ImageClassifier, Preprocessing, dict[str, Any]]:
    """The backbone with a new head of `num_classes`, pretrained or from scratch.

    At `finetune.input_size` when set; with every layer before
    `finetune.train_from` frozen (no gradients, BatchNorm statistics kept).

    Raises:
        BackboneError: `finetune.train_from` is not a layer of the network.
    """
    backbone, model, identity = _build(cfg, num_classes, device)
    return model, backbone.preprocessing, identity


def _build(
    cfg: Config, num_classes: int, device: torch.device
) -> tuple[Backbone, ImageClassifier, dict[str, Any]]:
    b, ft = cfg.backbone, cfg.finetune
    weights = b.weights if ft.init == "pretrained" else "random"
    backbone = build_backbone(
        b.name,
        weights,
        seed=cfg.run.seed,
        preprocessing=finetune_preprocessing(cfg),
        num_classes=num_classes,
    )
    for module in backbone.model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = ft.bn_momentum
    if ft.train_from is not None:
        freeze_before(backbone.model, ft.train_from)
    model = ImageClassifier(backbone.model, backbone.preprocessing).to(device)
    identity = {
        "backbone": backbone.identity() | {"num_classes": num_classes},
        "init": ft.init,
        "preprocessing": backbone.preprocessing.as_dict(),
    }
    return backbone, model, identity


def finetune_preprocessing(cfg: Config) -> dict[str, Any]:
    """The preprocessing overrides of the fine-tune: `[backbone]`'s, at
    `finetune.input_size` when set.

    The resize keeps the backbone's resize/crop ratio (the one `[backbone]`
    sets when it gives both sizes, else the backbone's own).
    """
    overrides = preprocessing_overrides(cfg)
    size, b = cfg.finetune.input_size, cfg.backbone
    if size is None:
        return overrides
    resize = None
    if b.input_size is not None and b.resize_size is not None:
        resize = round(size * b.resize_size / b.input_size)
    return {**overrides, "input_size": size, "resize_size": resize}


def _trainer(
    cfg: Config,
    model: ImageClassifier,
    prep: Preprocessing,
    images: ImageSet,
    identity: dict[str, Any],
    device: torch.device,
    world: Dist,
) -> Trainer:
    """The trainer of a fresh run: seeded, with its loaders and optimisation."""
    ft = cfg.finetune
    _determinism(ft, cfg.run.seed)
    loaders = data.loaders(
        cfg, images, prep, device, rank=world.rank, world=world.world
    )
    if channels_last(ft, device):
        model = model.to(memory_format=torch.channels_last)
    amp = PRECISION_DTYPES[resolve_precision(ft.precision, device)]
    optim = Optimization.create(
        ft,
        model,
        steps_per_epoch=math.ceil(len(loaders[0]) / ft.accumulate),
        processes=world.world,
        fp16=amp == torch.float16,
        device=device,
    )
    if world.main:
        _log_batch(ft, world, optim.lr)
        _warn_frozen_statistics(ft)
    return Trainer(
        ft,
        model,
        _wrapped(model, ft, device, world),
        device,
        amp,
        world,
        loaders,
        optim,
        _keepers(cfg, identity, images.label_names),
        progress=cfg.run.progress,
    )


def _keepers(
    cfg: Config, identity: dict[str, Any], label_names: tuple[str, ...]
) -> Keepers:
    layout, ft = cfg.layout, cfg.finetune
    return Keepers(
        BestModel(ft.monitor, layout.best_weights),
        EarlyStopping(ft.patience),
        History(ft.monitor, f"{cfg.backbone.name} ({ft.init})"),
        CheckpointSaver(layout.checkpoint, identity, label_names),
        ModelFiles(layout.finetune_work, "finetune"),
    )


def _wrapped(
    model: ImageClassifier, ft: FinetuneConfig, device: torch.device, world: Dist
) -> nn.Module:
    """The model as trained: under DDP with several processes, compiled if asked."""
    wrapped: nn.Module = model
    if world.world > 1:
        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if ft.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return wrapped


# Above this peak learning rate AdamW moved the weights of a network whose
# BatchNorm statistics were frozen until its features collapsed (Lite0 on
# 81 Fashion-MNIST images at 32 px: validation at chance with 2e-3, 1.0 with
# 1e-3 or 2e-4).
_FROZEN_STATISTICS_LR = 1e-3


def _warn_frozen_statistics(ft: FinetuneConfig) -> None:
    if ft.frozen_batchnorm and ft.lr > _FROZEN_STATISTICS_LR:
        log.warning(
            "finetune.lr = %g with frozen BatchNorm statistics (finetune.batchnorm "
            "= %r): above %g the features collapsed in our measurements; lower the "
            "learning rate, or set finetune.batchnorm = 'train'",
            ft.lr,
            ft.batchnorm,
            _FROZEN_STATISTICS_LR,
        )


def _effective_batch(ft: FinetuneConfig, world: Dist) -> int:
    return ft.batch_size * ft.accumulate * world.world


def _log_batch(ft: FinetuneConfig, world: Dist, lr: float) -> None:
    log.info(
        "effective batch %d (%d x %d accumulation x %d processes), lr %g%s",
        _effective_batch(ft, world),
        ft.batch_size,
        ft.accumulate,
        world.world,
        lr,
        " (scaled linearly with processes)" if lr != ft.lr else "",
    )


def _determinism(ft: FinetuneConfig, seed: int) -> None:
    torch.manual_seed(seed)
    if ft.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------------------
# Publishing


def publish(prepared: Prepared, stopped: bool) -> ModelFiles:
    """Publish `<run.out>/models/finetune/` whole: record, best weights, metrics."""
    cfg, keepers = prepared.cfg, prepared.trainer.keepers
    best, history = keepers.best, keepers.history
    final = cfg.layout.model("finetune")
    with staged_folder(final.folder) as folder:
        files = ModelFiles(folder, "finetune")
        _link_or_copy(cfg.layout.best_weights, files.weights)
        record = new_record(
            "finetune",
            cfg,
            label_names=prepared.images.label_names,
            preprocessing=Preprocessing().updated(prepared.identity["preprocessing"]),
            backbone=prepared.identity["backbone"],
            stamp=prepared.settings,
            init=cfg.finetune.init,
            score_kind="probability",
            weights={"file": files.weights.name, "sha256": sha256_of(files.weights)},
            training={
                "epochs_run": len(history.epochs),
                "epochs": cfg.finetune.epochs,
                "best_epoch": best.epoch,
                "monitor": cfg.finetune.monitor,
                "best_value": best.value,
                "stopped_early": stopped,
                "out_of_time": prepared.trainer.out_of_time,
                "head": "probe" if cfg.finetune.probe_head else "random",
                "probe": asdict(prepared.head) if prepared.head else None,
            },
        )
        write_json(files.record, record)
        history.write(files, best)
    return final


def _link_or_copy(source: Path, target: Path) -> None:
    # NOTE: a hard link costs nothing for large weights; best.pt is later
    # replaced by rename, which leaves the published file untouched.
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
