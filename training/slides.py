"""A DICOM slide cohort as training/evaluation data: the fields the server sees, labelled.

``marrowdx build --data DIR``, ``marrowdx train --data DIR`` and ``marrowdx evaluate --data
DIR`` take a folder of slide patients (DIR/<patient_id>/ holding one slide's DICOM files and
its annotation series, found by content). Training on slides must use the same pixels the
served stack is sent, so each slide is tiled by the client's tiler
(``marrowdx.slides.tiling.tile``) into the overlapping fields ``diagnose`` sends by
default (``--slide-tiling fields``): they lie inside the labelled ROIs, whereas the slide's
own frames (``frame_fields``) reach beyond them, where cells are not labelled and would be
taught as background. Each ground-truth cell (Consensus by default, or one annotator's session) is
mapped from base-level slide pixels into field pixels. The result is an ordinary cohort
folder (fields as image files, ``ground_truth.json`` in field pixels) cached under the work
dir, so training and evaluation run their usual code and print the usual metrics table.

Cells cut by a field's edge are kept, clipped to the field, when at least ``MIN_VISIBLE`` of
the cell lies inside it: that is what the detector sees there, and the slide's own frames
(``--slide-tiling frame_fields``) abut, so a cell on a frame corner is seen only in
quarters, which the merge joins: the detector must learn to find such pieces. A thinner
sliver is left out. A cell in an overlap belongs to every field that holds it, so
per-patient counts in ``evaluate --data`` count it once per such field on both sides (truth
and prediction alike); ``diagnose`` merges fields and counts it once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from marrowdx import taxonomy
from marrowdx.errors import InputError

#: Bump when the field cohort's layout or labelling rule changes (cached cohorts rebuild).
FIELD_COHORT_FORMAT = 2
#: Share of a cell's area that must lie inside a field for it to be labelled there (below a
#: quarter, so that the four pieces of a cell on a frame corner are each labelled).
MIN_VISIBLE = 0.2
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class FieldCohort:
    """What converting a slide cohort produced: the cohort folder and what it left out."""

    root: Path
    patients: int
    fields: int
    cells: int
    #: Labels of the slides' annotations that map to none of the 33 classes -> count.
    unmapped_labels: dict[str, int] = field(default_factory=dict)
    #: Slide folders that could not be read -> the reader's reason.
    skipped: dict[str, str] = field(default_factory=dict)


def slide_folders(data_dir: Path) -> list[Path]:
    """The patient folders of ``data_dir`` that hold a slide; InputError when there are none."""
    from marrowdx.slides import is_slide_folder

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"--data {data_dir}: not a folder")
    folders = [p for p in sorted(data_dir.iterdir()) if p.is_dir() and is_slide_folder(p)]
    if not folders:
        raise InputError(
            f"--data {data_dir}: no slide folders (expected {data_dir}/<patient_id>/ holding a "
            "DICOM whole-slide image and its annotation series)"
        )
    return folders


def _cohort_key(folders: list[Path], source: str, tiling: str) -> str:
    """Hash of every file's name, size and mtime: a changed slide rebuilds the cohort."""
    head = f"format={FIELD_COHORT_FORMAT};source={source};tiling={tiling}"
    digest = hashlib.sha256(head.encode())
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(
                f"{path.relative_to(folder.parent)}:{stat.st_size}:{stat.st_mtime_ns};".encode()
            )
    return digest.hexdigest()[:16]


def cell_in_field(box, field_box, scale: float) -> list[float] | None:
    """A base-level cell box in field pixels, clipped to the field; None when less than
    ``MIN_VISIBLE`` of it lies inside."""
    x0, y0, x1, y1 = (float(v) for v in box)
    fx0, fy0, fx1, fy1 = (float(v) for v in field_box)
    area = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    cx0, cy0, cx1, cy1 = max(x0, fx0), max(y0, fy0), min(x1, fx1), min(y1, fy1)
    inside = max(cx1 - cx0, 0.0) * max(cy1 - cy0, 0.0)
    if area <= 0 or inside < MIN_VISIBLE * area:
        return None
    return [(cx0 - fx0) / scale, (cy0 - fy0) / scale, (cx1 - fx0) / scale, (cy1 - fy0) / scale]


