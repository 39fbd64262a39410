"""The one writer: whole files or none, leftovers cleaned, clear errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from features.atomic import (
    atomic_open,
    check_output_file,
    check_writable,
    remove_stale,
    staged_folder,
    write_csv,
    write_json,
)
from features.errors import OutputError

DEAD = 2**22 + 4321  # above Linux's default pid_max: never a live process


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_file_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write('{"a": ')
        raise RuntimeError("killed halfway")
    assert target.read_text() == '{\n  "a": 1\n}\n'  # the old file, untouched
    assert hidden(tmp_path) == []  # the temporary went with the error


def test_csv_files_have_lf_line_ends(tmp_path: Path) -> None:
    write_csv(tmp_path / "t.csv", ["a", "b"], [[1, "x,y"], [2, "z"]])
    assert (tmp_path / "t.csv").read_bytes() == b'a,b\n1,"x,y"\n2,z\n'


def test_a_folder_is_published_whole_and_replaces_the_old_one(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with staged_folder(final) as folder:
        (folder / "a").write_text("1")
    with pytest.raises(RuntimeError), staged_folder(final) as folder:
        (folder / "a").write_text("2")
        raise RuntimeError("failed before the end")
    assert (final / "a").read_text() == "1" and hidden(tmp_path) == []
    with staged_folder(final) as folder:
        (folder / "b").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["b"]  # nothing stale kept


def test_leftovers_of_dead_processes_go_and_others_stay(tmp_path: Path) -> None:
    host = socket.gethostname()
    dead = tmp_path / f".x.onnx.tmp-{DEAD}-0@{host}"
    live = tmp_path / f".y.onnx.tmp-{os.getpid()}-0@{host}"
    remote = tmp_path / f".z.onnx.tmp-{DEAD}-0@another-host"
    for path in (dead, live, remote):
        path.write_bytes(b"partial")
    (tmp_path / "models").mkdir()
    aside = tmp_path / "models" / f".codes.old-{DEAD}-0@{host}"
    aside.mkdir()
    assert sorted(remove_stale(tmp_path)) == sorted([dead, aside])
    assert not dead.exists() and live.exists() and remote.exists()
    assert (tmp_path / "models" / "codes").is_dir()  # moved back into place


def test_outputs_in_the_way_are_named_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=r"file is a file, not a folder.*run.out"):
        check_writable(tmp_path / "file" / "run", setting="run.out")
    with pytest.raises(OutputError, match=r"it is a folder.*predictions.csv"):
        check_output_file(tmp_path)


@pytest.mark.skipif(
    subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True).returncode,
    reason="needs `unshare -r -m` to mount a small tmpfs",
)
def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]);"
        "from pathlib import Path; from features.atomic import write_bytes;"
        "from features.errors import OutputError\n"
        "try: write_bytes(Path(sys.argv[1]) / 'big.bin', bytes(200_000))\n"
        "except OutputError as err: print('ERROR', err)"
    )
    repo = Path(__file__).resolve().parents[2]
    script = (
        f"mount -t tmpfs -o size=100k tmpfs {disk} && "
        f'{sys.executable} -c "{code}" {disk} {repo}; ls -A {disk}; echo done'
    )
    out = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True
    ).stdout
    assert "ERROR cannot write" in out and "no space left on that disk" in out, out
    assert out.strip().endswith("the same command again: finished work is kept\ndone")
