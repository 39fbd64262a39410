from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from pipeline.cli import main
from tests.conftest import TINY


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture
def project(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A folder with a conf.toml for the tiny backbone, as the working folder."""
    conf = tmp_path / "conf.toml"
    conf.write_text(
        f'[data]\nroot = "{image_folder.name}"\n[run]\nout = "run"\nprogress = false\n'
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_extract_then_cache_info_and_verify(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["extract", *sets(*TINY)]) == 0
    out = capsys.readouterr().out
    assert "codes: " in out and "top/none" in out and "512 dims" in out
    [cache] = (project / "run" / "cache").glob("codes-*.h5")
    assert (project / "run" / "config.toml").is_file()
    assert "extract" in (project / "run" / "quadrant.log").read_text()

    assert main(["extract", *sets(*TINY)]) == 0
    assert "reused (no forward pass" in capsys.readouterr().out

    assert main(["cache", "info", str(cache)]) == 0
    info = capsys.readouterr().out
    assert (
        "backbone: resnet18 weights=random" in info and "codes/top/none: 20x512" in info
    )

    assert main(["cache", "verify", str(cache)]) == 0
    assert "OK (structure and checksums verified)" in capsys.readouterr().out
    with h5py.File(cache, "r+") as h5:
        h5["codes/top/none"][0, 0] += 1
    assert main(["cache", "verify", str(cache)]) == 1
    err = capsys.readouterr().err
    assert "failed verification" in err and "checksum mismatch" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["extract", "--set", "extract.batch_size=0"], "batch_size must be > 0"),
        (["extract", "--set", "extract.nope=1"], "unknown key(s) ['nope']"),
        (["extract", "-c", "missing.toml"], "missing.toml not found"),
        (["extract", *sets(*TINY), "--set", "data.root='absent'"], "absent not found"),
        (
            ["extract", *sets(*TINY, "extract.layers=['layer9']")],
            "layer 'layer9' is not in",
        ),
        (["cache", "info", "nothing.h5"], "nothing.h5 not found"),
        (["demo-data", "mnist", "out"], "mnist"),
    ],
)
def test_user_errors_exit_1_with_a_message_and_no_traceback(
    project: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"quadrant {argv[0]}: error: ")
    assert message in err
    assert "Traceback" not in err


def test_missing_conf_toml_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["extract"]) == 1
    assert "no conf.toml in" in capsys.readouterr().err


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as err:
        main(["no-such-command"])
    assert err.value.code == 2


def test_layers_lists_names_shapes_and_top(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["layers", "resnet18", "--set", "backbone.input_size=64"]) == 0
    out = capsys.readouterr().out
    assert "resnet18 at 64x64" in out
    assert "layer3" in out and "256x4x4" in out
    assert "flatten" in out and "<- top" in out
    assert main(["layers", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "efficientnet_lite0" in listed.split()
    assert "timm/<model>[.<pretrained tag>]" in listed


def test_layers_of_a_timm_vit_mark_its_blocks_and_top(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["layers", "timm/vit_tiny_patch16_224", "--set", "backbone.input_size=32"]
    args += ["--set", "extract.pooling=['cls+patch_avg']"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "timm/vit_tiny_patch16_224 at 32x32" in out
    assert re.search(r"blocks\.11 +5x192 +384  stage, stride 16", out)
    assert re.search(r"fc_norm +192 +192  <- top", out)


def test_demo_data_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo-data", "digits", str(tmp_path / "d")]) == 0
    assert "wrote 1797 images of digits" in capsys.readouterr().out
    assert len(list((tmp_path / "d" / "3").glob("*.png"))) == 183


def test_python_dash_m_pipeline_is_the_same_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "cache", "info", str(tmp_path / "x.h5")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert (
        "quadrant cache: error:" in result.stderr and "Traceback" not in result.stderr
    )


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_nothing_heavy(flag: str) -> None:
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        f"try: main([{flag!r}])\n"
        "except SystemExit: pass\n"
        "heavy = ('torch', 'torchvision', 'sklearn', 'numpy', 'h5py', 'PIL', 'onnx')\n"
        "print('LOADED', sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "LOADED []" in done.stdout
    if flag == "--version":
        from pipeline import __version__

        assert f"quadrant {__version__}" in done.stdout


def test_init_writes_the_starter_conf_toml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = Path(__file__).resolve().parents[2]
    assert main(["init", str(tmp_path / "new")]) == 0
    written = tmp_path / "new" / "conf.toml"
    assert written.read_bytes() == (repo / "conf.toml").read_bytes()
    assert f"wrote {written}" in capsys.readouterr().out
    assert main(["init", str(tmp_path / "new")]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "new"), "--force"]) == 0


def test_missing_conf_toml_points_to_init(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 1
    assert "run `quadrant init` to write a starter one here" in capsys.readouterr().err
