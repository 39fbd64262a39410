from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from features.data import _manifest_path, _real_paths, discover
from features.errors import DataError, StageInputError
from tests.conftest import write_png


def test_discover_class_folders_splits_each_class(image_folder: Path) -> None:
    images = discover(image_folder, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert images.label_names == ("cat", "dog")
    counts = images.counts()
    assert dict(counts["train"]) == {"cat": 7, "dog": 7}
    assert dict(counts["val"]) == {"cat": 1, "dog": 1}
    assert dict(counts["test"]) == {"cat": 2, "dog": 2}
    assert [r.path for r in images.records] == sorted(r.path for r in images.records)
    assert images.skipped == ()


def test_discover_split_is_seeded(image_folder: Path) -> None:
    a = discover(image_folder, seed=0)
    b = discover(image_folder, seed=0)
    c = discover(image_folder, seed=1)
    assert a.records == b.records
    assert a.records != c.records


def test_discover_split_folders_carve_missing_val_from_train(tmp_path: Path) -> None:
    for split, n in (("train", 10), ("test", 3)):
        for name in ("a", "b"):
            for i in range(n):
                write_png(tmp_path / split / name / f"{i}.png", seed=i)
    images = discover(tmp_path, val_fraction=0.2, test_fraction=0.5, seed=0)
    counts = images.counts()
    assert dict(counts["test"]) == {"a": 3, "b": 3}  # given, not carved
    assert dict(counts["val"]) == {"a": 2, "b": 2}
    assert dict(counts["train"]) == {"a": 8, "b": 8}


def test_discover_csv_manifest(tmp_path: Path) -> None:
    for i in range(4):
        write_png(tmp_path / "img" / f"{i}.png", seed=i)
    manifest = tmp_path / "labels.csv"
    manifest.write_text(
        "path,label,split\nimg/0.png,x,train\nimg/1.png,y,train\n"
        "img/2.png,x,test\nimg/3.png,y,validation\n"
    )
    images = discover(manifest, val_fraction=0.5, test_fraction=0.5)
    assert images.label_names == ("x", "y")
    assert {(r.path, r.split) for r in images.records} == {
        ("img/0.png", "train"),
        ("img/1.png", "train"),
        ("img/2.png", "test"),
        ("img/3.png", "val"),
    }
    assert images.absolute(images.records[0]) == tmp_path / "img" / "0.png"


def test_discover_reports_bad_files_and_keeps_going(image_folder: Path) -> None:
    (image_folder / "cat" / "notes.txt").write_text("not an image")
    (image_folder / "cat" / "empty.png").write_bytes(b"")
    (image_folder / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (image_folder / "dog" / ".DS_Store").write_bytes(b"\x00\x01")
    (image_folder / "stray.png").write_bytes(
        (image_folder / "cat" / "00.png").read_bytes()
    )
    images = discover(image_folder, val_fraction=0, test_fraction=0)
    reasons = {s.path: s.reason for s in images.skipped}
    assert set(reasons) == {
        "cat/notes.txt",
        "cat/empty.png",
        "dog/broken.jpg",
        "stray.png",
    }
    assert "not an image" in reasons["cat/notes.txt"]
    assert "empty" in reasons["cat/empty.png"]
    assert reasons["stray.png"] == "not inside a class folder"
    assert len(images) == 20


def test_discover_refuses_decompression_bombs(image_folder: Path) -> None:
    write_png(image_folder / "cat" / "big.png", seed=1, size=64)
    images = discover(image_folder, max_pixels=32 * 32, val_fraction=0, test_fraction=0)
    [skipped] = images.skipped
    assert skipped.path == "cat/big.png"
    assert "data.max_pixels" in skipped.reason


BAD_LAYOUTS = [
    ("missing", StageInputError, r"data.root .*missing not found.*quadrant demo-data"),
    ("no-classes", DataError, r"has no class folders \(it holds files but no class"),
    ("empty-class", DataError, r"class 'b' has no images .*add images or remove"),
    (
        "too-few",
        DataError,
        r"class 'a' has 2 usable image\(s\).*needs >= 3.*val_fraction",
    ),
    (
        "all-bad",
        DataError,
        r"no readable images under .*: all 1 listed files were skipped; fix or "
        r"remove these files:\n  a/1.png: not an image",
    ),
    (
        "many-bad",
        DataError,
        r"(?s)all 7 listed files were skipped.*\n  a/4\.png: [^\n]*\n  \.\.\. and 2 "
        r"more \(all are in the log\)$",
    ),
    (
        "unreadable-class",
        DataError,
        r"cannot list the folder .*/b \(Permission denied\); give the user "
        r"running quadrant read access to it \(chmod -R u\+rX",
    ),
    ("test-only", DataError, r"class 'z' has test images but no training images"),
    ("no-train", DataError, r"split folders \['test'\] but no train/"),
    ("mixed", DataError, r"mixes split folders with other folders \['extra'\]"),
]


def _layout(root: Path, kind: str) -> Path:
    if kind == "missing":
        return root / "missing"
    if kind == "no-classes":
        write_png(root / "x.png", seed=0)
    if kind == "empty-class":
        write_png(root / "a" / "1.png", seed=0)
        (root / "b").mkdir()
    if kind == "too-few":
        for i in range(2):
            write_png(root / "a" / f"{i}.png", seed=i)
    if kind == "all-bad":
        (root / "a").mkdir()
        (root / "a" / "1.png").write_bytes(b"nope")
    if kind == "many-bad":
        (root / "a").mkdir()
        for i in range(7):
            (root / "a" / f"{i}.png").write_bytes(b"nope")
    if kind == "unreadable-class":
        write_png(root / "a" / "1.png", seed=0)
        (root / "b").mkdir()
        (root / "b" / "1.png").write_bytes(b"unreadable: see the test")
    if kind == "test-only":
        for i in range(3):
            write_png(root / "train" / "a" / f"{i}.png", seed=i)
        write_png(root / "test" / "z" / "1.png", seed=9)
    if kind == "no-train":
        write_png(root / "test" / "a" / "1.png", seed=0)
    if kind == "mixed":
        write_png(root / "train" / "a" / "1.png", seed=0)
        write_png(root / "extra" / "a" / "1.png", seed=0)
    return root


@pytest.mark.parametrize("kind, error, pattern", BAD_LAYOUTS)
def test_discover_rejects_bad_layouts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    error: type[Exception],
    pattern: str,
) -> None:
    # NOTE: chmod 000 stops no root user (CI and this sandbox run as root):
    # the folder's listing fails as it would for anyone else.
    walk = os.walk

    def denied(top: str, **kwargs: Any) -> Iterator[Any]:
        if Path(top).name == "b" and kind == "unreadable-class":
            kwargs["onerror"](PermissionError(13, "Permission denied", str(top)))
        return walk(top, **kwargs)

    monkeypatch.setattr(os, "walk", denied)
    with pytest.raises(error, match=pattern):
        discover(_layout(tmp_path, kind), val_fraction=0.1, test_fraction=0.2)


BAD_MANIFESTS = [
    ("a,b\n1,2\n", r"needs a header row with columns path,label"),
    ("path,label\n", r"lists no images"),
    ("path,label,split\nx.png,a,holdout\n", r"line 2: split 'holdout' is not one of"),
    ("path,label\n,a\n", r"line 2: path and label must not be empty"),
    (
        "path,label\nx.png,a\ny,z.png,b\n",
        r"m.csv line 3 has 3 cells, the header 2 \(path,label\); quote a path",
    ),
    (
        "path,label\nimages/x.png,a\nimages/y.png,b\n",
        r"all 2 listed files were skipped; a manifest's paths are relative to the "
        r"CSV's own folder, .*: rewrite them relative to it, or make them absolute:"
        r"\n  images/x.png: file not found",
    ),
]


@pytest.mark.parametrize("text, pattern", BAD_MANIFESTS)
def test_discover_rejects_bad_manifests(
    tmp_path: Path, text: str, pattern: str
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(DataError, match=pattern):
        discover(manifest)


def test_fingerprint_changes_when_any_image_changes(image_folder: Path) -> None:
    def fp() -> str:
        return discover(image_folder).fingerprint

    base = fp()
    assert fp() == base
    target = image_folder / "cat" / "03.png"
    stat = target.stat()
    write_png(target, seed=999)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    modified = fp()
    assert modified != base
    write_png(image_folder / "dog" / "new.png", seed=5)
    added = fp()
    assert added not in (base, modified)
    (image_folder / "dog" / "new.png").unlink()
    (image_folder / "dog" / "00.png").unlink()
    assert fp() not in (base, modified, added)


def test_content_fingerprint_ignores_mtime_but_not_bytes(image_folder: Path) -> None:
    base = discover(image_folder, fingerprint="content").fingerprint
    os.utime(image_folder / "cat" / "01.png", ns=(1, 1))
    assert discover(image_folder, fingerprint="content").fingerprint == base
    write_png(image_folder / "cat" / "01.png", seed=1234)
    assert discover(image_folder, fingerprint="content").fingerprint != base


def test_a_symlink_loop_visits_each_folder_once(image_folder: Path) -> None:
    (image_folder / "cat" / "loop").symlink_to(image_folder / "cat")
    (image_folder / "dog" / "a" / "b").parent.mkdir()
    (image_folder / "dog" / "a" / "up").symlink_to(image_folder / "dog")
    images = discover(image_folder, seed=0)
    assert len(images) == 20  # not 12 -> 492, as with os.walk(followlinks) alone
    real = [os.path.realpath(images.absolute(r)) for r in images.records]
    assert len(set(real)) == len(real)  # no file twice, so none in two splits


def test_a_linked_folder_of_another_class_is_refused(image_folder: Path) -> None:
    (image_folder / "dog" / "cats").symlink_to(image_folder / "cat")
    with pytest.raises(
        DataError, match=r"listed 2 times with different labels or splits"
    ):
        discover(image_folder)


def test_manifest_duplicates_are_dropped_and_conflicts_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(4):
        write_png(tmp_path / "img" / f"{i}.png", seed=i)
    rows = "img/0.png,x\nimg/1.png,x\nimg/2.png,y\nimg/3.png,y\n"
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n" + rows + "img/0.png,x\n")
    images = discover(manifest, val_fraction=0.0, test_fraction=0.0)
    assert len(images) == 4
    assert "line 6 repeats an earlier row; dropped" in caplog.text

    manifest.write_text("path,label\n" + rows + "img/0.png,y\n")
    with pytest.raises(
        DataError, match=r"lists img/0.png on lines \[2, 6\] with different labels"
    ):
        discover(manifest)
    manifest.write_text("path,label,split\nimg/0.png,x,train\nimg/0.png,x,test\n")
    with pytest.raises(DataError, match="one label and one split"):
        discover(manifest)
    manifest.write_text("path,label\nimg/0.png,x\n./img/../img/0.png,y\n")
    with pytest.raises(DataError, match="listed 2 times with different labels"):
        discover(manifest)


@pytest.mark.parametrize(
    "text",
    [
        "img/0.png",
        "./img/0.png",
        "img//0.png",
        "img/./0.png",
        "img/0.png/",
        "img/.",
        ".",
        "img/../img/0.png",
        "/abs/img/0.png",
        ".hidden/0.png",
        "img/..png",
        "a b/ç.png",
    ],
)
def test_manifest_paths_are_spelled_as_path_spells_them(text: str) -> None:
    """The fast path for plain manifest paths agrees with Path() on every form."""
    path = Path(text)
    assert _manifest_path(text) == (
        path.as_posix() if not path.is_absolute() else str(path)
    )


def test_folder_listing_resolves_links_like_realpath(tmp_path: Path) -> None:
    real = tmp_path / "real"
    for name in ("a.png", "b.png"):
        write_png(real / name, seed=1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "folder").symlink_to(real)
    (tmp_path / "data" / "file.png").symlink_to(real / "b.png")
    write_png(tmp_path / "data" / "plain.png", seed=2)
    resolve = _real_paths(str(tmp_path / "data"))
    for relative in ("folder/a.png", "file.png", "plain.png", "folder/b.png"):
        assert resolve(relative) == os.path.realpath(tmp_path / "data" / relative)


def test_manifest_rows_of_every_form_load_as_written(tmp_path: Path) -> None:
    """Short rows, split aliases, absolute paths and '..' all take the right path."""
    for i in range(6):
        write_png(tmp_path / "img" / f"{i}.png", seed=i)
    absolute = tmp_path / "img" / "5.png"
    manifest = tmp_path / "labels.csv"
    manifest.write_text(
        "path,label,split\n"
        "img/0.png,x,Training\nimg/1.png,x\nimg/2.png,x,VALID\n"
        "img/3.png,y,train\nimg/../img/4.png,y,\n"
        f"{absolute},y,test\n"
    )
    images = discover(manifest, val_fraction=0.0, test_fraction=0.0)
    got = {r.path: (images.label_names[r.label], r.split) for r in images.records}
    assert got == {
        "img/0.png": ("x", "train"),
        "img/1.png": ("x", "train"),
        "img/2.png": ("x", "val"),
        "img/3.png": ("y", "train"),
        "img/../img/4.png": ("y", "train"),
        str(absolute): ("y", "test"),
    }
    manifest.write_text("path,label,split\nimg/0.png,x,holdout\n")
    with pytest.raises(DataError, match=r"line 2: split 'holdout' is not one of"):
        discover(manifest)


def test_manifest_file_named_twice_by_absolute_and_relative_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(3):
        write_png(tmp_path / "img" / f"{i}.png", seed=i)
    absolute = tmp_path.resolve() / "img" / "0.png"
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"path,label\nimg/0.png,x\nimg/1.png,x\n{absolute},x\n")
    images = discover(manifest, val_fraction=0.0, test_fraction=0.0)
    assert len(images) == 2  # one of the two spellings of img/0.png
    assert f"{absolute} is reached 2 times (img/0.png, {absolute})" in caplog.text
    manifest.write_text(f"path,label\nimg/0.png,x\nimg/1.png,x\n{absolute},y\n")
    with pytest.raises(DataError, match=rf"{absolute} is listed 2 times"):
        discover(manifest)


def test_fingerprint_is_the_digest_of_one_line_per_file(tmp_path: Path) -> None:
    """Blocked hashing and the stat fast path give the documented digest, so
    caches keyed on fingerprints of earlier versions stay valid."""
    for i in range(3):
        write_png(tmp_path / "img" / f"{i}.png", seed=i)
    absolute = tmp_path.resolve() / "img" / "2.png"
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"path,label\nimg/0.png,a\nimg/1.png,b\n{absolute},b\n")
    images = discover(manifest, val_fraction=0.0, test_fraction=0.0)
    expected = hashlib.sha256(b"stat\n")
    for r in sorted(images.records, key=lambda r: r.path):
        stat = os.stat(images.base / r.path)
        name = images.label_names[r.label]
        line = f"{r.path}\t{name}\t{r.split}\t{stat.st_size}:{stat.st_mtime_ns}\n"
        expected.update(line.encode())
    assert images.fingerprint == expected.hexdigest()


def test_listing_restores_the_garbage_collector(tmp_path: Path) -> None:
    assert gc.isenabled()
    with pytest.raises(DataError):
        discover(tmp_path)  # no class folders
    assert gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(DataError):
            discover(tmp_path)
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()
