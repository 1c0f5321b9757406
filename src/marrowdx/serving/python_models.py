"""The logic of the cpu-target python-backend models; ``model_repository/*/1/model.py`` are thin
subclasses that only bind Triton's ``triton_python_backend_utils`` module (importable solely
inside the backend stub). Keeping the logic here makes it testable and lets the in-process
pipeline share it.

Privacy: these models see only tensors (encoded bytes, pixels, counts). They never log
tensor contents, and error texts name the problem (sizes, formats) but not the data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from marrowdx.image_checks import ImageLimits
from marrowdx.preprocess import PreprocessSpec, QualitySpec
from marrowdx.serving.guarded_preprocess import GuardedPreprocessor, Preprocessed, Rejected
from marrowdx.serving.onnx_runner import ONNX_FILENAME, SessionThreads, open_runner

#: The preprocess config's switch for the field-quality measures: "0" serves a constant
#: FIELD_QUALITY (``marrowdx.preprocess.UNMEASURED_QUALITY``), only so that
#: ``marrowdx bench --workload gate`` can measure what the measures cost a served field.
MEASURE_FIELD_QUALITY = "measure_field_quality"


def _parameter(model_config: dict, key: str, default: int) -> int:
    """An integer from the config's ``parameters`` block (documented there, not in code)."""
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    return int(value) if value not in (None, "") else default


def _rows(parts: list[np.ndarray], *, stacked: bool = False) -> np.ndarray:
    """One batch array from per-item rows (``stacked``: parts already have a batch axis).

    Why not always np.stack/np.concatenate: a request usually carries one image, and PIXELS
    is 0.8 MB per image; a copy into a freshly allocated buffer (page faults included) costs
    time on every request, for nothing when there is a single part. A view is enough here
    because the python backend copies outputs into shared memory anyway and ONNX Runtime
    only reads its inputs.
    """
    if len(parts) == 1:
        return parts[0] if stacked else parts[0][np.newaxis]
    return np.concatenate(parts) if stacked else np.stack(parts)


