"""`quadrant <command>`: parse arguments, build the config, call a stage.

Exit status: 0 on success, 1 on an error quadrant raised on purpose (its
message, no traceback), 130 when interrupted; any other exception keeps its
traceback.

NOTE: this module imports nothing heavy at the top: `quadrant --help` and
`--version` must answer at once, so torch, scikit-learn and the stages are
imported by the handler of the command that needs them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from features.errors import ConfigError, PipelineError
from pipeline import __version__

if TYPE_CHECKING:
    from pipeline.config import Config

DEFAULT_CONFIG = Path("conf.toml")


def build_parser() -> argparse.ArgumentParser:
    """The `quadrant` argument parser with one sub-command per stage."""
    parser = argparse.ArgumentParser(
        prog="quadrant",
        description="Transfer learning on images: CNN codes + scikit-learn, or "
        "fine-tuning, chosen by the size and similarity of your data.",
    )
    parser.add_argument(
        "--version", action="version", version=f"quadrant {__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()
    for name in _ORDER:
        if name in _STAGE_COMMANDS:
            summary, handler = _STAGE_COMMANDS[name]
            p = sub.add_parser(name, parents=[common], help=summary)
            p.set_defaults(handler=handler)
        else:
            _BUILDERS[name](sub, common)
    return parser


def _common() -> argparse.ArgumentParser:
    """The options every configured command takes: -c, --set, -v, -q."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="conf.toml to read (default: ./conf.toml)",
    )
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML syntax, repeatable), e.g. "
        "--set extract.batch_size=128",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages"
    )
    common.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return common


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_init(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "init", help="write a starter conf.toml (every key, commented) into DIR"
    )
    p.add_argument("dir", nargs="?", type=Path, default=Path("."), help="default: .")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(handler=_init)


def _add_finetune(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "finetune",
        parents=[common],
        help="fine-tune the whole network (torchrun for several GPUs)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue from run.out/finetune/last.pt exactly",
    )
    group.add_argument(
        "--restart",
        action="store_true",
        help="discard an existing checkpoint and start over",
    )
    p.set_defaults(handler=_finetune)


def _add_predict(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "predict",
        parents=[common],
        help="predict images (files, folders, CSV, - for stdin) with an ONNX model",
        description="Exit codes: 0 every image predicted; 1 an error (nothing "
        "written); 3 the output was written but some images failed (their "
        "rows hold the error); 130 interrupted (run the same command again to "
        "resume).",
    )
    p.add_argument("model", type=Path, help="a model.onnx written by quadrant export")
    p.add_argument(
        "paths",
        nargs="+",
        help="image files, folders, CSV files with a 'path' column, or - to read "
        "one path per line from stdin",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("predictions.csv"),
        help="predictions.csv, a .parquet file, or a folder (a Parquet dataset); "
        "default: predictions.csv",
    )
    p.add_argument(
        "--top-k",
        type=int,
        help="best classes listed per image (default: 3, or every class if fewer)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--all-scores",
        action="store_true",
        help="also write every class's score (score_<class> columns)",
    )
    p.add_argument(
        "--max-failures",
        help="stop when more images than this fail: a count (10) or a share (5%%)",
    )
    p.add_argument(
        "--part-rows",
        type=int,
        default=1024,
        help="images per committed part: a killed run redoes at most one part",
    )
    p.set_defaults(handler=_predict)


def _add_run(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run", parents=[common], help="the whole job: advise, the case's stages, report"
    )
    p.add_argument(
        "--predict",
        nargs="+",
        type=Path,
        default=[],
        metavar="PATH",
        help="also predict these images with the exported model",
    )
    p.set_defaults(handler=_run)


def _add_layers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("layers", parents=[common], help="list a backbone's layer names")
    p.add_argument("backbone", nargs="?", help="backbone name (default: the config's)")
    p.add_argument(
        "--all", action="store_true", help="every graph node, not just modules"
    )
    p.add_argument(
        "--list", action="store_true", help="list the backbone names instead"
    )
    p.set_defaults(handler=_layers)


def _add_cache(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "cache", parents=[common], help="inspect, check or prune code caches"
    )
    p.add_argument("action", choices=["info", "verify", "prune"])
    p.add_argument("file", type=Path, help="a codes-*.h5 file (prune: a cache folder)")
    p.add_argument("--older-than", help="prune: caches older than this (30d, 12h)")
    p.add_argument("--max-size", help="prune: the oldest until the folder fits (50G)")
    p.add_argument(
        "--keep-used-by",
        type=Path,
        action="append",
        default=[],
        help="prune: keep the caches these run folders' models were trained on",
    )
    p.add_argument("--dry-run", action="store_true", help="prune: list, remove nothing")
    p.set_defaults(handler=_cache)


