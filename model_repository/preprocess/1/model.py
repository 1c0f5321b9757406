"""preprocess (cpu target): the shared DALI pipeline on the CPU with per-image checks and
recovery. Logic: marrowdx.serving.python_models / guarded_preprocess."""

import triton_python_backend_utils as pb_utils

from marrowdx.serving.python_models import PreprocessModel


class TritonPythonModel(PreprocessModel):
    pb_utils = pb_utils
