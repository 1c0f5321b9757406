"""Turning checkpoints into servable artefacts: the build stages, ONNX export, TensorRT engines.

Public entry: :func:`build_onnx_models` (used by ``marrowdx build``). Imports of torch and
friends happen inside the submodules, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from marrowdx.serving.onnx_artifacts import OnnxModels

__all__ = ["OnnxModels", "build_onnx_models"]


def build_onnx_models(
    work_dir=None, preset: str = "reference", *, progress: bool = True, **kwargs
) -> OnnxModels:
    """See :func:`marrowdx.export.build.build_onnx_models`."""
    from marrowdx.export.build import build_onnx_models as _build

    return _build(work_dir, preset, progress=progress, **kwargs)


def __getattr__(name: str):
    if name == "OnnxModels":
        from marrowdx.serving.onnx_artifacts import OnnxModels

        return OnnxModels
    raise AttributeError(name)
