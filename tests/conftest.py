"""Shared fixtures: a tiny-preset model repository and one real Triton server per session.

``built_repository`` runs ``marrowdx build`` (the CLI, so it is tested) with the ``tiny``
training preset into ``build/test-cache`` (reruns reuse the weights: build is idempotent).
``MARROWDX_TEST_MODELS=synthetic`` swaps the trained models for the contract-exact graphs of
``tests/helpers/onnx_graphs.py`` (seconds instead of training; for working on serving alone).

``triton_server`` starts the real ``tritonserver`` through the same launcher as
``marrowdx serve`` (``launch_triton``) on free loopback ports and stops it at the end,
checking that no process of its group survives and the ports are free again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

#: Everything the fixtures build lives here (git-ignored, reused across sessions).
from tests.helpers import TEST_CACHE  # noqa: E402

if TYPE_CHECKING:
    from marrowdx.serving.server import LaunchedTriton


@pytest.fixture(scope="session")
def built_repository() -> Path:
    from marrowdx import cli

    out = TEST_CACHE / "model_repository"
    argv = ["build", "--out", str(out), "--work-dir", str(TEST_CACHE), "--preset", "tiny"]
    if os.environ.get("MARROWDX_TEST_MODELS") == "synthetic":
        from tests.helpers import onnx_graphs

        onnx_graphs.write_all(TEST_CACHE / "synthetic-onnx")
        argv += ["--onnx-dir", str(TEST_CACHE / "synthetic-onnx")]
    assert cli.main(argv) == 0, "marrowdx build failed"
    return out


@pytest.fixture(scope="session")
def triton_server(built_repository: Path) -> Iterator[LaunchedTriton]:
    import secrets

    from marrowdx.serving.server import launch_triton, port_is_free

    log_path = TEST_CACHE / f"triton-{os.getpid()}.log"
    with launch_triton(
        built_repository,
        work_dir=TEST_CACHE,
        log_path=log_path,
        admin_key=secrets.token_hex(16),
    ) as launched:
        try:
            yield launched
        finally:
            dead = launched.server.dead_models()
    code = launched.server.stop()  # already stopped by launch_triton: its exit code
    assert not dead, f"model processes died during the session: {dead}; see {log_path}"
    assert not launched.server.group_alive(), "tritonserver or a stub outlived the session"
    for port in (launched.ports.http, launched.ports.grpc, launched.ports.metrics):
        assert port_is_free(port), f"port {port} still in use after the server stopped"
    assert code == 0, f"tritonserver exited with {code}; see {log_path}"


@pytest.fixture(scope="session")
def inprocess_pipeline(built_repository: Path):
    """The served pipeline's code and models, in this process (the reference for served outputs)."""
    from marrowdx.serving.inprocess import InProcessPipeline

    return InProcessPipeline(built_repository)


@pytest.fixture(scope="session")
def simulated_images(tmp_path_factory) -> list[bytes]:
    """A few simulated fields of view (JPEG bytes), small to keep CI fast."""
    from marrowdx.simulate import simulate_cohort

    out = tmp_path_factory.mktemp("cohort")
    gt = simulate_cohort(out, n_patients=1, seed=7, images_per_patient=3, size=(640, 480))
    return [(out / img["file"]).read_bytes() for p in gt["patients"] for img in p["images"]]
