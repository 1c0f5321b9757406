"""The records every reader returns, the error they raise, and what the readers share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from marrowdx.datasets.labels import KIND_RED_CELL, LabelTarget
from marrowdx.errors import InputError
from marrowdx.image_checks import IMAGE_SUFFIXES, is_system_entry, open_image, upright_size
from marrowdx.spacing import red_cell_spacing

#: The file beside the data that declares its format, pixel spacing and label map.
DECLARATION_NAME = "marrowdx-dataset.toml"
#: The layouts ``load_dataset`` reads (``format`` in the declaration).
FORMATS: tuple[str, ...] = ("crops", "yolo", "voc", "coco")
#: Folder names that mean a split, and the split each stands for. Raabin-WBC's TestA/TestB
#: are both test sets.
SPLIT_NAMES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
    "testa": "test",
    "testb": "test",
}
#: A box may overhang the image by this many pixels (rounding in the tool that wrote it); it
#: is clipped. Further out is an error: the annotation belongs to another image or size.
BOX_TOLERANCE_PX = 1.0


class DatasetError(InputError):
    """A data set that cannot be read as declared; the message names the file (and line)."""


@dataclass
class CellCrop:
    """One single-cell image, the labelled cell at its centre."""

    path: Path
    label: str  # the source label (its folder name)
    target: LabelTarget
    split: str | None  # "train" / "val" / "test" when the layout says so


@dataclass
class AnnotatedField:
    """One field of view with boxes in its own pixels (x0, y0, x1, y1).

    Boxes whose label has no mapping are not in ``boxes``; they are kept apart in
    ``unmapped_boxes`` so a detector can leave those regions out of its loss rather than
    learn them as background.
    """

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4]
    labels: list[str]  # source labels, one per box
    targets: list[LabelTarget]
    split: str | None
    um_per_pixel: float | None  # the data set's declared spacing (None: unknown)
    unmapped_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    unmapped_labels: list[str] = field(default_factory=list)

    @property
    def known_spacing(self) -> float | None:
        """The field's pixel spacing as its labels know it: the declared one, else the one
        its red-cell boxes give (``marrowdx.spacing.red_cell_spacing``), else None (the
        client's estimate is then all there is)."""
        if self.um_per_pixel:
            return self.um_per_pixel
        red = np.array([t.kind == KIND_RED_CELL for t in self.targets], bool)
        return red_cell_spacing(self.boxes[red], self.width, self.height) if red.any() else None


@dataclass
class RawField:
    """A field as a reader finds it, before its labels are mapped."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4]
    labels: list[str]
    split: str | None


@dataclass
class RawCrop:
    path: Path
    label: str
    split: str | None


def split_of(name: str) -> str | None:
    """The split a folder or file name stands for, or None."""
    return SPLIT_NAMES.get(name.strip().lower())


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not is_system_entry(path)


def visible_children(folder: Path) -> list[Path]:
    """A folder's entries less hidden and system ones (.DS_Store, __MACOSX, Thumbs.db), sorted."""
    return sorted(p for p in folder.iterdir() if not is_system_entry(p))


def images_under(folder: Path) -> list[Path]:
    """Every image file below ``folder`` (any depth: the Munich crops sit in numbered
    sub-folders of each class folder), sorted."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(is_system_entry(Path(part)) for part in p.relative_to(folder).parts)
    )


def image_size(path: Path, *, verify: bool = False) -> tuple[int, int]:
    """(width, height) from the image's header, upright (EXIF orientation applied, as the
    client and the server read the image: boxes are in those pixels); ``verify`` decodes all
    of it, which catches truncated files a header read does not."""
    try:
        with open_image(path) as image:
            if verify:
                image.load()
            return upright_size(image)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image not found") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot open the image ({exc})") from None
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path}: cannot open the image ({exc})") from None


def check_box_shape(
    box: tuple[float, float, float, float], where: str
) -> tuple[float, float, float, float]:
    """The box unchanged, or a DatasetError naming ``where`` when it is not finite or empty
    (what can be said of a box without its image)."""
    x0, y0, x1, y1 = box
    if not all(np.isfinite(v) for v in box):
        raise DatasetError(f"{where}: box {list(box)} is not finite")
    if x1 <= x0 or y1 <= y0:
        raise DatasetError(f"{where}: box {_fmt(box)} is empty (x1 <= x0 or y1 <= y0)")
    return box


def checked_box(
    box: tuple[float, float, float, float], width: int, height: int, where: str
) -> tuple[float, float, float, float]:
    """A box clipped to the image, or a DatasetError naming ``where`` when it is empty or
    lies outside the image by more than BOX_TOLERANCE_PX."""
    x0, y0, x1, y1 = check_box_shape(box, where)
    t = BOX_TOLERANCE_PX
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
        raise DatasetError(f"{where}: box {_fmt(box)} lies outside the {width}x{height} image")
    return max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))


def _fmt(box: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in box) + "]"


def as_boxes(rows: list[tuple[float, float, float, float]]) -> np.ndarray:
    return np.asarray(rows, np.float32).reshape(-1, 4)
