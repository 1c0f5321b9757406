"""Client logic at unit level: aggregation, failure reporting, retry policy, privacy, files.

The wire partner here is a small in-process gRPC stand-in speaking Triton's real protocol
(tritonclient's own protobuf service), so failure modes can be injected exactly. What the
real server computes is tested in test_client_server.py; this file only checks what the
client does with answers.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from marrowdx import config, taxonomy
from marrowdx.client import AsyncMarrowClient, MarrowClient, PatientInput, write_csv, write_json
from marrowdx.client.cohort import CohortError, discover
from marrowdx.client.transport import RequestFailed, RetryPolicy, call_with_retry

FAST_RETRY = RetryPolicy(max_total_s=5.0, initial_backoff_s=0.01, max_backoff_s=0.05)
LETTERBOX_SCALE = 0.5  # the stand-in pretends every image was 1024 px, shrunk to 512


def fake_detections(data: bytes) -> tuple[int, list[int]]:
    """Deterministic per-image answer derived from the bytes: n cells and their classes
    (at least 16, so that a patient's count can show a leukaemia pattern and be named:
    ``differential.min_cells_for_pattern``)."""
    n = data[-1] % 5 + 16
    return n, [(data[0] + 7 * i) % taxonomy.N_CLASSES for i in range(n)]


@dataclass
class StandIn(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers like the ensemble and the diagnosis model; records every request."""

    unavailable_first: int = 0  # first N inference calls fail with UNAVAILABLE
    always_unavailable: bool = False
    diagnosis_error: str = ""  # when set, the diagnosis model fails with INTERNAL and this text
    requests: list[tuple[bytes, tuple]] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    diagnosis_inputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ServerLive(self, request, context):  # noqa: N802 (gRPC method names)
        return service_pb2.ServerLiveResponse(live=True)

    def ModelReady(self, request, context):  # noqa: N802
        return service_pb2.ModelReadyResponse(ready=True)

    def ModelInfer(self, request, context):  # noqa: N802
        with self.lock:
            self.requests.append(
                (request.SerializeToString(), tuple(context.invocation_metadata()))
            )
            self.calls[request.model_name] = self.calls.get(request.model_name, 0) + 1
            n_calls = sum(self.calls.values())
        if self.always_unavailable or n_calls <= self.unavailable_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "Server is restarting")
        if request.model_name == config.MODELS.pipeline:
            return self._pipeline(request, context)
        return self._diagnosis(request, context)

    def _pipeline(self, request, context):
        data = request.raw_input_contents[0]
        if data.startswith(b"BAD"):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "IMAGE: cannot decode image (corrupt JPEG)"
            )
        k = config.MAX_DETECTIONS
        n, labels = fake_detections(data)
        boxes = np.zeros((k, 4), np.float32)
        class_probs = np.zeros((k, config.N_CLASSES), np.float32)
        attr = np.zeros((k, config.N_ATTRIBUTES), np.float32)
        scores = np.zeros(k, np.float32)
        for i, label in enumerate(labels):
            boxes[i] = (10 * i, 20, 10 * i + 8, 30)
            class_probs[i, label] = 0.9
            class_probs[i, (label + 1) % config.N_CLASSES] = 0.1
            attr[i, 0] = 0.7  # cell_size -> big
            scores[i] = 0.9 - 0.01 * i
        counts = np.bincount(labels, minlength=config.N_CLASSES).astype(np.float32)
        t = config.TENSORS
        return _response(
            {
                t.boxes: boxes,
                t.scores: scores,
                t.num_detections: np.array([n], np.int32),
                t.class_probs: class_probs,
                t.attribute_probs: attr,
                t.class_counts: counts,
                t.letterbox: np.array([LETTERBOX_SCALE, LETTERBOX_SCALE, 0, 0], np.float32),
                t.image_size: np.array([1024, 1024], np.int32),
                # a sharp, stained, thin field: passes the quality gate (client.quality)
                t.field_quality: np.array([2000.0, 0.08, 0.03, 190.0], np.float32),
                t.familiarity: np.where(np.arange(k) < n, 0.5, 0.0).astype(np.float32),
            }
        )

    def _diagnosis(self, request, context):
        if self.diagnosis_error:
            context.abort(grpc.StatusCode.INTERNAL, self.diagnosis_error)
        arrays = {
            tensor.name: np.frombuffer(raw, np.float32).reshape(tuple(tensor.shape))[0]
            for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        with self.lock:
            self.diagnosis_inputs.append(arrays)
        return _response({config.TENSORS.diagnosis_probs: np.array([0.2, 0.5, 0.3], np.float32)})


def _response(arrays: dict[str, np.ndarray]) -> service_pb2.ModelInferResponse:
    dtypes = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}
    response = service_pb2.ModelInferResponse(model_name="x")
    for name, array in arrays.items():
        out = response.outputs.add(name=name, datatype=dtypes[array.dtype])
        out.shape.extend([1, *array.shape])
        response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return response


