"""Where the fields of a ROI go: a grid of overlapping squares in base-level pixels.

Pure geometry (no pixels), so the layout can be tested exactly: every point of the ROI lies
in some field, and neighbouring fields overlap by at least the requested margin, so a cell no
wider than the overlap lies whole inside at least one field.
"""

from __future__ import annotations

import math

from marrowdx.slides.base import Box

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
