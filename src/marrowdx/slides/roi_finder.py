"""Find the countable monolayer areas of a slide that has no ROI annotations.

Slides straight from a scanner (SVS, NDPI, MRXS, TIFF, or DICOM without its "Monolayer
regions of interest" series) say nothing about where cells can be counted. A smear has three
kinds of area: empty glass, the thick part (cells piled on each other, too dense to count)
and, between them, the monolayer where red cells lie apart. They differ in how much of the
glass is covered by stain, which a low-resolution level shows without reading the base:

1. **Overview.** The coarsest pyramid level at least as fine as ``OVERVIEW_UM`` (read whole,
   chunk by chunk; only when no such level exists is a finer one read and shrunk). Per
   pixel, optical density above the glass (its brightest pixels), scaled so that the
   darkest 5% of the cells sit at ``REFERENCE_STAIN_OD`` (labs stain more or less strongly).
2. **Classify.** Mean OD over ``TISSUE_WINDOW_UM`` below ``TISSUE_OD``: glass. Mean OD over
   ``THICK_WINDOW_UM`` above ``THICK_OD``, over an area at least ``THICK_MIN_UM`` wide: thick,
   and the monolayer keeps ``THICK_MARGIN_UM`` (plus half the window's blur) away from it
   (the feathered transition). The rest is monolayer.
3. **Rectangles.** The monolayer is covered by its largest all-monolayer rectangles
   (``monolayer_boxes``; at least ``MIN_SIDE_UM`` a side, never overlapping, so a cell counts
   once), each grown back to the area's ragged border.
4. **Confirm at full resolution.** ``CONFIRM_PATCHES`` patches of ``CONFIRM_PX`` model pixels,
   spread over each candidate, are read at the models' spacing; it is kept when most have a
   stained share in [``COVER_MIN``, ``COVER_MAX``] (cells apart, not empty). Only these
   patches touch the base level, so a large slide is searched from a small share of it.

Everything read is in the slide's ``read_log``; ``RoiSearch`` records the overview level,
each candidate and why it was kept or dropped, and the base tiles read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from marrowdx import config
from marrowdx.slides.base import Roi, SlideError
from marrowdx.slides.pyramid import PyramidSlide

#: Spacing of the overview the search works on (µm/pixel): a red cell (7-8 µm) is about two
#: pixels, enough to measure coverage over a window, and a 25 x 12 mm slide is 6,250 x 3,125.
OVERVIEW_UM = 4.0
#: Mean optical density (summed over RGB, above the glass) over ``TISSUE_WINDOW_UM`` from
#: which an area holds cells rather than empty glass (glass: about 0.02; a monolayer: 0.3-1).
TISSUE_OD = 0.15
TISSUE_WINDOW_UM = 16.0
#: Mean optical density over ``THICK_WINDOW_UM`` above which cells overlap: the thick area,
#: where nothing can be counted (a simulated monolayer: 0.3-1.1 at its densest 5%; the thick
#: band: 1.0-2.0, median 1.5).
THICK_OD = 1.2
THICK_WINDOW_UM = 32.0
#: The optical density (summed over RGB) of the darkest 5% of the overview's cells on the
#: simulated slides the thresholds above were set on (2.6-2.9 at 4 µm/pixel); a slide whose
#: stain is weaker or stronger has its overview scaled to it first (within the limits), as
#: the models' stain normaliser scales each field: at half and twice the stain strength the
#: thick band otherwise passed for monolayer, or the monolayer for thick.
REFERENCE_STAIN_OD = 2.7
STAIN_GAIN_LIMITS = (0.25, 4.0)
#: Full resolution (confirmation): a pixel is stained above this OD; a monolayer patch has
#: a stained share in [COVER_MIN, COVER_MAX] (below: nearly empty; above: cells overlap).
STAINED_OD = 0.3
COVER_MIN = 0.05
COVER_MAX = 0.85
#: Monolayer next to a thick area is the feathered transition; this much of it is left out.
THICK_MARGIN_UM = 16.0
#: Narrowest thick area (µm): a denser cluster of a few cells inside a monolayer is not one.
THICK_MIN_UM = 48.0
#: Smallest monolayer area kept (each side, µm): a quarter of a model field, so that a found
#: area is worth tiling.
MIN_SIDE_UM = 64.0
#: Full-resolution confirmation: patches per candidate, their side (model pixels), and the
#: share that must look like monolayer.
CONFIRM_PATCHES = 3
CONFIRM_PX = 512
CONFIRM_SHARE = 0.5
#: Largest overview read in one piece (pixels a side): bounds memory on any slide.
_CHUNK = 4096


@dataclass(frozen=True)
class Candidate:
    """One monolayer area found on the overview: base-level box, mean coverage there, the
    coverage of each full-resolution patch, and whether it was kept (and why not)."""

    box: tuple[int, int, int, int]
    coverage: float
    patch_coverage: tuple[float, ...]
    kept: bool
    why: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "box": list(self.box),
            "coverage": round(self.coverage, 3),
            "patch_coverage": [round(c, 3) for c in self.patch_coverage],
            "kept": self.kept,
            "why": self.why,
        }


@dataclass
class RoiSearch:
    """What the automatic search did: the ROIs it returns and what it read."""

    rois: list[Roi]
    overview_level: int
    overview_um: float
    candidates: list[Candidate] = field(default_factory=list)
    base_tiles_read: int = 0
    base_tiles_total: int = 0
    regions_read: int = 0
    stain_gain: float = 1.0

    @property
    def base_fraction(self) -> float:
        return self.base_tiles_read / self.base_tiles_total if self.base_tiles_total else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "overview_level": self.overview_level,
            "overview_um_per_pixel": round(self.overview_um, 4),
            "stain_gain": round(self.stain_gain, 3),
            "candidates": [c.to_dict() for c in self.candidates],
            "base_tiles_read": self.base_tiles_read,
            "base_tiles_total": self.base_tiles_total,
            "base_fraction_read": round(self.base_fraction, 5),
        }


def _overview(slide: PyramidSlide) -> tuple[np.ndarray, int, float]:
    """The slide at about OVERVIEW_UM (uint8 RGB), its source level and its spacing; read
    chunk by chunk so that no more than one chunk of the source level is held at once."""
    from PIL import Image

    target = OVERVIEW_UM / slide.um_per_pixel  # base pixels per overview pixel
    index = slide.level_for(max(target, 1.0))
    level = slide.levels[index]
    shrink = max(1, math.floor(target / level.downsample))  # level pixels per overview pixel
    out_w, out_h = -(-level.width // shrink), -(-level.height // shrink)
    overview = np.empty((out_h, out_w, 3), np.uint8)
    step = _CHUNK - _CHUNK % shrink
    for y in range(0, level.height, step):
        for x in range(0, level.width, step):
            w, h = min(step, level.width - x), min(step, level.height - y)
            region = slide.read_level_region(index, x, y, w, h)
            if shrink > 1:
                size = (-(-w // shrink), -(-h // shrink))
                region = region.resize(size, Image.Resampling.BOX)
            tile = np.asarray(region)
            oy, ox = y // shrink, x // shrink
            overview[oy : oy + tile.shape[0], ox : ox + tile.shape[1]] = tile
    return overview, index, slide.um_per_pixel * level.downsample * shrink


def glass_level(rgb: np.ndarray) -> np.ndarray:
    """Per channel, the 99.5th percentile of a uint8 RGB image: the glass (the brightest),
    from a histogram (a sort of a whole overview would cost seconds)."""
    flat = np.asarray(rgb, np.uint8).reshape(-1, 3)
    out = np.empty(3)
    for c in range(3):
        cumulative = np.cumsum(np.bincount(flat[:, c], minlength=256))
        out[c] = float(np.searchsorted(cumulative, 0.995 * cumulative[-1]))
    return out


def optical_density(rgb: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """Per pixel, optical density above the glass summed over RGB (float32, >= 0); one
    256-entry table per channel instead of a log per pixel."""
    rgb = np.asarray(rgb, np.uint8)
    levels = np.arange(256, dtype=np.float32)
    od = np.zeros(rgb.shape[:-1], np.float32)
    for c in range(3):
        table = np.clip(np.log((np.float32(glass[c]) + 1.0) / (levels + 1.0)), 0, None)
        od += table[rgb[..., c]]
    return od


def stained(rgb: np.ndarray, glass: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Boolean mask of stained pixels at full resolution: OD above the glass, scaled by the
    slide's stain gain, > STAINED_OD."""
    return optical_density(rgb, glass) * gain > STAINED_OD