@pytest.fixture
def stand_in() -> Iterator[tuple[StandIn, str]]:
    servicer = StandIn()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def images(*seeds: int) -> list[bytes]:
    return [bytes([s, 1, 2, 3, s]) for s in seeds]


def expected_counts(datas: list[bytes]) -> np.ndarray:
    total = np.zeros(config.N_CLASSES, np.int64)
    for d in datas:
        total += np.bincount(fake_detections(d)[1], minlength=config.N_CLASSES)
    return total


def test_patient_counts_are_the_sum_of_image_counts_and_diagnosis_is_called_once(stand_in):
    servicer, url = stand_in
    datas = images(3, 40, 41, 99)
    with MarrowClient(url, retry=FAST_RETRY) as client:
        report = client.diagnose_patient("P1", datas, labs={"wbc_per_nl": 12.5})
    want = expected_counts(datas)
    assert [report.counts[c] for c in taxonomy.CLASSES] == want.tolist()
    assert report.n_cells == want.sum() == sum(len(i.cells) for i in report.images)
    assert report.n_images == 4 and not report.failed_images
    assert servicer.calls == {config.MODELS.pipeline: 4, config.MODELS.diagnosis: 1}
    sent = servicer.diagnosis_inputs[0]
    np.testing.assert_allclose(sent[config.TENSORS.fractions], want / want.sum(), rtol=1e-6)
    assert sent[config.TENSORS.total_cells].tolist() == [want.sum()]
    assert sent[config.TENSORS.lab_values].tolist() == [12.5, 0, 0, 0]
    assert sent[config.TENSORS.lab_mask].tolist() == [1, 0, 0, 0]
    assert report.diagnosis == "AML" and sum(report.probabilities.values()) == pytest.approx(1.0)
    assert sum(report.fractions.values()) == pytest.approx(1.0)
    cell = report.images[0].cells[1]
    # letterboxed (10, 20, 18, 30) at scale 0.5 -> original pixels
    assert cell.box == (20.0, 40.0, 36.0, 60.0)
    assert cell.attributes["cell_size"] == "big" and cell.attributes["nucleolus"] == "inconspicuous"
    assert [i.file for i in report.images] == ["#0", "#1", "#2", "#3"]


def test_failed_image_is_listed_with_the_server_reason_and_not_retried(stand_in):
    servicer, url = stand_in
    datas = [*images(5, 6), b"BAD image bytes"]
    with MarrowClient(url, retry=FAST_RETRY) as client:
        report = client.diagnose_patient("P2", datas)
    assert report.failed_images == {
        "#2": "INVALID_ARGUMENT: IMAGE: cannot decode image (corrupt JPEG)"
    }
    assert report.n_images == 2
    assert [report.counts[c] for c in taxonomy.CLASSES] == expected_counts(datas[:2]).tolist()
    assert report.diagnosis is not None  # the rest still gives a diagnosis
    assert servicer.calls[config.MODELS.pipeline] == 3  # the bad image was sent once


def test_patient_whose_images_all_fail_gets_no_diagnosis_and_says_why(stand_in, tmp_path):
    servicer, url = stand_in
    missing = tmp_path / "gone.jpg"
    with MarrowClient(url, retry=FAST_RETRY) as client:
        report = client.diagnose_patient("P3", [b"BAD1", missing, b""])
    assert report.diagnosis is None and report.probabilities == {}
    assert report.diagnosis_error == "all 3 images failed"
    assert set(report.failed_images) == {"#0", str(missing), "#2"}
    assert "No such file" in report.failed_images[str(missing)]
    assert "empty image" in report.failed_images["#2"]
    assert config.MODELS.diagnosis not in servicer.calls
    assert not report.complete


def test_a_failed_diagnosis_call_is_reported_not_hidden(stand_in):
    servicer, url = stand_in
    servicer.diagnosis_error = "onnxruntime: diagnosis session failed"
    with MarrowClient(url, retry=FAST_RETRY) as client:
        report = client.diagnose_patient("P", images(1, 2))
    assert report.n_images == 2 and report.n_cells > 0 and not report.failed_images
    assert report.diagnosis is None and not report.complete
    assert report.diagnosis_error == (
        "diagnosis request failed: INTERNAL: onnxruntime: diagnosis session failed"
    )
    assert servicer.calls[config.MODELS.diagnosis] == 1  # INTERNAL is final: no retry


