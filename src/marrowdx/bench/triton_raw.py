"""KServe-v2 gRPC messages built on the raw Triton protobufs, without ``InferenceServerClient``.

The locust user needs the raw ``GRPCInferenceServiceStub`` (tritonclient's client takes no
interceptor, and its HTTP client's gevent pin clashes with locust), so requests and responses
are packed here by hand. Only numpy and the generated protobuf modules are imported, which
keeps this usable inside a gevent-patched locust process.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from marrowdx import config, differential

#: numpy dtype -> KServe v2 datatype string, for the tensors this project sends.
_V2_DATATYPES: dict[np.dtype, str] = {
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float32): "FP32",
}
_NUMPY_DTYPES: dict[str, np.dtype] = {v: k for k, v in _V2_DATATYPES.items()}


def infer_request(model_name: str, inputs: Mapping[str, np.ndarray], request_id: str = ""):
    """A ``ModelInferRequest`` carrying ``inputs`` as raw little-endian contents.

    Raw contents (not typed ``contents``) are what tritonclient sends too: one memcpy on the
    server instead of a protobuf repeated-field decode per element.
    """
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model_name, id=request_id)
    for name, array in inputs.items():
        array = np.ascontiguousarray(array)
        try:
            datatype = _V2_DATATYPES[array.dtype]
        except KeyError as exc:
            raise TypeError(f"input {name!r}: unsupported dtype {array.dtype}") from exc
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def image_request(image: bytes, request_id: str = ""):
    """One encoded image for the per-image ensemble (IMAGE UINT8 [1, nbytes])."""
    encoded = np.frombuffer(image, dtype=np.uint8)[None, :]
    return infer_request(config.MODELS.pipeline, {config.TENSORS.image: encoded}, request_id)


def decode_response(response) -> dict[str, np.ndarray]:
    """Output name -> array of a ``ModelInferResponse`` (raw contents only, as Triton sends)."""
    arrays: dict[str, np.ndarray] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        dtype = _NUMPY_DTYPES[tensor.datatype]
        arrays[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape))
    return arrays


def diagnosis_request(class_counts: np.ndarray, request_id: str = ""):
    """The per-patient diagnosis call from summed per-image class counts (no lab values).

    Mirrors what the client does after a patient's images: fractions of the total, the total
    itself, and an all-absent lab mask.
    """
    counts = np.asarray(class_counts, dtype=np.float64).reshape(1, -1)  # a batch of one
    inputs = differential.diagnosis_inputs(counts)
    return infer_request(config.MODELS.diagnosis, inputs.tensors(), request_id)
