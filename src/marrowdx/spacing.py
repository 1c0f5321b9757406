"""Pixel spacing: how many µm one image pixel spans, and how an image reaches the models at theirs.

The models were trained on fields at ``config.MODEL_UM_PER_PIXEL`` (0.25 µm/px, 1024 px =
256 µm). An image at another spacing must be resampled before it is sent, or its cells reach
the models at the wrong size (a 640x480 camera field at 0.075 µm/px would show cells about 3x
too large, and the letterbox would enlarge it further). Real images rarely store their
spacing, so it can also be estimated from the red cells, whose diameter is nearly constant
(about 8 µm) across patients and labs.

- :func:`estimate_um_per_pixel`: segment the pale red cells on a small copy of the image, fill
  their central pallor, and take the median diameter: a single cell's from its area, a
  clump's from its largest inscribed circle (two touching cells still inscribe one cell's
  circle). Spacing is ``RED_CELL_UM`` over that diameter in the input's pixels.
- :func:`pooled_estimate`: one estimate from the red cells of several images taken at one
  spacing (one patient's fields or crops from one camera), for images too small to hold enough
  red cells of their own (a single-cell crop shows one to three); :func:`pool_uncertain`
  gives each image whose own estimate is uncertain the pool of its same-sized companions
  (:func:`estimate_images` for a set of encoded images at once).
- :func:`resample`: an image brought to the models' spacing, scaled by
  ``um_per_pixel / MODEL_UM_PER_PIXEL``. Where its fields then go (padded or tiled, the rule
  images and slides share) is ``marrowdx.slides.tiling.plan_fields``.

numpy, Pillow and scipy.ndimage only (scipy for labelling, hole filling and the exact
Euclidean distance transform in C: the estimate must cost a few ms per image on the client).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from marrowdx import config
from marrowdx.wording import quantity

#: Red-cell diameter (µm): the simulator's red cells are config.RED_CELL_DIAMETER_PX across at the
#: models' spacing, i.e. 7-9 µm, as human red cells are.
RED_CELL_UM = sum(config.RED_CELL_DIAMETER_PX) / 2 * config.MODEL_UM_PER_PIXEL
#: Relative spacing mismatch under which an input counts as being at the models' spacing and
#: is sent without resampling (a slide's own frames, an image whose spacing is given or
#: estimated): the models were trained with +-15% zoom, and the simulator's cells vary in size
#: by more than this.
MODEL_SPACING_TOLERANCE = 0.1
#: Largest working size tried, and the red-cell diameter (working pixels) below which a
#: larger one is tried.
MAX_WORK_SIDE = 1024
MIN_CELL_WORK_PX = 7.0
#: The estimator's own tolerance: an estimate this close to the models' spacing counts as
#: being at it (on 146 simulated fields at 0.25 µm/px, whose truth is exact, lab-shifted
#: ones included, the estimates scatter by up to 11%: whole-pixel steps of 8 px red cells at
#: the 256 px working size; docs/performance.md).
ESTIMATE_TOLERANCE = 0.15
#: Longer side (pixels) of the copy the estimate segments: a 1024 field at the models'
#: spacing keeps its red cells 8 px across, enough for the median over a field's red cells,
#: and the exact distance transform stays cheap (its cost grows faster than the pixels).
WORK_SIDE = 256
#: Fewer red cells than this, or a wider spread (interquartile range over median of the
#: diameters) than ``MAX_RELATIVE_UNCERTAINTY``, make the estimate uncertain (warned).
MIN_RED_CELLS = 5
MAX_RELATIVE_UNCERTAINTY = 0.3
#: Objects whose largest inscribed circle is smaller than this share of the typical one
#: (the median over objects weighted by circle area) are debris, platelets or fragments of
#: the threshold. Why by circle, not by area: in a dense field most red cells lie in clumps,
#: whose area would make every single cell look like a fragment.
MIN_RADIUS_SHARE = 0.65
#: An object whose area is at most this many times its largest inscribed circle's is one
#: cell (an oval of axis ratio up to 1.6), measured by its area; a larger one is a clump of
#: touching cells, measured by its inscribed circle (two touching discs have twice its area).
MAX_SINGLE_AREA = 1.6
#: An object with more than this share of nucleus-dark pixels is a nucleated cell; a pixel
#: is nucleus-dark above the Otsu split of the stained pixels' density and at least this
#: many times the median stained pixel's.
DARK_OVER_TYPICAL = 1.8
MAX_DARK_SHARE = 0.2
#: Flat-field correction of the red-cell segmentation (:func:`_flat_fielded`): the field is cut
#: into about this many blocks a side; a block whose bright pixels lie more than
#: FLAT_FIELD_CLUMP under the fitted illumination is a clump, not glass; an illumination
#: within FLAT_FIELD_TOLERANCE of flat is left as it is; where the gain would pass
#: FLAT_FIELD_MAX_GAIN (a corner under a third of the light) nothing is read.
FLAT_FIELD_BLOCKS = 16
FLAT_FIELD_CLUMP = 0.1
FLAT_FIELD_TOLERANCE = 0.3
FLAT_FIELD_MAX_GAIN = 3.0
#: Objects kept around the first median diameter (lower, upper factor): clumps and white
#: cells above, fragments below.
DIAMETER_BAND = (0.6, 1.5)
#: Diameters (µm) that pass for a red cell's at a stated spacing (:func:`red_cells_at`): the
#: same band around ``RED_CELL_UM`` (4.8-12 µm), wide enough for a spacing a third off.
RED_CELL_BAND_UM = (DIAMETER_BAND[0] * RED_CELL_UM, DIAMETER_BAND[1] * RED_CELL_UM)
#: Inscribed diameters below this (work pixels) are noise whatever the scale.
MIN_DIAMETER_WORK_PX = 5.0
#: A pooled estimate is certain over at least this many red cells from at least two images,
#: with a spread (as MAX_RELATIVE_UNCERTAINTY) of at most ``MAX_POOLED_SPREAD``. Why a wider
#: spread than one image's: the median of n diameters moves by about spread / sqrt(n), and
#: small crops add fragments of cells cut by their border to the pool (docs/performance.md,
#: "Pooled estimates").
MIN_POOLED_RED_CELLS = 20
MAX_POOLED_SPREAD = 0.4
#: An estimate from fewer round objects than this is one object's size: on single-cell
#: crops sent alone, such estimates were within 30% of the crops' spacing for 29% of 17
#: hand-cut blood crops and 36% of 2,209 marrow crops, those from 2-4 objects for 83% and
#: 71%. Such an image whose size's pool holds no more takes the certain pool of all the
#: patient's images (:func:`pool_uncertain`).
MIN_OWN_RED_CELLS = 2
#: The pool of all sizes is of one spacing only when at most this share of its images with
#: several round objects measure them outside the band of sizes its median keeps
#: (``DIAMETER_BAND``): on real sets of one spacing 0-3% of fields and 2-10% of crops
#: (objects cut by a crop's border); images of a second objective (1.6x or more) all fall
#: outside it, and the median would silently give them the majority's spacing.
MAX_DISAGREEING_SHARE = 0.2
#: Where a spacing came from (the ``spacing.source`` of the diagnose JSON): ``pooled`` is
#: estimated from the red cells of the patient's (or data set's) images of the same size;
#: ``file`` (``FILE_SOURCE``) is the calibration the image file states about itself
#: (``marrowdx.file_spacing``). ``STATED_SOURCES`` are the ones the user or the user's
#: camera stated (the rest are estimates or a fallback).
FILE_SOURCE = "file"
STATED_SOURCES = ("given", "patient", FILE_SOURCE)
SOURCES = (*STATED_SOURCES, "estimated", "pooled", "assumed")


def scale_to_model(
    um_per_pixel: float, model_um_per_pixel: float = config.MODEL_UM_PER_PIXEL
) -> float:
    """Model pixels per input pixel: the factor an input at ``um_per_pixel`` is resampled by.

    The one scale rule of images and slides (``marrowdx.slides`` reads a slide level at
    ``1 / scale_to_model(...)`` base pixels per field pixel)."""
    check_um_per_pixel(um_per_pixel)
    check_um_per_pixel(model_um_per_pixel)
    return float(um_per_pixel) / float(model_um_per_pixel)


def check_um_per_pixel(value: object, what: str = "um_per_pixel") -> float:
    """``value`` as a positive finite float, or ValueError naming the problem."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{what} must be a number (µm per pixel), got {value!r}")
    out = float(value)
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"{what} must be a positive number of µm per pixel, got {value!r}")
    return out


