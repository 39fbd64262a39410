"""The batched forward pass that turns images into cached CNN codes.

`extract_codes` runs a frozen backbone once over an `ImageSet` and writes every
requested layer, pooled every requested way, into one HDF5 cache (see
`features.cache`). The cache is addressed by a key over everything that
determines the codes, so a second call with the same inputs runs no forward
pass, and a killed call resumes from its last committed shard.

Determinism: batches are formed from the global row order and shards hold a
whole number of batches, so a resumed run feeds the network exactly the
batches an uninterrupted run would have, and writes the same values.

Many processes (torchrun): rank 0 lists the images and writes them to the
cache's index file, the other ranks read them there; the missing shards are
dealt out among the ranks, each writes its own, and rank 0 links them into
the cache file at the end. Since a shard's values depend only on its rows,
the cache equals a one-process run's value for value, and a killed job
resumes with any number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset, Subset

from features.atomic import check_free_space
from features.backbones import Backbone
from features.cache import (
    FORMAT_VERSION,
    CodeSpec,
    Failures,
    ImageTable,
    ShardStore,
    cache_key,
    decode_outcome,
    finish,
    open_cache,
    read_index,
    shards_folder,
    write_index,
)
from features.data import ImageRecord, ImageSet, Skipped
from features.devices import (
    PRECISION_DTYPES,
    LoaderPlan,
    plan_loader,
    resolve_device,
    resolve_precision,
)
from features.distributed import (
    World,
    gather_text,
    process_device,
    rank_cpus,
    run_on_main,
    share_text,
)
from features.errors import (
    BackboneError,
    CacheCorruptError,
    CacheMismatchError,
    DistributedError,
    ImageDecodeError,
)
from features.gpu_decode import (
    GpuJpegDecoder,
    jpeg_collate,
    jpeg_source,
    resolve_decoder,
)
from features.images import read_plain_jpeg
from features.interrupts import InterruptibleLoader
from features.layers import (
    as_nchw,
    build_feature_extractor,
    depth_order,
    output_layout,
    pool,
    pooled_name,
    resolve_layers,
)
from features.optimize import fold_batchnorm
from features.pooling import parse_pooling
from features.progress import progress_bar
from features.settings import VIEW_CROP_SCALE, Decoding, ExtractOptions
from features.transforms import (
    Normalize,
    Preprocessing,
    eval_transform,
    view_transform,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Settings:
    """One extraction's settings: the options and the inputs beside them."""

    options: ExtractOptions
    decoding: Decoding
    seed: int  # seeds the augmented views
    progress: bool


@dataclass(frozen=True)
class ExtractResult:
    """What `extract_codes` produced."""

    path: Path
    key: str
    reused: bool
    n_images: int
    n_rows: int
    specs: tuple[CodeSpec, ...]
    skipped: tuple[tuple[str, str], ...]
    seconds: float
    computed_rows: int

    @property
    def images_per_second(self) -> float:
        return self.computed_rows / self.seconds if self.seconds > 0 else 0.0


class CodeModel(nn.Module):
    """uint8 images in, one pooled code array per (layer, pooling) out.

    Normalisation runs inside the model, so the same module serves extraction
    and ONNX export. With `fold`, BatchNorm layers are folded into their
    convolutions (see `features.optimize`); the backbone itself is not changed.
    """

    def __init__(
        self,
        backbone: Backbone,
        layers: Sequence[str],
        pooling: Sequence[str],
        *,
        fold: bool = True,
    ) -> None:
        super().__init__()
        prep = backbone.preprocessing
        self.preprocessing = prep
        self.identity = backbone.identity()
        self.normalize = Normalize(prep.mean, prep.std)
        nodes = resolve_layers(backbone.model, layers)
        # A copy: folding rewrites modules the backbone's own model shares.
        self.features = build_feature_extractor(copy.deepcopy(backbone.model), nodes)
        self.folded = fold_batchnorm(self.features) if fold else 0
        self.layer_order = depth_order(backbone.model, nodes)
        self.poolings = [parse_pooling(p) for p in pooling]
        self.layout = output_layout(backbone.model)
        self.specs = self._specs(nodes, prep.input_size)

    @torch.no_grad()
    def _specs(self, nodes: Mapping[str, str], input_size: int) -> tuple[CodeSpec, ...]:
        probe = torch.zeros(1, 3, input_size, input_size, dtype=torch.uint8)
        outputs = self.features(self.normalize(probe))
        specs: list[CodeSpec] = []
        for layer in self.layer_order:
            output = as_nchw(outputs[layer], self.layout)
            shape = tuple(output.shape[1:])
            for p in self.poolings:
                try:
                    dims = int(pool(output, p, self.layout).shape[1])
                except BackboneError as err:
                    raise BackboneError(f"layer {layer!r}: {err}") from None
                spec = CodeSpec(
                    layer, nodes[layer], pooled_name((1, *shape), p), dims, shape
                )
                if spec not in specs:  # flat layers give the same "none" code
                    specs.append(spec)
        return tuple(specs)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.features(self.normalize(images))
        codes = {}
        for spec in self.specs:
            tensor = as_nchw(outputs[spec.layer].float(), self.layout)
            pooling = next(
                (p for p in self.poolings if p.spec == spec.pooling), self.poolings[0]
            )
            codes[spec.name] = pool(tensor, pooling, self.layout)
        return codes


