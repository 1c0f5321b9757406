"""The one rule for whether a TensorRT engine may run on a host.

An engine (``model.plan``) runs only on the GPU model and the TensorRT release that built it;
a mismatch surfaces as a cryptic deserialisation failure, or mid-rollout. Two places check
it: ``marrowdx.export.tensorrt_build`` (before loading a plan it built) and
``deploy/scripts/engine_manifest.py`` (the serving pod's init container, before Triton
starts). Both call :func:`fit_problems` here, so they cannot disagree.

The rule:
- the GPU model name must be equal (engines are tuned per device);
- the compute capability must be equal where both sides know it (the deploy script may not:
  older ``nvidia-smi`` cannot report it);
- the TensorRT release must be equal on its first three version parts: ``10.5.0.18`` (the
  library's full build number, NGC's ``TRT_VERSION``) and ``10.5.0`` (``tensorrt.__version__``
  of the same release) are one release; ``10.5.0`` and ``10.6.0`` are not.

Standard library only and Python 3.10 syntax: the NGC container's own python3 (3.10) runs the
deploy script, which carries a copy of this file when marrowdx is not importable there.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Leading TensorRT version components that must agree (major.minor.patch).
TRT_VERSION_PARTS = 3


@dataclass(frozen=True)
class EngineHost:
    """Where an engine was built, or where it is about to run."""

    gpu_name: str
    tensorrt_version: str
    #: "major.minor", e.g. "9.0" for an H100/H200; "" when unknown.
    compute_capability: str = ""


def same_tensorrt_release(a: str, b: str) -> bool:
    """10.5.0.18 and 10.5.0 are one release; 10.5.0 and 10.6.0 are not."""
    return a.split(".")[:TRT_VERSION_PARTS] == b.split(".")[:TRT_VERSION_PARTS]


def fit_problems(built: EngineHost, running: EngineHost, here: str = "this host") -> list[str]:
    """Every reason an engine built on ``built`` must not run on ``running`` (empty: it fits).

    ``here`` names the running side in the messages ("this pod" in the init container).
    """
    problems = []
    if built.gpu_name != running.gpu_name:
        problems.append(f"built on GPU {built.gpu_name!r}, {here} has {running.gpu_name!r}")
    if (
        built.compute_capability
        and running.compute_capability
        and built.compute_capability != running.compute_capability
    ):
        problems.append(
            f"built for compute capability {built.compute_capability}, "
            f"{here} has {running.compute_capability}"
        )
    if not same_tensorrt_release(built.tensorrt_version, running.tensorrt_version):
        problems.append(
            f"built with TensorRT {built.tensorrt_version}, {here} has {running.tensorrt_version}"
        )
    return problems
