"""diagnosis (cpu target): ONNX Runtime in a python-backend model.

Logic: marrowdx.serving.python_models (shared with the in-process pipeline)."""

import triton_python_backend_utils as pb_utils

from marrowdx.serving.python_models import OnnxModel


class TritonPythonModel(OnnxModel):
    pb_utils = pb_utils
