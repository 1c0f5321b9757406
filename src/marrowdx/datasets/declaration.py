"""The declaration file beside a data set: its format, pixel spacing and label map.

A public set states neither its pixel spacing nor how its labels relate to the taxonomy;
both are decisions someone makes once and writes down beside the data, so every run reads
the same ones. Keyword (command-line) arguments override the file.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from marrowdx.datasets.base import DECLARATION_NAME, FORMATS, SPLIT_NAMES, DatasetError

#: The value of ``um_per_pixel`` that says the spacing is not known.
UNKNOWN = "unknown"
#: Keys a declaration may hold; free-text ones are kept for the record and shown by
#: ``marrowdx data check``.
KEYS: dict[str, str] = {
    "name": "the data set's name",
    "format": f"one of {', '.join(FORMATS)} (else detected from the layout)",
    "um_per_pixel": f"micrometres per pixel, or {UNKNOWN!r}",
    "labels": "table: source label -> class, group, list of them, 'ignore' or 'red_cell'",
    "held_out_splits": "splits that must never be trained or tuned on (e.g. ['test'])",
    "split": "the split of every image whose layout names none ('train', 'val' or 'test'; "
    "'val' holds a set out whole, to be scored whole; else a share is held out by file name)",
    "box_labels": "a CSV (file, x0, y0, x1, y1, label; image pixels) of finer labels for some "
    "of the set's boxes, relative to this file",
    "source": "free text: where the data came from",
    "license": "free text: the data's licence",
    "citation": "free text: what to cite",
    "url": "free text: where to get it",
    "description": "free text",
}


@dataclass
class Declaration:
    """A parsed declaration; ``um_per_pixel`` None with ``spacing_declared`` True means the
    file says "unknown", with it False that the file says nothing."""

    path: Path | None = None
    name: str | None = None
    format: str | None = None
    um_per_pixel: float | None = None
    spacing_declared: bool = False
    labels: dict[str, str | list[str]] | None = None
    held_out_splits: tuple[str, ...] = ()
    split: str | None = None  # of every image whose layout names none
    box_labels: Path | None = None  # resolved against the declaration's folder
    notes: dict[str, str] = field(default_factory=dict)


def parse_spacing(value: object, where: str) -> float | None:
    """A declared spacing: a positive number, or "unknown" (None)."""
    if isinstance(value, str) and value.strip().lower() == UNKNOWN:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DatasetError(f"{where}: um_per_pixel must be a number or {UNKNOWN!r}, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise DatasetError(f"{where}: um_per_pixel must be positive, not {value!r}")
    return float(value)


def check_format(value: object, where: str) -> str:
    if value not in FORMATS:
        raise DatasetError(f"{where}: format must be one of {', '.join(FORMATS)}, not {value!r}")
    return str(value)


def check_split(value: object, where: str) -> str:
    """A declared split, named as a layout's folder may name it ("validation" is "val":
    ``SPLIT_NAMES``)."""
    split = SPLIT_NAMES.get(value.strip().lower()) if isinstance(value, str) else None
    if split is None:
        splits = ", ".join(sorted(set(SPLIT_NAMES.values())))
        raise DatasetError(f"{where}: split must be one of {splits}, not {value!r}")
    return split


def check_labels(value: object, where: str) -> dict[str, str | list[str]]:
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: [labels] must be a table of label = target")
    for key, target in value.items():
        ok = isinstance(target, str) or (
            isinstance(target, list) and target and all(isinstance(t, str) for t in target)
        )
        if not ok:
            raise DatasetError(
                f"{where}: label {key!r} maps to {target!r}; give a name or a list of names"
            )
    return dict(value)


def read_declaration(path: Path) -> Declaration:
    """Parse one declaration file; unknown keys and bad values are errors naming the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: declaration file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        allowed = "\n".join(f"  {k}: {v}" for k, v in KEYS.items())
        raise DatasetError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed:\n{allowed}")
    decl = Declaration(path=path)
    if "name" in data:
        decl.name = str(data["name"])
    if "format" in data:
        decl.format = check_format(data["format"], str(path))
    if "um_per_pixel" in data:
        decl.um_per_pixel = parse_spacing(data["um_per_pixel"], str(path))
        decl.spacing_declared = True
    if "labels" in data:
        decl.labels = check_labels(data["labels"], str(path))
    if "held_out_splits" in data:
        held = data["held_out_splits"]
        if not isinstance(held, list) or not all(isinstance(s, str) for s in held):
            raise DatasetError(f"{path}: held_out_splits must be a list of split names")
        decl.held_out_splits = tuple(held)
    if "split" in data:
        decl.split = check_split(data["split"], str(path))
    if "box_labels" in data:
        if not isinstance(data["box_labels"], str) or not data["box_labels"].strip():
            raise DatasetError(f"{path}: box_labels must be the path of a CSV file")
        decl.box_labels = path.parent / data["box_labels"]
    decl.notes = {
        k: str(data[k])
        for k in ("source", "license", "citation", "url", "description")
        if k in data
    }
    return decl


def find_declaration(root: Path) -> Path | None:
    """The declaration beside a data set: ROOT/marrowdx-dataset.toml (for a COCO file, in
    its folder or the folder above ``annotations/``)."""
    root = Path(root)
    folders = [root] if root.is_dir() else [root.parent, root.parent.parent]
    for folder in folders:
        if (folder / DECLARATION_NAME).is_file():
            return folder / DECLARATION_NAME
    return None


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return (
        key
        if key.replace("_", "").replace("-", "").isalnum() and key.isascii()
        else _toml_string(key)
    )


def declaration_text(
    *,
    header: list[str],
    values: dict[str, object],
    labels: dict[str, str | list[str]],
    label_comments: dict[str, str] | None = None,
) -> str:
    """A declaration as TOML text: comment lines, top-level keys, then ``[labels]`` with one
    comment per label (what the source's code means)."""
    label_comments = label_comments or {}
    lines = [f"# {line}" if line else "#" for line in header]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
    lines += ["", "[labels]"]
    for key, target in labels.items():
        comment = f"  # {label_comments[key]}" if key in label_comments else ""
        lines.append(f"{_toml_key(key)} = {_toml_value(target)}{comment}")
    return "\n".join(lines) + "\n"
