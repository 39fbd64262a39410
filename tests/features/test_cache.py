from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from features import load_codes
from features.cache import (
    CodeSpec,
    ImageTable,
    ShardStore,
    cache_key,
    diff_provenance,
    finish,
    read_info,
    verify,
    write_index,
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
    # Five shards of four rows (one batch each).
    return extract.run(
        make_config(
            image_folder, "extract.layers=['top', 'layer1']", "extract.shard_size=4"
        )
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
    assert info.environment["processes"] == 1
    with h5py.File(cache_file, "r") as h5:
        codes = h5["codes/top/none"]
        assert codes.is_virtual and h5["images/path"].is_virtual
        assert {s.file_name for s in codes.virtual_sources()} == {
            f"{cache_file.stem}.shards/shard-{i:06d}.h5" for i in range(5)
        }
        assert codes.attrs["rows_per_chunk"] == 4
        top = codes[:]
    shards = cache_file.with_suffix(".shards")
    with h5py.File(shards / "shard-000001.h5", "r") as h5:
        assert h5["codes/top/none"].attrs["sha256"]
        np.testing.assert_array_equal(h5["codes/top/none"][:], top[4:8])
    assert not (shards / "index.h5").exists()  # it became the cache file
    assert not Path(str(shards) + ".lock").exists()


def test_cache_file_is_small_and_finishing_copies_no_codes(
    image_folder: Path, make_config: MakeConfig
) -> None:
    wide = extract.run(
        make_config(
            image_folder, "extract.pooling=['grid:4']", "extract.layers=['layer1']"
        )
    )
    shards = wide.path.with_suffix(".shards")
    code_bytes = 20 * 64 * 16 * 4
    assert sum(f.stat().st_size for f in shards.glob("shard-*.h5")) > code_bytes
    assert wide.path.stat().st_size < code_bytes / 2


def test_cache_key_is_stable_and_order_free() -> None:
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})


def test_verify_detects_corrupted_codes(cache_file: Path) -> None:
    with h5py.File(cache_file, "r+") as h5:
        h5["codes/top/none"][5, 7] += 1.0  # writes through to shard 1
    [problem] = verify(cache_file)
    assert f"{cache_file.stem}.shards/shard-000001.h5: codes/top/none: " in problem
    assert "checksum mismatch" in problem


def test_verify_detects_a_corrupted_shard_file(cache_file: Path) -> None:
    shard = cache_file.with_suffix(".shards") / "shard-000003.h5"
    with h5py.File(shard, "r") as h5:
        offset = h5["codes/layer1/avg"].id.get_offset()
    data = bytearray(shard.read_bytes())
    data[offset + 17] ^= 0xFF  # one flipped byte in the codes, as on a bad disk
    shard.write_bytes(bytes(data))
    assert verify(cache_file) == [
        f"{cache_file.stem}.shards/shard-000003.h5: codes/layer1/avg: checksum "
        "mismatch (data corrupted)"
    ]


def test_verify_detects_a_misplaced_shard(cache_file: Path) -> None:
    shards = cache_file.with_suffix(".shards")
    shutil.copy(shards / "shard-000000.h5", shards / "shard-000004.h5")
    assert verify(cache_file) == [
        f"{shards.name}/shard-000004.h5: not shard 4 of key {cache_file.stem[6:]}"
    ]


def test_open_refuses_a_cache_without_its_shards(
    cache_file: Path, tmp_path: Path
) -> None:
    (cache_file.with_suffix(".shards") / "shard-000002.h5").unlink()
    with pytest.raises(
        CacheCorruptError,
        match=r"links its codes to 5 shard files .* 1 are missing \(e\.g\. "
        r"shard-000002\.h5\).*keep codes-\w+\.shards/ beside",
    ):
        load_codes(cache_file)
    alone = tmp_path / "copied" / cache_file.name
    alone.parent.mkdir()
    shutil.copy(cache_file, alone)  # the file without its folder
    assert "5 are missing" in verify(alone)[0]