Item = tuple[int, torch.Tensor, bool, str]


class _RowDataset(Dataset[Any]):
    """Row i -> (i, uint8 image tensor, decoded?, failure reason).

    With `gpu_jpeg`, items carry a fifth entry: the row's JPEG bytes when a
    GPU decoder can take them (the pixels are then a placeholder), else None.
    """

    def __init__(
        self,
        files: Sequence[Path],
        table: ImageTable,
        prep: Preprocessing,
        decoding: Decoding,
        *,
        seed: int = 0,
        gpu_jpeg: bool = False,
    ) -> None:
        self.files = files
        self.row_image = table.row_image
        self.row_view = table.row_view
        self.eval_transform = eval_transform(prep)
        self.view_transform = view_transform(prep)
        # NOTE: augmented views crop, so fast decoding keeps them more pixels.
        self.eval_decoding = decoding.for_input(prep)
        self.view_decoding = decoding.for_input(prep, crop_scale=VIEW_CROP_SCALE)
        self.size = prep.input_size
        self.seed = seed
        self.gpu_jpeg = gpu_jpeg

    def __len__(self) -> int:
        return len(self.row_image)

    def __getitem__(self, row: int) -> Any:
        file = self.files[int(self.row_image[row])]
        view = int(self.row_view[row])
        if not self.gpu_jpeg:
            return self.item(row, file, view)
        # NOTE: augmented views keep the CPU path: their seeded random crops
        # are defined on PIL images.
        jpeg = (
            None
            if view
            else read_plain_jpeg(file, max_pixels=self.eval_decoding.max_pixels)
        )
        if jpeg is None:
            return (*self.item(row, file, view), None)
        return row, self._blank(), True, "", jpeg_source(file, *jpeg)

    def item(self, row: int, file: Path, view: int) -> Item:
        """The row decoded and transformed on the CPU."""
        try:
            image = (self.view_decoding if view else self.eval_decoding).open(file)
        except ImageDecodeError as err:
            return row, self._blank(), False, str(err).removeprefix(f"{file}: ")
        if view == 0:
            return row, self.eval_transform(image), True, ""
        # NOTE: the view's randomness comes from (seed, row) alone, so it is the
        # same in any worker, in any order, and after a resume.
        with torch.random.fork_rng(devices=[]):
            # NOTE: the CPU generator only: torch.manual_seed also queues a
            # CUDA seeding call with a formatted stack on every call.
            torch.default_generator.manual_seed(_row_seed(self.seed, row))
            return row, self.view_transform(image), True, ""

    def cpu_pixels(self, file: Path) -> torch.Tensor:
        """View 0 of `file` decoded on the CPU: the GPU decoder's fallback."""
        return self.eval_transform(self.eval_decoding.open(file))

    def _blank(self) -> torch.Tensor:
        return torch.zeros(3, self.size, self.size, dtype=torch.uint8)


def _row_seed(seed: int, row: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}".encode()).digest()[:7])


def image_table(images: ImageSet, views: int) -> ImageTable:
    """Rows: every image's view 0, then views 1..V-1 of the training images."""
    n = len(images)
    train = np.array(
        [i for i, r in enumerate(images.records) if r.split == "train"], dtype=np.int64
    )
    extra_image = np.tile(train, views - 1)
    extra_view = np.repeat(np.arange(1, views, dtype=np.int16), len(train))
    return ImageTable(
        paths=[r.path for r in images.records],
        labels=np.array([r.label for r in images.records], dtype=np.int64),
        splits=[r.split for r in images.records],
        row_image=np.concatenate([np.arange(n, dtype=np.int64), extra_image]),
        row_view=np.concatenate([np.zeros(n, dtype=np.int16), extra_view]),
    )


