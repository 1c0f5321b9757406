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

from marrowdx.datasets.base import BOX_TOLERANCE_PX, DatasetError, RawField

#: The columns a table must have (others, such as an index, are kept out of the way).
COLUMNS: tuple[str, ...] = ("file", "x0", "y0", "x1", "y1", "label")


@dataclass(frozen=True)
class BoxLabel:
    """One row: the box (image pixels, x0, y0, x1, y1) in the image named ``file``."""

    file: str
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
            box = tuple(float(row[c]) for c in ("x0", "y0", "x1", "y1"))
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: box coordinates are not numbers") from None
        label = (row["label"] or "").strip()
        if not label or not (row["file"] or "").strip():
            raise DatasetError(f"{where}: empty file name or label")
        if not all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
            raise DatasetError(f"{where}: box {list(box)} is empty or not finite")
        name = Path(row["file"].strip()).name
        rows.setdefault(name, []).append(BoxLabel(name, box, label, line))  # type: ignore[arg-type]
    return rows


def apply_box_labels(
    fields: Sequence[RawField], table: dict[str, list[BoxLabel]], where: Path
) -> tuple[list[RawField], int]:
    """The fields with each row's box relabelled, and how many rows applied. A row matches the
    field box whose every coordinate lies within ``BOX_TOLERANCE_PX`` of its own (rounding in
    the tool that wrote either)."""
    out: list[RawField] = []
    applied = 0
    for raw in fields:
        rows = table.get(raw.path.name)
        if not rows:
            out.append(raw)
            continue
        labels = list(raw.labels)
        boxes = np.asarray(raw.boxes, np.float64).reshape(-1, 4)
        for row in rows:
            distance = np.abs(boxes - np.asarray(row.box)).max(axis=1) if len(boxes) else []
            hits = np.flatnonzero(np.asarray(distance) <= BOX_TOLERANCE_PX)
            if not len(hits):
                raise DatasetError(
                    f"{where}:{row.line}: no box of {raw.path} lies at {list(row.box)} "
                    f"(within {BOX_TOLERANCE_PX:g} px); the table does not fit this copy"
                )
            labels[int(hits[np.argmin(distance[hits])])] = row.label
            applied += 1
        out.append(replace(raw, labels=labels))
    return out, applied
