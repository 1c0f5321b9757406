"""Cohort folder discovery: DIR/<patient_id>/<images>, checked before any request is sent.

Layouts the client cannot interpret (no patient folders, images directly in DIR, nested
folders) are refused with an error that names the offending paths; anything else that is
not an image is reported, never silently skipped: unsupported files inside a patient
folder become that patient's failed images, and so does a byte-for-byte copy of one of its
images (counted, it would count its cells twice); stray files beside the patient folders are
returned as warnings. Files the operating system or a file share writes by itself (hidden
names such as ``.DS_Store`` and macOS's ``._img.jpg`` forks, ``Thumbs.db``, ``__MACOSX/``)
are skipped with one warning that names them, since they are never a lab's images. A
patient folder that holds a slide (DICOM files of a VL whole-slide image, any names,
possibly in sub-folders of a study) is recognised by content and becomes a slide patient
instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from marrowdx import config
from marrowdx.errors import CohortError
from marrowdx.image_checks import IMAGE_SUFFIXES, is_system_entry
from marrowdx.slides.detect import is_slide_folder

#: Files the client knows and reads itself rather than reporting as unexpected.
GROUND_TRUTH_FILE = "ground_truth.json"  # written next to the patient folders by the simulator
LABS_FILE = "labs.json"  # optional, inside a patient folder: {lab name: value or null}
#: Optional, inside a patient folder: {"um_per_pixel": 0.1}, the pixel spacing of the
#: patient's images (overrides ``diagnose --um-per-pixel``; see marrowdx.spacing).
SPACING_FILE = "spacing.json"
#: How many offending paths an error message lists before "...".
MAX_LISTED = 5


@dataclass
class PatientFolder:
    patient_id: str
    images: list[Path]
    names: list[str]  # relative to the cohort DIR, as in ground_truth.json
    labs: Mapping[str, float | None] | None = None
    problems: dict[str, str] = field(default_factory=dict)  # name -> why it is not processed
    #: Pixel spacing of the patient's images from its SPACING_FILE (µm per pixel), or None.
    um_per_pixel: float | None = None
    #: A slide folder (DICOM WSI + annotation series, recognised by content by
    #: ``marrowdx.slides.is_slide_folder``): tiled into fields by ``marrowdx.client.slides``;
    #: ``images`` is then empty and ``names`` holds the folder's name relative to DIR.
    slide: Path | None = None


@dataclass
class Cohort:
    root: Path
    patients: list[PatientFolder]
    warnings: list[str]

    @property
    def n_images(self) -> int:
        return sum(len(p.images) for p in self.patients)

    @property
    def n_slides(self) -> int:
        return sum(p.slide is not None for p in self.patients)


def _listing(paths: list[Path], root: Path) -> str:
    names = [str(p.relative_to(root)) for p in paths[:MAX_LISTED]]
    return ", ".join(names) + (", ..." if len(paths) > MAX_LISTED else "")


def _read_labs(path: Path) -> Mapping[str, float | None]:
    try:
        labs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CohortError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(labs, dict):
        raise CohortError(f"{path}: expected an object of lab values, got {type(labs).__name__}")
    unknown = sorted(set(labs) - set(config.LAB_VALUE_NAMES))
    if unknown:
        raise CohortError(
            f"{path}: unknown lab value(s) {unknown}; known: {list(config.LAB_VALUE_NAMES)}"
        )
    return labs


def read_spacing(path: Path) -> float:
    """The ``um_per_pixel`` of a patient's SPACING_FILE; CohortError naming what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CohortError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or set(data) != {"um_per_pixel"}:
        raise CohortError(
            f'{path}: expected {{"um_per_pixel": <positive number>}}, got {json.dumps(data)}'
        )
    from marrowdx.spacing import check_um_per_pixel

    try:
        return check_um_per_pixel(data["um_per_pixel"])
    except ValueError as exc:
        raise CohortError(f"{path}: {exc}") from None