def at_model_spacing(um_per_pixel: float, tolerance: float = MODEL_SPACING_TOLERANCE) -> bool:
    """Within ``tolerance`` of the models' spacing: sent without resampling."""
    return abs(scale_to_model(um_per_pixel) - 1.0) <= tolerance


#: Red-cell boxes reaching within this many pixels of the image border are not used to
#: measure red cells (a cell cut by the border looks smaller than it is).
BORDER_MARGIN_PX = 2.0


def red_cell_spacing(boxes: np.ndarray, width: int, height: int) -> float | None:
    """µm per pixel that a data set's red-cell boxes (x0, y0, x1, y1 in an image of
    ``width`` x ``height``) give: ``RED_CELL_UM`` over the median side of those not cut by
    the border; None with none left. The ruler for labelled fields that state no spacing,
    in training, evaluation and the crops cut from them alike."""
    if len(boxes) == 0:
        return None
    b = np.asarray(boxes, np.float32)
    inside = (
        (b[:, 0] > BORDER_MARGIN_PX)
        & (b[:, 1] > BORDER_MARGIN_PX)
        & (b[:, 2] < width - BORDER_MARGIN_PX)
        & (b[:, 3] < height - BORDER_MARGIN_PX)
    )
    if not inside.any():
        return None
    sides = ((b[inside, 2] - b[inside, 0]) + (b[inside, 3] - b[inside, 1])) / 2
    return float(RED_CELL_UM / np.median(sides))


