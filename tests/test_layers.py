"""The layer contract (``[tool.importlinter]`` in pyproject.toml) holds, and breaks, naming the
import, when a module imports a layer above its own or closes a cycle."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("importlinter", reason="import-linter is in the dev extra")


def _lint_module():
    spec = importlib.util.spec_from_file_location("lint_imports", ROOT / ".ci" / "lint_imports.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


LINT = _lint_module()


def _copy_checkout(dest: Path) -> Path:
    """pyproject.toml and every mapped package's Python files, in the checkout's layout."""
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    for folder in LINT.package_dirs(ROOT).values():
        shutil.copytree(
            folder,
            dest / folder.relative_to(ROOT),
            ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.plan", "*.pt"),
            dirs_exist_ok=True,
        )
    return dest


def _plant(root: Path, relative: str, line: str) -> None:
    path = root / relative
    path.write_text(path.read_text() + f"\n{line}  # planted\n")


def test_the_tree_keeps_every_contract() -> None:
    done = LINT.lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_the_view_holds_every_mapped_package(tmp_path: Path) -> None:
    view = LINT.build_view(ROOT, tmp_path)
    for name in LINT.package_dirs(ROOT):
        assert (view.joinpath(*name.split(".")) / "__init__.py").exists(), name


def test_an_upward_import_breaks_the_layers_and_is_named(tmp_path: Path) -> None:
    root = _copy_checkout(tmp_path)
    _plant(root, "src/marrowdx/taxonomy.py", "from marrowdx.client import report")
    done = LINT.lint_imports(root)
    assert done.returncode != 0
    assert "marrowdx.taxonomy -> marrowdx.client.report" in done.stdout


def test_an_import_cycle_between_siblings_is_named(tmp_path: Path) -> None:
    root = _copy_checkout(tmp_path)
    # slides.tiling -> slides.merge closes a cycle only if merge imports tiling back
    _plant(root, "src/marrowdx/slides/merge.py", "from marrowdx.slides import tiling")
    _plant(root, "src/marrowdx/slides/tiling.py", "from marrowdx.slides import merge")
    done = LINT.lint_imports(root)
    assert done.returncode != 0
    assert "No cycles are allowed in marrowdx.slides" in done.stdout
