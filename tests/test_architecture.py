"""The layering docs/architecture.md promises, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            # `from package import module` reaches past the door too.
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _sources(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((REPO / f).rglob("*.py"))]


def test_features_never_imports_pipeline() -> None:
    for path in _sources("features"):
        bad = [m for m in _imports(path) if m.split(".")[0] == "pipeline"]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_packages_are_entered_through_their_door() -> None:
    doors = ("features.backbones", "pipeline.advisor", "pipeline.finetune")
    for path in _sources("features", "pipeline"):
        inside = path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
        for module in _imports(path):
            for door in doors:
                folder = REPO / door.replace(".", "/")
                past = module.startswith(door + ".") and (
                    (folder / f"{module.split('.')[2]}.py").exists()
                )
                if past and not inside.startswith(door):
                    # NOTE: report.py reads the advice record's case names,
                    # a data-only module, without the advisor stage.
                    allowed = module.startswith("pipeline.advisor.record")
                    assert allowed, f"{inside} imports {module} past {door}"


def test_every_package_declares_its_public_names() -> None:
    for init in (REPO / "features").rglob("__init__.py"):
        assert "__all__" in init.read_text(encoding="utf-8"), init
    for init in (REPO / "pipeline").rglob("__init__.py"):
        assert "__all__" in init.read_text(encoding="utf-8"), init
