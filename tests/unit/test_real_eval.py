"""Scoring real crops: what is flagged, and what is wrong yet counted."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from marrowdx import taxonomy
from marrowdx.client.report import Cell, ImageResult
from marrowdx.datasets.labels import LabelTarget
from marrowdx.training.real_eval import NO_CELL, score_crops


def _crop(label: str) -> SimpleNamespace:
    return SimpleNamespace(path=Path(f"{label}.jpg"), label=label)


def _result(label: str | None, **flags: bool) -> ImageResult:
    cells = () if label is None else (Cell((40, 40, 60, 60), label, 0.9, {}, 0.9, **flags),)
    return ImageResult("x.jpg", cells, {}, (100, 100))


def test_crop_scores_split_found_cells_into_flagged_and_confidently_wrong() -> None:
    blast = taxonomy.CLASSES.index("myelocytic_blast")
    lympho = taxonomy.CLASSES.index("lymphocyte")
    dataset = SimpleNamespace(
        name="toy",
        label_map={
            "BLA": LabelTarget("classes", (blast,), "blasts"),
            "LYT": LabelTarget("classes", (lympho,), "lymphocyte"),
        },
    )
    crops = [_crop("BLA"), _crop("BLA"), _crop("BLA"), _crop("LYT"), _crop("LYT")]
    results = [
        _result("myelocytic_blast"),  # right, counted
        _result("lymphocyte"),  # wrong, counted: confidently wrong
        _result("lymphocyte", unfamiliar=True),  # wrong, flagged
        _result("lymphocyte", unidentified=True),  # right, flagged
        _result(None),  # no cell: not among the found ones
    ]
    scores = score_crops(dataset, results, crops)
    assert scores.confusion[0] == [1, 2, 0, 0]
    assert scores.labels[-1] == NO_CELL and scores.confusion[1][-1] == 1
    assert scores.flagged == 2 / 4
    assert scores.unfamiliar == 1 / 4
    assert scores.confidently_wrong == 1 / 4
