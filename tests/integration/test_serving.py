"""The real Triton server on the built repository: served outputs equal the in-process
pipeline, malformed requests get per-request errors, admin endpoints need the key."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from marrowdx import config, contract
from marrowdx.contract import PIPELINE_OUTPUTS
from marrowdx.serving.guarded_preprocess import Rejected
from marrowdx.serving.server import ADMIN_KEY_HEADER

pytestmark = pytest.mark.server

T, M = config.TENSORS, config.MODELS
#: Probabilities may differ by float rounding between batch compositions.
PROB_ATOL = 1e-4
#: Box coordinates (pixels) likewise.
BOX_ATOL = 1e-3


@pytest.fixture(scope="module")
def grpc(triton_server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield client
    client.close()


def infer_image(client, data: bytes) -> dict[str, np.ndarray]:
    import tritonclient.grpc as grpcclient

    arr = np.frombuffer(data, dtype=np.uint8)[None, :]
    inp = grpcclient.InferInput(T.image, list(arr.shape), "UINT8")
    inp.set_data_from_numpy(arr)
    outputs = [grpcclient.InferRequestedOutput(n) for n in PIPELINE_OUTPUTS]
    result = client.infer(M.pipeline, [inp], outputs=outputs)
    return {n: result.as_numpy(n)[0] for n in PIPELINE_OUTPUTS}


def assert_same(served: dict[str, np.ndarray], local: dict[str, np.ndarray], what: str) -> None:
    n = int(local[T.num_detections][0])
    assert int(served[T.num_detections][0]) == n, f"{what}: detection count"
    np.testing.assert_array_equal(served[T.image_size], local[T.image_size], err_msg=what)
    np.testing.assert_allclose(served[T.letterbox], local[T.letterbox], rtol=1e-6, err_msg=what)
    np.testing.assert_allclose(served[T.boxes][:n], local[T.boxes][:n], atol=BOX_ATOL, err_msg=what)
    np.testing.assert_allclose(served[T.scores], local[T.scores], atol=PROB_ATOL, err_msg=what)
    np.testing.assert_array_equal(
        served[T.class_probs][:n].argmax(-1),
        local[T.class_probs][:n].argmax(-1),
        err_msg=f"{what}: labels",
    )
    np.testing.assert_allclose(
        served[T.class_probs], local[T.class_probs], atol=PROB_ATOL, err_msg=what
    )
    np.testing.assert_allclose(
        served[T.attribute_probs], local[T.attribute_probs], atol=PROB_ATOL, err_msg=what
    )
    np.testing.assert_array_equal(served[T.class_counts], local[T.class_counts], err_msg=what)


@pytest.fixture(scope="module")
def expected(inprocess_pipeline, simulated_images) -> list[dict[str, np.ndarray]]:
    results = inprocess_pipeline.infer(simulated_images)
    assert not any(isinstance(r, Rejected) for r in results)
    return results  # type: ignore[return-value]


def test_metadata_lists_every_model_and_tensor(grpc) -> None:
    """What Triton serves is the tensor contract: every model, tensor, datatype and shape
    (batch axis first) as ``marrowdx.contract`` says for the cpu target."""
    for name, spec in contract.MODELS.items():
        assert grpc.is_model_ready(name), name
        meta = grpc.get_model_metadata(name, as_json=True)
        for kind, want in zip(("inputs", "outputs"), spec.config_io("cpu"), strict=True):
            served = [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[kind]]
            expected = [(t.name, t.data_type.removeprefix("TYPE_"), [-1, *t.dims]) for t in want]
            assert served == expected, f"{name} {kind}"


def test_served_ensemble_equals_in_process(grpc, simulated_images, expected) -> None:
    for k, data in enumerate(simulated_images):
        assert_same(infer_image(grpc, data), expected[k], f"image {k}")


def test_concurrent_requests_are_batched_and_still_equal(
    triton_server, simulated_images, expected
) -> None:
    import tritonclient.grpc as grpcclient

    def one(k: int) -> tuple[int, dict[str, np.ndarray]]:
        c = grpcclient.InferenceServerClient(triton_server.grpc_url)
        try:
            return k, infer_image(c, simulated_images[k % len(simulated_images)])
        finally:
            c.close()

    with ThreadPoolExecutor(8) as pool:
        for k, served in pool.map(one, range(16)):
            assert_same(served, expected[k % len(simulated_images)], f"concurrent request {k}")


def test_diagnosis_served_equals_in_process(grpc, inprocess_pipeline) -> None:
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(3)
    fractions = rng.dirichlet(np.ones(config.N_CLASSES), size=4).astype(np.float32)
    total = np.array([[120.0], [300.0], [50.0], [410.0]], np.float32)
    labs = np.zeros((4, config.N_LAB_VALUES), np.float32)
    mask = np.zeros_like(labs)
    labs[1], mask[1] = [12.0, 9.5, 80.0, 400.0], 1.0
    inputs = []
    for name, arr in (
        (T.fractions, fractions),
        (T.total_cells, total),
        (T.lab_values, labs),
        (T.lab_mask, mask),
    ):
        inp = grpcclient.InferInput(name, list(arr.shape), "FP32")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    served = grpc.infer(M.diagnosis, inputs).as_numpy(T.diagnosis_probs)
    local = inprocess_pipeline.diagnose(fractions, total, labs, mask)
    np.testing.assert_allclose(served, local, atol=PROB_ATOL)
    np.testing.assert_allclose(served.sum(1), 1.0, atol=1e-5)


def _jpeg(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header (valid CRC) declares width x height: a decompression bomb."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "PNG")
    png = buf.getvalue()
    ihdr = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + png[24:29]
    return png[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]


MALFORMED = {
    "empty": (b"", "empty"),
    "not_an_image": (b"%PDF-1.7 patient notes" * 10, "not an image"),
    "truncated_jpeg": (_jpeg(256, 256)[:700], "decode"),
    "corrupt_jpeg": (lambda j: j[:400] + bytes(400) + j[800:])(_jpeg(256, 256)),
    "absurd_dimensions": (_png_declaring(60000, 60000), "too large"),
    "too_small": (_jpeg(8, 8), "too small"),
}
MALFORMED["corrupt_jpeg"] = (MALFORMED["corrupt_jpeg"], "decode")


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_gets_a_named_error_and_the_server_recovers(
    grpc, case, simulated_images, expected
) -> None:
    from tritonclient.utils import InferenceServerException

    data, message = MALFORMED[case]
    with pytest.raises(InferenceServerException) as info:
        infer_image(grpc, data)
    assert message in str(info.value).lower(), str(info.value)
    assert grpc.is_server_ready() and grpc.is_model_ready(M.pipeline)
    assert_same(infer_image(grpc, simulated_images[0]), expected[0], f"good image after {case}")


def test_bad_images_in_one_dynamic_batch_fail_alone(
    triton_server, simulated_images, expected
) -> None:
    """Good and corrupt requests sent together (so the preprocess model sees them in one
    batch): every good one gets its normal result, every corrupt one its own error."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    corrupt = MALFORMED["corrupt_jpeg"][0]
    jobs = [(k % 2 == 0, k) for k in range(12)]

    def one(job):
        good, k = job
        c = grpcclient.InferenceServerClient(triton_server.grpc_url)
        try:
            return infer_image(c, simulated_images[k % len(simulated_images)] if good else corrupt)
        except InferenceServerException as exc:
            return exc
        finally:
            c.close()

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    for (good, k), result in zip(jobs, results, strict=True):
        if good:
            assert not isinstance(result, Exception), (
                f"good request {k} failed beside corrupt ones: {result}"
            )
            assert_same(result, expected[k % len(simulated_images)], f"good request {k}")
        else:
            assert isinstance(result, InferenceServerException) and "decode" in str(result)