def _slide_entry(
    folder: Path, out: Path, source: str, tiling: str, unmapped: dict[str, int]
) -> dict:
    """One slide -> its fields written under ``out/<folder name>/`` and the patient entry."""
    from marrowdx.slides import open_slide
    from marrowdx.slides.tiling import tile

    with open_slide(folder) as slide:
        truth = slide.ground_truth(source)
        for label, n in truth.get("unmapped_labels", {}).items():
            unmapped[label] = unmapped.get(label, 0) + int(n)
        by_roi: dict[tuple[int, ...], list[dict]] = {}
        for image in truth["images"]:
            by_roi.setdefault(tuple(int(v) for v in image["roi"]), []).extend(image["cells"])
        images = []
        (out / folder.name).mkdir(parents=True, exist_ok=True)
        counters: dict[int, int] = {}
        for view in tile(slide, tiling):
            j = counters[view.roi.index] = counters.get(view.roi.index, -1) + 1
            suffix = ".png" if view.data.startswith(_PNG_MAGIC) else ".jpg"
            name = f"{folder.name}/roi{view.roi.index}_field{j}{suffix}"
            (out / name).write_bytes(view.data)
            cells = []
            for cell in by_roi.get(tuple(view.roi.box), []):
                if cell["label"] not in taxonomy.CLASS_INDEX:
                    unmapped[cell["label"]] = unmapped.get(cell["label"], 0) + 1
                    continue
                box = cell_in_field(cell["box"], view.box, view.scale)
                if box is not None:
                    cells.append({**cell, "box": [round(v, 2) for v in box]})
            images.append({"file": name, "cells": cells})
        return {"patient_id": slide.patient_id, "diagnosis": slide.diagnosis, "images": images}


def field_cohort(
    data_dir: Path,
    work_dir: Path,
    *,
    source: str = "consensus",
    tiling: str = "fields",
    log: Callable[[str], None] | None = None,
) -> FieldCohort:
    """Convert (once; cached by content) a slide cohort into a field cohort under
    ``work_dir/cohorts/``. A slide that cannot be read is skipped and reported; none
    readable is an InputError."""
    from marrowdx.slides import SlideError

    folders = slide_folders(data_dir)
    out = Path(work_dir) / "cohorts" / f"slides-{_cohort_key(folders, source, tiling)}"
    summary = out / "field_cohort.json"
    if summary.exists() and (out / "ground_truth.json").exists():
        return FieldCohort(root=out, **json.loads(summary.read_text()))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    patients, skipped, unmapped = [], {}, {}
    for folder in folders:
        try:
            patients.append(_slide_entry(folder, tmp, source, tiling, unmapped))
        except SlideError as exc:
            skipped[folder.name] = str(exc)
            if log is not None:
                log(f"skipped slide {folder.name}: {exc}")
    if not patients:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"--data {data_dir}: no slide could be read: {skipped}")
    gt = {
        "classes": list(taxonomy.CLASSES),
        "attributes": {k: list(v) for k, v in taxonomy.ATTRIBUTES.items()},
        "diagnoses": list(taxonomy.DIAGNOSES),
        "patients": patients,
    }
    (tmp / "ground_truth.json").write_text(json.dumps(gt))
    n_fields = sum(len(p["images"]) for p in patients)
    n_cells = sum(len(i["cells"]) for p in patients for i in p["images"])
    result = {
        "patients": len(patients),
        "fields": n_fields,
        "cells": n_cells,
        "unmapped_labels": unmapped,
        "skipped": skipped,
    }
    (tmp / "field_cohort.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    if log is not None:
        log(f"{data_dir}: {len(patients)} slides -> {n_fields} fields, {n_cells} labelled cells")
    return FieldCohort(root=out, **result)