@dataclass(frozen=True)
class CodePlan:
    """Where the codes for a configuration live, and why: key and provenance."""

    key: str
    provenance: dict[str, Any]
    path: Path


def plan_codes(
    images: ImageSet,
    model: CodeModel,
    options: ExtractOptions,
    cache_dir: Path,
    *,
    decoding: Decoding | None = None,
    seed: int = 0,
) -> CodePlan:
    """The cache key and file of these images through this model (no compute).

    `decoding` and `seed` (of augmented views) are those `extract_codes` is
    given.
    """
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    settings = _Settings(options, decoding or Decoding(), seed, progress=False)
    provenance = _provenance(images, model, settings, device, precision)
    key = cache_key(provenance)
    return CodePlan(key, provenance, Path(cache_dir) / f"codes-{key[:16]}.h5")


def extract_codes(
    images: ImageSet | None,
    model: CodeModel,
    *,
    options: ExtractOptions,
    cache_dir: Path,
    decoding: Decoding | None = None,
    seed: int = 0,
    progress: bool = True,
    world: World | None = None,
) -> ExtractResult:
    """Compute (or find) the cached codes of `images`.

    Args:
        images: the checked, split images; None on the ranks other than 0 of
            a torchrun job, which read the list rank 0 made instead of
            listing the files again.
        model: the frozen backbone cut at the requested layers, with pooling
            (build it first: an unknown layer fails there, before any image
            is read).
        options: forward-pass and storage options.
        cache_dir: folder of cache files, one per key.
        decoding: how image files are decoded (its side is set per input);
            the default recipe when None.
        seed: seeds the augmented views (`options.views` > 1).
        progress: show a progress bar.
        world: this process's place in a torchrun job (`join_world()`); one
            process when omitted.

    Returns:
        The cache file and what was done; `reused` is True when no forward pass
        ran.

    Raises:
        CacheLockedError: another job is extracting the same codes.
        DistributedError: another rank of this job failed first.
    """
    world = world or World()
    start = time.perf_counter()
    device = process_device(resolve_device(options.device), world)
    precision = resolve_precision(options.precision, device)
    settings = _Settings(options, decoding or Decoding(), seed, progress)
    with contextlib.ExitStack() as stack:
        job = _open_job(images, model, settings, cache_dir, world, stack)
        if isinstance(job, tuple):  # the cache exists: nothing to compute
            return _reuse(*job, start)
        computed, failures = _run_shards(job, model, settings, device, precision, world)
        failures = _finish_job(job, failures, device, world)
    return _computed_result(job, failures, computed, start)


@dataclass(frozen=True)
class _Job:
    """One extraction in progress: its plan, shards and images."""

    plan: CodePlan
    store: ShardStore
    table: ImageTable
    images: ImageSet


def _plan_for(
    images: ImageSet, model: CodeModel, settings: _Settings, cache_dir: Path
) -> CodePlan:
    return plan_codes(
        images,
        model,
        settings.options,
        cache_dir,
        decoding=settings.decoding,
        seed=settings.seed,
    )


def _open_job(
    images: ImageSet | None,
    model: CodeModel,
    settings: _Settings,
    cache_dir: Path,
    world: World,
    stack: contextlib.ExitStack,
) -> _Job | tuple[Path, str]:
    """Rank 0 plans the cache, locks it and writes the image list to its index;
    the other ranks read the list from there. (final, key) if it exists."""

    def lead() -> _Job | CodePlan:
        if images is None:
            raise AssertionError("rank 0 of a job needs the listed images")
        plan = _plan_for(images, model, settings, cache_dir)
        if plan.path.exists() and _sound(plan.path):
            return plan
        table = image_table(images, settings.options.views)
        store = stack.enter_context(_store(plan, model, settings.options, table, world))
        if plan.path.exists():  # another job finished it just before the lock
            return plan
        listing = {
            "root": str(images.root),
            "label_names": list(images.label_names),
            "fingerprint": images.fingerprint,
        }
        write_index(
            store,
            table,
            skipped=[(s.path, s.reason) for s in images.skipped],
            attrs={"listing": json.dumps(listing)},
        )
        return _Job(plan, store, table, images)

    led = run_on_main(world, lead)
    text = None
    if led is not None:
        plan = led.plan if isinstance(led, _Job) else led
        text = json.dumps({"key": plan.key, "reused": not isinstance(led, _Job)})
    message = json.loads(share_text(world, text))
    final = Path(cache_dir) / f"codes-{message['key'][:16]}.h5"
    if message["reused"]:
        return final, message["key"]
    if isinstance(led, _Job):
        return led
    return _join_job(final, message["key"], model, settings, world, stack)