def test_transient_failures_are_retried_and_counted_once(stand_in):
    servicer, url = stand_in
    servicer.unavailable_first = 5
    datas = images(7, 8, 9)
    with MarrowClient(url, retry=FAST_RETRY, concurrency=1) as client:
        report = client.diagnose_patient("P4", datas)
    assert report.complete
    assert [report.counts[c] for c in taxonomy.CLASSES] == expected_counts(datas).tolist()
    assert sum(servicer.calls.values()) == 5 + 3 + 1


def test_retries_stop_at_the_time_budget_and_report_why(stand_in):
    servicer, url = stand_in
    servicer.always_unavailable = True
    policy = RetryPolicy(max_total_s=0.3, initial_backoff_s=0.02, max_backoff_s=0.05)
    with MarrowClient(url, retry=policy) as client:
        report = client.diagnose_patient("P5", images(1))
    reason = report.failed_images["#0"]
    assert reason.startswith("UNAVAILABLE: Server is restarting (gave up after")
    assert report.diagnosis is None


def test_backoff_grows_exponentially_with_jitter_and_respects_the_budget():
    policy = RetryPolicy(max_total_s=30, initial_backoff_s=1, max_backoff_s=8, jitter=0.5)
    assert [policy.backoff(a, 0.0) for a in range(1, 6)] == [1, 2, 4, 8, 8]
    assert policy.backoff(3, 0.999) == pytest.approx(2.002)
    now = [0.0]
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    async def always_down():
        from tritonclient.utils import InferenceServerException

        raise InferenceServerException("down", status="StatusCode.UNAVAILABLE")

    with pytest.raises(RequestFailed) as info:
        asyncio.run(
            call_with_retry(
                always_down, policy, sleep=sleep, clock=lambda: now[0], rand=lambda: 0.0
            )
        )
    assert slept == [1, 2, 4, 8, 8] and sum(slept) <= 30
    assert info.value.attempts == 6 and info.value.status == "StatusCode.UNAVAILABLE"


def test_no_patient_identifier_or_file_name_reaches_the_server(stand_in, tmp_path):
    servicer, url = stand_in
    patient = "PATIENT-7f3a-Doe"
    folder = tmp_path / patient
    folder.mkdir()
    path = folder / "slide-of-PATIENT-7f3a-Doe.jpg"
    path.write_bytes(images(11)[0])
    with MarrowClient(url, retry=FAST_RETRY) as client:
        report = client.diagnose_patient(patient, [path, images(12)[0]])
    assert report.complete and report.images[0].file == str(path)
    request_ids = []
    for raw, metadata in servicer.requests:
        request = service_pb2.ModelInferRequest.FromString(raw)
        del request.raw_input_contents[:]  # image bytes / count fractions, nothing else
        assert b"7f3a" not in request.SerializeToString()
        assert all("7f3a" not in f"{k}{v}" for k, v in metadata)
        assert not request.parameters
        request_ids.append(request.id)
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in request_ids)
    assert len(set(request_ids)) == len(request_ids)


def test_async_client_streams_patients_in_order_with_bounded_concurrency(stand_in):
    servicer, url = stand_in
    cohort = [PatientInput(f"P{i}", images(i, i + 50)) for i in range(6)]
    seen: list[tuple[str, str]] = []

    async def main():
        async with AsyncMarrowClient(
            url, retry=FAST_RETRY, concurrency=3, patients_in_flight=2
        ) as c:
            return [
                r
                async for r in c.diagnose_cohort(
                    cohort, on_image=lambda p, n, e: seen.append((p, n))
                )
            ]

    reports = asyncio.run(main())
    assert [r.patient_id for r in reports] == [p.patient_id for p in cohort]
    assert all(r.complete for r in reports) and len(seen) == 12
    assert servicer.calls == {config.MODELS.pipeline: 12, config.MODELS.diagnosis: 6}


def test_sync_client_runs_inside_a_running_event_loop(stand_in):
    """The blocking client drives the async one on its own loop, so notebooks can use it."""
    _, url = stand_in

    async def from_async_code():
        with MarrowClient(url, retry=FAST_RETRY) as client:
            return list(
                client.diagnose_cohort([PatientInput("A", images(1)), PatientInput("B", images(2))])
            )

    reports = asyncio.run(from_async_code())
    assert [r.patient_id for r in reports] == ["A", "B"]


