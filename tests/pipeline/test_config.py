from __future__ import annotations

from pathlib import Path

import pytest

from features.errors import ConfigError
from pipeline.config import (
    Config,
    ExtractConfig,
    config_to_dict,
    dump_toml,
    load_config,
)
from pipeline.demo import demo_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf.toml"
    path.write_text(text)
    return path


BAD = [
    (
        "[extract]\nbatchsize = 8\n",
        r"\[extract\] unknown key\(s\) \['batchsize'\]; valid: ",
    ),
    ("[extract]\nbatch_size = 0\n", r"\[extract\] batch_size must be > 0, got 0"),
    (
        "[extract]\nbatch_size = '8'\n",
        r"\[extract\] batch_size must be an integer, got '8'",
    ),
    ("[extract]\nbatch_size = true\n", r"batch_size must be an integer, got True"),
    ("[extract]\ndevice = 'gpu'\n", r"device = 'gpu' is not one of auto, cpu, cuda"),
    (
        "[extract]\npooling = 'mean'\n",
        r"pooling: 'mean' is not a pooling; use avg, max",
    ),
    ("[extract]\npooling = 'grid:0'\n", r"'grid:0' is not a pooling"),
    ("[extract]\nprecision = 'fp8'\n", r"precision = 'fp8' is not one of"),
    ("[extract]\nlayers = []\n", r"layers must name at least one layer"),
    ("[extract]\nlayers = ['top', 'top']\n", r"layers has duplicates"),
    ("[extract]\nviews = 0\n", r"views must be >= 1"),
    ("[extract]\ndtype = 'float64'\n", r"dtype = 'float64' is not one of"),
    ("[data]\nval_fraction = 1.5\n", r"\[data\] val_fraction must be in \[0, 1\)"),
    ("[data]\nval_fraction = 0.5\ntest_fraction = 0.5\n", r"must leave images for"),
    ("[data]\nbackground = [0, 0]\n", r"background must be three integers"),
    ("[data]\ndecode = 'draft'\n", r"\[data\] decode = 'draft' is not one of"),
    ("[extract]\ndecoder = 'gpu'\n", r"\[extract\] decoder = 'gpu' is not one of"),
    ("[extract]\nthreads = 0\n", r"\[extract\] threads must be -1 .* or >= 1"),
    ("[extract]\nengine = 'tvm'\n", r"\[extract\] engine = 'tvm' is not one of"),
    ("[data]\nroot = 3\n", r"\[data\] root must be a path string, got 3"),
    ("[backbone]\nname = 'resnet5'\n", r"name = 'resnet5' is not a known backbone"),
    ("[backbone]\nmean = [0.5]\n", r"mean must have 3 values"),
    ("[backbone]\ninput_size = 4\n", r"input_size must be >= 8"),
    (
        "[backbone]\nname = 'vit_b_16'\ninput_size = 32\n",
        r"\[backbone\] input_size: vit_b_16 takes only 224x224 inputs .* set it to 224",
    ),
    (
        "[backbone]\nname = 'vit_b_16'\n[finetune]\ninput_size = 64\n",
        r"\[finetune\] input_size: vit_b_16 takes only 224x224 inputs",
    ),
    (
        "[train]\nn_jobs = 0\n",
        r"\[train\] n_jobs must be a number of parallel jobs.*0 runs nothing, got 0",
    ),
    ("[run]\nstrategy = 'best'\n", r"strategy = 'best' is not one of"),
    (
        "[run]\nseed = -1\n",
        r"\[run\] seed must be an integer in 0\.\.4294967295, got -1",
    ),
    ("[data]\nseed = 4294967296\n", r"\[data\] seed must be an integer in 0\.\."),
    ("[run]\nmodel = 'best'\n", r"model = 'best' is not one of \['latest', 'codes'"),
    ("[trian]\nepochs = 1\n", r"unknown section\(s\) \['trian'\]; valid: "),
    (
        "[advise]\nlarge_per_class = 500\n",
        r"large_per_class is retired: the advisor measures size with a pilot",
    ),
    ("[advise]\ncv_folds = 1\n", r"\[advise\] cv_folds must be >= 2, got 1"),
    ("[advise]\ncv_repeats = 0\n", r"\[advise\] cv_repeats must be >= 1, got 0"),
    ("[advise]\nconfidence = 1.0\n", r"confidence must be in \[0.5, 1\), got 1.0"),
    ("[advise]\npilot_share = 0\n", r"pilot_share must be in \(0, 1\]"),
    ("[advise]\npilot_points = 1\n", r"pilot_points must be >= 2, got 1"),
    ("[advise]\nsmall_per_class = -1\n", r"small_per_class must be >= 0, got -1"),
    ("extract = 3\n", r"extract must be a table"),
    ("[extract\n", r"is not valid TOML"),
]


