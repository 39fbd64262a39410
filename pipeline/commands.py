"""What each command prints: stages run here and their results are shown.

Stages return values and log; this module turns those values into the text a
user reads on stdout.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from features import datasets
from features.atomic import check_writable, write_text
from features.backbones import (
    TIMM_INSTALL,
    available_backbones,
    build_backbone,
    import_timm,
    stage_reductions,
)
from features.cache import read_info, verify
from features.errors import (
    BackboneError,
    CacheCorruptError,
    ConfigError,
    OutputError,
)
from features.extractor import ExtractResult
from features.layers import TOP, code_dims, layer_names, layer_shapes, resolve_top
from features.pooling import parse_pooling
from pipeline import evaluate as evaluate_stage
from pipeline import export as export_stage
from pipeline import extract as extract_stage
from pipeline import finetune as finetune_stage
from pipeline import sweep as sweep_stage
from pipeline import train as train_stage
from pipeline.config import Config
from pipeline.logs import command_log, run_log

if TYPE_CHECKING:
    from pipeline.predict import PredictOptions

log = logging.getLogger(__name__)


def extract(cfg: Config) -> int:
    """`quadrant extract`; under torchrun only rank 0 prints and logs to file."""
    if int(os.environ.get("RANK", "0")) != 0:
        extract_stage.run(cfg)
        return 0
    with run_log(cfg, "extract"):
        result = extract_stage.run(cfg)
    print(format_extract(result))
    return 0


def sweep(cfg: Config) -> int:
    """`quadrant sweep`: the layer table, the plot, the best layer."""
    with run_log(cfg, "sweep"):
        result = sweep_stage.run(cfg)
    print("\n".join(format_sweep(result, cfg)))
    return 0


def format_sweep(result: sweep_stage.SweepResult, cfg: Config) -> list[str]:
    lines = [
        f"layer sweep on {result.images} training images ({result.cache.name})",
        f"  {'layer/pooling':<28} {'dims':>6} {'CV accuracy':>16} {'LogME':>8} "
        f"{'time':>7}",
    ]
    for r in result.rows:
        mark = "  <- best" if r is result.best else ""
        lines.append(
            f"  {r.name:<28} {r.dims:>6} {r.accuracy:>8.4f} ± {r.std:.4f} "
            f"{r.logme:>8.3f} {r.seconds:>6.1f}s{mark}"
        )
    margin = result.margin_over_top()
    if margin is not None and result.best.layer != "top":
        lines.append(f"best: {result.best.name}, {100 * margin:+.1f} points over top")
    else:
        lines.append(f"best: {result.best.name}")
    lines.append(f"plot: {cfg.layout.sweep_plot}  table: {cfg.layout.sweep_csv}")
    return lines


def train(cfg: Config) -> int:
    """`quadrant train`."""
    with run_log(cfg, "train"):
        result = train_stage.run(cfg)
    print("\n".join(format_train(result, cfg)))
    return 0


def format_train(result: train_stage.TrainResult, cfg: Config) -> list[str]:
    params = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
    val = "" if result.val_score is None else f", val accuracy {result.val_score:.4f}"
    return [
        f"trained {result.classifier} on {result.layer}/{result.pooling} "
        f"({result.n_train} training rows, {result.seconds:.1f} s)",
        f"  chosen: {params}; CV {cfg.train.scoring} {result.cv_score:.4f} ± "
        f"{result.cv_std:.4f}{val}",
        f"  model: {result.model_dir}",
        f"  validation curve: {cfg.layout.model('codes').train_plot}",
    ]


def finetune(cfg: Config, *, resume: bool, restart: bool) -> int:
    """`quadrant finetune`; under torchrun only rank 0 prints and logs to file."""
    if int(os.environ.get("RANK", "0")) != 0:
        finetune_stage.run(cfg, resume=resume, restart=restart)
        return 0
    with run_log(cfg, "finetune"):
        result = finetune_stage.run(cfg, resume=resume, restart=restart)
    files = cfg.layout.model("finetune")
    stop = " (early stop)" if result.stopped_early else ""
    print(
        f"fine-tuned {cfg.backbone.name} ({cfg.finetune.init}) for "
        f"{result.epochs_run} epochs{stop} in {result.seconds:.0f} s, effective "
        f"batch {result.effective_batch}"
    )
    best = f"{result.best_value:.4f} at epoch {result.best_epoch}"
    print(f"  best val {result.monitor} {best}")
    print(f"  model: {result.model_dir}  checkpoint: {cfg.layout.checkpoint}")
    print(f"  curves: {files.curves}  metrics: {files.history_csv}")
    return 0


def export(cfg: Config) -> int:
    """`quadrant export`."""
    with run_log(cfg, "export"):
        result = export_stage.run(cfg)
    print(
        f"exported {result.path} ({result.size_bytes / 2**20:.1f} MiB, {result.kind})"
    )
    print(
        f"  checked against the source model on {result.parity_images} held-out "
        f"images: max |score difference| {result.max_abs_diff:.2g}, labels equal"
    )
    for name, v in result.variants.items():
        print(
            f"  {name}: {v.path} ({v.size_bytes / 2**20:.1f} MiB), test accuracy "
            f"{v.accuracy:.4f} vs fp32 {v.fp32_accuracy:.4f} "
            f"({100 * (v.accuracy - v.fp32_accuracy):+.2f} points)"
        )
    return 0


def predict(
    model: Path,
    paths: Sequence[str],
    *,
    out: Path,
    options: PredictOptions,
) -> int:
    """`quadrant predict MODEL.onnx PATH...`: 0, or 3 when some images failed.

    The run is logged to quadrant.log beside the output.
    """
    from features.distributed import World
    from pipeline import predict as predict_stage

    check_writable(out.parent, setting="--out")
    started = f"quadrant predict {model} {' '.join(map(str, paths))} --out {out}"
    with command_log(out.parent / "quadrant.log", "predict", started):
        result = predict_stage.run(model, paths, out=out, options=options)
    code = predict_stage.EXIT_SOME_FAILED if result.failed else 0
    if not World.from_env().main:
        return code  # under torchrun, rank 0 reports for the job
    resumed = f", {result.resumed_parts} parts resumed" if result.resumed_parts else ""
    print(
        f"predicted {result.predicted} images ({result.failed} unreadable, listed "
        f"with their error{resumed}) -> {result.out} [{result.provider}]; "
        f"summary: {result.summary}"
    )
    return code


def advise(cfg: Config) -> int:
    """`quadrant advise`."""
    from pipeline import advisor

    with run_log(cfg, "advise"):
        advice = advisor.run(cfg)
    print("\n".join(advisor.summary_lines(advice)))
    print(f"advice: {cfg.layout.advice}")
    return 0


def run(cfg: Config, *, predict_paths: Sequence[Path] = ()) -> int:
    """`quadrant run`: the whole job."""
    from pipeline import run as run_stage

    with run_log(cfg, "run"):
        result = run_stage.run(cfg, predict_paths=predict_paths)
    _print_run(cfg, result)
    return 0


def _print_run(cfg: Config, result: Any) -> None:
    from pipeline import advisor

    if result.advice is not None:
        print("\n".join(advisor.summary_lines(result.advice)))
    else:
        print(f"case {result.case} (run.strategy = {cfg.run.strategy!r})")
    print("\n".join(evaluate_stage.summary_lines(result.evaluation)))
    print(f"model: {result.model.folder}")
    print(f"onnx: {result.export.path}")
    if result.predictions:
        print(f"predictions: {result.predictions}")
    if result.reused:
        print(f"reused: {', '.join(result.reused)}")
    print(f"report: {result.report}")


def report(cfg: Config) -> int:
    """`quadrant report`: render report.html about the selected model."""
    from pipeline import report as report_stage

    with run_log(cfg, "report"):
        path = report_stage.write(cfg)
    print(f"report: {path}")
    return 0


def evaluate(cfg: Config) -> int:
    """`quadrant evaluate`."""
    with run_log(cfg, "evaluate"):
        result = evaluate_stage.run(cfg)
    print("\n".join(evaluate_stage.summary_lines(result)))
    return 0


def format_extract(result: ExtractResult) -> str:
    """A short summary of an extraction: where, how much, how fast."""
    if result.reused:
        how = f"reused (no forward pass, {result.seconds:.1f} s)"
    else:
        how = (
            f"computed {result.computed_rows} rows in {result.seconds:.1f} s "
            f"({result.images_per_second:.1f} img/s)"
        )
    lines = [
        f"codes: {result.path}",
        f"  {how}",
        f"  images: {result.n_images}, rows: {result.n_rows}, skipped: "
        f"{len(result.skipped)}",
    ]
    lines += [
        f"  {s.name:<28} {s.dims:>7} dims  (from {_shape(s.source_shape)})"
        for s in result.specs
    ]
    if result.skipped:
        lines.append("  skipped files:")
        lines += [f"    {p}: {r}" for p, r in result.skipped[:20]]
        if len(result.skipped) > 20:
            lines.append(
                f"    ... and {len(result.skipped) - 20} more (see extract.json)"
            )
    return "\n".join(lines)


def _dims(shape: Sequence[int], pooling: Any) -> str:
    dims = code_dims(shape, pooling)
    return "-" if dims is None else str(dims)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(v) for v in shape)


def list_backbones() -> int:
    """`quadrant layers --list`."""
    print("\n".join(available_backbones()))
    try:
        timm = import_timm()
        status = f"timm {timm.__version__} installed: {len(timm.list_models())} models"
    except BackboneError:
        status = f"timm is not installed: {TIMM_INSTALL}"
    print(
        "timm/<model>[.<pretrained tag>] names any timm model, e.g. "
        f"timm/convnext_tiny.fb_in22k ({status})"
    )
    return 0


def layers(cfg: Config, name: str | None, *, all_nodes: bool) -> int:
    """`quadrant layers [BACKBONE]`: names, output shapes, code sizes."""
    name = name or cfg.backbone.name
    # Shapes do not depend on the weights: random weights keep this offline.
    backbone = build_backbone(
        name, "random", preprocessing={"input_size": cfg.backbone.input_size}
    )
    size = backbone.preprocessing.input_size
    shapes = layer_shapes(
        backbone.model, layer_names(backbone.model, all_nodes=all_nodes), size
    )
    top = resolve_top(backbone.model)
    stages = stage_reductions(backbone.model)
    poolings = [parse_pooling(p) for p in cfg.extract.pooling]
    width = max(8, *(len(p.spec) for p in poolings))
    header = "  ".join(f"{p.spec:>{width}}" for p in poolings)
    print(f"{name} at {size}x{size} (codes per pooling of [extract] pooling)")
    print(f"  {'layer':<32} {'output':>14}  {header}")
    marked = False
    for layer, shape in shapes.items():
        dims = "  ".join(f"{_dims(shape, p):>{width}}" for p in poolings)
        mark = ""
        if not marked and (layer == top or top.startswith(layer + ".")):
            mark, marked = f"  <- {TOP}", True
        elif layer in stages:
            mark = f"  stage, stride {stages[layer]}" if stages[layer] else "  stage"
        print(f"  {layer:<32} {_shape(shape):>14}  {dims}{mark}")
    print(f'"{TOP}" is {top}, the input of the classifier.')
    return 0


def cache_info(path: Path) -> int:
    """`quadrant cache info FILE`."""
    info = read_info(path)
    prov = info.provenance
    print(f"{info.path} ({info.size_bytes / 2**20:.1f} MiB, created {info.created})")
    print(f"  key: {info.key}")
    print(
        f"  backbone: {prov['backbone']['name']} weights={prov['backbone']['weights']} "
        f"sha256={prov['backbone']['weights_sha256'][:16]}"
    )
    print(f"  preprocessing: {json.dumps(prov['preprocessing'])}")
    print(
        f"  images: {info.n_images} ({json.dumps(info.split_counts)}), rows: "
        f"{info.n_rows}, skipped: {info.n_skipped}, classes: {len(info.label_names)}"
    )
    print(f"  data root: {info.data_root}")
    for name, shape in info.datasets.items():
        print(f"  codes/{name}: {_shape(shape)} {info.dtype}")
    env = info.environment
    print(
        f"  computed on {env.get('device')} ({env.get('device_name')}) with torch "
        f"{env.get('torch')}, quadrant {env.get('quadrant')}"
    )
    return 0


def cache_verify(path: Path) -> int:
    """`quadrant cache verify FILE`: exit 1 with the problems if any."""
    problems = verify(path)
    if problems:
        raise CacheCorruptError(
            f"{path} failed verification:\n  "
            + "\n  ".join(problems)
            + "\nFix: run `quadrant extract` again with the same settings (the "
            "conf.toml that made it): it checks every shard's checksum and "
            "computes only the damaged ones again."
        )
    print(f"{path}: OK (structure and checksums verified)")
    return 0


def cache_prune(
    folder: Path,
    *,
    older_than: str | None,
    max_size: str | None,
    keep_used_by: Sequence[Path],
    dry_run: bool,
) -> int:
    """`quadrant cache prune FOLDER`: remove whole caches, oldest first."""
    from features import housekeeping

    if older_than is None and max_size is None:
        raise ConfigError(
            "cache prune needs --older-than (30d) and/or --max-size (50G)"
        )
    age = housekeeping.parse_age(older_than) if older_than else None
    size = housekeeping.parse_size(max_size) if max_size else None
    entries = housekeeping.list_caches(folder)
    keep = housekeeping.used_caches(list(keep_used_by))
    chosen = housekeeping.select(entries, older_than=age, max_size=size, keep=keep)
    verb = "would remove" if dry_run else "removed"
    for entry in chosen:
        if not dry_run:
            housekeeping.remove(entry)
        print(f"{verb} {housekeeping.describe(entry)}")
    freed = sum(e.size_bytes for e in chosen)
    left = sum(e.size_bytes for e in entries) - freed
    print(
        f"{verb} {len(chosen)} of {len(entries)} caches ({freed / 2**20:.1f} MiB); "
        f"{left / 2**20:.1f} MiB left in {folder}"
    )
    return 0


def init(folder: Path, *, force: bool) -> int:
    """`quadrant init [DIR]`: write the commented starter conf.toml."""
    from importlib.resources import files

    target = folder / "conf.toml"
    if target.exists() and not force:
        raise OutputError(
            f"{target} exists; pass --force to replace it, or choose another folder"
        )
    text = files("pipeline").joinpath("templates", "conf.toml").read_text("utf-8")
    write_text(target, text)
    print(f"wrote {target}: edit data.root, then run `quadrant run`")
    return 0


def demo_data(
    name: str,
    out: Path,
    *,
    classes: Sequence[str] | None,
    per_class: int | None,
    split: str,
    overwrite: bool,
) -> int:
    """`quadrant demo-data NAME DIR`."""
    options: dict[str, object] = {"overwrite": overwrite}
    if name == "fashion-mnist":
        options.update(classes=classes, per_class=per_class, split=split)
    path = datasets.write_dataset(name, out, **options)
    count = sum(1 for p in path.rglob("*.png"))
    print(f"wrote {count} images of {name} to {path}")
    return 0


def demo(cfg: Config) -> int:
    """`quadrant demo`: the main job on the embedded digits data."""
    from pipeline import demo as demo_stage

    with run_log(cfg, "demo"):
        result = demo_stage.run(cfg)
    _print_run(cfg, result)
    print(f"results are in {cfg.run.out}")
    return 0
