"""From raw model outputs to cells, per-patient sums and the diagnosis model's inputs.

Pure numpy, no I/O: the async client feeds it what the server returned, and tests can
check the arithmetic without a server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from marrowdx import config, differential, taxonomy
from marrowdx.client.quality import (
    DEFAULT_QUALITY,
    NOT_A_SMEAR,
    QualityThresholds,
    SmearEvidence,
    at_full_light,
    cells_verdict,
    field_quality,
    quality_verdict,
    smear_measured,
    spacing_verdict,
)
from marrowdx.client.report import Cell, ImageResult, PatientReport
from marrowdx.client.review import DEFAULT_THRESHOLDS, ReviewThresholds, review_reasons
from marrowdx.errors import BadServerOutput, InputError
from marrowdx.preprocess import boxes_to_original
from marrowdx.wording import quantity

#: An attribute is reported with its "present/high" value at or above this probability.
ATTRIBUTE_THRESHOLD = 0.5
#: How far the diagnosis probabilities may sum from 1 before the output is rejected as not
#: being probabilities at all (float32 softmax rounding is far below this).
PROBABILITY_SUM_TOLERANCE = 1e-3
#: Default ``unidentified_below`` (see ``config.UNIDENTIFIED_BELOW``).
DEFAULT_UNIDENTIFIED_BELOW = config.UNIDENTIFIED_BELOW
#: Default ``min_familiarity``: a cell whose served FAMILIARITY is below this is unfamiliar.
#: 0 is the limit fitted into the classifier (``training.calibration.fit_familiarity``: a
#: quantile of held-out in-domain cells), so the served score already carries the limit
#: and the client need not know the weights; docs/unfamiliar_cells.md says how it was
#: chosen and what it flags.
DEFAULT_MIN_FAMILIARITY = 0.0


def check_min_familiarity(value: float) -> float:
    """The limit as a float at most 1 (``-inf`` turns the rule off), or InputError."""
    value = float(value)
    if np.isnan(value) or value > 1.0:
        raise InputError(f"min_familiarity must be a number <= 1 (or -inf), got {value}")
    return value


def check_unidentified_below(value: float) -> float:
    """The threshold as a float in [0, 1] (0 turns the rule off), or InputError saying why."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise InputError(f"unidentified_below must be a probability in [0, 1], got {value}")
    return value


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise BadServerOutput(f"{name} has shape {list(array.shape)}, expected {list(shape)}")


def decode_image(
    file: str,
    outputs: Mapping[str, np.ndarray],
    unidentified_below: float = DEFAULT_UNIDENTIFIED_BELOW,
    quality: QualityThresholds = DEFAULT_QUALITY,
    min_familiarity: float = DEFAULT_MIN_FAMILIARITY,
    light: float | None = None,
) -> ImageResult:
    """Turn one image's ensemble outputs into cells in original-image pixels.

    A field that fails the quality gate (``quality``; see ``marrowdx.client.quality``)
    keeps its cells for review but counts 0 of each class, with the reason in ``excluded``.

    Labels are the argmax of CLASS_PROBS over the valid rows; a cell whose top probability
    is below ``unidentified_below`` is flagged unidentified, and one whose FAMILIARITY is
    below ``min_familiarity`` unfamiliar (instead). The image's counts are the server's
    CLASS_COUNTS (the same argmax, computed in the graph) less both kinds of cells; a
    server without FAMILIARITY (an older repository) flags no cell unfamiliar.

    The field is excluded when the quality gate fails or, with the gate on, when its cells
    are far from the size the models work at (``quality.spacing_verdict``). ``light``, the
    grey level of the image's glass when known, has its focus judged at full light
    (``quality.at_full_light``); the measures reported stay as measured.
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
    served = outputs.get(t.familiarity)
    familiarity = None
    if served is not None:
        familiarity = np.asarray(served, np.float32)
        _check_shape(t.familiarity, familiarity, (k,))
        if not np.isfinite(familiarity[:n]).all():
            raise BadServerOutput(f"{t.familiarity} has values that are not finite")

    original = boxes_to_original(boxes[:n], outputs[t.letterbox])
    labels = class_probs[:n].argmax(axis=1)
    top = class_probs[:n].max(axis=1) if n else np.zeros(0, np.float32)
    unfamiliar = familiarity[:n] < min_familiarity if familiarity is not None else np.zeros(n, bool)
    unidentified = (top < unidentified_below) & ~unfamiliar
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
            probability=float(top[i]),
            unidentified=bool(unidentified[i]),
            familiarity=None if familiarity is None else float(familiarity[i]),
            unfamiliar=bool(unfamiliar[i]),
        )
        for i in range(n)
    )
    counts = np.rint(outputs[t.class_counts]).astype(np.int64)
    if (counts < 0).any():
        raise BadServerOutput(f"{t.class_counts} has negative entries")
    counts -= np.bincount(labels[unidentified | unfamiliar], minlength=config.N_CLASSES)
    if (counts < 0).any():
        raise BadServerOutput(f"{t.class_counts} disagree with the labels of {t.class_probs}")
    height, width = (int(v) for v in outputs[t.image_size])
    measures = field_quality(outputs)
    at_light = at_full_light(measures, light)
    excluded = quality_verdict(at_light, quality, evidence=SmearEvidence.of(cells))
    if excluded is None and smear_measured(at_light):
        # (a server without the smear measures is judged as before)
        excluded = cells_verdict(n, int(unfamiliar.sum()), at_light, quality) or spacing_verdict(
            boxes[:n], labels, quality
        )
    if excluded is not None:
        counts[:] = 0
    return ImageResult(
        file=file,
        cells=cells,
        counts={c: int(counts[i]) for i, c in enumerate(taxonomy.CLASSES)},
        size=(height, width),
        quality=measures,
        excluded=excluded,
    )


def sum_counts(images: Sequence[ImageResult]) -> np.ndarray:
    """Per-class totals over a patient's processed images (taxonomy order)."""
    total = np.zeros(config.N_CLASSES, dtype=np.int64)
    for image in images:
        total += np.array([image.counts[c] for c in taxonomy.CLASSES], dtype=np.int64)
    return total