def _sound(final: Path) -> bool:
    """Whether a finished cache may be reused; a damaged one is unpublished.

    The cache file only links the shards: removing it leaves the sound
    shards to be reused and the damaged ones (found by their checksums when
    the store is opened) to be computed again.
    """
    try:
        with open_cache(final):
            return True
    except CacheCorruptError as err:
        log.warning("%s: repairing it", str(err).split(". Fix:")[0])
        final.unlink()
        return False


def _join_job(
    final: Path,
    key: str,
    model: CodeModel,
    settings: _Settings,
    world: World,
    stack: contextlib.ExitStack,
) -> _Job:
    """A rank other than 0: the job from the image list rank 0 wrote.

    Raises:
        DistributedError: this rank's settings give another cache key.
    """
    table, skipped, attrs = read_index(_wait_for(shards_folder(final) / "index.h5"))
    listing = json.loads(attrs["listing"])
    images = ImageSet(
        Path(listing["root"]),
        tuple(
            ImageRecord(p, int(label), s)
            for p, label, s in zip(table.paths, table.labels, table.splits, strict=True)
        ),
        tuple(listing["label_names"]),
        tuple(Skipped(p, r) for p, r in skipped),
        listing["fingerprint"],
    )
    plan = _plan_for(images, model, settings, final.parent)
    if plan.key != key:
        raise DistributedError(
            f"rank {world.rank} computes cache key {plan.key[:16]} where rank 0 "
            f"computed {key[:16]}: the ranks differ in settings, quadrant version "
            "or backbone weights. Run every rank with the same conf.toml and "
            "software."
        )
    store = stack.enter_context(_store(plan, model, settings.options, table, world))
    return _Job(plan, store, table, images)


def _wait_for(path: Path, seconds: float = 120.0) -> Path:
    """`path`, once this machine sees it.

    NOTE: on a network file system another machine's new file can stay
    invisible here for up to a minute (cached directory attributes).
    """
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise DistributedError(
                f"{path} (written by rank 0) is not visible from this machine "
                f"after {seconds:.0f} s: extract.cache_dir must be on a file "
                "system every machine of the job shares"
            )
        time.sleep(0.5)
    return path


def _store(
    plan: CodePlan,
    model: CodeModel,
    options: ExtractOptions,
    table: ImageTable,
    world: World,
) -> ShardStore:
    # Shards hold whole batches, so batches never straddle two shards.
    shard_rows = options.batch_size * max(
        1, round(options.shard_size / options.batch_size)
    )
    return ShardStore(
        shards_folder(plan.path),
        key=plan.key,
        n_rows=len(table.row_image),
        shard_rows=shard_rows,
        specs=model.specs,
        dtype=options.dtype,
        compression=options.compression,
        owner=world.main,
        rank=world.rank,
    )


def _run_shards(
    job: _Job,
    model: CodeModel,
    settings: _Settings,
    device: torch.device,
    precision: str,
    world: World,
) -> tuple[int, Failures]:
    """Compute this rank's share of the missing shards.

    Returns:
        The rows computed by the whole job, and the failed decodes this rank
        knows of.
    """
    store = job.store
    todo, failures = _missing_shards(store, world)
    assigned = todo[world.rank :: world.size]
    # Every rank's shards land in the one shared folder: known now, so a disk
    # too small fails before the forward pass rather than part way through.
    check_free_space(
        store.parts,
        store.code_bytes(sum(len(store.rows(s)) for s in todo)),
        what="the codes",
        setting="extract.cache_dir",
    )
    if world.main and world.size > 1:
        log.info(
            "%d of %d shards to compute on %d processes",
            len(todo),
            store.n_shards,
            world.size,
        )
    # NOTE: `todo` is the same on every rank, so all of them join the
    # export (rank 0's) or none does.
    engine = (
        _engine_file(model, store, settings.options, device, precision, world)
        if todo
        else None
    )
    if assigned:
        failures |= _forward(
            model,
            job,
            assigned,
            settings,
            device,
            precision,
            world,
            engine,
        )
    return sum(len(store.rows(s)) for s in todo), failures


