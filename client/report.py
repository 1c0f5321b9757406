"""Result dataclasses and the two file formats the client writes (JSON and CSV).

Standard library only, so reports can be loaded and written anywhere. The JSON layout is
the ``diagnose --json`` contract of DESIGN.md, plus ``failed_images`` per patient (an
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

#: Decimals kept in the written files: sub-pixel boxes and 4-digit scores are plenty,
#: and rounding keeps the JSON readable and diffable.
BOX_DECIMALS = 2
SCORE_DECIMALS = 4
PROBABILITY_DECIMALS = 6


@dataclass(frozen=True)
class Cell:
    """One detected cell, in the original image's pixels."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    label: str
    score: float
    attributes: dict[str, str]

    def to_dict(self) -> dict[str, object]:
        return {
            "box": [round(float(v), BOX_DECIMALS) for v in self.box],
            "label": self.label,
            "score": round(float(self.score), SCORE_DECIMALS),
            "attributes": dict(self.attributes),
        }


@dataclass(frozen=True)
class ImageResult:
    """What the server found in one image.

    ``counts`` are the server's per-image ``CLASS_COUNTS`` (what the patient sum uses);
    ``size`` is the original (height, width) the server decoded.
    """

    file: str
    cells: tuple[Cell, ...]
    counts: dict[str, int]
    size: tuple[int, int]

    def to_dict(self) -> dict[str, object]:
        return {"file": self.file, "cells": [c.to_dict() for c in self.cells]}


@dataclass
class PatientReport:
    """Per-patient differential count and diagnosis.

    ``n_images`` counts the images that were processed (``len(images)``); every image that
    was not is in ``failed_images`` (file name, or ``#index`` for in-memory bytes, mapped to
    the reason, usually the server's own message). ``diagnosis`` is None when no diagnosis
    could be made, and ``diagnosis_error`` then says why.
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
    diagnosis_error: str | None = None

    @property
    def complete(self) -> bool:
        """Nothing failed: every image was processed and, if any cell was found, the
        diagnosis model answered. (No cell in any image is a result, not a failure.)"""
        return not self.failed_images and (self.diagnosis is not None or self.n_cells == 0)

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
            "diagnosis_error": self.diagnosis_error,
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


def csv_columns() -> list[str]:
    return [
        *CSV_LEADING_COLUMNS,
        *(f"p_{d}" for d in taxonomy.DIAGNOSES),
        *(f"n_{c}" for c in taxonomy.CLASSES),
        "diagnosis_error",
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
            writer.writerow(row)
    return path
