"""Serving: the Triton model repository builder, the ``tritonserver`` launcher and the same
pipeline in-process.

Modules: ``repository`` (build_repository), ``model_config`` (the config.pbtxt files read
with Triton's ModelConfig protobuf, checked against and rewritten from the tensor contract),
``contract_cli`` (its command line and markdown table), ``triton_install`` (the server
binary from the nvidia-pytriton wheel), ``server`` (launcher/supervisor, hardening flags),
``python_models`` (logic of the cpu-target python-backend models), ``guarded_preprocess``
(per-image validation with the core's ``marrowdx.image_checks``, and DALI recovery),
``onnx_runner`` (ONNX Runtime sessions shared by the python models and ``inprocess``),
``cli`` (``marrowdx build`` / ``marrowdx serve``).
"""

from __future__ import annotations

__all__ = ["build_repository"]


def __getattr__(name: str):
    if name == "build_repository":
        from marrowdx.serving.repository import build_repository

        return build_repository
    raise AttributeError(name)