def nothing_counted(results: Sequence[ImageResult], processed: str) -> str:
    """Why a patient whose ``processed`` images or fields (``results``, "4 processed
    images") have no cell counted gets no diagnosis: none detected, or what became of those
    that were (their image excluded, the cells unidentified or unfamiliar). Why: "no cells
    detected" said of cells that were found but not identified sends a reviewer to the
    scanner instead of to the models' limits."""
    excluded = sum(result.excluded is not None for result in results)
    found = [cell for result in results if result.excluded is None for cell in result.cells]
    unidentified = sum(cell.unidentified for cell in found)
    unfamiliar = sum(cell.unfamiliar for cell in found)
    if not excluded and not unidentified and not unfamiliar:
        return f"no cells detected in {processed}"
    parts = [f"{excluded} excluded"] if excluded else []
    if unidentified:
        parts.append(f"{quantity(unidentified, 'cell')} unidentified")
    if unfamiliar:
        parts.append(f"{quantity(unfamiliar, 'cell')} unfamiliar")
    return f"no cell counted in {processed}: {', '.join(parts)}"


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


#: An image's outcome while a patient is being counted: its result, the failure reason, or
#: None while it is still in flight (or was never started).
Outcome = ImageResult | str | None


def field_nucleated(outcome: Outcome) -> int | None:
    """Nucleated cells one field adds to the count (a failed field adds 0; None = unknown)."""
    if outcome is None:
        return None
    return 0 if isinstance(outcome, str) else differential.nucleated_count(outcome.counts)


@dataclass(frozen=True)
class FieldSelection:
    """The fields a patient's count covers, by ``differential.fields_to_target``'s rule."""

    images: list[ImageResult]  # processed fields among the first ``fields_used``, in order
    failed: dict[str, str]  # failed fields among them: name -> reason
    fields_used: int
    fields_skipped: int  # fields after the target was reached: never counted


def cut_at_target(outcomes: Sequence[Outcome], target_cells: int) -> int | None:
    """Fields needed to reach the target, once decided (see ``fields_to_target``)."""
    return differential.fields_to_target([field_nucleated(o) for o in outcomes], target_cells)