def _copies(images: list[Path]) -> dict[Path, Path]:
    """Each image that repeats an earlier one byte for byte (``IMG_1.jpg`` and ``IMG_1
    (1).jpg``, a field exported twice) -> that earlier one. Only files of one size are read
    and hashed, so a folder without copies costs a ``stat`` per image."""
    by_size: dict[int, list[Path]] = {}
    for path in images:
        by_size.setdefault(path.stat().st_size, []).append(path)
    copies: dict[Path, Path] = {}
    for size, same_size in by_size.items():
        if len(same_size) < 2 or size == 0:  # empty files fail on their own, each named
            continue
        first: dict[str, Path] = {}
        for path in same_size:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in first:
                copies[path] = first[digest]
            else:
                first[digest] = path
    return copies


def discover(root: str | Path) -> Cohort:
    """Every sub-folder of ``root`` is a patient; raises CohortError for unusable layouts."""
    root = Path(root)
    if not root.is_dir():
        raise CohortError(f"{root}: not a folder")
    entries = sorted(root.iterdir())
    skipped = [e for e in entries if is_system_entry(e)]
    entries = [e for e in entries if e not in skipped]
    folders = [e for e in entries if e.is_dir()]
    files = [e for e in entries if not e.is_dir()]
    loose_images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if loose_images:
        raise CohortError(
            f"{root} holds images directly ({_listing(loose_images, root)}); put each patient's "
            f"images in its own sub-folder {root}/<patient_id>/"
        )
    if not folders:
        if is_slide_folder(root):  # one slide given instead of the cohort that holds it
            raise CohortError(
                f"{root} is one slide, not a cohort: put it in a patient folder and give its "
                f"parent, DIR/<patient_id>/<the slide's DICOM files>"
            )
        raise CohortError(
            f"{root} has no patient sub-folders; expected {root}/<patient_id>/<images>"
        )
    warnings = [
        f"ignored {e.relative_to(root)}: not a patient folder"
        for e in entries
        if e not in folders and e.name != GROUND_TRUTH_FILE
    ]

    patients, nested = [], []
    for folder in folders:
        if is_slide_folder(folder):  # stdlib only: no DICOM library is imported here
            labs_file = folder / LABS_FILE
            labs = _read_labs(labs_file) if labs_file.is_file() else None
            name = str(folder.relative_to(root))
            patients.append(PatientFolder(folder.name, [], [name], labs, slide=folder))
            continue
        images, names, problems, labs, spacing = [], [], {}, None, None
        for entry in sorted(folder.iterdir()):
            name = str(entry.relative_to(root))
            if is_system_entry(entry):
                skipped.append(entry)
            elif entry.is_dir():
                nested.append(entry)
            elif entry.name == LABS_FILE:
                labs = _read_labs(entry)
            elif entry.name == SPACING_FILE:
                spacing = read_spacing(entry)
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                images.append(entry)
                names.append(name)
            else:
                accepted = ", ".join(sorted(IMAGE_SUFFIXES))
                problems[name] = (
                    f"not processed: not an image file of a supported type ({accepted})"
                )
        if not images and not problems:
            problems[f"{folder.name}/"] = "no image files in the patient folder"
        copies = _copies(images)
        for copy, original in copies.items():
            problems[str(copy.relative_to(root))] = (
                f"not processed: the same bytes as {original.relative_to(root)} (a copy of "
                "an image would count its cells twice)"
            )
        names = [name for path, name in zip(images, names, strict=True) if path not in copies]
        images = [path for path in images if path not in copies]
        patients.append(
            PatientFolder(folder.name, images, names, labs, problems, um_per_pixel=spacing)
        )
    if nested:
        raise CohortError(
            f"patient folders must hold images only, found sub-folders: {_listing(nested, root)}"
        )
    if skipped:
        warnings.append(
            f"skipped {len(skipped)} hidden or system file(s) ({_listing(skipped, root)}): "
            "written by the operating system, not images"
        )
    return Cohort(root, patients, warnings)
