"""An installed wheel, with no checkout around it, builds the gpu repository and finds the
locustfile: the engine-build image installs the wheel and has nothing else.

The wheel is built from a copy of the sources (no build outputs land in the checkout) and
installed into a fresh virtual environment without network: ``--no-deps --no-index``, with
a ``.pth`` line that lends it this project's installed dependencies (numpy, onnx, locust...).
Every command then runs from a folder outside the checkout, and the test checks that
``marrowdx`` was imported from the new environment, not from the editable checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from marrowdx import config, contract
from tests.helpers import onnx_graphs

ROOT = config.project_root()
#: Never copied into the build: environments, caches and generated model artefacts.
NOT_SOURCES = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "__pycache__", "*.egg-info", ".pytest_cache",
    ".ruff_cache", "*.onnx", "*.plan", "*.pyc", "docs", "tests",
)  # fmt: skip
TIMEOUT_S = 300


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """(environment's bin folder, its environment variables, a folder outside the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    wheels = root / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--wheel-dir", str(wheels), str(src)],
        cwd=root,
    )  # fmt: skip
    (wheel,) = wheels.glob("marrowdx-*.whl")
    env_dir = root / "env"
    _run([sys._base_executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=root)
    bin_dir = env_dir / "bin"
    _run(
        [sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--quiet",
         "--no-deps", "--no-index", str(wheel)],
        cwd=root,
    )  # fmt: skip
    site = Path(
        _run(
            [
                str(bin_dir / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            cwd=root,
        ).stdout.strip()
    )
    # the dependencies only; this project's own editable finder is not activated by a path line
    (site / "project_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MARROWDX_", "PYTHON"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    outside = root / "elsewhere"
    outside.mkdir()
    return bin_dir, env, outside


def contract_sources() -> list[str]:
    """The hand-written files under model_repository/ (relative paths)."""
    repo = ROOT / "model_repository"
    return sorted(
        str(p.relative_to(repo))
        for p in repo.rglob("*")
        if p.is_file() and (p.suffix in (".pbtxt", ".py") or p.name == "README")
        and "__pycache__" not in p.parts
    )  # fmt: skip


def test_installed_package_builds_the_gpu_repository_outside_the_checkout(installed) -> None:
    bin_dir, env, outside = installed
    where = _run(
        [str(bin_dir / "python"), "-c", "import marrowdx, marrowdx.resources as r;"
         "print(marrowdx.__file__); print(r.model_repository_sources())"],
        cwd=outside, env=env,
    ).stdout.split()  # fmt: skip
    env_root = bin_dir.parent
    assert all(Path(p).is_relative_to(env_root) for p in where), where
    onnx_dir = outside / "onnx"
    onnx_graphs.write_all(onnx_dir)
    out = outside / "gpu_repository"
    _run(
        [str(bin_dir / "marrowdx"), "build", "--target", "gpu", "--out", str(out),
         "--onnx-dir", str(onnx_dir), "--work-dir", str(outside / "work")],
        cwd=outside, env=env,
    )  # fmt: skip
    m = config.MODELS
    assert (out / m.preprocess / "1" / "dali.py").is_file()
    assert (out / m.preprocess / "1" / "marrowdx_src" / "marrowdx" / "preprocess.py").is_file()
    for name in contract.EXPORTED_MODELS:
        text = (out / name / "config.pbtxt").read_text()
        assert 'platform: "tensorrt_plan"' in text, name
        assert (out / name / "1" / "model.onnx").is_file()
    # the installed package's profiles are cut to the configs it just wrote
    check = (
        "import sys; from pathlib import Path; from marrowdx import contract;"
        "from marrowdx.serving.model_config import load_config;"
        "from marrowdx.export.tensorrt_build import batch_profile;"
        "out = Path(sys.argv[1]);"
        "bad = [n for n in contract.EXPORTED_MODELS if batch_profile(n).max != int("
        "load_config(out / n / 'config.pbtxt').max_batch_size)];"
        "sys.exit(f'profiles differ: {bad}' if bad else 0)"
    )
    _run([str(bin_dir / "python"), "-c", check, str(out)], cwd=outside, env=env)


def test_installed_package_runs_the_loadtest_entry_outside_the_checkout(installed) -> None:
    bin_dir, env, outside = installed
    python = str(bin_dir / "python")
    helptext = _run([python, "-m", "marrowdx.bench.loadtest", "--help"], cwd=outside, env=env)
    assert "--soak" in helptext.stdout
    path = _run(
        [python, "-c", "from marrowdx.bench import loadtest; print(loadtest.LOCUSTFILE)"],
        cwd=outside, env=env,
    ).stdout.strip()  # fmt: skip
    assert Path(path).is_relative_to(bin_dir.parent) and Path(path).is_file(), path
    listed = _run([python, "-m", "locust", "-f", path, "--list"], cwd=outside, env=env)
    assert listed.stdout.strip(), "locust found no User class in the packaged locustfile"


def test_the_wheel_file_holds_every_repository_source(installed) -> None:
    bin_dir, _, _ = installed
    (wheel,) = (bin_dir.parent.parent / "wheels").glob("marrowdx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [s for s in contract_sources() if f"marrowdx/model_repository/{s}" not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert "marrowdx/loadtests/locustfile.py" in names
    assert not [n for n in names if n.endswith((".onnx", ".plan"))], "artefacts in the wheel"
