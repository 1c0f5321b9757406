"""Scoring real crops: what is flagged, and what is wrong yet counted."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from marrowdx import taxonomy
from marrowdx.client.report import Cell, ImageResult
from marrowdx.datasets.labels import LabelTarget
from marrowdx.training.real_eval import NO_CELL, score_crops, score_fields


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
    results[0] = replace(results[0], excluded="too thick: ...")  # scored, and reported
    scores = score_crops(dataset, results, crops)
    assert scores.confusion[0] == [1, 2, 0, 0]
    assert scores.labels[-1] == NO_CELL and scores.confusion[1][-1] == 1
    assert scores.flagged == 2 / 4
    assert scores.unfamiliar == 1 / 4
    assert scores.confidently_wrong == 1 / 4
    assert scores.excluded == 1 / 5


def test_field_scores_report_flagged_and_unfamiliar_white_cells() -> None:
    lympho = taxonomy.CLASSES.index("lymphocyte")
    white = LabelTarget("classes", (lympho,), "lymphocyte")
    field = SimpleNamespace(
        labels=["WBC", "WBC"],
        targets=[white, white],
        boxes=np.array([[0, 0, 20, 20], [40, 40, 60, 60]], np.float32),
    )
    cells = (
        Cell((0, 0, 20, 20), "lymphocyte", 0.9, {}, 0.9),
        Cell((40, 40, 60, 60), "lymphocyte", 0.8, {}, 0.9, unfamiliar=True),
        Cell((70, 70, 90, 90), "monocyte", 0.7, {}, 0.4, unidentified=True),
    )
    result = ImageResult("f.jpg", cells, {}, (100, 100))
    scores = score_fields(SimpleNamespace(name="toy"), [result], [field])
    assert scores.n_white_cells == 2 and scores.extra_white_cells_per_field == 1
    assert scores.flagged_white_cells == 2 / 3
    assert scores.unfamiliar_white_cells == 1 / 3
    assert scores.per_label["WBC"].found == 2 and scores.per_label["WBC"].called == 1


def test_field_labels_count_the_boxes_found_and_those_called_that_label() -> None:
    plasma = taxonomy.CLASSES.index("plasma_cell")
    lympho = taxonomy.CLASSES.index("lymphocyte")
    nucleated = tuple(taxonomy.CLASSES.index(c) for c in taxonomy.NUCLEATED_CLASSES)
    dataset = SimpleNamespace(
        name="myeloma",
        label_map={
            "PC": LabelTarget("classes", (plasma,), "plasma_cell"),
            "LY": LabelTarget("classes", (lympho,), "lymphocyte"),
            "WBC": LabelTarget("classes", nucleated, "nucleated"),
        },
    )
    boxes = [[0, 0, 20, 20], [30, 0, 50, 20], [60, 0, 80, 20], [0, 60, 20, 80], [60, 60, 90, 90]]
    red = LabelTarget("red_cell", (), "red_cell")
    field = SimpleNamespace(
        labels=["PC", "PC", "PC", "LY", "RBC", "WBC"],
        targets=[
            *[dataset.label_map["PC"]] * 3,
            dataset.label_map["LY"],
            red,
            dataset.label_map["WBC"],
        ],
        boxes=np.array([*boxes, [0, 30, 20, 50]], np.float32),
    )
    cells = (
        Cell((0, 0, 20, 20), "plasma_cell", 0.9, {}, 0.9),  # found, called
        Cell((31, 1, 50, 20), "promyelocyte", 0.8, {}, 0.9),  # found, called another class
        Cell((0, 60, 20, 80), "lymphocyte", 0.7, {}, 0.4, unidentified=True),  # not counted
        Cell((60, 60, 90, 90), "plasma_cell", 0.9, {}, 0.9),  # on a red cell: no label's
        Cell((0, 30, 20, 50), "lymphocyte", 0.9, {}, 0.9),  # a white cell: the group's class
    )  # the third plasma cell is not found
    result = ImageResult("f.jpg", cells, {}, (100, 100))
    scores = score_fields(dataset, [result, "unreadable"], [field, field])
    pc, ly = scores.per_label["PC"], scores.per_label["LY"]
    assert set(scores.per_label) == {"PC", "LY", "WBC"}
    assert (pc.boxes, pc.found, pc.called) == (6, 2, 1)
    assert (ly.boxes, ly.found, ly.called) == (2, 1, 0)
    wbc = scores.per_label["WBC"]  # called though the finer LY also holds lymphocytes
    assert (wbc.boxes, wbc.found, wbc.called) == (2, 1, 1)
