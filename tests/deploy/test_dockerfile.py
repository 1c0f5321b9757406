"""deploy/docker: the image pins its NGC base, ships what it copies, and its server-side
Python runs on the container's python3 (3.10).
"""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib

from tests.helpers.deploy import DEPLOY, DIGEST, ROOT


# ---------------------------------------------------------------- image and runbook files
def test_dockerfile_pins_the_ngc_base_and_ships_the_scripts() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG TRITON_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1).startswith("nvcr.io/nvidia/tritonserver:24.10-py3@sha256:")
    assert DIGEST.search(base.group(1))
    for stage in ("serving", "engine-builder"):
        assert re.search(rf"^FROM \S+ AS {stage}$", text, re.M), stage
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert any(path == a or path.startswith(a + "/") for a in allowed), (
                f"{path} is excluded from the build context by Dockerfile.dockerignore"
            )
            assert (ROOT / path).exists() or path == "README.md", (
                f"Dockerfile copies missing {path}"
            )
    assert "python_backend_stubs/3.11" in text and "[server]" in text
    assert re.search(r"^USER 1000:1000$", text, re.M)


def test_server_side_python_runs_on_the_containers_python() -> None:
    """The NGC 24.10 image's python3 is 3.10, and the DALI backend embeds it: the engine
    check, dali.py and the marrowdx core vendored beside it must not use newer syntax."""
    sources = [DEPLOY / "scripts" / "engine_manifest.py"] + [
        ROOT / "src" / "marrowdx" / f
        for f in ("__init__.py", "config.py", "taxonomy.py", "preprocess.py", "engine_fit.py")
    ]
    # the DALI model file the backend autoserializes with the container's Python
    sources += sorted((ROOT / "model_repository").glob("*/1/dali.py"))
    for src in sources:
        ast.parse(src.read_text(), filename=str(src), feature_version=(3, 10))
    proc = subprocess.run(
        ["bash", "-n", str(DEPLOY / "scripts" / "build_engines.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_wheel_stage_copies_every_folder_the_package_maps() -> None:
    """The image builds the wheel from what it copies: a folder pyproject.toml maps to a
    package (code, or package data such as model_repository/) and the Dockerfile leaves out
    would make the wheel build fail, or ship without the repository sources."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    wheel_stage = text.split(" AS wheel", 1)[1].split("\nFROM ", 1)[0]
    copied = {m.split()[0] for m in re.findall(r"^COPY (?!--from)(.+)$", wheel_stage, re.M)}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {p.split("/")[0] for p in project["tool"]["setuptools"]["package-dir"].values()}
    assert folders <= copied, f"the wheel stage does not copy {sorted(folders - copied)}"
    assert "COPY src/marrowdx/engine_fit.py /opt/marrowdx/" in text  # engine_manifest's rule