# ------------------------------------------------------------------------------ estimate
@dataclass(frozen=True)
class SpacingEstimate:
    """A pixel spacing and how sure it is.

    ``um_per_pixel`` is None when it could not be estimated (``reason`` says why);
    ``relative_uncertainty`` is the interquartile range of the red cells' diameters over
    their median (None from a single red cell: one diameter has no spread);
    ``n_red_cells`` how many objects the median is over; ``n_images`` how many
    images they come from (more than one for a pooled estimate). ``diameters_px``: every
    candidate red cell's diameter in input pixels, for :func:`pooled_estimate`.
    """

    um_per_pixel: float | None
    relative_uncertainty: float | None
    n_red_cells: int
    source: str = "estimated"
    reason: str | None = None
    n_images: int = 1
    diameters_px: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def uncertain(self) -> bool:
        """Too few red cells or too wide a spread to trust (or no estimate at all)."""
        if self.um_per_pixel is None:
            return True
        if self.source == "pooled":
            return (
                self.n_images < 2
                or self.n_red_cells < MIN_POOLED_RED_CELLS
                or (self.relative_uncertainty or 0.0) > MAX_POOLED_SPREAD
            )
        return (
            self.n_red_cells < MIN_RED_CELLS
            or (self.relative_uncertainty or 0.0) > MAX_RELATIVE_UNCERTAINTY
        )

    def warning(self) -> str | None:
        """What to tell the user when the estimate is uncertain, else None."""
        if self.source not in ("estimated", "pooled", "assumed"):
            return None
        hint = "give the spacing with --um-per-pixel (or spacing.json in the patient folder)"
        if self.um_per_pixel is None or self.source == "assumed":
            why = self.reason or "no red cells found"
            return f"pixel spacing could not be estimated ({why}); {hint}"
        if not self.uncertain:
            return None
        spread = (
            f"{self.relative_uncertainty:.0%} spread"
            if self.relative_uncertainty is not None
            else "unknown spread"
        )
        images = f" in {self.n_images} images" if self.n_images > 1 else ""
        return (
            f"pixel spacing estimate {self.um_per_pixel:.3g} um/px is uncertain "
            f"({quantity(self.n_red_cells, 'red cell')}{images}, {spread}); {hint}"
        )


