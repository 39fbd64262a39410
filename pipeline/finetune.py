"""The fine-tune stage: train the whole network with a new head (cases 3, 4).

Split the way torchvision's reference script is: `build_model`,
`param_groups`, `build_optimizer`, `build_scheduler`, `train_one_epoch`,
`evaluate`, with `run` reading like a table of contents. The same command
runs under `torchrun --nproc-per-node N` with DistributedDataParallel; only
rank 0 writes files.

While training, the work folder `<run.out>/finetune/` holds `last.pt` (the
full training state, every epoch, for --resume), `best.pt` (the best weights
so far) and the metrics per epoch (`finetune.json`, `finetune.csv`,
`training_curves.png`, to watch a long run). When training ends, the model
is published as one folder, `<run.out>/models/finetune/`: the record
(`model.json`), the best weights (`model.pt`) and the metrics.

`pilot` runs the same training under a `Budget` of training images: the
first part of the full fine-tune (same schedule, same seed), validated at
even steps, stopped when the budget is spent. The advisor sets it against
the frozen codes; its checkpoint, when it ends on an epoch boundary, is where
the full fine-tune continues.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from features.atomic import atomic_open, staged_folder, write_json, write_text
from features.backbones import build_backbone, sha256_of
from features.backbones.registry import head_name
from features.backbones.timm_backbones import is_timm_model
from features.data import ImageSet
from features.devices import (
    PRECISION_DTYPES,
    default_workers,
    resolve_device,
    resolve_precision,
)
from features.errors import CheckpointError, DataError, TrainingError
from features.layers import layer_names
from features.progress import progress_bar
from features.transforms import Preprocessing, eval_transform
from pipeline import checkpoint, finetune_data, plots
from pipeline.config import Config, FinetuneConfig
from pipeline.inputs import load_images, preprocessing_overrides
from pipeline.layout import ModelFiles
from pipeline.models import ImageClassifier, new_record, predict_batches
from pipeline.stamps import stamp

log = logging.getLogger(__name__)

AMP = PRECISION_DTYPES
OPTIMIZERS: dict[str, Any] = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class History:
    """Per-epoch metrics and the early-stopping state."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0


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