def _missing_shards(store: ShardStore, world: World) -> tuple[list[int], Failures]:
    """The shards no rank has committed, and the failed decodes of this rank's.

    Each rank checks every size-th shard for a committed file and the
    missing ones are pooled; rank r then computes every size-th of those, so
    the shares stay even after a resume, whichever ranks had finished what.
    """
    mine = range(world.rank, store.n_shards, world.size)
    done = store.committed(mine)
    failures = {row: why for found in done.values() for row, why in found.items()}
    missing = [s for s in mine if s not in done]
    todo = sorted(
        s for text in gather_text(world, json.dumps(missing)) for s in json.loads(text)
    )
    return todo, failures


def _finish_job(
    job: _Job, failures: Failures, device: torch.device, world: World
) -> Failures:
    """Rank 0 links the shards of every rank into the cache file.

    Returns:
        The failed decodes of the whole job.
    """
    every: Failures = {}
    for text in gather_text(
        world, json.dumps({str(r): w for r, w in failures.items()})
    ):
        every.update({int(r): w for r, w in json.loads(text).items()})
    images = job.images
    run_on_main(
        world,
        lambda: finish(
            job.store,
            job.plan.path,
            table=job.table,
            failures=every,
            provenance=job.plan.provenance,
            environment=_environment(device, world),
            label_names=images.label_names,
            data_root=str(images.root),
        ),
    )
    return every


def _reuse(final: Path, key: str, start: float) -> ExtractResult:
    with open_cache(final) as h5:
        if h5.attrs["key"] != key:
            raise CacheMismatchError(
                f"{final} holds codes for key {h5.attrs['key']}, not {key}; delete it"
            )
    log.info("codes are cached in %s (key %s): no forward pass", final, key[:16])
    return _result(final, key, reused=True, start=start, computed=0)


def _computed_result(
    job: _Job, failures: Failures, computed: int, start: float
) -> ExtractResult:
    """The result of a run that computed codes, from what every rank knows.

    NOTE: built without reading the new file: on a network file system
    shards other machines just wrote may not be listed here yet.
    """
    image_ok, reasons = decode_outcome(job.table, failures)
    skipped = sorted(
        [
            *((s.path, s.reason) for s in job.images.skipped),
            *((job.table.paths[i], r) for i, r in reasons.items()),
        ]
    )
    return ExtractResult(
        job.plan.path,
        job.plan.key,
        False,
        int(image_ok.sum()),
        int(image_ok[job.table.row_image].sum()),
        job.store.specs,
        tuple(skipped),
        time.perf_counter() - start,
        computed,
    )


def _result(
    final: Path, key: str, *, reused: bool, start: float, computed: int
) -> ExtractResult:
    with open_cache(final) as h5:
        specs = [
            CodeSpec(
                str(ds.attrs["layer"]),
                str(ds.attrs["node"]),
                str(ds.attrs["pooling"]),
                int(ds.shape[1]),
                tuple(int(v) for v in ds.attrs["source_shape"]),
            )
            for ds in (h5["codes"][n] for n in json.loads(h5.attrs["code_order"]))
        ]
        skipped = tuple(
            zip(
                h5["skipped/path"].asstr()[:],
                h5["skipped/reason"].asstr()[:],
                strict=True,
            )
        )
        n_images, n_rows = int(h5.attrs["n_images"]), int(h5.attrs["n_rows"])
    return ExtractResult(
        final,
        key,
        reused,
        n_images,
        n_rows,
        tuple(specs),
        skipped,
        time.perf_counter() - start,
        computed,
    )


