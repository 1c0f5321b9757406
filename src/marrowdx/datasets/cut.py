"""Cut the labelled cells of a set of fields out as single-cell crops, one folder per label.

Why: a lab that has boxed and typed cells in its own fields (YOLO, VOC, COCO, or a box-label
table beside a public set) holds the same kind of evidence as the public single-cell sets
(Munich, PBC, Raabin-WBC), but in a layout the crop scoring cannot read. Cut out, the cells
are scored like any crop set (``marrowdx evaluate --data OUT``: the class of the cell the
models find at each crop's centre), which is how this project's figure for other labs'
blood cells is made. Each crop is a square around its box, wide enough to show the cell's
neighbours as the public crops do, and may be resampled to one spacing so that the whole
set declares it; a declaration beside the crops carries the label map and the source's
notes (licence, citation) on.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from marrowdx.datasets.base import DECLARATION_NAME, AnnotatedField, DatasetError
from marrowdx.datasets.declaration import UNKNOWN, declaration_text
from marrowdx.datasets.labels import KIND_CLASSES, LabelTarget
from marrowdx.image_checks import upright_rgb
from marrowdx.spacing import check_um_per_pixel

#: The crop's side over its box's longer side: the cell and a ring of its neighbours, as
#: the public crop sets frame a cell (a Munich crop is 25 µm around a 10-15 µm cell).
DEFAULT_CONTEXT = 2.2
#: Characters a label keeps in its folder's name; others become "_" (a label such as
#: "band/segmented" cannot name one folder).
_UNSAFE = re.compile(r"[^\w.+-]")

Log = Callable[[str], None]


@dataclass(frozen=True)
class CutCrops:
    """What :func:`cut_crops` wrote: ``per_label`` crops per folder (label) name, the
    ``declaration`` beside them, and the fields left out because a resampled set was asked
    for and their spacing is not known (``unknown_spacing``: neither declared nor given by
    red-cell boxes)."""

    out: Path
    per_label: Counter[str] = field(default_factory=Counter)
    declaration: Path | None = None
    unknown_spacing: int = 0

    @property
    def n_crops(self) -> int:
        return sum(self.per_label.values())


def crop_window(
    box: np.ndarray, width: int, height: int, context: float = DEFAULT_CONTEXT
) -> tuple[int, int, int, int]:
    """The pixels (x0, y0, x1, y1) of a box's crop: a square of ``context`` times the box's
    longer side on the box's centre, clipped to the image (a cell at its edge keeps a
    narrower crop rather than invented pixels)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    half = context * max(x1 - x0, y1 - y0) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = max(0, round(cx - half)), max(0, round(cy - half))
    right, bottom = min(width, round(cx + half)), min(height, round(cy + half))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def folder_name(label: str) -> str:
    """The folder a label's crops go to: the label, with characters a folder name cannot
    safely hold replaced by "_"."""
    name = _UNSAFE.sub("_", label.strip()) or "_"
    return "_" + name if name.startswith(".") else name


def cut_crops(
    fields: list[AnnotatedField],
    label_map: dict[str, LabelTarget],
    out: Path,
    *,
    labels: Collection[str] | None = None,
    context: float = DEFAULT_CONTEXT,
    um_per_pixel: float | None = None,
    name: str = "crops",
    notes: dict[str, str] | None = None,
    log: Log | None = None,
) -> CutCrops:
    """Write OUT[/<split>]/<label>/<image stem>_<box>.png for every box of ``fields`` whose
    label (its source label) maps to classes in ``label_map`` and, when given, is one of
    ``labels``; then OUT/marrowdx-dataset.toml. ``um_per_pixel``: resample every crop to
    this spacing from its field's (:attr:`AnnotatedField.known_spacing`; fields without
    one are left out and counted); else the crops keep the fields' pixels, and the
    declaration states the fields' declared spacing, or "unknown". Errors name the problem:
    an ``out`` folder that is not empty, a label that is not in the set, no crop to cut.
    """
    out = Path(out)
    if context <= 0:
        raise DatasetError(
            f"context (the crop's side over the box's) must be positive, not {context}"
        )
    if um_per_pixel is not None:
        try:
            um_per_pixel = check_um_per_pixel(um_per_pixel, "the crops' um_per_pixel")
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: not empty; cut the crops into a new or empty folder")
    wanted = _wanted_labels(label_map, labels)
    _check_folder_names(wanted)
    per_label: Counter[str] = Counter()
    unknown = 0
    for n, f in enumerate(fields, start=1):
        rows = [i for i, label in enumerate(f.labels) if label in wanted]
        if log is not None and n % 100 == 0:
            log(f"  {n}/{len(fields)} fields, {sum(per_label.values())} crops")
        if not rows:
            continue
        factor = 1.0
        if um_per_pixel is not None:
            spacing = f.known_spacing
            if spacing is None:
                unknown += 1
                continue
            factor = spacing / um_per_pixel
        rgb = _decoded(f.path)
        folder = out / f.split if f.split is not None else out
        for i in rows:
            window = crop_window(f.boxes[i], f.width, f.height, context)
            crop = rgb.crop(window)
            if factor != 1.0:
                size = (max(1, round(crop.width * factor)), max(1, round(crop.height * factor)))
                crop = crop.resize(size, Image.Resampling.LANCZOS)
            label = folder_name(f.labels[i])
            target = folder / label
            target.mkdir(parents=True, exist_ok=True)
            path = target / f"{f.path.stem}_{i:03d}.png"
            if path.exists():  # another image of this stem (a.jpg beside a.png, subfolders)
                path = target / f"{f.path.stem}-{n}_{i:03d}.png"
            crop.save(path)
            per_label[label] += 1
    if not per_label:
        raise DatasetError(_nothing_cut(wanted, unknown))
    spacing_out: float | str = um_per_pixel or _shared_spacing(fields) or UNKNOWN
    declaration = out / DECLARATION_NAME
    declaration.write_text(
        _declaration(name, spacing_out, wanted, notes or {}, context), encoding="utf-8"
    )
    return CutCrops(out=out, per_label=per_label, declaration=declaration, unknown_spacing=unknown)