def _trim(mask: np.ndarray, box: list[int]) -> list[int] | None:
    """Shrink box (x0, y0, x1, y1, exclusive) until each edge row/column is >= half mask."""
    x0, y0, x1, y1 = box
    while x1 - x0 > 0 and y1 - y0 > 0:
        edges = {
            "top": mask[y0, x0:x1].mean(),
            "bottom": mask[y1 - 1, x0:x1].mean(),
            "left": mask[y0:y1, x0].mean(),
            "right": mask[y0:y1, x1 - 1].mean(),
        }
        worst = min(edges, key=edges.get)  # type: ignore[arg-type]
        if edges[worst] >= 0.5:
            return [x0, y0, x1, y1]
        if worst == "top":
            y0 += 1
        elif worst == "bottom":
            y1 -= 1
        elif worst == "left":
            x0 += 1
        else:
            x1 -= 1
    return None


def _patch_origins(box: tuple[int, int, int, int], side: float, n: int) -> list[tuple[int, int]]:
    """n patch corners spread over box: its centre, then along its diagonal."""
    x0, y0, x1, y1 = box
    free_w, free_h = max(0.0, x1 - x0 - side), max(0.0, y1 - y0 - side)
    spots = [0.5, 0.2, 0.8, 0.35, 0.65][:n]
    return [(round(x0 + free_w * t), round(y0 + free_h * t)) for t in spots]


