"""The client against the real Triton server: counts, failures, and a server restart.

Reference values come from raw tritonclient calls to the same server, so the test checks the
client's arithmetic and bookkeeping, not the (tiny-preset) models' quality.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from marrowdx import config, taxonomy
from marrowdx.client import MarrowClient
from marrowdx.client.fields import SpacingInfo
from marrowdx.differential import WITHHOLDING_PATTERNS
from marrowdx.preprocess import boxes_to_original
from marrowdx.serving.server import SHM_DIR

pytestmark = pytest.mark.server

#: Model fields at the models' spacing (the simulator's): the client sends each as its own
#: bytes, so the raw pipeline called on the same file is the exact reference. (The client
#: mirror-pads any other size to a field, never enlarging it as the server's letterbox would;
#: that mapping is tested in tests/unit/test_client_spacing.py.)
FIELD_SIZE = config.FIELD_SIZE  # width, height
SEED = 6060
#: Seconds to wait for a server (started by this test) to load its models.
READY_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict]:
    from marrowdx.simulate import simulate_cohort

    root = tmp_path_factory.mktemp("client-cohort")
    return root, simulate_cohort(root, 2, SEED, images_per_patient=3, size=FIELD_SIZE)


def patient_paths(cohort: tuple[Path, dict], index: int) -> tuple[str, list[Path]]:
    root, gt = cohort
    patient = gt["patients"][index]
    return patient["patient_id"], [root / image["file"] for image in patient["images"]]


def raw_pipeline(url: str, data: bytes) -> dict[str, np.ndarray]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput(config.TENSORS.image, [1, len(data)], "UINT8")
        tensor.set_data_from_numpy(np.frombuffer(data, np.uint8).reshape(1, -1))
        result = client.infer(config.MODELS.pipeline, [tensor])
        return {out.name: result.as_numpy(out.name)[0] for out in result.get_response().outputs}
    finally:
        client.close()


def raw_diagnosis(url: str, counts: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    arrays = {
        config.TENSORS.fractions: (counts / counts.sum()).astype(np.float32)[None],
        config.TENSORS.total_cells: np.array([[counts.sum()]], np.float32),
        config.TENSORS.lab_values: np.zeros((1, config.N_LAB_VALUES), np.float32),
        config.TENSORS.lab_mask: np.zeros((1, config.N_LAB_VALUES), np.float32),
    }
    client = grpcclient.InferenceServerClient(url)
    try:
        inputs = []
        for name, array in arrays.items():
            inputs.append(grpcclient.InferInput(name, list(array.shape), "FP32"))
            inputs[-1].set_data_from_numpy(array)
        return client.infer(config.MODELS.diagnosis, inputs).as_numpy(
            config.TENSORS.diagnosis_probs
        )[0]
    finally:
        client.close()


def test_counts_are_the_sum_of_the_ensembles_per_image_counts(triton_server, cohort):
    url = triton_server.grpc_url
    patient_id, paths = patient_paths(cohort, 0)
    raws = [raw_pipeline(url, path.read_bytes()) for path in paths]
    tops = [
        r[config.TENSORS.class_probs][: int(r[config.TENSORS.num_detections][0])].max(axis=1)
        for r in raws
    ]
    # a threshold with cells on both sides, so counting and flagging are both exercised
    threshold = float(np.median(np.concatenate(tops))) if sum(map(len, tops)) else 0.5
    with MarrowClient(url, unidentified_below=threshold) as client:
        report = client.diagnose_patient(patient_id, paths, um_per_pixel=config.MODEL_UM_PER_PIXEL)
    assert report.complete, report.failed_images

    total = np.zeros(config.N_CLASSES, np.int64)
    n_unidentified = 0
    for path, image, raw, top in zip(paths, report.images, raws, tops, strict=True):
        n = int(raw[config.TENSORS.num_detections][0])
        labels = raw[config.TENSORS.class_probs][:n].argmax(axis=1)
        server_counts = raw[config.TENSORS.class_counts]
        # The server's per-image counts are the argmax counts over its valid rows.
        np.testing.assert_array_equal(
            server_counts, np.bincount(labels, minlength=config.N_CLASSES)
        )
        # the client counts them less its unfamiliar and (other) unidentified cells
        unfamiliar = raw[config.TENSORS.familiarity][:n] < report.min_familiarity
        flagged = (top < threshold) & ~unfamiliar
        assert [c.unidentified for c in image.cells] == flagged.tolist()
        assert [c.unfamiliar for c in image.cells] == unfamiliar.tolist()
        n_unidentified += int(flagged.sum())
        total += server_counts.astype(np.int64)
        total -= np.bincount(labels[flagged | unfamiliar], minlength=config.N_CLASSES)
        assert image.file == str(path)
        assert image.spacing == SpacingInfo(config.MODEL_UM_PER_PIXEL, "given")  # one field
        assert [c.label for c in image.cells] == [taxonomy.CLASSES[i] for i in labels]
        assert image.size == (FIELD_SIZE[1], FIELD_SIZE[0])
        want_boxes = boxes_to_original(raw[config.TENSORS.boxes][:n], raw[config.TENSORS.letterbox])
        got_boxes = np.array([c.box for c in image.cells], np.float32).reshape(-1, 4)
        np.testing.assert_allclose(got_boxes, want_boxes, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose([c.score for c in image.cells], raw[config.TENSORS.scores][:n])

    assert total.sum() > 0, "the tiny models found no cell at all: nothing is being tested"
    assert [report.counts[c] for c in taxonomy.CLASSES] == total.tolist()
    assert report.n_cells == total.sum() and report.n_images == len(paths)
    assert report.n_unidentified == n_unidentified
    want = raw_diagnosis(url, total)
    # the model's answer; named as the diagnosis unless the differential fits no leukaemia,
    # the cells not counted could change the pattern it fits or too few were counted
    assert [report.model_probabilities[d] for d in taxonomy.DIAGNOSES] == pytest.approx(
        want.tolist(), abs=1e-6
    )
    if report.leukemia_pattern in WITHHOLDING_PATTERNS:
        assert report.diagnosis is None and report.probabilities == {}
    else:
        assert report.diagnosis == taxonomy.DIAGNOSES[int(want.argmax())]
        assert report.probabilities == report.model_probabilities
        assert sum(report.probabilities.values()) == pytest.approx(1.0, abs=1e-9)


def test_bad_images_are_reported_with_the_servers_reason(triton_server, cohort, tmp_path):
    patient_id, paths = patient_paths(cohort, 1)
    good = paths[0].read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 3])
    images = [b"this is not an image", truncated, paths[0]]
    with MarrowClient(triton_server.grpc_url, concurrency=1) as client:
        report = client.diagnose_patient(patient_id, images)
        assert client.retries == 0  # a bad image is the server's final answer
    assert set(report.failed_images) == {"#0", str(truncated)}
    for reason in report.failed_images.values():
        assert reason and not reason.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED")), reason
    # The good image after the bad ones is still served and counted, and gives a diagnosis.
    assert report.n_images == 1 and report.images[0].file == str(paths[0])
    assert report.counts == {c: n for c, n in report.images[0].counts.items()}
    assert not report.complete
    # A diagnosis comes from the good image's cells (none found: no diagnosis, and why; a
    # differential that fits no leukaemia, rests on uncounted cells or on too few cells,
    # names none either).
    answered = report.diagnosis is not None or report.diagnosis_withheld
    assert answered == (report.n_cells > 0), report.diagnosis_error


# --------------------------------------------------------------------- server restart
@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_a_server_restart_mid_patient_loses_and_double_counts_nothing(
    stop, built_repository, cohort, tmp_path
):
    from tests.helpers.reliability import own_server

    _, paths = patient_paths(cohort, 0)
    patient_id = "PATIENT-ZX81-Doe"  # must never reach the server or its log
    paths = paths * 2  # 6 requests: enough left in flight when the server dies
    names = [f"{i}-ZX81-{p.name}" for i, p in enumerate(paths)]
    first_done = threading.Event()
    result: dict[str, object] = {}

    log_path = tmp_path / "server.log"
    # Logs every request verbosely, so the log can be searched for identifiers.
    with own_server(
        built_repository, log_path, log_verbose=1, ready_timeout=READY_TIMEOUT_S
    ) as launched:
        url = launched.grpc_url
        with MarrowClient(url, concurrency=1) as client:
            reference = client.diagnose_patient(patient_id, paths, names=names)
        assert reference.complete

        def diagnose() -> None:
            with MarrowClient(url, concurrency=1) as client:
                result["report"] = client.diagnose_patient(
                    patient_id, paths, names=names, on_image=lambda *_: first_done.set()
                )
                result["retries"] = client.retries

        worker = threading.Thread(target=diagnose)
        worker.start()
        assert first_done.wait(READY_TIMEOUT_S)
        regions = set(launched.server.shm_regions)
        if stop == "sigkill":  # a crash: in-flight requests die with the server
            os.killpg(launched.pid, signal.SIGKILL)
        launched.server.stop()  # SIGTERM: Triton refuses new requests, unloads, exits
        # a killed server's model processes leave their shared memory behind: released
        assert regions and not [r for r in regions if (SHM_DIR / r).exists()]
        time.sleep(1.0)  # clients see the server gone
        # A new Triton on the same ports, not waited for: the client's retries are tested.
        launched.restart(wait=False)
        worker.join(READY_TIMEOUT_S + 60)
        assert not worker.is_alive()

    report = result["report"]
    assert result["retries"] > 0, "no request was in flight across the restart"
    assert report.complete, (report.failed_images, report.diagnosis_error)
    # Every image exactly once, under its own name, with the counts of the undisturbed run.
    assert [i.file for i in report.images] == names
    assert [i.counts for i in report.images] == [i.counts for i in reference.images]
    assert report.counts == reference.counts and report.n_cells == reference.n_cells
    assert report.probabilities == pytest.approx(reference.probabilities, abs=1e-6)
    log = log_path.read_text(errors="replace")
    # Triton writes "<id_unknown>" where a message has no request attached.
    logged_ids = set(re.findall(r"request id: (\S+?)\]", log)) - {"<id_unknown>"}
    assert logged_ids, "the verbose log shows no request ids: nothing was checked"
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in logged_ids), logged_ids
    assert "ZX81" not in log and paths[0].name not in log and paths[0].parent.name not in log