class _BaseModel:
    #: Bound by the model.py subclass: ``triton_python_backend_utils``.
    pb_utils: Any = None

    def initialize(self, args: dict) -> None:
        self.model_config = json.loads(args["model_config"])
        self.name = self.model_config["name"]
        self.version_dir = Path(args["model_repository"]) / str(args["model_version"])
        self.output_dtypes = {
            out["name"]: self.pb_utils.triton_string_to_numpy(out["data_type"])
            for out in self.model_config["output"]
        }
        self.setup()

    def setup(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _error(self, message: str, *, bad_input: bool = False):
        """A failed response. ``bad_input``: the request itself is wrong (a rejected image,
        inputs that disagree), answered INVALID_ARGUMENT as the in-process server and the
        bench's peer answer it; anything else is the server's own failure (INTERNAL), so a
        deployment's error rates tell its faults from its users' files."""
        errors = self.pb_utils.TritonError
        code = errors.INVALID_ARG if bad_input else errors.INTERNAL
        return self.pb_utils.InferenceResponse(
            output_tensors=[], error=errors(f"{self.name}: {message}", code)
        )

    def _response(self, arrays: dict[str, np.ndarray]):
        tensors = [
            self.pb_utils.Tensor(name, np.ascontiguousarray(arrays[name], dtype=dtype))
            for name, dtype in self.output_dtypes.items()
        ]
        return self.pb_utils.InferenceResponse(output_tensors=tensors)


class PreprocessModel(_BaseModel):
    """DALI on the CPU, with per-image validation and recovery (see guarded_preprocess)."""

    def setup(self) -> None:
        self.image_input = self.model_config["input"][0]["name"]
        defaults = ImageLimits()
        # Optional per-deployment overrides of marrowdx.config's request limits.
        limits = ImageLimits(
            max_bytes=_parameter(self.model_config, "max_image_bytes", defaults.max_bytes),
            max_pixels=_parameter(self.model_config, "max_image_pixels", defaults.max_pixels),
            min_side=_parameter(self.model_config, "min_image_side", defaults.min_side),
        )
        measure = bool(_parameter(self.model_config, MEASURE_FIELD_QUALITY, 1))
        self.preprocessor = GuardedPreprocessor(
            max_batch_size=max(1, int(self.model_config.get("max_batch_size", 1))),
            num_threads=_parameter(self.model_config, "dali_num_threads", 1),
            limits=limits,
            spec=PreprocessSpec(quality=QualitySpec(enabled=measure)),
        )

    def execute(self, requests: list) -> list:
        from marrowdx import config

        per_request: list[list[np.ndarray]] = []
        for request in requests:
            batch = self.pb_utils.get_input_tensor_by_name(request, self.image_input).as_numpy()
            batch = batch.reshape(1, -1) if batch.ndim == 1 else batch
            per_request.append([np.ascontiguousarray(row, dtype=np.uint8) for row in batch])
        flat = [img for imgs in per_request for img in imgs]
        try:
            results = self.preprocessor(flat) if flat else []
        except Exception as exc:  # a bug, not bad input: fail this batch, keep the model alive
            return [self._error(f"internal error: {type(exc).__name__}") for _ in requests]
        responses = []
        pos = 0
        t = config.TENSORS
        for imgs in per_request:
            mine = results[pos : pos + len(imgs)]
            pos += len(imgs)
            errors = [(k, r.reason) for k, r in enumerate(mine) if isinstance(r, Rejected)]
            if not imgs:
                responses.append(
                    self._error("empty request: no image in the batch", bad_input=True)
                )
            elif errors:
                text = "; ".join(
                    f"image {k}: {reason}" if len(imgs) > 1 else reason for k, reason in errors
                )
                responses.append(self._error(text, bad_input=True))
            else:
                ok: list[Preprocessed] = mine  # type: ignore[assignment]
                responses.append(
                    self._response(
                        {
                            t.pixels: _rows([r.pixels for r in ok]),
                            t.letterbox: _rows([r.letterbox for r in ok]),
                            t.image_size: _rows([r.image_size for r in ok]),
                            t.field_quality: _rows([r.field_quality for r in ok]),
                        }
                    )
                )
        return responses

    def finalize(self) -> None:
        self.preprocessor = None


class OnnxModel(_BaseModel):
    """ONNX Runtime on the CPU: concatenate the dynamic batch, run once, split per request.
    The classifier runs only the box slots its batch needs (onnx_runner.BoxSlotClassifier)."""

    def setup(self) -> None:
        threads = SessionThreads(
            intra_op=_parameter(self.model_config, "intra_op_threads", 0),
            inter_op=_parameter(self.model_config, "inter_op_threads", 1),
        )
        self.runner = open_runner(self.version_dir / ONNX_FILENAME, threads)
        self.inputs = self.model_config["input"]

    def _input(self, request, spec: dict) -> np.ndarray:
        """Every input is required in the configs (none is ``optional``), so Triton refuses a
        request without one before ``execute``: a missing tensor cannot reach this point."""
        return self.pb_utils.get_input_tensor_by_name(request, spec["name"]).as_numpy()

    def execute(self, requests: list) -> list:
        columns: dict[str, list[np.ndarray]] = {spec["name"]: [] for spec in self.inputs}
        sizes: list[int] = []
        responses: list = [None] * len(requests)
        for r, request in enumerate(requests):
            arrays = {spec["name"]: self._input(request, spec) for spec in self.inputs}
            n = next(iter(arrays.values())).shape[0]
            if any(a.shape[0] != n for a in arrays.values()):
                responses[r] = self._error("inputs disagree on the batch size", bad_input=True)
                continue
            for name, a in arrays.items():
                columns[name].append(a)
            sizes.append(n)
        live = [r for r in range(len(requests)) if responses[r] is None]
        if not live:
            return responses
        try:
            outputs = self.runner.run({k: _rows(v, stacked=True) for k, v in columns.items()})
        except Exception as exc:  # ORT raises its own exception types; keep serving
            first_line = (str(exc).splitlines() or [""])[0][:300]
            msg = f"inference failed: {type(exc).__name__}: {first_line}"
            for r in live:
                responses[r] = self._error(msg)
            return responses
        start = 0
        for r, n in zip(live, sizes, strict=True):
            responses[r] = self._response({k: v[start : start + n] for k, v in outputs.items()})
            start += n
        return responses

    def finalize(self) -> None:
        self.runner = None