def test_unknown_lab_names_are_refused_before_any_request(stand_in):
    servicer, url = stand_in
    with MarrowClient(url, retry=FAST_RETRY) as client, pytest.raises(ValueError, match="ferritin"):
        client.diagnose_patient("P", images(1), labs={"ferritin": 3.0})
    assert not servicer.requests


def test_json_and_csv_files_follow_the_contract(stand_in, tmp_path):
    _, url = stand_in
    with MarrowClient(url, retry=FAST_RETRY) as client:
        reports = [
            client.diagnose_patient("P1", images(1, 2)),
            client.diagnose_patient("P2", [b"BAD"], names=["p2/x.png"]),
        ]
    data = json.loads(write_json(reports, tmp_path / "out.json").read_text())
    first, second = data["patients"]
    # New keys are added, never renamed: the original keys stay (test_icsh checks the new ones).
    assert set(first) >= {
        "patient_id", "n_images", "n_cells", "counts", "diagnosis", "probabilities", "images",
        "failed_images", "diagnosis_error",
    }  # fmt: skip
    assert list(first["counts"]) == list(taxonomy.CLASSES)
    assert set(first["images"][0]) >= {"file", "cells"}  # + "quality"
    assert set(first["images"][0]["cells"][0]) >= {"box", "label", "score", "attributes"}
    assert list(first["probabilities"]) == list(taxonomy.DIAGNOSES)
    assert second["diagnosis"] is None and second["failed_images"] == {
        "p2/x.png": "INVALID_ARGUMENT: IMAGE: cannot decode image (corrupt JPEG)"
    }
    with write_csv(reports, tmp_path / "out.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["patient_id"] for r in rows] == ["P1", "P2"]
    assert int(rows[0]["n_cells"]) == first["n_cells"]
    assert sum(int(rows[0][f"n_{c}"]) for c in taxonomy.CLASSES) == first["n_cells"]
    assert rows[1]["n_failed_images"] == "1" and rows[1]["diagnosis"] == ""
    for row, patient in zip(rows, data["patients"], strict=True):  # the JSON's numbers
        assert int(row["n_excluded_images"]) == len(patient["excluded_images"])
        assert int(row["unidentified"]) == patient["differential"]["unidentified"]


def _touch(path: Path, data: bytes | None = None) -> None:
    """A file; by default its bytes are its name, so that no two are copies of each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(path.name.encode() if data is None else data)


def test_cohort_layouts_that_cannot_be_interpreted_are_refused(tmp_path):
    with pytest.raises(CohortError, match="not a folder"):
        discover(tmp_path / "missing")
    with pytest.raises(CohortError, match="no patient sub-folders"):
        discover(tmp_path)
    _touch(tmp_path / "flat" / "a.jpg")
    with pytest.raises(CohortError, match=r"holds images directly \(a.jpg\)"):
        discover(tmp_path / "flat")
    _touch(tmp_path / "nested" / "P1" / "slide1" / "a.jpg")
    with pytest.raises(CohortError, match="sub-folders: P1/slide1"):
        discover(tmp_path / "nested")


def test_cohort_reports_unsupported_and_stray_files(tmp_path):
    _touch(tmp_path / "P1" / "a.JPG")
    _touch(tmp_path / "P1" / "b.png")
    _touch(tmp_path / "P1" / "c.tif")  # camera formats: the client decodes them itself
    _touch(tmp_path / "P1" / "d.BMP")
    _touch(tmp_path / "P1" / "notes.txt")
    _touch(tmp_path / "P1" / "labs.json", json.dumps({"ldh_u_l": 400}).encode())
    (tmp_path / "P2").mkdir()
    _touch(tmp_path / "README.md")
    _touch(tmp_path / "ground_truth.json", b"{}")
    cohort = discover(tmp_path)
    p1, p2 = cohort.patients
    assert p1.names == ["P1/a.JPG", "P1/b.png", "P1/c.tif", "P1/d.BMP"]
    assert p1.labs == {"ldh_u_l": 400}
    assert list(p1.problems) == ["P1/notes.txt"]
    assert p2.problems == {"P2/": "no image files in the patient folder"}
    assert cohort.warnings == ["ignored README.md: not a patient folder"]


def test_a_folder_of_unsupported_files_only_says_so(tmp_path):
    """A patient folder holding only a GIF is not "given no images": the report names the
    unsupported files (and refers for them); an empty folder stays "no images given"."""
    from marrowdx.client.aggregate import build_report
    from marrowdx.client.async_client import NO_IMAGES
    from marrowdx.client.cli import _name_unsupported_only
    from marrowdx.client.review import DEFAULT_THRESHOLDS, NO_DIAGNOSIS

    _touch(tmp_path / "P1" / "a.gif")
    (tmp_path / "P2").mkdir()
    for folder in discover(tmp_path).patients:
        empty = np.zeros(config.N_CLASSES, np.int64)
        report = build_report(folder.patient_id, [], {}, empty, None, NO_IMAGES)
        report.failed_images.update(folder.problems)
        _name_unsupported_only(report, DEFAULT_THRESHOLDS)
        reasons = {r.code: r.message for r in report.review_reasons}
        if folder.patient_id == "P1":
            assert report.diagnosis_error.startswith("no image of a supported type (1 file(s)")
            assert reasons[NO_DIAGNOSIS] == f"no diagnosis: {report.diagnosis_error}"
        else:
            assert report.diagnosis_error == NO_IMAGES


def test_a_copy_of_an_image_is_reported_not_counted_twice(tmp_path):
    _touch(tmp_path / "P1" / "IMG_1.jpg", b"field one")
    _touch(tmp_path / "P1" / "IMG_1 (1).jpg", b"field one")  # the same field, copied twice
    _touch(tmp_path / "P1" / "IMG_1 copy.png", b"field one")
    _touch(tmp_path / "P1" / "IMG_2.jpg", b"field two")  # the same size, other bytes
    _touch(tmp_path / "P2" / "IMG_1.jpg", b"field one")  # another patient's: not a copy
    _touch(tmp_path / "P2" / "a.jpg", b"")  # empty files fail as empty, each of them
    _touch(tmp_path / "P2" / "b.jpg", b"")
    p1, p2 = discover(tmp_path).patients
    kept = "P1/IMG_1 (1).jpg"  # the first in name order
    assert p1.names == [kept, "P1/IMG_2.jpg"]
    assert set(p1.problems) == {"P1/IMG_1 copy.png", "P1/IMG_1.jpg"}
    for reason in p1.problems.values():
        assert f"the same bytes as {kept}" in reason and "twice" in reason
    assert p2.names == ["P2/IMG_1.jpg", "P2/a.jpg", "P2/b.jpg"] and not p2.problems


def test_cohort_skips_files_the_operating_system_writes_with_one_warning(tmp_path):
    _touch(tmp_path / "P1" / "a.jpg")
    _touch(tmp_path / "P1" / "._a.jpg")  # macOS AppleDouble fork: an image's suffix, no image
    _touch(tmp_path / "P1" / ".DS_Store")
    _touch(tmp_path / "P1" / "Thumbs.db")
    _touch(tmp_path / "P1" / ".thumbnails" / "a.png")  # a hidden folder is no nesting
    _touch(tmp_path / "__MACOSX" / "P1" / "._a.jpg")  # a zip made on macOS, unpacked
    _touch(tmp_path / ".DS_Store")
    cohort = discover(tmp_path)
    (p1,) = cohort.patients
    assert p1.names == ["P1/a.jpg"] and p1.problems == {}
    (warning,) = cohort.warnings
    assert warning.startswith("skipped 6 hidden or system file(s) (.DS_Store, __MACOSX, ")
    assert "P1/._a.jpg" in warning and "written by the operating system" in warning


def test_importing_the_client_stays_thin():
    code = (
        "import sys, marrowdx.client\n"
        "from marrowdx.client import MarrowClient, AsyncMarrowClient, PatientReport\n"
        "import marrowdx.client.cli, marrowdx.client.cohort, marrowdx.client.aggregate\n"
        "heavy = ('torch', 'onnxruntime', 'nvidia.dali', 'tensorrt', 'onnx', 'matplotlib', 'PIL')\n"
        "loaded = [m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy)]\n"
        "print(sorted(loaded))\n"
        "assert 'tritonclient.grpc.aio' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("status", "message", "transient"),
    [
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", True),
        ("StatusCode.UNAVAILABLE", "Server is stopping, scheduler", True),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", True),
        (
            "StatusCode.NOT_FOUND",
            "Request for unknown model: 'pipeline' has no available versions",
            True,
        ),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'pipelin' is not found", False),
        ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'IMAGE'", False),
        ("StatusCode.INTERNAL", "preprocess: not an image", False),
    ],
)
def test_which_server_errors_are_retried(status, message, transient):
    from tritonclient.utils import InferenceServerException

    from marrowdx.client.transport import is_transient

    assert is_transient(InferenceServerException(message, status=status)) is transient