def _decoded(path: Path) -> Image.Image:
    """The field's upright pixels, or a ``DatasetError`` naming the image (a set read with
    headers only can hold a truncated file)."""
    try:
        return upright_rgb(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode the image ({exc})") from None


def _wanted_labels(
    label_map: dict[str, LabelTarget], labels: Collection[str] | None
) -> dict[str, LabelTarget]:
    """The labels to cut: those asked for (each must map to classes), else every label that
    maps to classes (red cells and ignored labels are no cell to type)."""
    cells = {k: t for k, t in label_map.items() if t.kind == KIND_CLASSES}
    if labels is None:
        return cells
    missing = [label for label in labels if label not in cells]
    if missing:
        known = ", ".join(sorted(cells)) or "none"
        raise DatasetError(
            f"no cells labelled {', '.join(missing)} in the set (labels that map to cells: {known})"
        )
    return {label: cells[label] for label in labels}


def _check_folder_names(wanted: dict[str, LabelTarget]) -> None:
    """Two labels whose folder names would be one (``folder_name``) would merge: an error."""
    seen: dict[str, str] = {}
    for label in wanted:
        other = seen.setdefault(folder_name(label), label)
        if other != label:
            raise DatasetError(
                f"labels {other!r} and {label!r} would share the folder {folder_name(label)!r}; "
                "map or cut them apart"
            )


def _shared_spacing(fields: list[AnnotatedField]) -> float | None:
    """The one declared spacing of all ``fields``, or None."""
    spacings = {f.um_per_pixel for f in fields}
    return spacings.pop() if len(spacings) == 1 else None


def _nothing_cut(wanted: dict[str, LabelTarget], unknown: int) -> str:
    if unknown:
        return (
            f"no crop cut: {unknown} fields hold the labels asked for but have no known "
            "spacing to resample from (declare the set's um_per_pixel, or label red cells)"
        )
    return f"no crop cut: no box is labelled {', '.join(sorted(wanted)) or 'as a cell'}"


def _declaration(
    name: str,
    spacing: float | str,
    wanted: dict[str, LabelTarget],
    notes: dict[str, str],
    context: float,
) -> str:
    cut = f"cut by `marrowdx data crops` (a square {context:g}x each box's longer side"
    cut += ", clipped to the image)" if spacing == UNKNOWN else f", at {spacing:g} µm/px)"
    values: dict[str, object] = {"name": name, "format": "crops", "um_per_pixel": spacing}
    values.update({k: v for k, v in notes.items() if k in ("source", "license", "citation", "url")})
    values["description"] = f"{notes['description']}; {cut}" if "description" in notes else cut
    targets = {folder_name(k): _as_declared(t) for k, t in wanted.items()}
    return declaration_text(header=[f"Single-cell crops {cut}."], values=values, labels=targets)


def _as_declared(target: LabelTarget) -> str | list[str]:
    """A target as a declaration writes it (a list of classes is named "a+b")."""
    parts = target.name.split("+")
    return parts[0] if len(parts) == 1 else parts
