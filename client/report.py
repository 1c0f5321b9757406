"""Result dataclasses and the two file formats the client writes (JSON and CSV).

Standard library only, so reports can be loaded and written anywhere. The JSON layout is
the ``diagnose --json`` contract (docs/contracts.md), plus ``failed_images`` per patient (an
image that failed is never silently dropped) and ``diagnosis_error`` (why a patient got
no diagnosis, or null).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from marrowdx import taxonomy
from marrowdx.differential import WITHHELD, Differential, differential

#: Decimals kept in the written files: sub-pixel boxes and 4-digit scores are plenty,
#: and rounding keeps the JSON readable and diffable.
BOX_DECIMALS = 2
SCORE_DECIMALS = 4
PROBABILITY_DECIMALS = 6
#: Percentages (blast %, its interval) and the M:E ratio: two decimals is below what 500
#: counted cells can resolve (one cell = 0.2 %).
PERCENT_DECIMALS = 2
RATIO_DECIMALS = 3


@dataclass(frozen=True)
class Cell:
    """One detected cell, in the original image's pixels.

    ``probability`` is the (calibrated) probability of ``label``, the top class; a cell
    whose probability is below the client's ``unidentified_below`` is ``unidentified``: it
    keeps its best-guess label (for review) but is not counted in the differential.
    ``familiarity`` is the served FAMILIARITY (1 at a class mean, 0 at the fitted limit; None
    from a server without it); a cell below the client's ``min_familiarity`` is
    ``unfamiliar``: unlike the cells the classifier was trained on, so its label is only a
    guess; it is listed apart and not counted either. An unfamiliar cell is never also
    ``unidentified`` (the stronger statement wins), so the two groups never overlap.
    """

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    label: str
    score: float
    attributes: dict[str, str]
    probability: float | None = None
    unidentified: bool = False
    familiarity: float | None = None
    unfamiliar: bool = False

    @property
    def counted(self) -> bool:
        """Whether the cell enters the counts (neither unidentified nor unfamiliar)."""
        return not (self.unidentified or self.unfamiliar)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "box": [round(float(v), BOX_DECIMALS) for v in self.box],
            "label": self.label,
            "score": round(float(self.score), SCORE_DECIMALS),
            "attributes": dict(self.attributes),
            "unidentified": bool(self.unidentified),
            "unfamiliar": bool(self.unfamiliar),
        }
        if self.probability is not None:
            out["probability"] = round(float(self.probability), SCORE_DECIMALS)
        if self.familiarity is not None:
            out["familiarity"] = round(float(self.familiarity), SCORE_DECIMALS)
        return out


@dataclass(frozen=True)
class ImageResult:
    """What the server found in one image.

    ``counts`` are the server's per-image ``CLASS_COUNTS`` less the unidentified cells
    (what the patient sum uses); ``size`` is the original (height, width) the server decoded.
    ``quality`` holds the server's FIELD_QUALITY measures (None from a server without them);
    ``excluded`` is why the quality gate left the field out (``marrowdx.client.quality``):
    then ``counts`` are all 0 and the report lists it in ``excluded_images``.
    """

    file: str
    cells: tuple[Cell, ...]
    counts: dict[str, int]
    size: tuple[int, int]
    quality: dict[str, float] | None = None
    excluded: str | None = None

    @property
    def n_unidentified(self) -> int:
        """Cells found but left out of ``counts``: no class was probable enough."""
        return sum(c.unidentified for c in self.cells)

    @property
    def n_unfamiliar(self) -> int:
        """Cells found but left out of ``counts``: unlike anything the classifier learned."""
        return sum(c.unfamiliar for c in self.cells)

    @property
    def warnings(self) -> list[str]:
        """What to tell the user about an image counted with a caveat (none here: the
        client's images add an uncertain spacing and a slight blur,
        ``client.fields.SpacedImageResult``)."""
        return []

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"file": self.file, "cells": [c.to_dict() for c in self.cells]}
        if self.quality is not None:
            out["quality"] = {k: round(float(v), SCORE_DECIMALS) for k, v in self.quality.items()}
        return out


@dataclass(frozen=True)
class ReviewReason:
    """Why a patient is referred for review: a stable ``code`` for programs, a ``message``
    with the numbers for people (codes in ``marrowdx.client.review``)."""

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else round(100.0 * fraction, PERCENT_DECIMALS)


def differential_to_dict(d: Differential) -> dict[str, object]:
    """The ``differential`` object of the JSON contract (percentages, not fractions)."""
    return {
        "nucleated_cells": d.nucleated_cells,
        "blasts": d.blasts,
        "blast_percent": _percent(d.blast_fraction),
        "blast_percent_ci95": [_percent(v) for v in d.blast_ci95],
        "blast_call": d.blast_call,
        "blast_threshold_percent": _percent(d.blast_threshold),
        "myeloid_cells": d.myeloid_cells,
        "erythroid_cells": d.erythroid_cells,
        "me_ratio": None if d.me_ratio is None else round(d.me_ratio, RATIO_DECIMALS),
        "lineages": dict(d.lineages),
        "not_in_differential": dict(d.not_counted),
        "unidentified": d.unidentified,
        "unfamiliar": d.unfamiliar,
    }


@dataclass
class PatientReport:
    """Per-patient differential count and diagnosis.

    ``n_images`` counts the images that were processed (``len(images)``); every image that
    was not is in ``failed_images`` (file name, or ``#index`` for in-memory bytes, mapped to
    the reason, usually the server's own message). ``diagnosis`` is None when no diagnosis
    could be made, and ``diagnosis_error`` then says why.

    Counting (ICSH): with ``target_cells`` > 0 the count covers the first ``fields_used``
    fields in the given order, up to the one at which the nucleated count reached the target;
    the ``fields_skipped`` after it are not counted (see
    ``marrowdx.differential.fields_to_target``). ``differential`` is derived from ``counts``;
    ``review_reasons`` (empty: no referral) are set by ``marrowdx.client.review``.

    ``leukemia_pattern`` is what the differential fits by counting rules
    (``marrowdx.differential.leukemia_pattern``). When it fits none of ALL, AML and CML
    (``"none"``), the cells found and not counted could change the pattern the counted ones
    fit (``"unsettled"``), or too few cells were counted to read one (``"too_few_cells"``), no
    leukaemia is named: ``diagnosis`` is None, ``probabilities``
    empty and ``diagnosis_error`` says why, while ``model_probabilities`` keep what the
    diagnosis model answered among the three (for the reviewer; it always answers one).
    """

    patient_id: str
    n_images: int
    n_cells: int
    counts: dict[str, int]
    fractions: dict[str, float]
    diagnosis: str | None
    probabilities: dict[str, float]
    images: list[ImageResult] = field(default_factory=list)
    failed_images: dict[str, str] = field(default_factory=dict)
    #: Fields the quality gate left out of the counts: file -> reason (client.quality).
    excluded_images: dict[str, str] = field(default_factory=dict)
    diagnosis_error: str | None = None
    target_cells: int = 0
    fields_used: int = 0
    fields_skipped: int = 0
    n_unidentified: int = 0
    unidentified_below: float | None = None
    review_reasons: list[ReviewReason] = field(default_factory=list)
    n_unfamiliar: int = 0
    min_familiarity: float | None = None
    leukemia_pattern: str | None = None
    model_probabilities: dict[str, float] = field(default_factory=dict)

    @property
    def differential(self) -> Differential:
        """Nucleated differential, blast % with its 95% interval, M:E ratio, lineages."""
        return differential(self.counts, self.n_unidentified, unfamiliar=self.n_unfamiliar)

    @property
    def diagnosis_withheld(self) -> bool:
        """No leukaemia named because the differential fits none, because the cells not
        counted could change the pattern it fits, or because too few cells were counted to
        read one (a result, not a failure)."""
        return self.withheld_because is not None

    @property
    def withheld_because(self) -> str | None:
        """Why no leukaemia was named, in a few words (the CLI table), or None if one was or
        the diagnosis failed (the model did not answer: a failure, whatever the pattern)."""
        if self.diagnosis is not None or self.leukemia_pattern is None:
            return None
        if not self.model_probabilities:
            return None
        withheld = WITHHELD.get(self.leukemia_pattern)
        return withheld.in_words if withheld else None

    @property
    def target_reached(self) -> bool:
        """A target was set and the nucleated count reached it."""
        return 0 < self.target_cells <= self.differential.nucleated_cells

    @property
    def refer_for_review(self) -> bool:
        return bool(self.review_reasons)

    def unidentified_cells(self) -> list[tuple[str, Cell]]:
        """(image file, cell) of every unidentified cell, for review, in image order."""
        return [(image.file, c) for image in self.images for c in image.cells if c.unidentified]

    def unfamiliar_cells(self) -> list[tuple[str, Cell]]:
        """(image file, cell) of every unfamiliar cell, for review, in image order."""
        return [(image.file, c) for image in self.images for c in image.cells if c.unfamiliar]

    @property
    def complete(self) -> bool:
        """Nothing failed: every image was processed and, if any cell was found, the
        diagnosis model answered. (No cell in any image is a result, not a failure; so is a
        diagnosis withheld because the differential fits no leukaemia.)"""
        answered = self.diagnosis is not None or self.diagnosis_withheld
        return not self.failed_images and (answered or self.n_cells == 0)

    @property
    def probability(self) -> float | None:
        """Probability of the reported diagnosis."""
        return None if self.diagnosis is None else self.probabilities[self.diagnosis]

    def top_classes(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` most frequent classes with their fraction (ties in taxonomy order)."""
        ranked = sorted(
            (c for c in taxonomy.CLASSES if self.counts.get(c, 0) > 0),
            key=lambda c: (-self.counts[c], taxonomy.CLASS_INDEX[c]),
        )
        return [(c, self.fractions.get(c, 0.0)) for c in ranked[:k]]

    def to_dict(self) -> dict[str, object]:
        return {
            "patient_id": self.patient_id,
            "n_images": self.n_images,
            "n_cells": self.n_cells,
            "counts": dict(self.counts),
            "diagnosis": self.diagnosis,
            "probabilities": {
                k: round(float(v), PROBABILITY_DECIMALS) for k, v in self.probabilities.items()
            },
            "images": [image.to_dict() for image in self.images],
            "failed_images": dict(self.failed_images),
            "excluded_images": dict(self.excluded_images),
            "diagnosis_error": self.diagnosis_error,
            "target_cells": self.target_cells,
            "target_reached": self.target_reached,
            "fields_used": self.fields_used,
            "fields_skipped": self.fields_skipped,
            "differential": differential_to_dict(self.differential),
            "unidentified_below": self.unidentified_below,
            "min_familiarity": self.min_familiarity,
            "leukemia_pattern": self.leukemia_pattern,
            "model_probabilities": {
                k: round(float(v), PROBABILITY_DECIMALS)
                for k, v in self.model_probabilities.items()
            },
            "refer_for_review": self.refer_for_review,
            "review_reasons": [r.to_dict() for r in self.review_reasons],
        }


def cohort_to_dict(reports: Iterable[PatientReport]) -> dict[str, object]:
    return {"patients": [r.to_dict() for r in reports]}


def write_json(reports: Sequence[PatientReport], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cohort_to_dict(reports), indent=2) + "\n", encoding="utf-8")
    return path