def test_admin_endpoints_need_the_key_inference_does_not(triton_server, grpc) -> None:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException):
        grpc.get_model_repository_index()
    index = grpc.get_model_repository_index(
        headers={ADMIN_KEY_HEADER: triton_server.admin_key}, as_json=True
    )
    assert {m["name"] for m in index["models"]} >= {M.pipeline, M.diagnosis}
    with pytest.raises(InferenceServerException):
        grpc.get_inference_statistics(M.pipeline, headers={ADMIN_KEY_HEADER: "wrong"})
    # HTTP: same restriction; health and metadata stay open.
    req = urllib.request.Request(
        f"{triton_server.http_url}/v2/repository/index", method="POST", data=b"{}"
    )
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(req, timeout=10)
    req.add_header(ADMIN_KEY_HEADER, triton_server.admin_key)
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(
        f"{triton_server.http_url}/v2/models/{M.pipeline}", timeout=10
    ) as r:
        assert json.load(r)["name"] == M.pipeline
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as r:
        assert b"nv_inference_request_success" in r.read()


def test_model_control_is_off_and_the_key_never_reaches_the_log(triton_server, grpc) -> None:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException):  # model-control-mode=none: even with the key
        grpc.unload_model(M.diagnosis, headers={ADMIN_KEY_HEADER: triton_server.admin_key})
    assert grpc.is_model_ready(M.diagnosis)
    assert triton_server.admin_key not in triton_server.log_text()