def test_moved_cache_folder_reads_the_same_codes(
    cache_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = load_codes(cache_file, "layer1")
    moved = tmp_path / "elsewhere" / "cache"
    shutil.move(cache_file.parent, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative links, not the cwd
    after = load_codes(moved / cache_file.name, "layer1")
    np.testing.assert_array_equal(before.X, after.X)
    assert verify(moved / cache_file.name) == []


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
    with pytest.raises(
        StageInputError, match=r"not found; pass a cache file .* or run"
    ):
        read_info(tmp_path / "missing.h5")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(
        CacheCorruptError, match=r"garbage.h5 is not an HDF5 file .* Delete it"
    ):
        read_info(garbage)
    # Not a cache at all (a config passed by mistake): nothing to delete.
    with pytest.raises(StageInputError, match=r"conf.toml is not a code cache"):
        read_info(garbage.rename(tmp_path / "conf.toml"))
    with pytest.raises(StageInputError, match=r"code cache .* is a folder, not a file"):
        read_info(tmp_path)


def test_open_refuses_other_format_versions(cache_file: Path) -> None:
    with h5py.File(cache_file, "r+") as h5:
        h5.attrs["format_version"] = 99
    with pytest.raises(CacheMismatchError, match="format version 99"):
        load_codes(cache_file)


def test_old_format_cache_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A version 1 cache (codes copied into the file) names the fix: re-extract."""
    old = tmp_path / "codes-0123456789abcdef.h5"
    with h5py.File(old, "w") as h5:
        h5.attrs.update({"format": "quadrant-codes", "format_version": 1})
        h5.attrs["complete"] = True
        h5["codes/top/none"] = np.zeros((2, 3), np.float32)
    with pytest.raises(
        CacheMismatchError,
        match=r"format version 1; this quadrant reads version 2 .*Fix: re-extract: "
        r"run `quadrant extract`",
    ):
        load_codes(old)
    assert "format version 1" in verify(old)[0]


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
        ok = np.array([True, False, True, True])
        store.write(0, {"top/none": np.ones((4, 3))}, ok, ["", "truncated", "", ""])
        assert store.committed() == {0: {1: "truncated"}}
        assert store.committed([1, 2]) == {}
    with _store(tmp_path) as store:
        codes, flags, reasons = store.read(0)
        assert codes["top/none"].shape == (4, 3) and list(flags) == list(ok)
        assert reasons[1] == "truncated"
    with _store(tmp_path, shard_rows=5) as store:  # other settings: start over
        assert store.committed() == {}


def test_shard_store_drops_unreadable_shards(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        store.write(0, {"top/none": np.ones((4, 3))}, np.ones(4, bool), [""] * 4)
        store.write(1, {"top/none": np.ones((4, 3))}, np.ones(4, bool), [""] * 4)
        (store.parts / "shard-000000.h5").write_bytes(b"half an hdf5 file")
        (store.parts / "shard-000001.h5").replace(store.parts / "shard-000002.h5")
        assert store.committed() == {}
        assert not list(store.parts.glob("shard-*"))


def test_shard_store_owner_removes_temporaries_of_killed_writers(
    tmp_path: Path,
) -> None:
    with _store(tmp_path) as store:
        leftover = store.parts / ".shard-000001.h5.tmp-99999-0@another-machine"
        leftover.write_bytes(b"half a shard")
    with _store(tmp_path, owner=False):
        assert leftover.exists()  # a rank never tidies: its job may be writing
    with _store(tmp_path):
        assert not leftover.exists()


def test_shard_store_refuses_a_second_job_but_not_its_own_ranks(
    tmp_path: Path,
) -> None:
    with _store(tmp_path):
        with _store(tmp_path, owner=False) as rank1:  # same job, no lock taken
            rank1.write(1, {"top/none": np.ones((4, 3))}, np.ones(4, bool), [""] * 4)
        with pytest.raises(CacheLockedError, match="another quadrant job"):
            with _store(tmp_path):
                pass


def test_shard_store_of_a_rank_checks_the_manifest(tmp_path: Path) -> None:
    with _store(tmp_path):
        with pytest.raises(CacheMismatchError, match="ranks of this job disagree"):
            with _store(tmp_path, owner=False, shard_rows=5):
                pass


def _linked_cache(tmp_path: Path, failures: dict[int, str]) -> tuple[Path, np.ndarray]:
    """A finished cache of 10 random rows in 3 shards (4, 4, 2 rows)."""
    codes = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    table = ImageTable(
        paths=[f"c/{i}.png" for i in range(10)],
        labels=np.zeros(10, np.int64),
        splits=["train"] * 10,
        row_image=np.arange(10, dtype=np.int64),
        row_view=np.zeros(10, np.int16),
    )
    with _store(tmp_path) as store:
        for shard in range(store.n_shards):
            rows = store.rows(shard)
            ok = np.array([r not in failures for r in rows])
            reasons = [failures.get(r, "") for r in rows]
            store.write(shard, {"top/none": codes[rows.start : rows.stop]}, ok, reasons)
        write_index(store, table, skipped=[], attrs={"listing": "{}"})
        final = finish(
            store,
            tmp_path / "c.h5",
            table=table,
            failures=failures,
            provenance={},
            environment={},
            label_names=["c"],
            data_root=str(tmp_path),
        )
    return final, codes


def test_finishing_links_every_kept_row_of_every_shard(tmp_path: Path) -> None:
    """Rows of failed images drop out of the links (mid-shard and at a shard's
    end), and the linked codes equal the shards' rows in order."""
    failures = {1: "truncated", 7: "not an image", 9: "empty"}
    final, codes = _linked_cache(tmp_path, failures)
    kept = [r for r in range(10) if r not in failures]
    with h5py.File(final, "r") as h5:
        linked = h5["codes/top/none"]
        assert linked.is_virtual and len(linked.virtual_sources()) == 4
        np.testing.assert_array_equal(linked[:], codes[kept])
        assert linked.attrs["layer"] == "top"
        assert linked.attrs["pooling"] == "none"
        assert list(h5["images/path"].asstr()[:]) == [f"c/{r}.png" for r in kept]
        skipped = h5["skipped/path"].asstr()[:], h5["skipped/reason"].asstr()[:]
        assert dict(zip(*skipped, strict=True))["c/7.png"] == "not an image"
    assert verify(final) == []


def test_a_missing_shard_reads_as_nan_and_fails_verify(tmp_path: Path) -> None:
    final, codes = _linked_cache(tmp_path, {})
    (tmp_path / "c.parts" / "shard-000001.h5").unlink()
    with h5py.File(final, "r") as h5:
        linked = h5["codes/top/none"][:]
    assert np.isnan(linked[4:8]).all()
    np.testing.assert_array_equal(linked[[0, 1, 2, 3, 8, 9]], codes[[0, 1, 2, 3, 8, 9]])
    assert verify(final)  # names the missing shard