def _forward(
    model: CodeModel,
    job: _Job,
    todo: Sequence[int],
    settings: _Settings,
    device: torch.device,
    precision: str,
    world: World,
    engine: Path | None,
) -> Failures:
    """Compute and commit the shards `todo`; return their failed decodes.

    `engine` is the onnxruntime file of the code model, None for torch.
    """
    store, table = job.store, job.table
    rows = [row for shard in todo for row in store.rows(shard)]
    compute = _runner(model, engine, settings.options, device, precision)
    loader = _loader(model, job, rows, settings, device, compute, rank_cpus(world))
    shards = _ShardBuffer(store)
    # One bar per job: rank 0's, counting its own share under torchrun.
    total = len(table.row_image) if world.size == 1 else len(rows)
    with progress_bar(
        total,
        initial=total - len(rows),
        desc="extract" if world.size == 1 else f"extract (rank 0 of {world.size})",
        enabled=settings.progress and world.main,
    ) as bar:
        for batch_rows, pixels, ok, reasons in loader:
            codes = compute(pixels)
            shards.add(batch_rows.numpy(), codes, ok.numpy(), list(reasons))
            bar.update(len(batch_rows))
    return shards.failures


def _runner(
    model: CodeModel,
    engine: Path | None,
    options: ExtractOptions,
    device: torch.device,
    precision: str,
) -> Any:
    if engine is None:
        return CodeRunner(model, options, device, precision)
    from features.onnx_engine import OnnxRunner

    return OnnxRunner(
        engine,
        [s.name for s in model.specs],
        device,
        chunk=compute_chunk(options, device),
    )


def _engine_file(
    model: CodeModel,
    store: ShardStore,
    options: ExtractOptions,
    device: torch.device,
    precision: str,
    world: World,
) -> Path | None:
    """The code model exported for onnxruntime, or None for the torch engine.

    Exported once per network and layers, beside the code caches, by rank 0
    alone: the other ranks of a torchrun job wait for it.
    """
    if resolve_engine(options.engine, device, precision) == "torch":
        return None
    identity = {
        "backbone": model.identity,
        "specs": [s.name for s in model.specs],
        "preprocessing": model.preprocessing.as_dict(),
        "fold": model.folded,
    }
    path = store.parts.parent / f"engine-{cache_key(identity)[:16]}.onnx"
    run_on_main(
        world,
        lambda: None if path.exists() else _export_engine(model, path, options.engine),
    )
    return _wait_for(path)


def resolve_engine(spec: str, device: torch.device, precision: str) -> str:
    """ "auto" is onnxruntime for a float32 forward on the CPU, torch elsewhere.

    NOTE: on the CPU onnxruntime ran EfficientNet-Lite0 3.4x faster than
    torch eager per thread (docs/benchmarks.md); on GPUs torch keeps
    autocast and channels_last.
    """
    if spec != "auto":
        return spec
    return "onnxruntime" if device.type == "cpu" and precision == "fp32" else "torch"


def _export_engine(model: CodeModel, path: Path, spec: str) -> None:
    """Export the code model for onnxruntime, saying what to do if it cannot be.

    Raises:
        BackboneError: the exporter refused the network.
    """
    from features.onnx_engine import export_code_model

    try:
        export_code_model(model, model.specs, model.preprocessing.input_size, path)
    except (RuntimeError, ValueError, TypeError) as err:
        raise BackboneError(
            f"the onnxruntime engine ({'chosen by ' if spec == 'auto' else ''}"
            f"extract.engine = {spec!r}) cannot export {model.identity.get('name')}: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; set "
            "extract.engine = 'torch'"
        ) from err


def _loader(
    model: CodeModel,
    job: _Job,
    rows: Sequence[int],
    settings: _Settings,
    device: torch.device,
    compute: Any,
    cpus: int,
) -> Iterable[Any]:
    """Batches of (rows, pixels, ok, reasons), decoded as the plan says.

    Also sets `compute`'s threads: the loader plan shares this process's
    `cpus` cores between the decoders and the forward.
    """
    options = settings.options
    files = [job.images.absolute(r) for r in job.images.records]
    gpu = resolve_decoder(options.decoder, device) == "nvjpeg"
    dataset = _RowDataset(
        files,
        job.table,
        model.preprocessing,
        settings.decoding,
        seed=settings.seed,
        gpu_jpeg=gpu,
    )
    plan = _plan(dataset, rows, compute, options, device, cpus)
    log.info("loader: %s", plan.describe())
    if plan.forward_threads:
        compute.set_threads(plan.forward_threads)
    loader = InterruptibleLoader(
        Subset(dataset, rows),
        batch_size=options.batch_size,
        num_workers=plan.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if plan.workers else None,
        worker_init_fn=functools.partial(_init_worker, plan.worker_threads),
        collate_fn=jpeg_collate if gpu else None,
    )
    if not gpu:
        return loader
    decoder = GpuJpegDecoder(model.preprocessing, device, dataset.cpu_pixels)
    return _gpu_batches(loader, decoder)


