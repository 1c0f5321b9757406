"""Where fields go: one rule for slides and images.

- :func:`field_boxes`: a ROI's grid of overlapping square fields in base-level pixels.
- :func:`plan_fields`: the model fields of an image resampled to the models' spacing
  (``marrowdx.spacing.resample``). An image no larger than the model field
  (``config.FIELD_SIZE``) is padded to it (never enlarged beyond its true scale), a larger one
  is tiled with the slides' :func:`axis_starts`. Padding mirrors the image (numpy
  ``symmetric``), because a constant border would change what the models normalise each
  field with (the brightest 8x8 block is the background, the darkest 5% the stain): mirrored
  pixels have the image's own statistics. Cells whose box centre falls in the padding are not
  the image's cells.
- :func:`tile`: the fields a slide sends under a tiling (:data:`TILINGS`).

The layout is pure geometry, so it can be tested exactly: every point of the ROI or image lies
in some field, and neighbouring fields overlap by at least the requested margin
(:data:`DEFAULT_OVERLAP_PX`), so a cell no wider than the overlap lies whole inside at least
one field.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from marrowdx import config, spacing
from marrowdx.slides.base import Box, Field, SlideError

#: Overlap of neighbouring fields in model pixels: at least the largest simulated cell's
#: outline diameter (megakaryocytes: up to 200 px across, 1.12 aspect, irregular outline,
#: about 230 px in all; see tests/unit/test_slides_tiling.py), so every cell lies whole
#: inside at least one field.
DEFAULT_OVERLAP_PX = 256


def axis_starts(lo: float, hi: float, size: float, overlap: float, grid: int = 1) -> list[float]:
    """Start coordinates of fields of ``size`` covering [lo, hi) with >= ``overlap`` between
    neighbours, spread evenly (the first starts at lo, the last ends at hi).

    A span shorter than one field gets one field centred on it. Starts are multiples of
    ``grid`` base pixels (whole pixels of the pyramid level the field is read from, so the
    read needs no resampling); the count leaves ``grid`` pixels of slack so rounding never
    eats into the overlap.
    """
    if size <= 0 or overlap < 0 or overlap + 2 * grid >= size or grid < 1:
        raise ValueError(f"need 0 <= overlap < size, got size={size}, overlap={overlap}")

    def snap(v: float, how=round) -> float:
        return float(how(v / grid) * grid)

    span = hi - lo
    if span <= size:
        return [snap(lo + (span - size) / 2)]
    n = max(2, math.ceil((span - overlap - grid) / (size - overlap - 2 * grid) - 1e-9))
    step = (span - size) / (n - 1)
    # first and last snap outwards, so the ROI's own edges stay covered
    return (
        [snap(lo, math.floor)]
        + [snap(lo + i * step) for i in range(1, n - 1)]
        + [snap(hi - size, math.ceil)]
    )


def clamp_start(start: float, size: float, limit: float) -> float:
    """Shift a field start so [start, start+size) lies in [0, limit) when it fits."""
    if size >= limit:
        return 0.0
    return min(max(start, 0.0), limit - size)


def field_boxes(
    roi: tuple[int, int, int, int],
    field_base: float,
    overlap_base: float,
    slide_size: tuple[int, int],
    grid: int = 1,
) -> list[Box]:
    """Base-level boxes of the fields tiling ``roi`` (row-major), each ``field_base`` pixels
    square, kept inside the slide (``slide_size`` = width, height) where they fit.

    A field never shrinks: near the slide's edge it is shifted inwards instead, which only
    adds overlap. Only a slide smaller than one field gives a smaller (clipped) field.
    """
    x0, y0, x1, y1 = roi
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty ROI {roi}")
    w, h = slide_size
    boxes: list[Box] = []
    for sy in axis_starts(y0, y1, field_base, overlap_base, grid):
        fy = clamp_start(sy, field_base, h)
        fh = min(field_base, h - fy)
        for sx in axis_starts(x0, x1, field_base, overlap_base, grid):
            fx = clamp_start(sx, field_base, w)
            fw = min(field_base, w - fx)
            boxes.append((fx, fy, fx + fw, fy + fh))
    return boxes


# ------------------------------------------------------------------ images into model fields
#: Field pixels (1 µm) a mirror image must keep from the edges of its copy of the image to be
#: taken for a whole cell (``FieldPlan.fold_into_image``): the detector's box of a cell cut
#: by the border ends within a few pixels of it.
MIRROR_EDGE_MARGIN = 4.0


@dataclass(frozen=True)
class FieldPlan:
    """One model field of an image: ``x0``, ``y0`` is its top-left corner in the resampled
    image's pixels (negative where the field is padded), ``size`` its side; ``scale`` is model
    pixels per input pixel. ``image_size`` = (width, height) of the resampled image."""

    x0: int
    y0: int
    size: tuple[int, int]
    scale: float
    image_size: tuple[int, int]

    @property
    def pad(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((top, bottom), (left, right)) mirrored rows/columns around the image part."""
        w, h = self.image_size
        fw, fh = self.size
        return (
            (max(0, -self.y0), max(0, self.y0 + fh - h)),
            (max(0, -self.x0), max(0, self.x0 + fw - w)),
        )

    @property
    def crop(self) -> tuple[int, int, int, int]:
        """The part of the resampled image inside the field (x0, y0, x1, y1)."""
        w, h = self.image_size
        fw, fh = self.size
        return (max(0, self.x0), max(0, self.y0), min(w, self.x0 + fw), min(h, self.y0 + fh))

    @property
    def input_box(self) -> tuple[float, float, float, float]:
        """The input-image pixels this field holds (the padding excluded)."""
        x0, y0, x1, y1 = self.crop
        return (x0 / self.scale, y0 / self.scale, x1 / self.scale, y1 / self.scale)

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """x0, y0, x1, y1 boxes from field pixels to input-image pixels."""
        out = np.asarray(boxes, dtype=np.float64).copy()
        out[..., [0, 2]] = (out[..., [0, 2]] + self.x0) / self.scale
        out[..., [1, 3]] = (out[..., [1, 3]] + self.y0) / self.scale
        return out

    def fold_into_image(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Field boxes lying wholly in the mirror padding, mapped back onto what they are an
        image of: (input-image boxes [N, 4], mask [N] of the boxes that are such mirror
        images). The inverse of :meth:`shown`: the padding repeats the image reflected
        about its edges (period twice its side), so a box inside one copy folds onto the
        image. Not mirror images: a box on the image itself, and one across or within
        ``MIRROR_EDGE_MARGIN`` of an edge between copies or of the field's edge (a cell cut
        by the image's border, alone or joined to its own reflection, or by the field's, is
        no whole cell)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        folded = np.empty_like(boxes)
        mirror = np.zeros(len(boxes), dtype=bool)
        whole = np.ones(len(boxes), dtype=bool)
        margin = MIRROR_EDGE_MARGIN
        for lo_col, start, length, side in (
            (0, self.x0, self.image_size[0], self.size[0]),
            (1, self.y0, self.image_size[1], self.size[1]),
        ):
            # a copy cut by the field's own edge is no whole cell either
            whole &= (boxes[:, lo_col] >= margin) & (boxes[:, lo_col + 2] <= side - margin)
            lo, hi = boxes[:, lo_col] + start, boxes[:, lo_col + 2] + start
            copy = np.floor((lo + hi) / 2 / length)
            whole &= (lo >= copy * length + margin) & (hi <= (copy + 1) * length - margin)
            # odd copies are reflections about their far edge, even ones translations
            reflected = copy % 2 == 1
            edge, start_of_copy = (copy + 1) * length, copy * length
            folded[:, lo_col] = np.where(reflected, edge - hi, lo - start_of_copy)
            folded[:, lo_col + 2] = np.where(reflected, edge - lo, hi - start_of_copy)
            mirror |= copy != 0
        return folded / self.scale, mirror & whole

    def mirror_copies(self, boxes: np.ndarray) -> np.ndarray:
        """How many mirror images of each input-image box [N, 4] lie wholly in this field's
        padding, as :meth:`fold_into_image` would take them (the image itself not counted)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        index, field_boxes = self.shown(boxes, min_visible=1.0)
        mirrored = self.fold_into_image(field_boxes)[1]
        return np.bincount(index[mirrored], minlength=len(boxes))

    def shown(self, boxes: np.ndarray, min_visible: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """Where input-image boxes appear in this field, mirror images in the padding
        included (ground truth for the field as rendered): (indices into ``boxes``, field
        boxes clipped to the field), keeping images with at least ``min_visible`` of their
        area inside it."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * self.scale
        axes = []
        for lo_col, start, length, side in (
            (0, self.x0, self.image_size[0], self.size[0]),
            (1, self.y0, self.image_size[1], self.size[1]),
        ):
            lo, hi = boxes[:, lo_col], boxes[:, lo_col + 2]
            period = 2 * length
            images = []  # [a + 2nk, b + 2nk) and its reflection [2nk - b, 2nk - a)
            for k in range(math.floor(start / period) - 1, math.ceil((start + side) / period) + 1):
                images.append((lo + period * k, hi + period * k))
                images.append((period * k - hi, period * k - lo))
            axes.append([(a - start, b - start) for a, b in images])
        index, out = [], []
        for x0, x1 in axes[0]:
            for y0, y1 in axes[1]:
                box = np.stack([x0, y0, x1, y1], axis=1)
                clipped = np.clip(box, 0, [self.size[0], self.size[1]] * 2)
                area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
                inside = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(
                    clipped[:, 3] - clipped[:, 1], 0, None
                )
                keep = inside >= min_visible * np.maximum(area, 1e-9)
                index.append(np.flatnonzero(keep))
                out.append(clipped[keep])
        return np.concatenate(index), np.concatenate(out).reshape(-1, 4)

    def render(self, resampled: np.ndarray) -> np.ndarray:
        """This field's pixels cut from the resampled image, mirror-padded where it ends."""
        x0, y0, x1, y1 = self.crop
        part = resampled[y0:y1, x0:x1]
        (top, bottom), (left, right) = self.pad
        if top or bottom or left or right:
            part = np.pad(part, ((top, bottom), (left, right), (0, 0)), mode="symmetric")
        return part