@dataclass
class Budget:
    """A pilot's allowance of training images, and its validation curve so far.

    Attributes:
        images: training images (forward + backward) it may process at most.
        points: validation points spread evenly over `images`.
        used: training images processed so far.
        curve: (images processed, validation accuracy) at each point reached.
        cut: training stopped part-way through an epoch.
        passed: intermediate validation points passed so far.
    """

    images: int
    points: int
    used: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)
    cut: bool = False
    passed: int = 0

    def fits(self, batch: int) -> bool:
        """Whether a batch of `batch` images stays within the budget."""
        return self.used + batch <= self.images

    def next_point(self) -> bool:
        """Whether an intermediate validation point was just passed.

        Points lie at images x k / points for k < points (the end is the
        last point, recorded by the caller); a batch that passes several
        records one.
        """
        if self.used >= self.images:
            return False
        reached = min(self.points - 1, self.used * self.points // self.images)
        if reached > self.passed:
            self.passed = reached
            return True
        return False


@dataclass(frozen=True)
class PilotRun:
    """What a budgeted pilot fine-tune did and how it scored on validation.

    Attributes:
        init: "pretrained" or "scratch".
        budget: the training images it was allowed.
        images: the training images it processed (<= budget).
        full: the training images the full fine-tune processes.
        epochs: whole epochs completed (its checkpoint holds the last one).
        curve: (images processed, validation accuracy) along the way; the last
            point is the end of the pilot.
        val_paths: the validation images scored at the end (relative paths).
        val_correct: whether the pilot got each of them right.
        seconds: wall time.
        resumable: it ended on an epoch boundary with a checkpoint the full
            fine-tune can continue.
        warmup: training images in the learning-rate warm-up.
    """

    init: str
    budget: int
    images: int
    full: int
    epochs: int
    curve: tuple[tuple[int, float], ...]
    val_paths: tuple[str, ...]
    val_correct: tuple[bool, ...]
    seconds: float
    resumable: bool
    warmup: int = 0

    @property
    def accuracy(self) -> float:
        return self.curve[-1][1]


# ---------------------------------------------------------------------------
# The stage


def run(cfg: Config, *, resume: bool = False, restart: bool = False) -> FinetuneResult:
    """Fine-tune the configured backbone on the training split; publish the model.

    Args:
        cfg: the configuration.
        resume: continue from `<run.out>/finetune/last.pt` exactly (model,
            optimizer, scheduler, scaler, epoch and RNG states).
        restart: discard an existing checkpoint and start over.

    Raises:
        DataError: fewer than two training images per process, a class
            without validation images.
        CheckpointError: a checkpoint exists and neither resume nor restart
            was asked for, or the checkpoint belongs to another setup.
        TrainingError: out of GPU memory (the last checkpoint is kept).
    """
    start = time.perf_counter()
    world = _init_distributed()
    cfg, images, settings, identity, state = _prepare(
        cfg, world, resume=resume, restart=restart
    )
    try:
        stopped = state.fit(identity)
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
        publish(cfg, identity, images.label_names, state.history, settings, stopped)
    h = state.history
    return FinetuneResult(
        cfg.layout.model("finetune").folder,
        len(h.epochs),
        h.best_epoch,
        float(h.best_value or 0.0),
        cfg.finetune.monitor,
        stopped,
        time.perf_counter() - start,
        state.effective_batch,
    )


def _prepare(
    cfg: Config, world: Dist, *, resume: bool, restart: bool
) -> tuple[Config, ImageSet, str, dict[str, Any], _Training]:
    """The data, the model and the training state, restored or fresh.

    The stamp is written before training so that a killed run's checkpoint
    can be matched to its settings on --resume.
    """
    device = _device(cfg.finetune, world)
    images = load_images(cfg)
    settings = model_stamp(cfg, images)
    cfg = _fitting_batch(cfg, images, world)
    model, prep, identity = build_model(cfg, len(images.label_names), device)
    state = _Training.create(cfg, model, device, images, prep, world)
    state.restore(cfg.layout.checkpoint, identity, resume=resume, restart=restart)
    if world.main:
        write_json(cfg.layout.finetune_stamp, {"stamp": settings})
    return cfg, images, settings, identity, state


def pilot(cfg: Config, *, share: float, points: int) -> PilotRun:
    """The first `share` of the full fine-tune, validated at `points` even steps.

    The pilot is the full fine-tune's own beginning: the same settings,
    schedule (warm-up and cosine over all `finetune.epochs`) and seed, in
    `<run.out>/finetune/` of the config it is given, which it starts afresh.
    Its budget is `share` of the full run's training images, in whole epochs
    when that is at least one epoch (so its checkpoint can be continued),
    else in batches. One process, whatever torchrun says.

    Raises:
        DataError: as `run`.
    """
    start = time.perf_counter()
    cfg, images, settings, identity, state = _prepare(
        cfg, Dist(), resume=False, restart=True
    )
    ft = cfg.finetune
    per_epoch = len(state.train_loader) * ft.batch_size
    budget = Budget(pilot_budget(share, ft.epochs, per_epoch, ft.batch_size), points)
    log.info(
        "pilot fine-tune (%s init): %d training images, %.0f%% of the full "
        "fine-tune's %d (%d epochs x %d)",
        ft.init,
        budget.images,
        100 * budget.images / (per_epoch * ft.epochs),
        per_epoch * ft.epochs,
        ft.epochs,
        per_epoch,
    )
    state.fit(identity, budget)
    probs, labels, index = predict_batches(
        state.model, state.val_loader, state.device, state.amp
    )
    correct = (probs.argmax(1) == labels).tolist() if len(labels) else []
    budget.curve.append((budget.used, float(sum(correct) / max(len(correct), 1))))
    val = [r.path for r in images.records if r.split == "val"]
    log.info(
        "pilot (%s): %d of %d images, val accuracy %.4f (end)",
        ft.init,
        budget.used,
        budget.images,
        budget.curve[-1][1],
    )
    return PilotRun(
        ft.init,
        budget.images,
        budget.used,
        per_epoch * ft.epochs,
        state.epoch,
        tuple(budget.curve),
        tuple(val[i] for i in index.tolist()),
        tuple(bool(c) for c in correct),
        time.perf_counter() - start,
        not budget.cut and state.epoch >= 1,
        round(ft.warmup_epochs * per_epoch),
    )


def pilot_budget(share: float, epochs: int, per_epoch: int, batch: int) -> int:
    """Training images for a pilot of `share` of `epochs` x `per_epoch` images.

    Whole epochs when the share covers at least one (rounded down, so the
    pilot never exceeds it); else whole batches, one at least.
    """
    whole = math.floor(share * epochs + 1e-9)
    if whole >= 1:
        return whole * per_epoch
    part = math.floor(share * epochs * per_epoch)
    return max(batch, part - part % batch)


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
    """The backbone with a new head of `num_classes`, pretrained or from scratch."""
    b = cfg.backbone
    weights = b.weights if cfg.finetune.init == "pretrained" else "random"
    backbone = build_backbone(
        b.name,
        weights,
        seed=cfg.run.seed,
        preprocessing=preprocessing_overrides(cfg),
        num_classes=num_classes,
    )
    for module in backbone.model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = cfg.finetune.bn_momentum
    model = ImageClassifier(backbone.model, backbone.preprocessing).to(device)
    identity = {
        "backbone": backbone.identity() | {"num_classes": num_classes},
        "init": cfg.finetune.init,
        "preprocessing": backbone.preprocessing.as_dict(),
    }
    return model, backbone.preprocessing, identity


def param_groups(
    model: nn.Module, *, lr: float, layer_decay: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Parameter groups with layer-wise learning-rate decay (as timm's --layer-decay).

    Layers are the network's module paths two levels deep in forward order
    (`layer1.0`, `_blocks.5`, `features.3`); layer i of L gets
    lr * layer_decay ** (L - 1 - i), so the head learns fastest. Biases and
    normalisation weights get no weight decay. timm models are grouped by
    timm's own helper (`param_groups_layer_decay`), from the model's
    `group_matcher`: a vision transformer's embeddings, then one group per
    block, then the final norm and head; the parameters timm lists in
    `no_weight_decay()` (position embeddings, class token) get no weight decay.
    """
    net = model.net if isinstance(model, ImageClassifier) else model
    if is_timm_model(net) and hasattr(net, "group_matcher"):
        return _timm_param_groups(
            net, lr=lr, layer_decay=layer_decay, weight_decay=weight_decay
        )
    names = [n for n, _ in net.named_parameters()]
    # Only layers that own parameters count: relu or pooling add no depth.
    layers = [
        layer
        for layer in layer_names(net)
        if any(n.startswith(layer + ".") for n in names)
    ]
    depth = {name: i for i, name in enumerate(layers)}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in net.named_parameters():
        layer = _layer_of(name, depth)
        decay = param.ndim > 1  # no decay on biases and norm scales
        scale = layer_decay ** (len(layers) - 1 - layer)
        key = (layer, decay)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
    return list(groups.values())


def _timm_param_groups(
    net: nn.Module, *, lr: float, layer_decay: float, weight_decay: float
) -> list[dict[str, Any]]:
    try:
        from timm.optim import param_groups_layer_decay
    except ImportError:  # timm before 1.0.12 kept it here only
        from timm.optim.optim_factory import param_groups_layer_decay

    listed = getattr(net, "no_weight_decay", None)
    no_decay = listed() if callable(listed) else ()
    groups: list[dict[str, Any]] = param_groups_layer_decay(
        net,
        weight_decay=weight_decay,
        no_weight_decay_list=tuple(no_decay),
        layer_decay=layer_decay,
    )
    for group in groups:  # timm's scheduler applies lr_scale; quadrant's does not
        group["lr"] = lr * group["lr_scale"]
    return groups


def _layer_of(parameter: str, depth: dict[str, int]) -> int:
    parts = parameter.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in depth:
            return depth[prefix]
    return len(depth) - 1  # parameters outside the traced graph count as head


def build_optimizer(
    ft: FinetuneConfig, groups: list[dict[str, Any]]
) -> torch.optim.Optimizer:
    """AdamW or SGD with Nesterov momentum, fused where PyTorch supports it.

    NOTE: the fused AdamW step took 3.3 ms against 14.9 ms for the default
    on EfficientNet-Lite0 on a CPU; the result is the same update.
    """
    if ft.optimizer == "sgd":
        return _fused(
            torch.optim.SGD, groups, lr=ft.lr, momentum=ft.momentum, nesterov=True
        )
    return _fused(torch.optim.AdamW, groups, lr=ft.lr)


def _fused(
    cls: Any, groups: list[dict[str, Any]], **kwargs: Any
) -> torch.optim.Optimizer:
    try:
        optimizer: torch.optim.Optimizer = cls(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # device or version without it
        optimizer = cls(groups, **kwargs)
    return optimizer


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero, stepped per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------
# One training run's state


@dataclass
class _Training:
    """Everything that evolves during training, and what it is saved as."""

    cfg: Config
    model: ImageClassifier
    wrapped: nn.Module
    device: torch.device
    world: Dist
    train_loader: Any
    val_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    label_names: tuple[str, ...]
    steps_per_epoch: int
    effective_batch: int
    history: History = field(default_factory=History)
    epoch: int = 0

    @classmethod
    def create(
        cls,
        cfg: Config,
        model: ImageClassifier,
        device: torch.device,
        images: ImageSet,
        prep: Preprocessing,
        world: Dist,
    ) -> _Training:
        ft = cfg.finetune
        _determinism(ft, cfg.run.seed)
        train_loader, val_loader = _loaders(cfg, images, prep, device, world)
        if _channels_last(ft, device):
            model = model.to(memory_format=torch.channels_last)
        lr = ft.lr * (world.world if ft.lr_scaling == "linear" else 1)
        groups = param_groups(
            model, lr=lr, layer_decay=ft.layer_decay, weight_decay=ft.weight_decay
        )
        optimizer = build_optimizer(ft, groups)
        steps = math.ceil(len(train_loader) / ft.accumulate)
        scheduler = build_scheduler(
            optimizer,
            total_steps=steps * ft.epochs,
            warmup_steps=round(ft.warmup_epochs * steps),
        )
        precision = resolve_precision(ft.precision, device)
        amp = AMP[precision]
        wrapped: nn.Module = model
        if world.world > 1:
            wrapped = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if ft.compile:
            wrapped = torch.compile(wrapped)  # type: ignore[assignment]
        effective = ft.batch_size * ft.accumulate * world.world
        if world.main:
            log.info(
                "effective batch %d (%d x %d accumulation x %d processes), lr %g%s",
                effective,
                ft.batch_size,
                ft.accumulate,
                world.world,
                lr,
                " (scaled linearly with processes)" if lr != ft.lr else "",
            )
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        return cls(
            cfg,
            model,
            wrapped,
            device,
            world,
            train_loader,
            val_loader,
            optimizer,
            scheduler,
            scaler,
            amp,
            images.label_names,
            steps,
            effective,
        )

    # -- checkpoints -------------------------------------------------------

    def restore(
        self, path: Path, identity: dict[str, Any], *, resume: bool, restart: bool
    ) -> None:
        """Resume from `path`, or refuse to overwrite it unasked."""
        if path.exists() and not (resume or restart):
            done = checkpoint.load(path)["epoch"]
            raise CheckpointError(
                f"a checkpoint after epoch {done} exists at {path}; pass --resume to "
                "continue it or --restart to start over"
            )
        if not resume:
            return
        state = checkpoint.load(path)
        _check_identity(state, identity, self.label_names, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = History(
            list(state["history"]),
            state["best_value"],
            int(state["best_epoch"]),
            int(state["bad_epochs"]),
        )
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s after epoch %d", path, self.epoch)

    def _save(self, identity: dict[str, Any]) -> None:
        h = self.history
        checkpoint.save(
            self.cfg.layout.checkpoint,
            {
                "identity": identity,
                "label_names": list(self.label_names),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": self.epoch,
                "history": h.epochs,
                "best_value": h.best_value,
                "best_epoch": h.best_epoch,
                "bad_epochs": h.bad_epochs,
                "rng": checkpoint.rng_state(),
            },
        )

    # -- the loop ----------------------------------------------------------

    def fit(self, identity: dict[str, Any], budget: Budget | None = None) -> bool:
        """Train the remaining epochs; return True when early stopping ended it.

        With a budget, training also stops when the next batch would exceed
        it; an epoch cut short is not checkpointed (a checkpoint always holds
        whole epochs, so a resume is exact).
        """
        ft = self.cfg.finetune
        while self.epoch < ft.epochs:
            if budget is not None and not budget.fits(ft.batch_size):
                return False
            head_only = self.epoch < ft.head_epochs
            train_metrics = train_one_epoch(self, head_only=head_only, budget=budget)
            if budget is not None and budget.cut:
                return False
            val_metrics = (
                evaluate(self.model, self.val_loader, self.device, self.amp, self.world)
                if self.world.main
                else {}
            )
            self.epoch += 1
            if self.world.main:
                if self._record(train_metrics, val_metrics):
                    save_weights(self.model, self.cfg.layout.best_weights)
                self._save(identity)
                work = ModelFiles(self.cfg.layout.finetune_work, "finetune")
                write_history(self.cfg, self.history, work)
            if self.world.world > 1:
                dist.barrier()
            if self._stop():
                return True
        return False

    def _record(self, train: dict[str, float], val: dict[str, float]) -> bool:
        ft, h = self.cfg.finetune, self.history
        row = {
            "epoch": self.epoch,
            "lr": self.optimizer.param_groups[-1]["lr"],
            **{f"train_{k}": v for k, v in train.items()},
            **{f"val_{k}": v for k, v in val.items()},
        }
        h.epochs.append(row)
        value = val[ft.monitor]
        better = h.best_value is None or (
            value < h.best_value if ft.monitor == "loss" else value > h.best_value
        )
        if better:
            h.best_value, h.best_epoch, h.bad_epochs = value, self.epoch, 0
        else:
            h.bad_epochs += 1
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f%s",
            self.epoch,
            ft.epochs,
            train["loss"],
            train["accuracy"],
            val["loss"],
            val["accuracy"],
            "  (best)" if better else "",
        )
        return better

    def _stop(self) -> bool:
        patience = self.cfg.finetune.patience
        stop = torch.tensor(int(patience > 0 and self.history.bad_epochs >= patience))
        if self.world.world > 1:  # rank 0 decides for everyone
            dist.broadcast(stop, src=0)
        if stop.item():
            log.info(
                "early stopping: no better val %s for %d epochs",
                self.cfg.finetune.monitor,
                patience,
            )
        return bool(stop.item())


def _channels_last(ft: FinetuneConfig, device: torch.device) -> bool:
    # NOTE: measured on a 2-core CPU, channels_last made EfficientNet-Lite0
    # training about 30% slower (depthwise convolution backward), while it
    # speeds up tensor-core GPUs.
    return ft.channels_last and device.type == "cuda"


def _check_identity(
    state: dict[str, Any], identity: dict[str, Any], labels: tuple[str, ...], path: Path
) -> None:
    if tuple(state["label_names"]) != labels:
        raise CheckpointError(
            f"{path} was trained on classes {state['label_names']}, the data now has "
            f"{list(labels)}; use --restart"
        )
    if state["identity"] != identity:
        from features.cache import diff_provenance

        raise CheckpointError(
            f"{path} belongs to another setup:\n  "
            + "\n  ".join(diff_provenance(identity, state["identity"]))
            + "\nRestore the config it was trained with, or use --restart."
        )


def _determinism(ft: FinetuneConfig, seed: int) -> None:
    torch.manual_seed(seed)
    if ft.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def _loaders(
    cfg: Config,
    images: ImageSet,
    prep: Preprocessing,
    device: torch.device,
    world: Dist,
) -> tuple[Any, Any]:
    ft, decoding = cfg.finetune, cfg.data.decoding
    workers = ft.num_workers if ft.num_workers >= 0 else default_workers(device)
    train = finetune_data.split_dataset(
        images,
        "train",
        finetune_data.train_transform(prep, ft.augment),
        prep=prep,
        seed=cfg.run.seed,
        decoding=finetune_data.train_decoding(decoding, prep, ft.augment),
    )
    val = finetune_data.split_dataset(
        images,
        "val",
        eval_transform(prep),
        prep=prep,
        seed=cfg.run.seed,
        decoding=decoding.for_input(prep),
    )
    pin = device.type == "cuda"
    train_loader = finetune_data.loader(
        train,
        batch_size=ft.batch_size,
        train=True,
        workers=workers,
        pin_memory=pin,
        seed=cfg.run.seed,
        world=world.world,
        rank=world.rank,
    )
    used = len(train_loader) * ft.batch_size * world.world
    if world.main and used < len(train):
        log.info(
            "each epoch trains on %d of the %d training images: the last partial "
            "batch is dropped (a different one each epoch, as the order is "
            "reshuffled)",
            used,
            len(train),
        )
    val_loader = finetune_data.loader(
        val,
        batch_size=ft.batch_size,
        train=False,
        workers=workers,
        pin_memory=pin,
        seed=cfg.run.seed,
    )
    return train_loader, val_loader


# ---------------------------------------------------------------------------
# Epochs


@contextlib.contextmanager
def _frozen_body(model: ImageClassifier) -> Iterator[None]:
    """Train the head alone: body parameters frozen, body BatchNorm in eval mode."""
    head = head_name(model.net)
    body = [p for n, p in model.net.named_parameters() if not n.startswith(head + ".")]
    for p in body:
        p.requires_grad_(False)
    for name, module in model.net.named_modules():
        if not name.startswith(head) and isinstance(
            module, nn.modules.batchnorm._BatchNorm
        ):
            module.eval()
    try:
        yield
    finally:
        for p in body:
            p.requires_grad_(True)


def train_one_epoch(
    t: _Training, *, head_only: bool, budget: Budget | None = None
) -> dict[str, float]:
    """One pass over the training split; returns mean loss and accuracy.

    With a budget, the pass stops before a batch that would exceed it, and
    the validation accuracy is recorded at each of the budget's points.
    """
    ft = t.cfg.finetune
    t.model.train()
    sampler = t.train_loader.sampler
    sampler.set_epoch(t.epoch)
    t.train_loader.dataset.epoch = t.epoch
    criterion = nn.CrossEntropyLoss(label_smoothing=ft.label_smoothing)
    loss_sum, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    batches = len(t.train_loader)
    freeze = _frozen_body(t.model) if head_only else contextlib.nullcontext()
    desc = f"epoch {t.epoch + 1}/{ft.epochs}" + (" (head)" if head_only else "")
    bar = progress_bar(
        len(t.train_loader.sampler) if t.world.world > 1 else batches * ft.batch_size,
        desc=desc,
        enabled=t.cfg.run.progress and t.world.main,
    )
    with freeze, bar:
        for i, (images, labels, _) in enumerate(t.train_loader):
            if len(labels) == 0:
                continue
            if budget is not None and not budget.fits(len(labels)):
                budget.cut = True
                break
            last = (i + 1) % ft.accumulate == 0 or i + 1 == batches
            logits, loss = _step(t, images, labels, criterion, sync=last)
            if last:
                _optimizer_step(t)
            loss_sum += float(loss) * len(labels)
            correct += int((logits.argmax(1) == labels.to(logits.device)).sum())
            seen += len(labels)
            bar.update(len(labels))
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
            if budget is not None:
                budget.used += len(labels)
                if budget.next_point():
                    _validation_point(t, budget, head_only=head_only)
    return {
        "loss": loss_sum / max(seen, 1),
        "accuracy": correct / max(seen, 1),
        "images_per_second": seen / (time.perf_counter() - start),
    }


def _validation_point(t: _Training, budget: Budget, *, head_only: bool) -> None:
    """Validate mid-epoch for a pilot's curve, then return to training mode."""
    metrics = evaluate(t.model, t.val_loader, t.device, t.amp, t.world)
    budget.curve.append((budget.used, metrics["accuracy"]))
    log.info(
        "pilot (%s): %d of %d images, val accuracy %.4f",
        t.cfg.finetune.init,
        budget.used,
        budget.images,
        metrics["accuracy"],
    )
    t.model.train()
    if head_only:  # the frozen body's BatchNorm stays in eval mode
        head = head_name(t.model.net)
        for name, module in t.model.net.named_modules():
            if not name.startswith(head) and isinstance(
                module, nn.modules.batchnorm._BatchNorm
            ):
                module.eval()


def _step(
    t: _Training,
    images: torch.Tensor,
    labels: torch.Tensor,
    criterion: nn.Module,
    *,
    sync: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(t.device, non_blocking=True)
    if _channels_last(t.cfg.finetune, t.device):
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.to(t.device, non_blocking=True)
    # NOTE: with accumulation, DDP all-reduces gradients only on the last
    # micro-batch of each optimizer step.
    no_sync = (
        t.wrapped.no_sync()
        if isinstance(t.wrapped, DistributedDataParallel) and not sync
        else contextlib.nullcontext()
    )
    with no_sync:
        with torch.autocast(
            t.device.type, dtype=t.amp or torch.float32, enabled=t.amp is not None
        ):
            logits = t.wrapped(images)
            loss = criterion(logits.float(), labels)
        t.scaler.scale(loss / t.cfg.finetune.accumulate).backward()
    if not torch.isfinite(loss):
        raise TrainingError(
            f"the training loss became {float(loss)} at epoch {t.epoch + 1}; lower "
            "finetune.lr, set finetune.clip_grad (e.g. 1.0) or use precision = 'bf16'"
        )
    return logits.detach(), loss.detach()


def _optimizer_step(t: _Training) -> None:
    clip = t.cfg.finetune.clip_grad
    if clip > 0:
        t.scaler.unscale_(t.optimizer)
        nn.utils.clip_grad_norm_(t.model.parameters(), clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()


@torch.inference_mode()
def evaluate(
    model: ImageClassifier,
    loader: Any,
    device: torch.device,
    amp: torch.dtype | None,
    world: Dist | None = None,
) -> dict[str, float]:
    """Mean loss, accuracy and balanced accuracy on a loader's images."""
    probs, labels, _ = predict_batches(model, loader, device, amp)
    y = labels.numpy()
    loss = float(nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), labels))
    predicted = probs.argmax(1).numpy()
    return {
        "loss": loss,
        "accuracy": float((predicted == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
    }


# ---------------------------------------------------------------------------
# Outputs


def save_weights(model: ImageClassifier, path: Path) -> None:
    """The model's weights (a state_dict: loads with weights_only=True)."""
    with atomic_open(path, "wb") as handle:
        torch.save(model.state_dict(), handle)


def publish(
    cfg: Config,
    identity: dict[str, Any],
    label_names: tuple[str, ...],
    history: History,
    settings: str,
    stopped: bool,
) -> ModelFiles:
    """Publish `<run.out>/models/finetune/` whole: record, best weights, metrics."""
    final = cfg.layout.model("finetune")
    with staged_folder(final.folder) as folder:
        files = ModelFiles(folder, "finetune")
        _link_or_copy(cfg.layout.best_weights, files.weights)
        record = new_record(
            "finetune",
            cfg,
            label_names=label_names,
            preprocessing=Preprocessing().updated(identity["preprocessing"]),
            backbone=identity["backbone"],
            stamp=settings,
            init=cfg.finetune.init,
            score_kind="probability",
            weights={"file": files.weights.name, "sha256": sha256_of(files.weights)},
            training={
                "epochs_run": len(history.epochs),
                "epochs": cfg.finetune.epochs,
                "best_epoch": history.best_epoch,
                "monitor": cfg.finetune.monitor,
                "best_value": history.best_value,
                "stopped_early": stopped,
            },
        )
        write_json(files.record, record)
        write_history(cfg, history, files)
    return final


def _link_or_copy(source: Path, target: Path) -> None:
    # NOTE: a hard link costs nothing for large weights; best.pt is later
    # replaced by rename, which leaves the published file untouched.
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_history(cfg: Config, history: History, files: ModelFiles) -> None:
    """finetune.json, finetune.csv and training_curves.png into `files.folder`."""
    write_json(
        files.history_json,
        {
            "epochs": history.epochs,
            "best_epoch": history.best_epoch,
            "best_value": history.best_value,
            "monitor": cfg.finetune.monitor,
        },
    )
    keys = list(history.epochs[0])
    lines = [",".join(keys)] + [
        ",".join(f"{row[k]:.6g}" for k in keys) for row in history.epochs
    ]
    write_text(files.history_csv, "\n".join(lines) + "\n")
    plots.training_curves(
        history.epochs,
        files.curves,
        title=f"{cfg.backbone.name} ({cfg.finetune.init})",
    )