@pytest.mark.parametrize("text, pattern", BAD)
def test_load_config_rejects_bad_values(
    tmp_path: Path, text: str, pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, text))


def test_load_config_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.toml not found; pass -c PATH"):
        load_config(tmp_path / "nope.toml")


def test_load_config_resolves_relative_paths_against_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "project"
    sub.mkdir()
    cfg = load_config(
        write(sub, '[data]\nroot = "imgs"\n[run]\nout = "out"\n'), cwd=tmp_path
    )
    assert cfg.data.root == sub / "imgs"
    assert cfg.run.out == sub / "out"
    assert cfg.cache_dir == sub / "out" / "cache"


def test_load_config_overrides_use_toml_syntax_and_bare_strings(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "extract.batch_size=128",
            'extract.layers=["top", "layer3"]',
            "extract.pooling=avg+max",
            "backbone.name=resnet18",
            "run.progress=false",
            "data.root=rel/imgs",
        ],
        cwd=tmp_path,
    )
    assert cfg.extract.batch_size == 128
    assert cfg.extract.layers == ("top", "layer3")
    assert cfg.extract.pooling == ("avg+max",)
    assert cfg.backbone.name == "resnet18"
    assert cfg.run.progress is False
    # Paths typed on the command line are relative to the shell's folder.
    assert cfg.data.root == tmp_path / "rel" / "imgs"


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("extract.batch_size", r"must look like section.key=value"),
        ("batch_size=3", r"must look like section.key=value"),
        ("extrct.batch_size=3", r"unknown section 'extrct'"),
        ("extract.bs=3", r"unknown key\(s\) \['bs'\]"),
    ],
)
def test_load_config_rejects_bad_overrides(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_config_dataclasses_are_frozen() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.extract.batch_size = 3  # type: ignore[misc]


def test_config_round_trips_through_dump_toml(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "extract.layers=['top', 'layer2']",
            "backbone.name=resnet18",
            "backbone.mean=[0.5, 0.5, 0.5]",
        ],
        cwd=tmp_path,
    )
    path = tmp_path / "copy.toml"
    path.write_text(dump_toml(config_to_dict(cfg)))
    again = load_config(path, cwd=tmp_path)
    assert config_to_dict(again) == config_to_dict(cfg)


def test_repo_conf_toml_is_the_demo_config() -> None:
    # conf.toml documents the demo; `quadrant demo` must run exactly it.
    from_file = load_config(REPO / "conf.toml")
    assert config_to_dict(from_file) == config_to_dict(demo_config(cwd=REPO))


def test_the_starter_conf_toml_in_the_wheel_is_the_repos() -> None:
    # `quadrant init` writes the packaged copy; the two must not drift apart.
    packaged = REPO / "pipeline" / "templates" / "conf.toml"
    assert packaged.read_bytes() == (REPO / "conf.toml").read_bytes()


def test_extract_config_defaults_are_valid() -> None:
    assert ExtractConfig().layers == ("top",)


def test_every_config_key_is_documented() -> None:
    from dataclasses import fields

    from pipeline.config import SECTIONS

    doc = (REPO / "docs" / "configuration.md").read_text()
    for section, cls in SECTIONS.items():
        assert f"## [{section}]" in doc
        part = doc.split(f"## [{section}]")[1].split("\n## ")[0]
        for f in fields(cls):
            assert f"`{f.name}`" in part, f"[{section}] {f.name} is not documented"


def test_config_without_a_timm_backbone_never_imports_timm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # any `import timm` fails
    assert load_config(None, ["backbone.name=resnet18"]).backbone.name == "resnet18"


def _every_key() -> list[tuple[str, str, object]]:
    """(section, key, bad value) for every key: a wrong type, and for a key
    with a declared limit also the value that limit refuses."""
    from dataclasses import fields

    from pipeline.config import SECTIONS

    cases: list[tuple[str, str, object]] = []
    for section, cls in SECTIONS.items():
        limits = getattr(cls, "LIMITS", {})
        for f in fields(cls):
            cases.append((section, f.name, {"x": 1}))  # no key takes a table
            if f.name in limits:
                cases.append((section, f.name, limits[f.name].invalid()))
    return cases


@pytest.mark.parametrize("section, key, value", _every_key())
def test_every_key_of_every_section_refuses_a_bad_value(
    tmp_path: Path, section: str, key: str, value: object
) -> None:
    if isinstance(value, dict):
        text = f"[{section}]\n{key} = {{x = 1}}\n"
    else:
        shown = list(value) if isinstance(value, tuple) else value
        text = dump_toml({section: {key: shown}})
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"[{section}] {key}"), message
    bad = value if not isinstance(value, tuple) else value[0]
    assert repr(bad) in message or str(bad) in message, message
