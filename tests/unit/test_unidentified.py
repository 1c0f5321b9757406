"""Unidentified cells: a cell whose top class probability is below the client's threshold
is flagged, listed for review, and left out of the counts, the differential and the
diagnosis model's inputs. Runs the client's real decode/aggregate path with a stand-in
transport (no server)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

from marrowdx import config, taxonomy
from marrowdx.client import aggregate
from marrowdx.client.async_client import AsyncMarrowClient
from marrowdx.client.report import ImageResult, cohort_to_dict
from marrowdx.errors import BadServerOutput, InputError

T = config.TENSORS
#: (label index, top probability) of the cells in the stand-in image
CELLS = [(3, 0.95), (3, 0.40), (7, 0.55), (7, 0.30), (12, 0.80)]


def outputs(cells=CELLS) -> dict[str, np.ndarray]:
    """One image's ensemble outputs with the given labels and top probabilities."""
    k = config.MAX_DETECTIONS
    probs = np.zeros((k, config.N_CLASSES), np.float32)
    boxes = np.zeros((k, 4), np.float32)
    scores = np.zeros(k, np.float32)
    for i, (label, p) in enumerate(cells):
        rest = (1.0 - p) / (config.N_CLASSES - 1)
        probs[i] = rest
        probs[i, label] = p
        boxes[i] = (20 * i, 10, 20 * i + 15, 25)
        scores[i] = 0.9
    counts = np.bincount([c for c, _ in cells], minlength=config.N_CLASSES).astype(np.float32)
    return {
        T.boxes: boxes,
        T.scores: scores,
        T.num_detections: np.array([len(cells)], np.int32),
        T.class_probs: probs,
        T.attribute_probs: np.zeros((k, config.N_ATTRIBUTES), np.float32),
        T.class_counts: counts,
        T.letterbox: np.array([1, 1, 0, 0], np.float32),
        T.image_size: np.array([512, 512], np.int32),
    }


def test_cells_below_the_threshold_are_flagged_and_not_counted() -> None:
    image = aggregate.decode_image("a.jpg", outputs(), unidentified_below=0.5)
    flags = [c.unidentified for c in image.cells]
    assert flags == [False, True, False, True, False]
    assert [c.label for c in image.cells] == [taxonomy.CLASSES[c] for c, _ in CELLS]
    assert image.cells[1].probability == pytest.approx(0.40)
    assert image.n_unidentified == 2
    names = taxonomy.CLASSES
    assert image.counts[names[3]] == 1 and image.counts[names[7]] == 1
    assert image.counts[names[12]] == 1 and sum(image.counts.values()) == 3


def test_threshold_zero_counts_every_cell_and_one_flags_every_cell() -> None:
    everything = aggregate.decode_image("a.jpg", outputs(), unidentified_below=0.0)
    assert everything.n_unidentified == 0 and sum(everything.counts.values()) == len(CELLS)
    nothing = aggregate.decode_image("a.jpg", outputs(), unidentified_below=1.0)
    assert nothing.n_unidentified == len(CELLS) and sum(nothing.counts.values()) == 0


def test_counts_that_disagree_with_the_labels_are_refused() -> None:
    bad = outputs()
    bad[T.class_counts] = np.zeros(config.N_CLASSES, np.float32)  # says no cell at all
    with pytest.raises(BadServerOutput, match="disagree"):
        aggregate.decode_image("a.jpg", bad, unidentified_below=0.5)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_bad_thresholds_are_refused(value: float) -> None:
    with pytest.raises(InputError, match="probability in \\[0, 1\\]"):
        aggregate.check_unidentified_below(value)
    with pytest.raises(InputError):
        AsyncMarrowClient(unidentified_below=value)


class StandInTransport:
    """Answers every image with ``outputs()`` and records the diagnosis inputs."""

    def __init__(self) -> None:
        self.diagnosis_calls: list[tuple[np.ndarray, float]] = []

    async def infer_image(self, data: bytes) -> dict[str, np.ndarray]:
        return outputs()

    async def infer_diagnosis(self, fractions, total_cells, lab_values, lab_mask) -> np.ndarray:
        self.diagnosis_calls.append((np.asarray(fractions), float(total_cells)))
        return np.array([0.2, 0.5, 0.3], np.float32)

    async def close(self) -> None:
        pass


def _diagnose(threshold: float):
    client = AsyncMarrowClient("127.0.0.1:1", unidentified_below=threshold, target_cells=0)
    transport = StandInTransport()
    client._transport = transport  # type: ignore[assignment]
    report = asyncio.run(client.diagnose_patient("P1", [b"x1", b"x2"]))
    return report, transport


def test_patient_report_and_diagnosis_inputs_exclude_unidentified_cells() -> None:
    report, transport = _diagnose(0.5)
    assert report.n_unidentified == 4 and report.n_cells == 6
    assert report.unidentified_below == 0.5
    assert [f for f, _ in report.unidentified_cells()] == ["#0", "#0", "#1", "#1"]
    ((fractions, total),) = transport.diagnosis_calls
    assert total == 6.0
    expected = np.zeros(config.N_CLASSES)
    expected[[3, 7, 12]] = 2 / 6
    np.testing.assert_allclose(fractions, expected, atol=1e-6)
    data = cohort_to_dict([report])["patients"][0]
    assert data["unidentified_below"] == 0.5
    assert data["differential"]["unidentified"] == 4
    cells = data["images"][0]["cells"]
    assert [c["unidentified"] for c in cells] == [False, True, False, True, False]
    assert cells[1]["probability"] == pytest.approx(0.4)
    json.dumps(data)  # the JSON contract stays serialisable


def test_a_patient_whose_cells_are_all_unidentified_is_told_so_not_that_none_were_found() -> None:
    """Every cell found but none identified: the report says what became of them, and the
    diagnosis model is not asked; with no cell found at all it says none was detected."""
    report, transport = _diagnose(1.0)
    assert report.diagnosis is None and not transport.diagnosis_calls
    assert report.diagnosis_error == "no cell counted in 2 processed images: 10 cells unidentified"
    empty = ImageResult(file="a", cells=(), counts={}, size=(10, 10))
    assert aggregate.nothing_counted([empty], "1 processed image") == (
        "no cells detected in 1 processed image"
    )
    excluded = ImageResult(
        file="b", cells=(), counts={}, size=(10, 10), excluded="out of focus: ..."
    )
    assert aggregate.nothing_counted([empty, excluded], "2 processed images") == (
        "no cell counted in 2 processed images: 1 excluded"
    )


def test_threshold_zero_keeps_the_previous_behaviour() -> None:
    report, transport = _diagnose(0.0)
    assert report.n_unidentified == 0 and report.n_cells == 2 * len(CELLS)
    assert transport.diagnosis_calls[0][1] == 2 * len(CELLS)


def test_diagnose_flag_refuses_a_bad_value_with_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "marrowdx", "diagnose", ".", "--unidentified-below", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--unidentified-below" in proc.stderr and "not a probability" in proc.stderr
