"""Real annotated images for training: fields with boxes and single-cell crops.

Why a module of its own: real public images come at their own magnification (about
0.05-0.17 µm/px), in small fields or single-cell crops, with labels that are often coarser
than the taxonomy ("WBC", "blast"). Here they are brought to what the models see when the
client serves them (``marrowdx.spacing``: resampled to the models' spacing; an image smaller
than the field is mirror-padded, never enlarged) and each label becomes the set of taxonomy
classes it allows, so training can use a group label as a partial label.

Sources are decoded once and kept at the field spacing (``config.MODEL_UM_PER_PIXEL``); each
training step resamples them to the models' input spacing with a random zoom and pads them
to a small canvas. Mirror padding keeps a canvas's stain statistics those of its image,
which is what the in-graph stain normalisation sees in the served path too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from marrowdx import config
from marrowdx.datasets.labels import KIND_CLASSES
from marrowdx.image_checks import upright_rgb
from marrowdx.spacing import SpacingEstimate, estimate_images

#: µm per pixel of the detector's and classifier's input: a FIELD_SIZE field at
#: MODEL_UM_PER_PIXEL letterboxed to INPUT_SIZE.
INPUT_UM_PER_PIXEL = config.MODEL_UM_PER_PIXEL * config.FIELD_SIZE[0] / config.INPUT_SIZE
#: Canvas side (input pixels) a real field is placed on for a detector step (its window).
FIELD_CANVAS = 256
#: Canvas side (input pixels) a single-cell crop is placed on: 48 µm, a cell and neighbours.
CROP_CANVAS = 96
#: Share of the images of a set without its own split that are held out for validation,
#: chosen by a hash of the file name (reproducible, independent of listing order).
VALIDATION_PERCENT = 15
#: Share of the training images (a set's own or hashed) held out of training as the
#: calibration slice the familiarity limit is fitted on: cells a model trained on lie closer
#: to its class means than new cells of the same labs, so a limit fitted on them flags those.
CALIBRATION_PERCENT = 10
#: The splits ``evaluate`` scores: held out of training and calibration alike. ``val`` is
#: what choices are made on; ``test`` is a set's own, scored for a final figure.
SCORED_SPLITS = ("val", "test")

Log = Callable[[str], None]


@dataclass
class RealImage:
    """One decoded source image at the field spacing and its cells."""

    rgb: np.ndarray  # uint8 [H, W, 3] at config.MODEL_UM_PER_PIXEL
    boxes: np.ndarray  # float32 [N, 4], pixels of ``rgb``; detector targets
    allowed: np.ndarray  # bool [N, N_CLASSES]: the classes each box's label allows
    source: str  # data set name, for balancing and reports
    label: str  # crops: the source label; fields: ""


@dataclass
class RealData:
    """Real training images of one or more data sets, ready for the trainers."""

    fields: list[RealImage] = field(default_factory=list)
    crops: list[RealImage] = field(default_factory=list)
    description: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.fields and not self.crops

    def crop_labels(self) -> np.ndarray:
        """Index of each crop's (source, label) group, for class-balanced sampling."""
        keys = sorted({(c.source, c.label) for c in self.crops})
        index = {k: i for i, k in enumerate(keys)}
        return np.array([index[(c.source, c.label)] for c in self.crops], np.int64)


def split_of(path: Path, declared: str | None) -> str:
    """The image's split: the set's own ("train", "val", "test"), else "train" or "val" by
    a hash of the file name (VALIDATION_PERCENT held out); of the training images, a slice
    chosen by another part of the hash (CALIBRATION_PERCENT) is "calibration"."""
    digest = int(hashlib.sha1(Path(path).name.encode()).hexdigest(), 16)
    split = declared or ("val" if digest % 100 < VALIDATION_PERCENT else "train")
    if split == "train" and digest // 100 % 100 < CALIBRATION_PERCENT:
        return "calibration"
    return split


