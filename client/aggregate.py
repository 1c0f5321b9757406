"""From raw model outputs to cells, per-patient sums and the diagnosis model's inputs.

Pure numpy, no I/O: the async client feeds it what the server returned, and tests can
check the arithmetic without a server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from marrowdx.client.report import Cell, ImageResult, PatientReport

from marrowdx import config, taxonomy
from marrowdx.preprocess import boxes_to_original

#: An attribute is reported with its "present/high" value at or above this probability.
ATTRIBUTE_THRESHOLD = 0.5
#: How far the diagnosis probabilities may sum from 1 before the output is rejected as not
#: being probabilities at all (float32 softmax rounding is far below this).
PROBABILITY_SUM_TOLERANCE = 1e-3


class BadServerOutput(ValueError):
    """The server answered with tensors that break the contract (shape, range)."""


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise BadServerOutput(f"{name} has shape {list(array.shape)}, expected {list(shape)}")


def decode_image(file: str, outputs: Mapping[str, np.ndarray]) -> ImageResult:
    """Turn one image's ensemble outputs into cells in original-image pixels.

    Labels are the argmax of CLASS_PROBS over the valid rows; the image's counts are the
    server's CLASS_COUNTS (the same argmax, computed in the graph).
    """
    t = config.TENSORS
    k = config.MAX_DETECTIONS
    boxes, scores = outputs[t.boxes], outputs[t.scores]
    class_probs, attribute_probs = outputs[t.class_probs], outputs[t.attribute_probs]
    _check_shape(t.boxes, boxes, (k, 4))
    _check_shape(t.scores, scores, (k,))
    _check_shape(t.class_probs, class_probs, (k, config.N_CLASSES))
    _check_shape(t.attribute_probs, attribute_probs, (k, config.N_ATTRIBUTES))
    _check_shape(t.class_counts, outputs[t.class_counts], (config.N_CLASSES,))
    _check_shape(t.letterbox, outputs[t.letterbox], (4,))
    _check_shape(t.image_size, outputs[t.image_size], (2,))
    n = int(np.asarray(outputs[t.num_detections]).reshape(-1)[0])
    if not 0 <= n <= k:
        raise BadServerOutput(f"{t.num_detections} is {n}, outside 0..{k}")

    original = boxes_to_original(boxes[:n], outputs[t.letterbox])
    labels = class_probs[:n].argmax(axis=1)
    present = attribute_probs[:n] >= ATTRIBUTE_THRESHOLD
    cells = tuple(
        Cell(
            box=tuple(float(v) for v in original[i]),  # type: ignore[arg-type]
            label=taxonomy.CLASSES[int(labels[i])],
            score=float(scores[i]),
            attributes={
                name: taxonomy.attribute_value(name, bool(present[i, j]))
                for j, name in enumerate(taxonomy.ATTRIBUTE_NAMES)
            },
        )
        for i in range(n)
    )
    counts = np.rint(outputs[t.class_counts]).astype(np.int64)
    if (counts < 0).any():
        raise BadServerOutput(f"{t.class_counts} has negative entries")
    height, width = (int(v) for v in outputs[t.image_size])
    return ImageResult(
        file=file,
        cells=cells,
        counts={c: int(counts[i]) for i, c in enumerate(taxonomy.CLASSES)},
        size=(height, width),
    )


def sum_counts(images: Sequence[ImageResult]) -> np.ndarray:
    """Per-class totals over a patient's processed images (taxonomy order)."""
    total = np.zeros(config.N_CLASSES, dtype=np.int64)
    for image in images:
        total += np.array([image.counts[c] for c in taxonomy.CLASSES], dtype=np.int64)
    return total


@dataclass(frozen=True)
class DiagnosisInputs:
    fractions: np.ndarray  # FP32 [N_CLASSES], sums to 1 (or all zero when no cells)
    total_cells: float
    lab_values: np.ndarray  # FP32 [N_LAB_VALUES], zero where absent
    lab_mask: np.ndarray  # FP32 [N_LAB_VALUES], 1 where present


def lab_arrays(labs: Mapping[str, float | None] | None) -> tuple[np.ndarray, np.ndarray]:
    """Lab values in the model's order plus a presence mask; None or missing = absent."""
    values = np.zeros(config.N_LAB_VALUES, dtype=np.float32)
    mask = np.zeros(config.N_LAB_VALUES, dtype=np.float32)
    if not labs:
        return values, mask
    unknown = sorted(set(labs) - set(config.LAB_VALUE_NAMES))
    if unknown:
        raise ValueError(f"unknown lab value(s) {unknown}; known: {list(config.LAB_VALUE_NAMES)}")
    for i, name in enumerate(config.LAB_VALUE_NAMES):
        value = labs.get(name)
        if value is None:
            continue
        value = float(value)
        if not np.isfinite(value):
            raise ValueError(f"lab value {name!r} is not a finite number: {value}")
        values[i], mask[i] = value, 1.0
    return values, mask


def diagnosis_inputs(
    counts: np.ndarray, labs: Mapping[str, float | None] | None
) -> DiagnosisInputs:
    total = float(counts.sum())
    fractions = (counts / total if total > 0 else np.zeros_like(counts)).astype(np.float32)
    values, mask = lab_arrays(labs)
    return DiagnosisInputs(fractions, total, values, mask)


def probabilities(raw: np.ndarray) -> dict[str, float]:
    """DIAGNOSIS_PROBS as a dict that sums to exactly 1 (float32 rounding removed)."""
    raw = np.asarray(raw, dtype=np.float64).reshape(-1)
    if raw.shape != (config.N_DIAGNOSES,):
        raise BadServerOutput(
            f"DIAGNOSIS_PROBS has {raw.size} values, expected {config.N_DIAGNOSES}"
        )
    if (
        not np.isfinite(raw).all()
        or (raw < 0).any()
        or abs(raw.sum() - 1) > PROBABILITY_SUM_TOLERANCE
    ):
        raise BadServerOutput(f"DIAGNOSIS_PROBS are not probabilities: {raw.tolist()}")
    raw = raw / raw.sum()
    return {d: float(raw[i]) for i, d in enumerate(taxonomy.DIAGNOSES)}


def build_report(
    patient_id: str,
    images: Sequence[ImageResult],
    failed_images: Mapping[str, str],
    counts: np.ndarray,
    probs: Mapping[str, float] | None,
    diagnosis_error: str | None,
) -> PatientReport:
    total = int(counts.sum())
    diagnosis = max(probs, key=probs.__getitem__) if probs else None
    return PatientReport(
        patient_id=patient_id,
        n_images=len(images),
        n_cells=total,
        counts={c: int(counts[i]) for i, c in enumerate(taxonomy.CLASSES)},
        fractions={
            c: (float(counts[i]) / total if total else 0.0) for i, c in enumerate(taxonomy.CLASSES)
        },
        diagnosis=diagnosis,
        probabilities=dict(probs or {}),
        images=list(images),
        failed_images=dict(failed_images),
        diagnosis_error=diagnosis_error if diagnosis is None else None,
    )
