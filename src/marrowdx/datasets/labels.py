"""From a data set's own label ("BLA", "WBC", "NIF") to what training may learn from it.

A real data set's labels are often coarser than the 33 classes ("blast", "white cell") or
name things the taxonomy has no class for (red cells). Each label is declared as one of
three kinds of :class:`LabelTarget`, so no label is ever forced into a finer class than it
states: a set of classes (one class, or a group from ``taxonomy.LABEL_GROUPS``: the cell is
one of them), ``ignore`` (a cell is there, but its class teaches nothing), or ``red_cell``
(not counted and not a detector target, but its size gives the pixel spacing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from marrowdx import taxonomy
from marrowdx.errors import InputError

#: The three kinds of target a label can have.
KIND_CLASSES = "classes"
KIND_IGNORE = "ignore"
KIND_RED_CELL = "red_cell"
#: The declared names of the two targets that are not classes.
IGNORE = KIND_IGNORE
RED_CELL = KIND_RED_CELL


@dataclass(frozen=True)
class LabelTarget:
    """What one source label lets training learn.

    ``classes`` holds taxonomy class indices (in taxonomy order) and is empty unless
    ``kind == "classes"``; ``name`` is what the label was declared as ("blasts",
    "segmented_neutrophil", "smudge_cell+artifact", "ignore").
    """

    kind: str
    classes: tuple[int, ...]
    name: str

    @property
    def is_group(self) -> bool:
        """A partial label: the cell is one of several classes (train on their summed
        probability, never on one of them)."""
        return self.kind == KIND_CLASSES and len(self.classes) > 1

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(taxonomy.CLASSES[i] for i in self.classes)


def target_names() -> list[str]:
    """Every name :func:`resolve_target` accepts, in the order an error lists them."""
    return [*taxonomy.CLASSES, *taxonomy.LABEL_GROUPS, IGNORE, RED_CELL]


def _one(name: str) -> tuple[str, tuple[int, ...]]:
    key = name.strip().lower()
    if key in taxonomy.CLASS_INDEX:
        return key, (taxonomy.CLASS_INDEX[key],)
    if key in taxonomy.LABEL_GROUPS:
        return key, tuple(taxonomy.CLASS_INDEX[c] for c in taxonomy.LABEL_GROUPS[key])
    if key in (IGNORE, RED_CELL):
        raise InputError(f"{name!r} cannot be part of a list of classes; give it on its own")
    raise InputError(
        f"unknown label target {name!r}; valid targets: a class ({', '.join(taxonomy.CLASSES)}), "
        f"a group ({', '.join(taxonomy.LABEL_GROUPS)}), a list of those, "
        f"{IGNORE!r} or {RED_CELL!r}"
    )


def resolve_target(text: str | list[str] | tuple[str, ...]) -> LabelTarget:
    """A declared target: a class name, a group name, a list of those (their union),
    ``"ignore"`` or ``"red_cell"`` (names are case-insensitive). Unknown names raise
    :class:`~marrowdx.errors.InputError` listing the valid ones."""
    if isinstance(text, str):
        key = text.strip().lower()
        if key in (IGNORE, RED_CELL):
            return LabelTarget(key, (), key)
        name, classes = _one(text)
        return LabelTarget(KIND_CLASSES, classes, name)
    if not isinstance(text, list | tuple) or not text:
        raise InputError(f"a label target is a name or a non-empty list of names, not {text!r}")
    if not all(isinstance(t, str) for t in text):
        raise InputError(f"a list of label targets holds names only: {text!r}")
    if len(text) == 1:
        return resolve_target(text[0])
    names, union = [], set()
    for part in text:
        name, classes = _one(part)
        names.append(name)
        union.update(classes)
    return LabelTarget(KIND_CLASSES, tuple(sorted(union)), "+".join(names))


def _normalised(label: str) -> str:
    return re.sub(r"[\s\-]+", "_", label.strip().lower())


#: Names public sets and lab tools give cells that are no class's or group's own name but
#: mean one in every haematology text: "neutrophil" is the mature cell, band or segmented
#: (PBC, Raabin-WBC); "RBC" / "erythrocyte" the red cell a YOLO set boxes (BCCD, TXL-PBC).
STANDARD_NAMES: dict[str, str] = {
    "neutrophil": "neutrophils_mature",
    "rbc": RED_CELL,
    "red_blood_cell": RED_CELL,
    "erythrocyte": RED_CELL,
    "white_blood_cell": "wbc",
    "leukocyte": "wbc",
}


def auto_target(label: str) -> LabelTarget | None:
    """The target of an undeclared label: the class or group whose name it is (ignoring
    case, and spaces or hyphens for underscores: "Segmented neutrophil", "WBC"), also in the
    singular or the plural ("Eosinophil" is the group "eosinophils", "Lymphocytes" the class),
    or a ``STANDARD_NAMES`` entry; else None. Never a guess beyond that: codes ("BLA", "ig")
    and anything else stay unmapped and are reported."""
    key = _normalised(label)
    for name in (key, f"{key}s", key.removesuffix("s")):
        name = STANDARD_NAMES.get(name, name)
        if name in taxonomy.CLASS_INDEX or name in taxonomy.LABEL_GROUPS or name == RED_CELL:
            return resolve_target(name)
    return None