def _gpu_batches(
    loader: Iterable[Any], decoder: GpuJpegDecoder
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]]:
    """The loader's batches with their JPEGs decoded on the GPU."""
    for rows, pixels, ok, reasons, jpegs in loader:
        yield rows, *decoder(pixels, ok, reasons, jpegs)
    c = decoder.counts
    log.info(
        "nvJPEG decoded %d images; %d decoded on the CPU after nvJPEG refused "
        "them, %d unreadable (other formats and views: on the CPU)",
        c.gpu,
        c.cpu_fallback,
        c.failed,
    )


def _init_worker(threads: int, worker_id: int) -> None:
    """Give a loader worker its planned torch threads."""
    torch.set_num_threads(threads)


CALIBRATION_IMAGES = 4
"""Images decoded (in the main process) to measure the job's decode cost."""


def _plan(
    dataset: _RowDataset,
    rows: Sequence[int],
    compute: Any,
    options: ExtractOptions,
    device: torch.device,
    cpus: int,
) -> LoaderPlan:
    """Workers and threads for this job, from its own measured costs.

    NOTE: only what `plan_loader` needs is measured: nothing when both are
    set, or when the main process decodes (0 workers) on the CPU.
    """
    workers = options.num_workers if options.num_workers >= 0 else None
    threads = options.threads if options.threads > 0 else None
    on_cpu = device.type == "cpu"
    needs = (workers is None or (on_cpu and threads is None)) and workers != 0
    decode = forward = None
    if needs and rows:
        decode, forward = _calibrate(dataset, rows, compute, on_cpu)
    return plan_loader(
        cpus=cpus,
        forward_on_cpu=on_cpu,
        decode_seconds=decode,
        forward_seconds=forward,
        workers=workers,
        threads=threads,
    )