def select_fields(
    names: Sequence[str], outcomes: Sequence[Outcome], target_cells: int
) -> FieldSelection:
    """Apply the counting rule to a patient's outcomes (in field order).

    Without a decided cut every field must have its outcome; with one, fields after it are
    discarded whatever their state, so the result never depends on which requests were
    still in flight when the target was reached.
    """
    if len(names) != len(outcomes):
        raise ValueError(f"{len(names)} names for {len(outcomes)} outcomes")
    cut = cut_at_target(outcomes, target_cells)
    used = len(outcomes) if cut is None else cut
    if any(o is None for o in outcomes[:used]):
        raise ValueError("a field inside the count has no outcome yet")
    kept = list(zip(names[:used], outcomes[:used], strict=True))
    return FieldSelection(
        images=[o for _, o in kept if isinstance(o, ImageResult)],
        failed={n: o for n, o in kept if isinstance(o, str)},
        fields_used=used,
        fields_skipped=len(outcomes) - used,
    )


def exclusion(image: ImageResult) -> str:
    """Why ``image`` (excluded) is left out, with the warnings that say what to do about it:
    an uncertain spacing estimate (a single-cell crop sent without its spacing is judged as
    a field), unless the reason says so already, and overexposure; none when the reason
    names what no spacing or light changes (``not a stained smear:`` its colour, texture or
    light: blank paper is as white as clipped glass)."""
    reason = image.excluded or ""
    if reason.startswith(f"{NOT_A_SMEAR}:"):
        return reason
    said = "--um-per-pixel" in reason
    return "; ".join([reason, *(w for w in image.warnings if not (said and "--um-per-pixel" in w))])


def build_report(
    patient_id: str,
    images: Sequence[ImageResult],
    failed_images: Mapping[str, str],
    counts: np.ndarray,
    probs: Mapping[str, float] | None,
    diagnosis_error: str | None,
    *,
    target_cells: int = 0,
    fields_used: int | None = None,
    fields_skipped: int = 0,
    review: ReviewThresholds = DEFAULT_THRESHOLDS,
    unidentified_below: float | None = None,
    min_familiarity: float | None = None,
) -> PatientReport:
    """The patient's report, with its referral reasons under ``review``'s thresholds.

    ``counts`` exclude the unidentified and unfamiliar cells (see :func:`decode_image`);
    their numbers are summed from ``images``, ``unidentified_below`` and
    ``min_familiarity`` are recorded as the rules used.

    When the differential fits none of ALL, AML and CML, or the cells found and not counted
    could change the pattern it fits (``differential.leukemia_pattern``), no leukaemia is
    named: the diagnosis model's answer is kept in ``model_probabilities`` only, and
    ``diagnosis_error`` says why.
    """
    total = int(counts.sum())
    fields_used = len(images) + len(failed_images) if fields_used is None else fields_used
    # fields the quality gate excluded count 0 cells: listed apart, not among the images
    excluded = {im.file: exclusion(im) for im in images if im.excluded is not None}
    images = [im for im in images if im.excluded is None]
    n_unidentified = sum(image.n_unidentified for image in images)
    n_unfamiliar = sum(image.n_unfamiliar for image in images)
    pattern = differential.leukemia_pattern(
        {c: int(counts[i]) for i, c in enumerate(taxonomy.CLASSES)},
        uncounted=n_unidentified + n_unfamiliar,
    )
    model_probabilities = dict(probs or {})
    if probs and pattern.withholds_diagnosis:
        probs, diagnosis_error = None, f"no leukaemia named: {pattern.reason}"
    diagnosis = max(probs, key=probs.__getitem__) if probs else None
    report = PatientReport(
        patient_id=patient_id,
        n_images=len(images),
        n_cells=total,
        counts={c: int(counts[i]) for i, c in enumerate(taxonomy.CLASSES)},
        fractions={
            c: float(f)
            for c, f in zip(taxonomy.CLASSES, differential.fractions(counts), strict=True)
        },
        diagnosis=diagnosis,
        probabilities=dict(probs or {}),
        images=list(images),
        failed_images=dict(failed_images),
        excluded_images=excluded,
        diagnosis_error=diagnosis_error if diagnosis is None else None,
        target_cells=target_cells,
        fields_used=fields_used,
        fields_skipped=fields_skipped,
        n_unidentified=n_unidentified,
        unidentified_below=unidentified_below,
        n_unfamiliar=n_unfamiliar,
        min_familiarity=min_familiarity,
        leukemia_pattern=pattern.pattern if total else None,
        model_probabilities=model_probabilities,
    )
    report.review_reasons = review_reasons(report, review)
    return report
