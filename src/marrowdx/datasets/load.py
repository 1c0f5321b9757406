"""``load_dataset``: one call from a folder of public or lab data to labelled records."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from marrowdx.datasets.base import (
    FORMATS,
    AnnotatedField,
    CellCrop,
    DatasetError,
    RawField,
    as_boxes,
)
from marrowdx.datasets.box_labels import apply_box_labels, read_box_labels
from marrowdx.datasets.declaration import (
    UNKNOWN,
    Declaration,
    check_format,
    check_labels,
    find_declaration,
    parse_spacing,
    read_declaration,
)
from marrowdx.datasets.labels import LabelTarget, auto_target, resolve_target
from marrowdx.datasets.readers import READERS, detect_format, read_crops
from marrowdx.errors import InputError


@dataclass
class Dataset:
    """A data set read and mapped: crops (``format == "crops"``) or fields with boxes.

    ``label_map`` holds every label with a target (declared, or matched by name when
    nothing was declared); ``unmapped`` the source labels with none and how many
    annotations they had, which are left out of ``crops`` and ``fields[i].boxes``.
    ``label_counts`` counts every source label's annotations, mapped or not.
    """

    name: str
    root: Path
    format: str
    um_per_pixel: float | None
    crops: list[CellCrop]
    fields: list[AnnotatedField]
    label_map: dict[str, LabelTarget]
    unmapped: dict[str, int]
    label_counts: dict[str, int] = field(default_factory=dict)
    #: Where the label map came from: "declared" (file or keyword) or "names" (matched).
    label_source: str = "declared"
    #: Splits never to be trained or tuned on (from the declaration).
    held_out_splits: tuple[str, ...] = ()
    declaration: Path | None = None
    #: The declaration's table of finer box labels, and how many of its rows applied.
    box_labels: Path | None = None
    box_labels_applied: int = 0
    #: Free-text keys of the declaration (source, license, citation, url, description).
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        """The splits the layout names, sorted (empty when it names none)."""
        items = self.crops if self.format == "crops" else self.fields
        return sorted({i.split for i in items if i.split is not None})

    @property
    def n_annotations(self) -> int:
        """Annotations kept (mapped): crops, or boxes over all fields."""
        if self.format == "crops":
            return len(self.crops)
        return sum(len(f.labels) for f in self.fields)


def _label_map(
    labels: dict[str, str | list[str]] | None, seen: set[str]
) -> tuple[dict[str, LabelTarget], str]:
    if labels is None:
        matched = {label: auto_target(label) for label in sorted(seen)}
        return {k: v for k, v in matched.items() if v is not None}, "names"
    resolved = {}
    for key, text in labels.items():
        try:
            resolved[key] = resolve_target(text)
        except InputError as exc:
            raise DatasetError(f"label {key!r}: {exc}") from None
    return resolved, "declared"


def _map_field(
    raw: RawField, label_map: dict[str, LabelTarget], spacing: float | None
) -> AnnotatedField:
    keep = [i for i, label in enumerate(raw.labels) if label in label_map]
    drop = [i for i, label in enumerate(raw.labels) if label not in label_map]
    return AnnotatedField(
        path=raw.path,
        width=raw.width,
        height=raw.height,
        boxes=as_boxes([tuple(raw.boxes[i]) for i in keep]),
        labels=[raw.labels[i] for i in keep],
        targets=[label_map[raw.labels[i]] for i in keep],
        split=raw.split,
        um_per_pixel=spacing,
        unmapped_boxes=np.ascontiguousarray(raw.boxes[drop], np.float32).reshape(-1, 4),
        unmapped_labels=[raw.labels[i] for i in drop],
    )


def _check_split(split: str, found: set[str | None], root: Path) -> None:
    names = sorted(s for s in found if s is not None)
    if not names:
        raise DatasetError(f"{root}: split {split!r} asked for, but the layout names no splits")
    if split not in names:
        raise DatasetError(f"{root}: no split {split!r}; the layout has {', '.join(names)}")


def load_dataset(
    root: Path,
    *,
    declaration: Path | None = None,
    format: str | None = None,
    um_per_pixel: float | str | None = None,
    labels: dict[str, str | list[str]] | None = None,
    split: str | None = None,
    verify: bool = False,
) -> Dataset:
    """Read a data set folder (or a COCO .json file) and map its labels onto the taxonomy.

    The declaration is ``declaration`` or ROOT/marrowdx-dataset.toml when present; keyword
    arguments override it (``um_per_pixel="unknown"`` overrides a declared number; ``labels``
    overrides the declared target of each label it names). With no label map from either,
    labels that are class or group names (ignoring case; singular or plural) or standard
    names (``labels.auto_target``) map to them, the rest are unmapped.
    The declaration's ``split`` is given to every image whose layout names none.
    ``split`` keeps one split. ``verify`` decodes every image fully (else headers only).
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such folder or file")
    decl_path = declaration if declaration is not None else find_declaration(root)
    decl = read_declaration(decl_path) if decl_path is not None else Declaration()
    fmt = check_format(format, "format") if format is not None else decl.format
    fmt = fmt or detect_format(root)
    if um_per_pixel is not None:
        spacing = parse_spacing(um_per_pixel, "um_per_pixel")
    else:
        spacing = decl.um_per_pixel
    label_spec = decl.labels
    if labels is not None:
        label_spec = {**(label_spec or {}), **check_labels(labels, "labels")}

    if fmt == "crops" and decl.box_labels is not None:
        raise DatasetError(f"{decl_path}: box_labels apply to boxes; a crops set has none")
    if fmt == "crops":
        items: list = read_crops(root, verify=verify)
    elif fmt in READERS:
        items = READERS[fmt](root, verify=verify)
    else:  # pragma: no cover - check_format / detect_format only return FORMATS
        raise DatasetError(f"format must be one of {', '.join(FORMATS)}")
    if decl.split is not None:  # the declared split of every image the layout leaves open
        items = [i if i.split is not None else replace(i, split=decl.split) for i in items]
    if split is not None:
        _check_split(split, {i.split for i in items}, root)
        items = [i for i in items if i.split == split]
    box_labels_applied = 0
    if decl.box_labels is not None:
        items, box_labels_applied = apply_box_labels(
            items, read_box_labels(decl.box_labels), decl.box_labels
        )
    if fmt == "crops":
        counts = Counter(c.label for c in items)
    else:
        counts = Counter(label for f in items for label in f.labels)
    label_map, label_source = _label_map(label_spec, set(counts))
    unmapped = {label: n for label, n in sorted(counts.items()) if label not in label_map}
    crops: list[CellCrop] = []
    fields: list[AnnotatedField] = []
    if fmt == "crops":
        crops = [
            CellCrop(c.path, c.label, label_map[c.label], c.split)
            for c in items
            if c.label in label_map
        ]
    else:
        fields = [_map_field(f, label_map, spacing) for f in items]
    return Dataset(
        name=decl.name or (root.name if root.is_dir() else root.stem),
        root=root,
        format=fmt,
        um_per_pixel=spacing,
        crops=crops,
        fields=fields,
        label_map=label_map,
        unmapped=unmapped,
        label_counts=dict(sorted(counts.items())),
        label_source=label_source,
        held_out_splits=decl.held_out_splits,
        declaration=decl_path,
        box_labels=decl.box_labels,
        box_labels_applied=box_labels_applied,
        notes=decl.notes,
    )


__all__ = ["Dataset", "UNKNOWN", "load_dataset"]
