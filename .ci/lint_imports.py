"""Run import-linter's contracts (``[tool.importlinter]`` in pyproject.toml) on the package as
a wheel lays it out.

Why a view: ``client/``, ``models/``, ``training/``, ``export/``, ``model_repository/`` and
``loadtests/`` are sub-packages of ``marrowdx`` that live beside ``src/`` (setuptools'
``package-dir``), and grimp, which import-linter builds its graph with, finds a package's
modules by walking the package's one folder: it would see only ``src/marrowdx``. The view
copies each mapped folder's Python files to its place in the package (the mapping is read
from pyproject.toml, its one source) in a temporary folder that goes first on PYTHONPATH.

``python .ci/lint_imports.py [--root DIR]`` exits with lint-imports' status.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dirs(root: Path) -> dict[str, Path]:
    """Import package -> its folder, from ``[tool.setuptools] package-dir``."""
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = meta["tool"]["setuptools"]["package-dir"]
    return {name: root / folder for name, folder in mapping.items()}


def build_view(root: Path, dest: Path) -> Path:
    """Copy every mapped package's ``.py`` files under ``dest`` at their import paths."""
    # parents first, so a sub-package's folder replaces nothing its parent copied
    for name, folder in sorted(package_dirs(root).items(), key=lambda kv: kv[0].count(".")):
        target = dest.joinpath(*name.split("."))
        for path in folder.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            out = target / path.relative_to(folder)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
    return dest


def lint_imports(root: Path = ROOT, *extra: str) -> subprocess.CompletedProcess[str]:
    """lint-imports over a fresh view of ``root``; its output is in the result."""
    with tempfile.TemporaryDirectory(prefix="marrowdx-layers-") as tmp:
        view = build_view(root, Path(tmp))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(view), str(root)])}
        exe = Path(sys.executable).with_name("lint-imports")
        command = [str(exe), "--no-cache", str(root / "pyproject.toml"), *extra]
        return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to check")
    args = parser.parse_args(argv)
    done = lint_imports(args.root.resolve())
    print(done.stdout, end="")
    print(done.stderr, end="", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