def _add_demo_data(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo-data", parents=[common], help="write a demo data set as PNGs"
    )
    p.add_argument("name", help="digits or fashion-mnist")
    p.add_argument("dir", type=Path, help="folder to create")
    p.add_argument("--classes", nargs="+", help="fashion-mnist: class names or indices")
    p.add_argument("--per-class", type=int, help="fashion-mnist: images per class")
    p.add_argument(
        "--split",
        default="both",
        choices=["both", "train", "test"],
        help="fashion-mnist: which official split(s) to write",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.set_defaults(handler=_demo_data)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `quadrant` command."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        if args.command != "init":
            _console(args)
        return handler(args)
    except PipelineError as err:
        print(f"quadrant {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        from features.atomic import output_error, writing_error

        if not writing_error(err):
            raise
        # NOTE: a last net under the writers' own checks: a full disk or a
        # read-only folder met by a library is still one clear message.
        where = Path(err.filename or "the output folder")
        print(
            f"quadrant {args.command}: error: {output_error(where, err)}",
            file=sys.stderr,
        )
        return 1
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: not an error of ours.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(
            f"quadrant {args.command}: interrupted; run the same command again to "
            "resume where it stopped",
            file=sys.stderr,
        )
        return 130


def _console(args: argparse.Namespace) -> None:
    from pipeline.logs import setup_console

    setup_console("debug" if args.verbose else "warning" if args.quiet else "info")


def _config(args: argparse.Namespace, *, required: bool = True) -> Config:
    """The config from -c (or ./conf.toml) with --set overrides applied."""
    from pipeline.config import load_config
    from pipeline.logs import setup_console

    path = args.config
    if path is None:
        if DEFAULT_CONFIG.is_file():
            path = DEFAULT_CONFIG
        elif required:
            raise ConfigError(
                f"no conf.toml in {Path.cwd()}; run `quadrant init` to write a "
                "starter one here, or pass -c PATH"
            )
    cfg = load_config(path, args.overrides)
    if not (args.verbose or args.quiet):
        setup_console(cfg.run.log_level)
    return cfg


def _init(args: argparse.Namespace) -> int:
    from pipeline import commands

    return commands.init(args.dir, force=args.force)


def _extract(args: argparse.Namespace) -> int:
    from pipeline import commands

    return commands.extract(_config(args))


def _finetune(args: argparse.Namespace) -> int:
    from pipeline import commands

    return commands.finetune(_config(args), resume=args.resume, restart=args.restart)


def _run(args: argparse.Namespace) -> int:
    from pipeline import commands

    return commands.run(_config(args), predict_paths=args.predict)


def _predict(args: argparse.Namespace) -> int:
    from pipeline import commands
    from pipeline.predict import PredictOptions

    options = PredictOptions(
        top_k=args.top_k,
        batch_size=args.batch_size,
        device=args.device,
        all_scores=args.all_scores,
        max_failures=args.max_failures,
        progress=not args.quiet,
        part_rows=args.part_rows,
    )
    return commands.predict(args.model, args.paths, out=args.out, options=options)


def _stage(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        from pipeline import commands

        command: Callable[[Config], int] = getattr(commands, name)
        return command(_config(args))

    return handler


def _layers(args: argparse.Namespace) -> int:
    from pipeline import commands

    if args.list:
        return commands.list_backbones()
    cfg = _config(args, required=False)
    return commands.layers(cfg, args.backbone, all_nodes=args.all)


def _cache(args: argparse.Namespace) -> int:
    from pipeline import commands

    if args.action == "info":
        return commands.cache_info(args.file)
    if args.action == "prune":
        return commands.cache_prune(
            args.file,
            older_than=args.older_than,
            max_size=args.max_size,
            keep_used_by=args.keep_used_by,
            dry_run=args.dry_run,
        )
    return commands.cache_verify(args.file)


def _demo_data(args: argparse.Namespace) -> int:
    from pipeline import commands

    return commands.demo_data(
        args.name,
        args.dir,
        classes=args.classes,
        per_class=args.per_class,
        split=args.split,
        overwrite=args.overwrite,
    )


def _demo(args: argparse.Namespace) -> int:
    from pipeline import commands, demo
    from pipeline.logs import setup_console

    cfg = demo.demo_config(args.overrides)
    if not (args.verbose or args.quiet):
        setup_console(cfg.run.log_level)
    return commands.demo(cfg)


# The commands in the order `quadrant --help` lists them.
_ORDER = (
    "init",
    "extract",
    "sweep",
    "train",
    "evaluate",
    "finetune",
    "export",
    "predict",
    "advise",
    "run",
    "report",
    "layers",
    "cache",
    "demo-data",
    "demo",
)
# Commands that take only the common options: name -> (help, handler).
_STAGE_COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
    "extract": ("cache CNN codes of the images", _extract),
    "sweep": ("probe every cached layer: CV accuracy and LogME", _stage("sweep")),
    "train": ("fit a scikit-learn classifier on cached codes", _stage("train")),
    "evaluate": ("score the trained model on the test split", _stage("evaluate")),
    "export": (
        "write model.onnx (images in, scores out) and check it",
        _stage("export"),
    ),
    "advise": ("measure size and similarity, name the case (1-4)", _stage("advise")),
    "report": ("re-render report.html", _stage("report")),
    "demo": ("run the main job on the embedded digits data", _demo),
}
# Commands with options of their own.
_BUILDERS: dict[str, Callable[[Subparsers, argparse.ArgumentParser], None]] = {
    "init": _add_init,
    "finetune": _add_finetune,
    "predict": _add_predict,
    "run": _add_run,
    "layers": _add_layers,
    "cache": _add_cache,
    "demo-data": _add_demo_data,
}