def resize_rgb(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Resample an HWC uint8 image by ``factor`` (area-like when shrinking)."""
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if size == (w, h):
        return rgb
    method = Image.Resampling.BOX if factor < 1 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize(size, method))


def mirror_place(
    rgb: np.ndarray, boxes: np.ndarray, canvas: int, offset: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Place an HWC image at ``offset`` (x, y; may be negative) of a square canvas filled by
    mirror-reflecting it, and return the canvas (CHW) and every box's mirrored copies.

    The copies matter for the detector: every reflected cell is a cell it must find.
    """
    h, w = rgb.shape[:2]
    ox, oy = offset
    ys = _reflect_index(np.arange(canvas) - oy, h)
    xs = _reflect_index(np.arange(canvas) - ox, w)
    image = rgb[ys][:, xs].transpose(2, 0, 1)
    return np.ascontiguousarray(image), _mirror_boxes(boxes, w, h, ox, oy, canvas)


def _reflect_index(i: np.ndarray, n: int) -> np.ndarray:
    """numpy 'symmetric' padding as an index map: ... 1 0 | 0 1 .. n-1 | n-1 n-2 ..."""
    period = i % (2 * n)
    return np.where(period < n, period, 2 * n - 1 - period)


def _mirror_boxes(boxes: np.ndarray, w: int, h: int, ox: int, oy: int, canvas: int) -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32)
    out = []
    for kx in range((-ox) // w - 1, (canvas - ox) // w + 2):
        for ky in range((-oy) // h - 1, (canvas - oy) // h + 2):
            b = boxes.astype(np.float32).copy()
            if kx % 2:
                b[:, [0, 2]] = w - b[:, [2, 0]]
            if ky % 2:
                b[:, [1, 3]] = h - b[:, [3, 1]]
            b[:, [0, 2]] += ox + kx * w
            b[:, [1, 3]] += oy + ky * h
            out.append(b)
    b = np.concatenate(out)
    b = np.clip(b, 0, canvas)
    keep = ((b[:, 2] - b[:, 0]) >= 2) & ((b[:, 3] - b[:, 1]) >= 2)
    return b[keep]


def allowed_rows(targets: Sequence) -> np.ndarray:
    """bool [N, N_CLASSES] from LabelTargets (kind "classes")."""
    out = np.zeros((len(targets), config.N_CLASSES), bool)
    for i, t in enumerate(targets):
        out[i, list(t.classes)] = True
    return out


def _load_rgb(path: Path, um_per_pixel: float) -> np.ndarray:
    rgb = np.asarray(upright_rgb(path))
    return resize_rgb(rgb, um_per_pixel / config.MODEL_UM_PER_PIXEL)


def stated_where_unknown(spacings: Sequence[float | None], paths: Sequence[Path]) -> list:
    """Each spacing, or where it is None the calibration the image's file states
    (``marrowdx.file_spacing``), which the client takes before any estimate."""
    from marrowdx.file_spacing import spacing_in_file

    return [
        spacing_in_file(path.read_bytes()) if um is None else um
        for um, path in zip(spacings, paths, strict=True)
    ]


def estimate_where_unknown(
    spacings: Sequence[float | None], paths: Sequence[Path]
) -> list[SpacingEstimate | None]:
    """The client's spacing estimate of each image whose spacing is None and whose file
    states none (else None), pooled per image size as the client pools a patient's images
    (one data set, one camera): real images are learnt and scored at the spacing the client
    would estimate."""
    return _estimate_unstated(stated_where_unknown(spacings, paths), paths)


def _estimate_unstated(
    stated: Sequence[float | None], paths: Sequence[Path]
) -> list[SpacingEstimate | None]:
    """:func:`estimate_where_unknown` once the files' calibrations are in ``stated``."""
    unknown = [i for i, um in enumerate(stated) if um is None]
    out: list[SpacingEstimate | None] = [None] * len(stated)
    estimates = estimate_images([paths[i].read_bytes() for i in unknown])
    for i, estimate in zip(unknown, estimates, strict=True):
        out[i] = estimate
    return out


def _with_estimates(spacings: Sequence[float | None], paths: Sequence[Path]) -> list:
    stated = stated_where_unknown(spacings, paths)
    estimates = _estimate_unstated(stated, paths)
    return [um if e is None else e.um_per_pixel for um, e in zip(stated, estimates, strict=True)]


def load_sets(
    folders: Sequence[Path],
    work_dir: Path,
    log: Log | None = None,
    *,
    um_per_pixel: float | None = None,
) -> list:
    """``marrowdx.datasets.load_dataset`` of each folder. A folder without its own
    declaration whose name is a public set of the catalogue (``marrowdx data list``) is read
    with the catalogue's declaration, written under ``work_dir`` (and said so);
    ``um_per_pixel`` overrides every set's declared spacing."""
    from marrowdx.datasets import load_dataset
    from marrowdx.datasets.catalogue import PUBLIC_SETS
    from marrowdx.datasets.declaration import find_declaration

    out = []
    for folder in folders:
        folder = Path(folder)
        declaration = None
        if find_declaration(folder) is None and folder.name in PUBLIC_SETS:
            declaration = Path(work_dir) / "declarations" / f"{folder.name}.toml"
            declaration.parent.mkdir(parents=True, exist_ok=True)
            declaration.write_text(PUBLIC_SETS[folder.name].declaration(), encoding="utf-8")
            if log is not None:
                log(f"{folder}: no marrowdx-dataset.toml, using the catalogue's ({declaration})")
        out.append(load_dataset(folder, declaration=declaration, um_per_pixel=um_per_pixel))
    return out


def real_from_datasets(
    datasets: Sequence, *, splits: Sequence[str] = ("train",), log: Log | None = None
) -> RealData:
    """Decode every usable image of the given ``marrowdx.datasets.Dataset`` objects.

    Only images of the given ``splits`` (:func:`split_of`) are taken (default: "train"), so
    a set's validation and test splits never reach training. Fields take their spacing from
    the data set's declaration, else from their red-cell boxes, else from the client's
    estimator (pooled per image size, as the client pools a patient's images); an image
    whose spacing cannot be had is left out and counted.
    """
    data = RealData()
    skipped: dict[str, int] = {}
    digest = hashlib.blake2b(digest_size=8)
    for ds in datasets:
        fields = [f for f in ds.fields if split_of(f.path, f.split) in splits]
        spacings = _with_estimates([f.known_spacing for f in fields], [f.path for f in fields])
        for f, um in zip(fields, spacings, strict=True):
            if not um:
                skipped[ds.name] = skipped.get(ds.name, 0) + 1
                continue
            cells = np.array([t.kind == KIND_CLASSES for t in f.targets], bool)
            factor = um / config.MODEL_UM_PER_PIXEL
            boxes = f.boxes[cells] * factor
            targets = [t for t, c in zip(f.targets, cells, strict=True) if c]
            rgb = _load_rgb(f.path, um)
            data.fields.append(RealImage(rgb, boxes, allowed_rows(targets), ds.name, ""))
            digest.update(f.path.name.encode())
        crops = [
            c
            for c in ds.crops
            if split_of(c.path, c.split) in splits and c.target.kind == KIND_CLASSES
        ]
        crop_spacings = _with_estimates([ds.um_per_pixel] * len(crops), [c.path for c in crops])
        for c, um in zip(crops, crop_spacings, strict=True):
            if not um:
                skipped[ds.name] = skipped.get(ds.name, 0) + 1
                continue
            rgb = _load_rgb(c.path, um)
            box = centre_cell_box(rgb)
            data.crops.append(RealImage(rgb, box[None], allowed_rows([c.target]), ds.name, c.label))
            digest.update(c.path.name.encode())
    data.description = {
        "sets": [ds.name for ds in datasets],
        "fields": len(data.fields),
        "crops": len(data.crops),
        "cells_in_fields": int(sum(len(f.boxes) for f in data.fields)),
        "skipped_no_spacing": skipped,
        "files_sha": digest.hexdigest(),
    }
    if log is not None:
        log(
            f"real data: {len(data.fields)} fields ({data.description['cells_in_fields']} cells),"
            f" {len(data.crops)} single-cell crops from {', '.join(data.description['sets'])}"
        )
    return data


def require_every_set(datasets: Sequence, used: Collection[str], splits: Sequence[str]) -> None:
    """Raise InputError naming each data set whose name is not in ``used`` (it gave no image
    of ``splits``), and why: a set given with ``--data`` that silently adds nothing (all its
    labels unmapped, no image of the split) would train or score without it, and the user
    would take the result for one that used it."""
    from marrowdx.errors import InputError

    problems = [f"{ds.root}: {_why_unused(ds, splits)}" for ds in datasets if ds.name not in used]
    if problems:
        raise InputError("nothing usable in " + "; ".join(problems))


def _why_unused(ds, splits: Sequence[str]) -> str:
    from marrowdx.datasets import DECLARATION_NAME

    if not ds.n_annotations:
        if not ds.unmapped:
            return "no annotated image found"
        labels = ", ".join(sorted(ds.unmapped))
        return (
            f"none of its labels maps to a cell class ({labels}: {sum(ds.unmapped.values())} "
            f"annotations left out); map them in [labels] of {DECLARATION_NAME} "
            "(`marrowdx data check` lists them)"
        )
    items = ds.crops if ds.format == "crops" else ds.fields
    found = sorted({split_of(i.path, i.split) for i in items})
    if not any(s in splits for s in found):
        scoring = all(s in SCORED_SPLITS for s in splits)
        other = [s for s in SCORED_SPLITS if s in found and s not in splits]
        scores = f"; `evaluate --split {other[0]}` scores it" if scoring and other else ""
        return f"no image in its {' or '.join(splits)} split (it has {', '.join(found)}{scores})"
    return (
        "no image whose pixel spacing could be had (no red cells to measure): declare "
        f"um_per_pixel in {DECLARATION_NAME} or give --um-per-pixel"
    )


def centre_cell_box(rgb: np.ndarray) -> np.ndarray:
    """Box of the stained object at the centre of a single-cell crop (pixels of ``rgb``).

    Why segmentation: crop sets state the class of the centre cell but not its extent, and
    the classifier takes the cell's box (its size is a class cue). Pixels stained well above
    the background (Otsu on optical density) form objects; the one under the centre (or
    nearest it) is the cell. Falls back to a typical white cell (12 µm) centred box.
    """
    from scipy import ndimage

    h, w = rgb.shape[:2]
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    # nuclei and cytoplasm absorb red light (blue/purple stain); red cells much less
    signal = od[..., 0] + 0.5 * od[..., 1]
    from marrowdx.spacing import otsu_threshold

    hist, edges = np.histogram(signal, bins=128)
    threshold = otsu_threshold((edges[:-1] + edges[1:]) / 2, hist)
    mask = ndimage.binary_opening(signal > threshold, iterations=1)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    cy, cx = h // 2, w // 2
    fallback_half = 6.0 / config.MODEL_UM_PER_PIXEL
    if n == 0:
        return np.array(
            [cx - fallback_half, cy - fallback_half, cx + fallback_half, cy + fallback_half],
            np.float32,
        )
    pick = labels[cy, cx]
    if pick == 0:
        dist, idx = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        pick = labels[idx[0][cy, cx], idx[1][cy, cx]]
    ys, xs = np.nonzero(labels == pick)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


# ----------------------------------------------------------------------- per-step samples
def place_field(
    image: RealImage, zoom: float, rng: np.random.Generator, canvas: int = FIELD_CANVAS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real field at the models' input spacing (times ``zoom``) on a mirror-padded canvas
    at a random offset: CHW uint8, every box (mirrored copies included: detector targets)
    and the original image's boxes on the canvas (rows of ``image.allowed``; they may lie
    partly outside the canvas when the image is larger than it)."""
    factor = config.MODEL_UM_PER_PIXEL / INPUT_UM_PER_PIXEL * zoom
    rgb = resize_rgb(image.rgb, factor)
    h, w = rgb.shape[:2]
    ox = int(rng.integers(min(0, canvas - w), max(0, canvas - w) + 1))
    oy = int(rng.integers(min(0, canvas - h), max(0, canvas - h) + 1))
    pixels, boxes = mirror_place(rgb, image.boxes * factor, canvas, (ox, oy))
    return pixels, boxes, (image.boxes * factor + [ox, oy, ox, oy]).astype(np.float32)


def place_crop(
    image: RealImage, zoom: float, canvas: int = CROP_CANVAS
) -> tuple[np.ndarray, np.ndarray]:
    """A single-cell crop at the input spacing (times ``zoom``), its centre cell at the
    centre of a mirror-padded canvas: CHW uint8 and the cell's box [4]."""
    factor = config.MODEL_UM_PER_PIXEL / INPUT_UM_PER_PIXEL * zoom
    rgb = resize_rgb(image.rgb, factor)
    h, w = rgb.shape[:2]
    box = image.boxes[0] * factor
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    ox, oy = int(round(canvas / 2 - cx)), int(round(canvas / 2 - cy))
    pixels, _ = mirror_place(rgb, np.zeros((0, 4), np.float32), canvas, (ox, oy))
    return pixels, (box + [ox, oy, ox, oy]).astype(np.float32)
