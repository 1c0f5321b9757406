"""Shared fixtures: a tiny-preset model repository and one real Triton server per session.

``built_repository`` runs ``marrowdx build`` (the CLI, so it is tested) with the ``tiny``
training preset into ``build/test-cache`` (reruns reuse the weights: build is idempotent).
``MARROWDX_TEST_MODELS=synthetic`` swaps the trained models for the contract-exact graphs of
``tests/onnx_graphs.py`` (seconds instead of training; for working on serving alone).

``triton_server`` starts the real ``tritonserver`` through the same launcher as
``marrowdx serve`` on free loopback ports and stops it at the end, checking that no process
of its group survives and the ports are free again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Everything the fixtures build lives here (git-ignored, reused across sessions).
from tests.helpers import TEST_CACHE  # noqa: E402


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


@dataclass
class ServedStack:
    """What tests need to talk to the session's server."""

    grpc_url: str
    http_url: str
    metrics_url: str
    repository: Path
    admin_key: str
    log_path: Path
    server: object  # marrowdx.serving.server.TritonServer

    @property
    def pid(self) -> int:
        return self.server.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def triton_server(built_repository: Path) -> Iterator[ServedStack]:
    import secrets

    from marrowdx.serving.server import ServerConfig, TritonServer, free_port, port_is_free
    from marrowdx.serving.triton_install import ensure_installed

    install = ensure_installed(TEST_CACHE / "triton")
    cfg = ServerConfig(
        repository=built_repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        admin_key=secrets.token_hex(16),
    )
    log_path = TEST_CACHE / f"triton-{os.getpid()}.log"
    with open(log_path, "wb") as log:
        server = TritonServer(cfg, install, stdout=log).start()
        try:
            server.wait_ready()
            yield ServedStack(
                grpc_url=cfg.grpc_url,
                http_url=cfg.http_url,
                metrics_url=cfg.metrics_url,
                repository=built_repository,
                admin_key=cfg.admin_key,
                log_path=log_path,
                server=server,
            )
        finally:
            dead = server.dead_models()
            code = server.stop()
    assert not dead, f"model processes died during the session: {dead}; see {log_path}"
    assert not server.group_alive(), "tritonserver or one of its stubs outlived the session"
    for port in (cfg.http_port, cfg.grpc_port, cfg.metrics_port):
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
