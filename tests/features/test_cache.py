from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from features import load_codes
from features.cache import (
    CodeSpec,
    ShardStore,
    cache_key,
    diff_provenance,
    read_info,
    verify,
)
from features.errors import (
    CacheCorruptError,
    CacheLockedError,
    CacheMismatchError,
    StageInputError,
)
from pipeline import extract
from pipeline.config import Config

MakeConfig = Callable[..., Config]


@pytest.fixture
def cache_file(image_folder: Path, make_config: MakeConfig) -> Path:
    return extract.run(
        make_config(image_folder, "extract.layers=['top', 'layer1']")
    ).path


def test_cache_round_trip_holds_images_rows_and_provenance(cache_file: Path) -> None:
    info = read_info(cache_file)
    assert info.n_images == 20 and info.n_rows == 20
    assert info.label_names == ("cat", "dog")
    assert info.datasets == {"top/none": (20, 512), "layer1/avg": (20, 64)}
    assert info.provenance["backbone"]["name"] == "resnet18"
    assert info.provenance["batch_size"] == 4
    assert cache_key(info.provenance) == info.key
    assert {"torch", "torchvision", "h5py", "quadrant"} <= set(info.environment)
    with h5py.File(cache_file, "r") as h5:
        chunks = h5["codes/top/none"].chunks
        assert h5["codes/top/none"].attrs["sha256"]
    assert chunks is not None and chunks[1] == 512


def test_cache_key_is_stable_and_order_free() -> None:
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})


def test_verify_detects_corrupted_codes(cache_file: Path) -> None:
    with h5py.File(cache_file, "r+") as h5:
        h5["codes/top/none"][3, 7] += 1.0
    [problem] = verify(cache_file)
    assert "codes/top/none: checksum mismatch" in problem


def test_verify_detects_a_truncated_file(cache_file: Path) -> None:
    data = cache_file.read_bytes()
    cache_file.write_bytes(data[: len(data) // 2])
    problems = verify(cache_file)
    assert problems and ("truncated" in problems[0] or "unreadable" in problems[0])


def test_open_refuses_unfinished_and_foreign_files(
    cache_file: Path, tmp_path: Path
) -> None:
    with h5py.File(cache_file, "r+") as h5:
        h5.attrs["complete"] = False
    with pytest.raises(CacheCorruptError, match="was not finished; delete it"):
        load_codes(cache_file)
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as h5:
        h5["x"] = 1
    with pytest.raises(CacheCorruptError, match="not a quadrant code cache"):
        read_info(foreign)
    with pytest.raises(StageInputError, match="not found; run `quadrant extract`"):
        read_info(tmp_path / "missing.h5")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(CacheCorruptError, match="cannot be opened as HDF5"):
        read_info(garbage)


def test_open_refuses_other_format_versions(cache_file: Path) -> None:
    with h5py.File(cache_file, "r+") as h5:
        h5.attrs["format_version"] = 99
    with pytest.raises(CacheMismatchError, match="format version 99"):
        load_codes(cache_file)


def test_load_codes_names_missing_layers(cache_file: Path) -> None:
    with pytest.raises(CacheMismatchError, match=r"layer 'layer4' is not in .*holds"):
        load_codes(cache_file, "layer4")
    with pytest.raises(CacheMismatchError, match=r"pooled 'max' is not in"):
        load_codes(cache_file, "layer1", "max")


def test_diff_provenance_names_the_differences() -> None:
    diff = diff_provenance(
        {"backbone": {"name": "a"}, "k": 1}, {"backbone": {"name": "b"}, "k": 1}
    )
    assert diff == ["backbone.name: expected 'a', found 'b'"]


def _store(tmp_path: Path, **changes: object) -> ShardStore:
    args: dict[str, object] = dict(
        key="k",
        n_rows=10,
        shard_rows=4,
        dtype="float32",
        specs=[CodeSpec("top", "flatten", "none", 3, (3,))],
    )
    args.update(changes)
    return ShardStore(tmp_path / "c.parts", **args)  # type: ignore[arg-type]


def test_shard_store_commits_and_finds_shards(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        assert store.n_shards == 3 and list(store.rows(2)) == [8, 9]
        store.write(0, {"top/none": np.ones((4, 3))}, np.ones(4, bool), [""] * 4)
        assert store.committed() == [0]
    with _store(tmp_path) as store:
        codes, ok, _ = store.read(0)
        assert codes["top/none"].shape == (4, 3) and ok.all()
    with _store(tmp_path, shard_rows=5) as store:  # other settings: start over
        assert store.committed() == []


def test_shard_store_drops_unreadable_shards(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        store.write(0, {"top/none": np.ones((4, 3))}, np.ones(4, bool), [""] * 4)
        (store.parts / "shard-000000.npz").write_bytes(b"half a zip")
        assert store.committed() == []


def test_shard_store_refuses_a_second_writer(tmp_path: Path) -> None:
    with _store(tmp_path):
        with pytest.raises(CacheLockedError, match="another quadrant process"):
            with _store(tmp_path):
                pass