def _calibrate(
    dataset: _RowDataset, rows: Sequence[int], compute: Any, on_cpu: bool
) -> tuple[float, float]:
    """(seconds to decode one image on a core, seconds of one image's forward).

    Decodes a few rows spread over the job; the CPU forward is timed on one
    thread, after a warm-up call, on a chunk of those images.
    """
    count = min(CALIBRATION_IMAGES, len(rows))
    picked = [rows[i * len(rows) // count] for i in range(count)]
    times, pixels = [], []
    for row in picked:
        start = time.perf_counter()
        item = dataset[row]
        times.append(time.perf_counter() - start)
        pixels.append(item[1])
    chunk = compute_chunk_of(compute)
    batch = torch.stack((pixels * chunk)[:chunk])
    if on_cpu:
        # NOTE: the caller sets the planned threads right after.
        compute.set_threads(1)
    compute(batch)  # warm-up: lazy initialisation, first allocations
    start = time.perf_counter()
    compute(batch)
    forward = (time.perf_counter() - start) / len(batch)
    return statistics.median(times), forward


def compute_chunk_of(compute: Any) -> int:
    """Images per forward call of a runner (CodeRunner or OnnxRunner)."""
    return int(getattr(compute, "chunk", None) or 8)


def compute_chunk(options: ExtractOptions, device: torch.device) -> int:
    """Images per forward call.

    NOTE: on the CPU a forward pass over 8 images at a time ran 2-4x faster
    than over 64 (activations stay in cache; docs/benchmarks.md), so CPU
    batches are cut into chunks of 8. GPUs take the whole batch.
    """
    return options.batch_size if device.type != "cpu" else min(8, options.batch_size)


class CodeRunner:
    """Runs a code model on uint8 batches: device, layout, precision, chunks.

    Shared by extraction and the benchmarks, so both time the same compute.
    """

    def __init__(
        self,
        model: CodeModel,
        options: ExtractOptions,
        device: torch.device,
        precision: str,
    ) -> None:
        self.device = device
        self.chunk = compute_chunk(options, device)
        self.format = torch.channels_last if options.channels_last else None
        self.model = model.to(device).eval()
        if self.format is not None:
            self.model = self.model.to(memory_format=self.format)
        self.amp = PRECISION_DTYPES[precision]
        self.threads = 0  # 0: torch's own setting

    def set_threads(self, threads: int) -> None:
        """Run later calls on `threads` torch threads (0: leave torch's setting)."""
        self.threads = threads

    def __call__(self, pixels: torch.Tensor) -> dict[str, npt.NDArray[np.float32]]:
        with _torch_threads(self.threads):
            parts = [self._run(chunk) for chunk in pixels.split(self.chunk)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _run(self, pixels: torch.Tensor) -> dict[str, npt.NDArray[np.float32]]:
        pixels = pixels.to(self.device, non_blocking=True)
        if self.format is not None:
            pixels = pixels.contiguous(memory_format=self.format)
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type,
                dtype=self.amp or torch.float32,
                enabled=self.amp is not None,
            ),
        ):
            codes = self.model(pixels)
        return {name: c.float().cpu().numpy() for name, c in codes.items()}


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside the block (0: unchanged).

    NOTE: set per call and restored, so the plan applies to the forward
    alone: a fine-tuning run later in the same process keeps every core.
    """
    previous = torch.get_num_threads()
    if not threads or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _ShardBuffer:
    """Collects consecutive batches and commits each shard when it is full."""

    def __init__(self, store: ShardStore) -> None:
        self.store = store
        self.shard = -1
        self.filled = 0
        self.codes: dict[str, npt.NDArray[np.float32]] = {}
        self.ok = np.zeros(0, dtype=bool)
        self.reasons: list[str] = []
        self.failures: Failures = {}

    def add(
        self,
        rows: npt.NDArray[np.int64],
        codes: Mapping[str, npt.NDArray[np.float32]],
        ok: npt.NDArray[np.bool_],
        reasons: Sequence[str],
    ) -> None:
        shard = int(rows[0]) // self.store.shard_rows
        if shard != self.shard:
            self._start(shard)
        offset = int(rows[0]) - self.store.rows(shard).start
        for name, array in codes.items():
            self.codes[name][offset : offset + len(rows)] = array
        self.ok[offset : offset + len(rows)] = ok
        self.reasons[offset : offset + len(rows)] = reasons
        for i in np.flatnonzero(~ok):
            self.failures[int(rows[i])] = reasons[int(i)]
        self.filled += len(rows)
        if self.filled == len(self.store.rows(shard)):
            self.store.write(shard, self.codes, self.ok, self.reasons)

    def _start(self, shard: int) -> None:
        n = len(self.store.rows(shard))
        self.shard, self.filled = shard, 0
        self.codes = {
            s.name: np.zeros((n, s.dims), dtype=np.float32) for s in self.store.specs
        }
        self.ok = np.zeros(n, dtype=bool)
        self.reasons = [""] * n


def _provenance(
    images: ImageSet,
    model: CodeModel,
    settings: _Settings,
    device: torch.device,
    precision: str,
) -> dict[str, Any]:
    """Everything that determines the codes' values: the cache key's input."""
    options = settings.options
    views: dict[str, Any] = {"count": options.views}
    if options.views > 1:
        views.update(seed=settings.seed, crop_scale=list(VIEW_CROP_SCALE))
    return {
        "format_version": FORMAT_VERSION,
        "backbone": model.identity,
        "preprocessing": model.preprocessing.as_dict(),
        "codes": [[s.layer, s.node, s.pooling] for s in model.specs],
        "views": views,
        "dtype": options.dtype,
        "batch_size": options.batch_size,
        "compute": {
            "engine": resolve_engine(options.engine, device, precision),
            "device": device.type,
            "precision": precision,
            "channels_last": options.channels_last,
            "chunk": compute_chunk(options, device),
            "fold_batchnorm": model.folded > 0,
            "decoder": resolve_decoder(options.decoder, device),
        },
        "decode": {"background": list(settings.decoding.background)},
        "images": image_identity(images),
    }


def image_identity(images: ImageSet) -> dict[str, Any]:
    """The provenance entry of an image set: which images, under which labels."""
    return {
        "fingerprint": images.fingerprint,
        "count": len(images),
        "labels": list(images.label_names),
    }


def _environment(device: torch.device, world: World) -> dict[str, Any]:
    """Recorded with the codes but not part of the key: what ran them."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        quadrant = version("quadrant")
    except PackageNotFoundError:
        quadrant = "unknown"
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor()
    )
    return {
        "quadrant": quadrant,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        # NOTE: imported only by timm backbones; recorded when it ran.
        "timm": getattr(sys.modules.get("timm"), "__version__", None),
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "device_name": name or platform.machine(),
        "host": platform.node(),
        "processes": world.size,
    }
