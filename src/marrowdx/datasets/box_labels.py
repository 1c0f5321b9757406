"""Finer labels for some of a data set's boxes, kept in a table beside it.

Why a table and not edited label files: a public set is downloaded as its authors wrote it,
and a lab that types some of its cells ("this white cell is a neutrophil") should not have
to rewrite the set's files or keep a private copy of its images. The table names each box by
its image and its coordinates; a box of the set drawn at the same place takes the table's
label, which the declaration then maps onto the taxonomy like any other label. The
declaration names the table (``box_labels``); a row whose image is not in the copy is
skipped (a copy may hold a subset), a row whose image is there but whose box is not is an
error, so a table never silently stops applying.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from marrowdx.datasets.base import BOX_TOLERANCE_PX, DatasetError, RawField, check_box_shape

#: The columns a table must have (others, such as an index, are kept out of the way).
COLUMNS: tuple[str, ...] = ("file", "x0", "y0", "x1", "y1", "label")


@dataclass(frozen=True)
class BoxLabel:
    """One row of a table (its image is the key it is filed under): the box (image pixels,
    x0, y0, x1, y1), its label and the table line, for errors."""

    box: tuple[float, float, float, float]
    label: str
    line: int


def read_box_labels(path: Path) -> dict[str, list[BoxLabel]]:
    """The table's rows by image file name; errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: box label table not found") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not a UTF-8 CSV file ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DatasetError(
            f"{path}: box label table needs the columns {', '.join(COLUMNS)}; "
            f"missing {', '.join(missing)}"
        )
    rows: dict[str, list[BoxLabel]] = {}
    for line, row in enumerate(reader, start=2):
        where = f"{path}:{line}"
        try:
            x0, y0, x1, y1 = (float(row[c]) for c in ("x0", "y0", "x1", "y1"))
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: box coordinates are not numbers") from None
        label = (row["label"] or "").strip()
        if not label or not (row["file"] or "").strip():
            raise DatasetError(f"{where}: empty file name or label")
        box = check_box_shape((x0, y0, x1, y1), where)
        name = Path(row["file"].strip()).name
        rows.setdefault(name, []).append(BoxLabel(box, label, line))
    return rows


def apply_box_labels(
    fields: Sequence[RawField], table: dict[str, list[BoxLabel]], table_path: Path
) -> tuple[list[RawField], int]:
    """The fields with each row's box relabelled, and how many rows applied. A row matches a
    box, in a field of its file name (any split), whose every coordinate lies within
    ``BOX_TOLERANCE_PX`` of its own (rounding in the tool that wrote either)."""
    by_name: dict[str, list[int]] = {}
    for i, raw in enumerate(fields):
        by_name.setdefault(raw.path.name, []).append(i)
    labels = [list(raw.labels) for raw in fields]
    applied = 0
    for name, rows in table.items():
        candidates = by_name.get(name, [])
        if not candidates:
            continue  # an image this copy does not hold
        for row in rows:
            i, j = _box_at(fields, candidates, row.box)
            if i < 0:
                raise DatasetError(
                    f"{table_path}:{row.line}: no box of {name} lies at {list(row.box)} "
                    f"(within {BOX_TOLERANCE_PX:g} px); the table does not fit this copy"
                )
            labels[i][j] = row.label
            applied += 1
    return [replace(raw, labels=new) for raw, new in zip(fields, labels, strict=True)], applied


def _box_at(
    fields: Sequence[RawField], candidates: list[int], box: tuple[float, float, float, float]
) -> tuple[int, int]:
    """(field, box) index of the closest box within tolerance among ``candidates``, or
    (-1, -1)."""
    best, where = BOX_TOLERANCE_PX, (-1, -1)
    for i in candidates:
        distance = np.abs(np.asarray(fields[i].boxes, np.float64) - box).max(axis=1)
        if len(distance) and distance.min() <= best:
            best, where = float(distance.min()), (i, int(distance.argmin()))
    return where