#: Fixed leading CSV columns; one ``p_<diagnosis>`` and one ``n_<class>`` column follow.
CSV_LEADING_COLUMNS = (
    "patient_id",
    "n_images",
    "n_failed_images",
    "n_cells",
    "diagnosis",
    "probability",
)


#: ICSH counting and review columns, appended after the original ones (never reordered).
CSV_COUNTING_COLUMNS = (
    "nucleated_cells",
    "blast_percent",
    "blast_ci95_low",
    "blast_ci95_high",
    "blast_call",
    "me_ratio",
    "fields_used",
    "refer_for_review",
    "review_reasons",
    "unfamiliar",
    "leukemia_pattern",
    "unidentified",
    "n_excluded_images",
)


def csv_columns() -> list[str]:
    return [
        *CSV_LEADING_COLUMNS,
        *(f"p_{d}" for d in taxonomy.DIAGNOSES),
        *(f"n_{c}" for c in taxonomy.CLASSES),
        "diagnosis_error",
        *CSV_COUNTING_COLUMNS,
    ]


def write_csv(reports: Sequence[PatientReport], path: str | Path) -> Path:
    """One row per patient: the differential as counts, so spreadsheets can re-derive %."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns())
        writer.writeheader()
        for r in reports:
            row: dict[str, object] = {
                "patient_id": r.patient_id,
                "n_images": r.n_images,
                "n_failed_images": len(r.failed_images),
                "n_cells": r.n_cells,
                "diagnosis": r.diagnosis or "",
                "probability": "" if r.probability is None else f"{r.probability:.6f}",
                "diagnosis_error": r.diagnosis_error or "",
            }
            for d in taxonomy.DIAGNOSES:
                p = r.probabilities.get(d)
                row[f"p_{d}"] = "" if p is None else f"{p:.6f}"
            for c in taxonomy.CLASSES:
                row[f"n_{c}"] = r.counts.get(c, 0)
            d = differential_to_dict(r.differential)
            low, high = d["blast_percent_ci95"]  # type: ignore[misc]
            row.update(
                nucleated_cells=d["nucleated_cells"],
                blast_percent="" if d["blast_percent"] is None else d["blast_percent"],
                blast_ci95_low=low,
                blast_ci95_high=high,
                blast_call=d["blast_call"],
                me_ratio="" if d["me_ratio"] is None else d["me_ratio"],
                fields_used=r.fields_used,
                refer_for_review=int(r.refer_for_review),
                review_reasons="; ".join(x.code for x in r.review_reasons),
                unfamiliar=d["unfamiliar"],
                leukemia_pattern=r.leukemia_pattern or "",
                unidentified=d["unidentified"],
                n_excluded_images=len(r.excluded_images),
            )
            writer.writerow(row)
    return path
