"""Extraction under torchrun: two gloo processes on the CPU, as in CI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import pytest
import torch

from features.cache import verify
from features.devices import plan_loader
from features.distributed import (
    World,
    gather_text,
    rank_cpus,
    run_on_main,
    share_text,
)
from features.errors import DistributedError
from pipeline import extract
from pipeline.config import load_config
from tests.conftest import TINY, write_png
from tests.features.test_extractor import assert_same_codes

# 64 px and 4-row shards: 40 shards that take a few seconds in all, long
# enough to kill a rank between two of them.
SETTINGS = [*TINY, "backbone.input_size=64", "backbone.resize_size=64"]
SETTINGS += ["extract.shard_size=4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("torchrun") / "images"
    (root.parent / "conf.toml").write_text("")  # all settings come from --set
    for c in ("a", "b"):
        for i in range(80):
            write_png(root / c / f"{i:03d}.png", seed=i + (1000 if c == "b" else 0))
    return root


@pytest.fixture(scope="module")
def one_process(data: Path) -> Path:
    """The cache of a plain one-process run: the reference."""
    out = data.parent / "one"
    cfg = load_config(
        None, [f"data.root='{data}'", f"run.out='{out}'", *SETTINGS], cwd=data.parent
    )
    return extract.run(cfg).path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(data: Path, out: Path) -> list[str]:
    sets = [
        arg
        for item in [*SETTINGS, f"data.root='{data}'", f"run.out='{out}'"]
        for arg in ("--set", item)
    ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "pipeline",
        "extract",
        *sets,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_torchrun_two_processes_write_the_one_process_cache(
    data: Path, one_process: Path
) -> None:
    out = data.parent / "two"
    done = subprocess.run(
        _torchrun(data, out),
        cwd=data.parent,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("codes: ") == 1  # only rank 0 reports
    assert "computed 160 rows" in done.stdout
    assert "40 of 40 shards to compute on 2 processes" in done.stderr
    [two] = (out / "cache").glob("*.h5")
    assert two.name == one_process.name  # the same key
    assert_same_codes(one_process, two)
    assert verify(two) == []
    writers = set()
    for shard in two.with_suffix(".shards").glob("shard-*.h5"):
        with h5py.File(shard, "r") as h5:
            writers.add(int(h5.attrs["rank"]))
    assert writers == {0, 1}
    assert (out / "extract.json").is_file()


def _shards(cache: Path) -> list[Path]:
    return list(cache.glob("*.shards/shard-*.h5"))


def _rank_pid(agent: subprocess.Popen[bytes], rank: int) -> int:
    """The process id of one rank: a child of the torchrun agent."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children")
        for pid in children.read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} did not start")


def _kill_mid_run(data: Path, out: Path, rank: int) -> None:
    """Start a 2-process job, SIGKILL `rank` once a new shard is committed."""
    cache = out / "cache"
    before = len(_shards(cache))
    agent = subprocess.Popen(
        _torchrun(data, out),
        cwd=data.parent,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid = _rank_pid(agent, rank)
    deadline = time.monotonic() + 120
    while len(_shards(cache)) <= before:
        assert agent.poll() is None, "the job ended before a shard was committed"
        assert time.monotonic() < deadline, "no shard was committed"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    assert agent.wait(timeout=120) != 0  # torchrun stops the other rank too
    assert not list(cache.glob("*.h5")), "a job with a dead rank finished"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_torchrun_job_resumes_after_a_rank_is_killed(
    data: Path, one_process: Path
) -> None:
    """kill -9 rank 1, then rank 0 of the resumed job; a third run (one
    process this time) finishes, and the cache equals a one-process run's."""
    out = data.parent / "killed"
    _kill_mid_run(data, out, rank=1)
    after_first = len(_shards(out / "cache"))
    _kill_mid_run(data, out, rank=0)
    assert len(_shards(out / "cache")) > after_first
    cfg = load_config(
        None, [f"data.root='{data}'", f"run.out='{out}'", *SETTINGS], cwd=data.parent
    )
    resumed = extract.run(cfg)
    assert 0 < resumed.computed_rows < 160
    assert_same_codes(one_process, resumed.path)
    assert verify(resumed.path) == []


def test_one_process_world_needs_no_process_group() -> None:
    world = World()
    assert run_on_main(world, lambda: 7) == 7
    assert share_text(world, "key") == "key"
    assert gather_text(world, "[1, 2]") == ["[1, 2]"]


def test_a_rank_stops_with_rank_0s_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """What rank 1 raises when rank 0 fails while it waits."""
    sent = '{"error": "DataError: no readable images under /data"}'
    monkeypatch.setattr("features.distributed.share_text", lambda world, text: sent)
    with pytest.raises(
        DistributedError, match="rank 0 stopped the job: DataError: no readable"
    ):
        run_on_main(World(rank=1, size=2), lambda: pytest.fail("rank 1 ran it"))


def test_ranks_of_one_machine_plan_their_loaders_on_their_share_of_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 16 cores, 8 GPU ranks on the machine: each rank feeds its GPU from 2
    # cores, one decode worker beside its main process, not 15 workers each.
    monkeypatch.setattr("features.distributed.available_cpus", lambda: 16)
    world = World(rank=3, size=16, local_rank=3, local_size=8)
    assert rank_cpus(world) == 2
    plan = plan_loader(
        cpus=rank_cpus(world),
        forward_on_cpu=False,
        decode_seconds=0.03,
        forward_seconds=0.001,
    )
    assert plan.workers == 1
    assert rank_cpus(World()) == 16
    assert rank_cpus(World(rank=0, size=32, local_size=32)) == 1


def test_rank_0_alone_exports_the_onnxruntime_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from features import extractor
    from features.settings import ExtractOptions

    exported: list[Path] = []

    def export(model: object, path: Path, spec: str) -> None:
        exported.append(path)
        path.write_bytes(b"onnx")

    monkeypatch.setattr(extractor, "_export_engine", export)
    model = SimpleNamespace(
        identity={"name": "tiny"},
        specs=[SimpleNamespace(name="top/avg")],
        preprocessing=SimpleNamespace(as_dict=lambda: {"input_size": 32}),
        folded=0,
    )
    store = SimpleNamespace(parts=tmp_path / "codes-0123.shards")
    cpu = torch.device("cpu")

    def engine(world: World, name: str = "onnxruntime") -> Path | None:
        options = ExtractOptions(engine=name)
        return extractor._engine_file(model, store, options, cpu, "fp32", world)  # type: ignore[arg-type]

    # Rank 1 hears that rank 0 is done and waits for the file to be visible.
    monkeypatch.setattr(
        "features.distributed.share_text", lambda world, text: '{"ok": true}'
    )
    waited: list[Path] = []
    monkeypatch.setattr(
        extractor, "_wait_for", lambda path: waited.append(path) or path
    )
    on_rank_1 = engine(World(rank=1, size=2))
    assert exported == [] and waited == [on_rank_1]
    # Rank 0 exports once; a later job finds the file.
    first = engine(World(rank=0, size=2))
    assert exported == [first] == [on_rank_1] and first.parent == tmp_path
    assert engine(World()) == first and exported == [first]
    assert engine(World(), "torch") is None  # the torch engine needs no file