def _largest_rectangle(mask: np.ndarray) -> tuple[int, int, int, int, int]:
    """The largest all-True axis-aligned rectangle of a 2-D mask: x0, y0, x1, y1, area
    (the histogram method, one pass over the rows)."""
    h, w = mask.shape
    heights = np.zeros(w + 1, np.int64)  # a 0 sentinel column closes every run
    best = (0, 0, 0, 0, 0)
    for y in range(h):
        heights[:w] = np.where(mask[y], heights[:w] + 1, 0)
        stack: list[int] = []
        for x in range(w + 1):
            while stack and heights[stack[-1]] >= heights[x]:
                top = stack.pop()
                left = stack[-1] + 1 if stack else 0
                area = int(heights[top]) * (x - left)
                if area > best[4]:
                    best = (left, y - int(heights[top]) + 1, x, y + 1, area)
            stack.append(x)
    return best


def monolayer_boxes(mask: np.ndarray, min_side: float) -> list[tuple[int, int, int, int]]:
    """Cover a monolayer mask with rectangles (x0, y0, x1, y1, mask pixels), largest first.

    The largest all-monolayer rectangle is taken and removed, again and again, while one
    with both sides >= ``min_side`` remains: an L-shaped area becomes two ROIs rather than
    a bounding box half full of glass or thick smear. The search runs on the mask shrunk so
    that its longer side is at most 512 (speed), each rectangle is then trimmed at the
    mask's own resolution (``_trim``).
    """
    from scipy import ndimage

    h, w = mask.shape
    block = max(1, math.ceil(max(h, w) / 512))
    coarse = mask
    if block > 1:
        ph, pw = -(-h // block) * block, -(-w // block) * block
        padded = np.zeros((ph, pw), bool)
        padded[:h, :w] = mask
        coarse = padded.reshape(ph // block, block, pw // block, block).mean(axis=(1, 3)) >= 0.5
    # holes (a dense cluster inside a monolayer) do not split an area; thin strips go
    coarse = ndimage.binary_opening(ndimage.binary_fill_holes(coarse), iterations=1)
    free = mask.copy()  # monolayer not yet in a box: boxes never overlap (a cell counts once)
    found: list[tuple[int, tuple[int, int, int, int]]] = []
    labels, _n = ndimage.label(coarse)
    for k, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:
            continue
        ys, xs = where
        part = labels[ys, xs] == k
        for _ in range(64):  # an area is a few rectangles at most; this bounds the loop
            x0, y0, x1, y1, area = _largest_rectangle(part)
            if min(x1 - x0, y1 - y0) * block < min_side:
                break
            part[y0:y1, x0:x1] = False
            box = (xs.start + x0, ys.start + y0, xs.start + x1, ys.start + y1)
            found.append((area, box))
    boxes = []
    for _area, (x0, y0, x1, y1) in sorted(found, key=lambda f: -f[0]):
        fine = _trim(free, [x0 * block, y0 * block, min(w, x1 * block), min(h, y1 * block)])
        if fine is None:
            continue
        fine = _grow(free, fine)
        if min(fine[2] - fine[0], fine[3] - fine[1]) >= min_side:
            boxes.append(tuple(fine))
            free[fine[1] : fine[3], fine[0] : fine[2]] = False
    return boxes


def _grow(mask: np.ndarray, box: list[int]) -> list[int]:
    """Widen box (x0, y0, x1, y1) one row/column at a time while the new edge is at least
    half mask: the largest all-monolayer rectangle stops at the first notch of a ragged
    border, the area itself goes on."""
    h, w = mask.shape
    x0, y0, x1, y1 = box
    grew = True
    while grew:
        grew = False
        if y0 > 0 and mask[y0 - 1, x0:x1].mean() >= 0.5:
            y0, grew = y0 - 1, True
        if y1 < h and mask[y1, x0:x1].mean() >= 0.5:
            y1, grew = y1 + 1, True
        if x0 > 0 and mask[y0:y1, x0 - 1].mean() >= 0.5:
            x0, grew = x0 - 1, True
        if x1 < w and mask[y0:y1, x1].mean() >= 0.5:
            x1, grew = x1 + 1, True
    return [x0, y0, x1, y1]


def find_rois(slide: PyramidSlide) -> RoiSearch:
    """The monolayer areas of ``slide`` as ROIs (see the module docstring)."""
    from scipy import ndimage

    before = slide.read_log.n_read(0)
    overview, index, um = _overview(slide)
    glass = glass_level(overview)
    od = optical_density(overview, glass)
    del overview
    # stain strength differs between labs; the thresholds are for the reference strength
    tissue_od = od[od > TISSUE_OD]
    strength = float(np.percentile(tissue_od, 95)) if tissue_od.size else REFERENCE_STAIN_OD
    del tissue_od
    gain = float(np.clip(REFERENCE_STAIN_OD / max(strength, 1e-3), *STAIN_GAIN_LIMITS))
    od *= gain
    tissue = ndimage.uniform_filter(od, size=max(1, round(TISSUE_WINDOW_UM / um)), mode="nearest")
    window = max(1, round(THICK_WINDOW_UM / um))
    density = ndimage.uniform_filter(od, size=window, mode="nearest")
    del od
    thick = density > THICK_OD
    # the window's blur ends the thick mask up to half a window inside the thick area
    margin = max(1, round((THICK_MARGIN_UM + THICK_WINDOW_UM / 2) / um))
    if thick.any():
        # an opening drops dense clusters of a few cells (a thick area is wider than
        # THICK_MIN_UM), then a dilation by the margin; square filters, separable: fast
        thick = thick.view(np.uint8)
        side = max(1, round(THICK_MIN_UM / um))
        thick = ndimage.maximum_filter(ndimage.minimum_filter(thick, size=side), size=side)
        thick = ndimage.maximum_filter(thick, size=2 * margin + 1).view(bool)
    mono = ((tissue >= TISSUE_OD) & ~thick).view(np.uint8)
    coverage = density
    mono = ndimage.minimum_filter(ndimage.maximum_filter(mono, size=3), size=3).view(bool)
    min_side = MIN_SIDE_UM / um
    scale = um / slide.um_per_pixel  # base pixels per overview pixel
    search = RoiSearch(rois=[], overview_level=index, overview_um=um, stain_gain=gain)
    for box in monolayer_boxes(mono, min_side):
        base = (
            max(0, math.floor(box[0] * scale)),
            max(0, math.floor(box[1] * scale)),
            min(slide.width, math.ceil(box[2] * scale)),
            min(slide.height, math.ceil(box[3] * scale)),
        )
        mean_cover = float(coverage[box[1] : box[3], box[0] : box[2]].mean())
        search.candidates.append(_confirm(slide, base, mean_cover, glass, gain))
    search.rois = [
        Roi(index=i, box=c.box)
        for i, c in enumerate((c for c in search.candidates if c.kept), start=1)
    ]
    search.base_tiles_read = slide.read_log.n_read(0) - before
    search.base_tiles_total = slide.levels[0].n_tiles
    search.regions_read = slide.read_log.regions
    return search


def _confirm(
    slide: PyramidSlide,
    box: tuple[int, int, int, int],
    coverage: float,
    glass: np.ndarray,
    gain: float = 1.0,
) -> Candidate:
    """Read a few patches of the candidate at the models' spacing and check their coverage."""
    scale = config.MODEL_UM_PER_PIXEL / slide.um_per_pixel
    side = CONFIRM_PX * scale
    covers = []
    for x, y in _patch_origins(box, side, CONFIRM_PATCHES):
        patch = (x, y, min(slide.width, x + side), min(slide.height, y + side))
        image = np.asarray(slide.read_box(patch, scale))
        covers.append(float(stained(image, glass, gain).mean()))
    good = sum(COVER_MIN <= c <= COVER_MAX for c in covers)
    kept = good >= CONFIRM_SHARE * len(covers)
    why = "" if kept else f"{len(covers) - good} of {len(covers)} patches empty or thick"
    return Candidate(box, coverage, tuple(covers), kept, why)


def rois_iou(a: list[tuple[int, int, int, int]], b: list[tuple[int, int, int, int]]) -> float:
    """IoU of the areas two sets of boxes cover (each set's union), exact for boxes."""
    xs = sorted({v for box in (*a, *b) for v in (box[0], box[2])})
    ys = sorted({v for box in (*a, *b) for v in (box[1], box[3])})
    inter = union = 0.0
    for i in range(len(xs) - 1):
        cx = (xs[i] + xs[i + 1]) / 2
        for j in range(len(ys) - 1):
            cy = (ys[j] + ys[j + 1]) / 2
            area = (xs[i + 1] - xs[i]) * (ys[j + 1] - ys[j])
            in_a = any(x0 <= cx < x1 and y0 <= cy < y1 for x0, y0, x1, y1 in a)
            in_b = any(x0 <= cx < x1 and y0 <= cy < y1 for x0, y0, x1, y1 in b)
            inter += area * (in_a and in_b)
            union += area * (in_a or in_b)
    return inter / union if union else 1.0


def use_automatic_rois(source: PyramidSlide) -> None:
    """Give ``source`` the monolayer areas the ROI finder sees (``roi_finder.find_rois``);
    SlideError naming the slide when it finds none."""
    try:
        search = find_rois(source)
    except Exception:
        source.close()
        raise
    source.rois, source.roi_source, source.roi_search = search.rois, "automatic", search
    if not search.rois:
        source.close()
        dropped = "; ".join(f"{c.box}: {c.why}" for c in search.candidates) or "none"
        raise SlideError(
            f"slide {source.folder}: no ROI annotation and no monolayer area found automatically"
            f" (candidates: {dropped})"
        )