def otsu_threshold(values: np.ndarray, counts: np.ndarray) -> float:
    """Otsu's threshold over a histogram: ``counts`` of pixels at each of ``values`` (the
    split maximising the between-class variance); returns the highest value of the lower
    class."""
    order = np.argsort(values, kind="stable")
    v, c = values[order], counts[order].astype(np.float64)
    w0 = np.cumsum(c)
    w1 = w0[-1] - w0
    m0 = np.cumsum(c * v)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(v[int(np.argmax(w0 * w1 * (mu0 - mu1) ** 2))])


def _open3(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 3x3 square (numpy shifts: a twentieth of scipy's binary
    opening): drops specks and one-pixel bridges between cells."""
    eroded = _erode3(mask)
    return ~_erode3(~eroded)


def _erode3(mask: np.ndarray) -> np.ndarray:
    """Erosion with a 3x3 square, separably by shifted ANDs (pixels beyond the border
    count as set, so objects cut by the border are not eaten from it)."""
    rows = mask.copy()
    rows[1:] &= mask[:-1]
    rows[:-1] &= mask[1:]
    out = rows.copy()
    out[:, 1:] &= rows[:, :-1]
    out[:, :-1] &= rows[:, 1:]
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the border filled (a red
    cell's pale centre); one labelling of the background instead of scipy's iterated
    dilation."""
    from scipy import ndimage as ndi

    background, n = ndi.label(~mask)
    if n == 0:
        return mask
    hole = np.ones(n + 1, dtype=bool)
    hole[0] = False
    border = (background[0], background[-1], background[:, 0], background[:, -1])
    hole[np.concatenate(border)] = False
    return mask | hole[background]


def _red_cell_diameters(rgb: np.ndarray) -> np.ndarray:
    """Inscribed diameters (work pixels) of the pale, non-nucleated objects of ``rgb``, read
    without its frame of camera black (:func:`_without_frame`).

    Optical density of the green channel (eosin and haematoxylin both absorb green) over the
    image's own background (its 99th percentile). The foreground threshold is Otsu's on the
    density clipped at its 85th percentile, so that dark nuclei do not pull the split above
    the red cells; a second Otsu split of the foreground marks nucleus-dark pixels. Both are
    computed on the 256-level histogram, so each costs one pass over 256 values.
    """
    from scipy import ndimage as ndi

    rgb = _without_frame(rgb)
    green = _flat_fielded(np.ascontiguousarray(rgb[..., 1]))
    hist = np.bincount(green.ravel(), minlength=256)
    cumulative = np.cumsum(hist)
    background = float(np.searchsorted(cumulative, 0.99 * green.size)) + 1.0
    od = np.log(background / (np.arange(256, dtype=np.float64) + 1.0)).clip(0)
    cap = od[int(np.searchsorted(cumulative, 0.15 * green.size))]
    fg_threshold = otsu_threshold(np.minimum(od, cap), hist)
    foreground_levels = od > fg_threshold
    dark_threshold = np.inf
    if hist[foreground_levels].sum() > 16:
        # a split inside one population (every object a red cell) is no nucleus: nuclei
        # are far denser than the typical stained pixel
        counts = hist[foreground_levels]
        levels = od[foreground_levels]
        typical = np.sort(levels)[
            np.searchsorted(np.cumsum(counts[np.argsort(levels)]), counts.sum() / 2)
        ]
        dark_threshold = max(otsu_threshold(levels, counts), DARK_OVER_TYPICAL * float(typical))
    # density falls as the green level rises: thresholds become level comparisons
    foreground = _open3((od > fg_threshold)[green])
    dark_pixels = (od > dark_threshold)[green]
    filled = _fill_holes(foreground)
    labels, n = ndi.label(filled)
    if n == 0:
        return np.zeros(0)
    distance = ndi.distance_transform_edt(filled)
    radius = np.zeros(n)
    for i, box in enumerate(ndi.find_objects(labels)):
        if box is not None:
            radius[i] = distance[box][labels[box] == i + 1].max()
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    dark = np.bincount(flat, weights=dark_pixels.ravel(), minlength=n + 1)[1:]
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inner = np.ones(n, dtype=bool)
    inner[edge[edge > 0] - 1] = False  # cut by the border: smaller than it is
    diameter = 2.0 * radius
    pale = (dark < MAX_DARK_SHARE * np.maximum(area, 1)) & (diameter >= MIN_DIAMETER_WORK_PX)
    if pale.any():
        # specks and fragments are many but small: keep objects whose inscribed circle is
        # at least MIN_RADIUS_SHARE of the typical one, the median weighted by circle area
        # (a clump of many cells weighs as one cell, unlike its own area)
        r = np.sort(radius[pale])
        weight = np.cumsum(r**2)
        typical = r[np.searchsorted(weight, weight[-1] / 2)]
        pale &= radius >= MIN_RADIUS_SHARE * typical
    chosen = pale & inner if np.count_nonzero(pale & inner) >= MIN_RED_CELLS else pale
    # a single cell (its area near its inscribed circle's) is measured by its area: real red
    # cells are oval, and the inscribed circle alone would give their shorter axis
    single = area <= MAX_SINGLE_AREA * np.pi * radius**2
    diameter = np.where(single, np.sqrt(4.0 * area / np.pi), diameter)
    return diameter[chosen]


def _flat_fielded(green: np.ndarray) -> np.ndarray:
    """The green channel (uint8, work size) divided by its illumination where that falls off
    across the field (vignetting: a phone or a camera on a trinocular dims the corners), else
    as it is.

    Why: one density threshold serves the whole field, and in a vignetted one the dim glass
    of the corners passes it, so red cells merged with their surroundings and measured
    larger: 60 real blood fields, 3x enlarged, with their edges at 0.65 of the light, were
    estimated 0.024 against 0.034 um/px unvignetted, and 16 more of them miscounted (README
    "What a missing spacing costs"). The illumination is a quadratic surface fitted to each
    block's bright pixels (the glass between cells), blocks far darker than the fit (a clump
    of cells, camera black) left out; a surface within ``FLAT_FIELD_TOLERANCE`` of flat
    changes nothing, so evenly lit fields are read exactly as before."""
    height, width = green.shape
    block = max(8, min(height, width) // FLAT_FIELD_BLOCKS)
    rows, cols = height // block, width // block
    if rows < 3 or cols < 3:
        return green
    tiles = green[: rows * block, : cols * block].reshape(rows, block, cols, block)
    bright = np.percentile(tiles, 95, axis=(1, 3)).ravel()
    design = _quadratic_terms((rows, cols), (rows, cols)).reshape(rows * cols, -1)
    keep = bright > config.CAMERA_BLACK_LEVEL
    for _ in range(3):
        if keep.sum() < design.shape[1] * 2:
            return green
        coef, *_ = np.linalg.lstsq(design[keep], bright[keep], rcond=None)
        surface = design @ coef
        keep &= bright >= (1.0 - FLAT_FIELD_CLUMP) * surface
    lit = surface[keep]
    if lit.min() >= (1.0 - FLAT_FIELD_TOLERANCE) * lit.max():
        return green
    full = _quadratic_terms((height, width), (rows * block, cols * block)) @ coef
    gain = lit.max() / np.maximum(full, 1.0)
    corrected = np.clip(np.rint(green * np.maximum(gain, 1.0)), 0, 255).astype(np.uint8)
    # where the light falls under a third, nothing can be read: shown as glass, not as stain
    corrected[gain > FLAT_FIELD_MAX_GAIN] = 255
    return corrected


def _quadratic_terms(shape: tuple[int, int], span: tuple[int, int]) -> np.ndarray:
    """[rows, cols, 6]: the terms of a quadratic surface at the centres of a ``shape`` grid,
    its coordinates scaled so that ``span`` cells run from -0.5 to 0.5. Why a span: the
    surface fitted on the blocks (``span`` = the grid of blocks) is evaluated at every pixel
    (``span`` = the pixels those blocks cover), one scale for both."""
    y, x = ((np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5) / np.reshape(span, (2, 1, 1))) - 0.5
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)


def _spacing_from_diameters(diameters: np.ndarray, work_scale: float) -> SpacingEstimate:
    """Median of the diameters within ``DIAMETER_BAND`` of a first median; spacing from it.
    ``work_scale``: input pixels per pixel of ``diameters``."""
    if diameters.size == 0:
        return SpacingEstimate(None, None, 0, reason="no red cells found")
    input_px = np.asarray(diameters, np.float64) * work_scale
    first = float(np.percentile(input_px, 50, method="lower"))
    low, high = DIAMETER_BAND
    kept = input_px[(input_px >= low * first) & (input_px <= high * first)]
    median = float(np.median(kept))
    spread = None  # one object has no spread: unknown, not 0
    if kept.size > 1:
        q1, q3 = np.percentile(kept, [25, 75])
        spread = float((q3 - q1) / median)
    return SpacingEstimate(
        RED_CELL_UM / median, spread, int(kept.size), diameters_px=tuple(input_px.tolist())
    )


def _to_work_size(image, side: int) -> np.ndarray:
    """A PIL image as RGB at most ``side`` pixels on its longer side, its burned-in scale bar
    and labels painted over (``marrowdx.burned_in``: their black is no stain to split on)."""
    from PIL import Image

    from marrowdx.burned_in import paint_over
    from marrowdx.image_checks import rgb_of

    image = rgb_of(image)
    longer = max(image.size)
    if longer > side:
        factor = longer / side
        size = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
        image = image.resize(size, Image.Resampling.BOX)
    return paint_over(np.asarray(image))


def _work_sides(longer: int) -> list[int]:
    """Working sizes to try, smallest first: WORK_SIDE doubled up to MAX_WORK_SIDE (or the
    image's own size), so a large image whose red cells are small in it is looked at again
    more finely."""
    sides = [WORK_SIDE]
    while sides[-1] < min(longer, MAX_WORK_SIDE):
        sides.append(sides[-1] * 2)
    return sides


def _red_cells_resolved(um_per_pixel: float, scale: float) -> bool:
    """Whether red cells of an image at ``um_per_pixel``, seen at ``scale`` input pixels per
    working pixel, are at least MIN_CELL_WORK_PX across: the working-size rule of the
    estimate and of :func:`red_cells_at`."""
    return RED_CELL_UM / (um_per_pixel * scale) >= MIN_CELL_WORK_PX


def _without_frame(work: np.ndarray) -> np.ndarray:
    """The working copy less its frame of camera black or of a page's white
    (``image_checks.field_region``): the same pixel scale, only what the field shows."""
    from marrowdx.image_checks import field_region

    region = field_region(work)
    if region is None:
        return work
    x0, y0, x1, y1 = region
    return work[y0:y1, x0:x1]


def _estimate(read_work, width: int, longer: int) -> SpacingEstimate:
    """The estimate at the smallest working size at which red cells are at least
    MIN_CELL_WORK_PX across; ``read_work(side)`` gives the image at that size."""
    estimate = SpacingEstimate(None, None, 0, reason="no red cells found")
    for side in _work_sides(longer):
        work = read_work(side)
        scale = width / work.shape[1]
        estimate = _spacing_from_diameters(_red_cell_diameters(work), scale)
        if estimate.um_per_pixel is not None and _red_cells_resolved(estimate.um_per_pixel, scale):
            return estimate
    return estimate


def estimate_um_per_pixel(rgb: np.ndarray) -> SpacingEstimate:
    """Estimate the spacing of an RGB image (H x W x 3 uint8, input pixels) from its red cells.

    Returns ``um_per_pixel`` None with a ``reason`` when no red cell is found; check
    ``.uncertain`` before trusting it.
    """
    from PIL import Image

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    image = Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
    return _estimate(lambda side: _to_work_size(image, side), image.width, max(image.size))


def _work_reader(data: bytes) -> tuple[Callable[[int], np.ndarray], int, int]:
    """(``read_work(side)``, width, longer side) of an encoded image; JPEGs decode at a
    reduced size (draft mode: libjpeg's 1/2, 1/4, 1/8 scaling, far cheaper than a full
    decode)."""
    from marrowdx.image_checks import open_image

    with open_image(data) as image:
        width, size = image.width, image.size

    def read_work(side: int) -> np.ndarray:
        with open_image(data) as image:
            if image.format == "JPEG" and max(size) > side:
                shrink = max(size) / side  # draft keeps the size >= the one asked
                image.draft("RGB", (math.ceil(size[0] / shrink), math.ceil(size[1] / shrink)))
            return _to_work_size(image, side)

    return read_work, width, max(size)


def estimate_from_bytes(data: bytes) -> SpacingEstimate:
    """Estimate the spacing of an encoded image (:func:`estimate_um_per_pixel`)."""
    read_work, width, longer = _work_reader(data)
    return _estimate(read_work, width, longer)


def red_cells_at(data: bytes, um_per_pixel: float) -> int:
    """How many pale round objects of an encoded image are a red cell's size at a stated
    ``um_per_pixel`` (diameter within ``RED_CELL_BAND_UM``): the estimator's candidates,
    segmented at the smallest working size at which a red cell would be
    ``MIN_CELL_WORK_PX`` across. Why: a field of a smear at its stated spacing shows red
    cells of that size; a picture that is no smear, or a spacing far from the image's, shows
    none (``quality.red_cells_verdict``)."""
    check_um_per_pixel(um_per_pixel)
    low, high = RED_CELL_BAND_UM
    read_work, width, longer = _work_reader(data)
    sides = _work_sides(longer)
    side = next((s for s in sides if _red_cells_resolved(um_per_pixel, longer / s)), sides[-1])
    work = read_work(side)
    diameters_um = _red_cell_diameters(work) * (width / work.shape[1]) * um_per_pixel
    return int(np.count_nonzero((diameters_um >= low) & (diameters_um <= high)))


def pooled_estimate(estimates: Sequence[SpacingEstimate]) -> SpacingEstimate:
    """One estimate from the red cells of images taken at one spacing: the same median rule
    over every image's candidate red cells (source ``pooled``; ``n_images`` counts the
    images that gave any). Only images at one spacing may be pooled: the caller groups them
    (:func:`pool_uncertain` by pixel size)."""
    given = [np.asarray(e.diameters_px, np.float64) for e in estimates if e.diameters_px]
    if not given:
        return SpacingEstimate(None, None, 0, "pooled", "no red cells found", len(estimates))
    pooled = _spacing_from_diameters(np.concatenate(given), 1.0)
    return replace(pooled, source="pooled", n_images=len(given))


def pool_uncertain(
    estimates: Sequence[SpacingEstimate], sizes: Sequence[tuple[int, int]]
) -> list[SpacingEstimate]:
    """``estimates`` with each uncertain one replaced by the pooled estimate of all images of
    its pixel size (``sizes``: width, height), when the pool holds more red cells than the
    image alone. The pool keeps its own ``uncertain`` flag (and warning).

    Why by size: images of one size from one patient or set came from one camera, so they
    share a spacing. A lab that takes the same camera's images at two objectives gives a
    pool whose median is the majority's objective (the band of sizes it keeps leaves the
    other's red cells out): such folders need their spacing given. Why the size pool is not
    checked for that as the pool of all sizes is (:func:`_one_spacing`): small patient
    folders of real marrow crops, a fifth and more of whose crops measure their few objects
    outside the band (cut by the border), then lost it, and 22 of 308 crops were excluded.
    A certain estimate keeps its own value: it is the image's own evidence.

    An image left with fewer than ``MIN_OWN_RED_CELLS`` round objects (its size alone, or its
    size's pool no better) takes the pool of all the images whatever their size, when that
    pool is certain: single-cell crops cut to each cell's size (a lab's export, a hand-cut
    set) differ in size but not in spacing, and one object's size is no estimate. A pool of
    two magnifications is left alone by its spread (as above).
    """
    if len(estimates) != len(sizes):
        raise ValueError(f"{len(estimates)} estimates for {len(sizes)} sizes")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    out = list(estimates)
    for members in groups.values():
        if len(members) < 2 or not any(estimates[i].uncertain for i in members):
            continue
        pool = pooled_estimate([estimates[i] for i in members])
        if pool.um_per_pixel is None or pool.n_images < 2:
            continue
        for i in members:
            if estimates[i].uncertain and pool.n_red_cells > estimates[i].n_red_cells:
                out[i] = pool
    lone = [i for i, e in enumerate(out) if e.uncertain and e.n_red_cells < MIN_OWN_RED_CELLS]
    if lone and len(estimates) > 1:
        whole = pooled_estimate(estimates)
        if _one_spacing(estimates, whole) and not whole.uncertain:
            for i in lone:
                out[i] = whole
    return out


def _one_spacing(estimates: Sequence[SpacingEstimate], pool: SpacingEstimate) -> bool:
    """Whether ``pool`` (of ``estimates``) gives a spacing, from two images or more, that the
    images with several round objects agree with: at most ``MAX_DISAGREEING_SHARE`` of them
    with their own estimate beyond ``DIAMETER_BAND`` of it."""
    if pool.um_per_pixel is None or pool.n_images < 2:
        return False
    low, high = DIAMETER_BAND
    own = [e.um_per_pixel for e in estimates if e.n_red_cells >= MIN_OWN_RED_CELLS]
    ratios = np.array([u / pool.um_per_pixel for u in own if u is not None], np.float64)
    if not ratios.size:
        return True
    outside = (ratios < 1 / high) | (ratios > 1 / low)
    return float(outside.mean()) <= MAX_DISAGREEING_SHARE


def estimate_images(images: Sequence[bytes]) -> list[SpacingEstimate]:
    """Each encoded image's estimate (:func:`estimate_from_bytes`), an uncertain one pooled
    with the images of its size (:func:`pool_uncertain`): for images known to come from one
    source (a data set, a patient) whose spacing is not stated."""
    from marrowdx.image_checks import open_image

    sizes = []
    for data in images:
        with open_image(data) as image:
            sizes.append(image.size)
    return pool_uncertain([estimate_from_bytes(data) for data in images], sizes)


# ----------------------------------------------------------------------------- resampling
def resampled_size(width: int, height: int, um_per_pixel: float) -> tuple[int, int]:
    """(width, height) of an input resampled to the models' spacing (at least 1 px)."""
    scale = scale_to_model(um_per_pixel)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resample(image, um_per_pixel: float):
    """A PIL image resampled to the models' spacing (Lanczos; area-averaging first when
    shrinking by more than 2x, as Pillow's ``reducing_gap`` does)."""
    from PIL import Image

    size = resampled_size(image.width, image.height, um_per_pixel)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