def plan_fields(
    width: int,
    height: int,
    um_per_pixel: float,
    *,
    field_size: Sequence[int] = config.FIELD_SIZE,
    overlap_px: int = DEFAULT_OVERLAP_PX,
) -> list[FieldPlan]:
    """The model fields of a ``width`` x ``height`` image at ``um_per_pixel`` (row-major).

    Per axis, after resampling: a side no longer than the field gives one field centred on
    it (padded, never enlarged); a longer side gives fields overlapping by >= ``overlap_px``
    (:func:`axis_starts`, the slides' own rule).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = spacing.scale_to_model(um_per_pixel)
    rw, rh = spacing.resampled_size(width, height, um_per_pixel)
    fw, fh = (int(v) for v in field_size)
    xs = axis_starts(0, rw, fw, overlap_px)
    ys = axis_starts(0, rh, fh, overlap_px)
    return [FieldPlan(int(x), int(y), (fw, fh), scale, (rw, rh)) for y in ys for x in xs]


# ------------------------------------------------------------------------- what a slide sends
#: What a slide sends (``SlidePatient.tiling``). ``fields`` (default): overlapping 1024 px
#: fields inside each ROI at the models' spacing, decoded, resampled if needed and re-encoded:
#: the pixels the models were trained on, every cell whole in one field. ``frame_fields``: the
#: slide's own JPEG frames as stored (no decode; needs a DICOM level at the models' spacing
#: with frames of the field size); ``auto``: frames where the slide allows, else fields. The
#: frames cost almost no client CPU (nothing is decoded) but count worse: a
#: frame reaches beyond its ROI into the thick area or empty glass, so the models' per-field
#: stain normalisation is computed on other pixels (gains of 0.5-4 against 0.7-1.4 on
#: fields), and cells cut by frame seams are classified from their pieces (README, "Real
#: slides", has the measured figures).
TILINGS = ("fields", "frame_fields", "auto")


def tile(source: object, tiling: str) -> Iterator[Field]:
    """The fields ``source`` sends under ``tiling`` (see TILINGS); ``auto`` reads the first
    frame to learn whether the slide's frames can go as they are."""
    if tiling not in TILINGS:
        raise ValueError(f"unknown tiling {tiling!r}; choose one of {', '.join(TILINGS)}")
    if tiling != "auto":
        return iter(getattr(source, tiling)())
    frames = iter(source.frame_fields())  # type: ignore[attr-defined]
    try:
        first = next(frames)
    except StopIteration:
        return iter(())
    except SlideError:  # no level at the models' spacing, or frames that are not JPEG
        return iter(source.fields())  # type: ignore[attr-defined]
    return itertools.chain([first], frames)
