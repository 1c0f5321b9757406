"""Burned-in annotations: the scale bars, labels and arrows a microscope camera's program
draws into an image, painted over with the colours around them before the models see it.

Why: drawn in black, or in yellow or green, they reached the models as stained objects. On
288 real blood fields with a black scale bar, its length and a yellow label added, 32 fields'
counts changed: the detector took the bar and the letters for white cells, and the bar's
black moved the red-cell spacing estimate of a few (docs/magnification.md, "Burned-in scale
bars and labels"). The client paints them before it resamples an image and before it
estimates the spacing from the red cells, so both read the smear alone; the quality gate
reads what the models read.

What is painted: pixels of a colour no stained smear shows, in strokes thin next to the
image (a bar, a letter, a line):

- dark grey or black (brightest channel at most ``dark_max``, channels within
  ``grey_spread`` of each other): a nucleus, however dark the field, is blue or purple;
- yellow or green (green at least red less ``yellow_red_margin`` and above blue by
  ``yellow_blue_gap``): no Romanowsky dye nor haemoglobin is;

thin: gone after a morphological opening with a square of ``thin_share`` of the image's
shorter side; and long: a group of strokes (letters ``gap`` apart are one word) at least
``min_length`` across, so that a speck of dust or a dark granule is no annotation. A black
corner of a round field of view, a black margin, a dark-field image's sky or a logo's fill
is wide and stays, and so does the thin fringe where such a region nears the image's edge
(the quality gate judges those). An image whose strokes cover more than ``max_share`` of
it is left as it is: that is no annotation on a smear but a drawing or a dense dark
picture, and painting it would hide what the gate must see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BurnedInSpec:
    """When a pixel is an annotation's (module docstring); grey levels 0-255."""

    dark_max: int = 30  # black print after JPEG stays under it; a dark granule is 45 and up
    grey_spread: int = 16  # a nucleus's channels differ by 30 and more even at 0.4 light
    yellow_red_margin: int = 20
    yellow_blue_gap: int = 110  # some labs' yellowish glass and red cells reach 100
    thin_share: float = 0.03  # of the shorter side: a 480-pixel image's strokes up to 13 px
    halo: float = 0.004  # of the shorter side, at least 1 px: the JPEG ringing around a stroke
    gap: float = 0.012  # of the shorter side, at least 2 px: letters this close are one word
    min_length: float = 0.04  # of the shorter side, at least 8 px: a bar or a word, no speck
    max_share: float = 0.05  # of the image: annotations are a small part of it
    enabled: bool = True


DEFAULT_BURNED_IN = BurnedInSpec()
#: The strokes are found on a grid whose shorter side is at most this, each cell holding
#: ink if any of its pixels does (a stroke of any width stays): a 12-megapixel camera
#: image's cost is then one pass of comparisons over its pixels.
WORK_SHORTER = 768

Region = tuple[slice, slice]


def annotation_mask(rgb: np.ndarray, spec: BurnedInSpec = DEFAULT_BURNED_IN) -> np.ndarray:
    """Bool [H, W]: the pixels of ``rgb`` (H x W x 3 uint8) that :func:`paint_over` paints:
    strokes of an annotation's colour, thin, and long enough to be a bar or a word (letters
    a ``gap`` apart are one), with a ``halo`` around them."""
    return _assembled(rgb.shape[:2], _annotations(rgb, spec))


def paint_over(rgb: np.ndarray, spec: BurnedInSpec = DEFAULT_BURNED_IN) -> np.ndarray:
    """``rgb`` (H x W x 3 uint8) with its burned-in annotations painted over; the same array
    when it has none (the usual case: one pass of comparisons), or when they would cover
    more than ``spec.max_share`` of it.

    Each painted pixel takes the mean colour of the unpainted pixels within a stroke's width
    around it: a letter drawn across a cell is filled with that cell's colour, not cut
    through it with glass."""
    if not spec.enabled or rgb.size == 0:
        return rgb
    found = _annotations(rgb, spec)
    if not found or _assembled(rgb.shape[:2], found).mean() > spec.max_share:
        return rgb
    out = rgb.copy()
    window = 2 * _thin_side(min(rgb.shape[:2]), spec) + 1
    for region, local in found:
        out[region] = _filled(out[region], local, window)
    return out


def _assembled(shape: tuple[int, ...], found: list[tuple[Region, np.ndarray]]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for region, local in found:
        mask[region] |= local
    return mask


def _ink(rgb: np.ndarray, spec: BurnedInSpec) -> np.ndarray:
    """Bool [H, W]: pixels of an annotation's colour (module docstring)."""
    r, g, b = (rgb[..., i] for i in range(3))
    brightest = np.maximum(np.maximum(r, g), b)
    ink = (brightest <= spec.dark_max) & (
        brightest - np.minimum(np.minimum(r, g), b) <= spec.grey_spread
    )
    g16 = g.astype(np.int16)
    return ink | ((g16 >= r - spec.yellow_red_margin) & (g16 - b >= spec.yellow_blue_gap))


def _thin_side(shorter: int, spec: BurnedInSpec) -> int:
    return max(3, round(spec.thin_share * shorter))


def _annotations(rgb: np.ndarray, spec: BurnedInSpec) -> list[tuple[Region, np.ndarray]]:
    """The annotations of ``rgb``: per group of strokes (a bar, a word), a window around it
    (room for :func:`_filled` to take colours from) and the pixels to paint in it."""
    from scipy import ndimage as ndi

    ink = _ink(rgb, spec)
    if not ink.any():
        return []
    height, width = ink.shape
    step = max(1, math.ceil(min(height, width) / WORK_SHORTER))
    grid = _any_pooled(ink, step)
    shorter = min(grid.shape)
    side = _thin_side(shorter, spec)
    # opening by separable minimum and maximum filters: what survives is wider than ``side``
    wide = ndi.maximum_filter(ndi.minimum_filter(grid.view(np.uint8), side), side).view(bool)
    thin = grid & ~wide
    if not thin.any():
        return []
    gap = max(2, round(spec.gap * shorter))
    labels, _ = ndi.label(ndi.maximum_filter(thin.view(np.uint8), 2 * gap + 1))
    # the fringe of a wide region (where a round field of view's black nears the image's
    # edge) is thin too, but no annotation: painted, it would draw a ring into the black
    fringe = set(np.unique(labels[ndi.maximum_filter(wide.view(np.uint8), 2 * gap + 1) > 0]))
    length = max(8, round(spec.min_length * shorter))
    halo = max(1, round(spec.halo * min(height, width)))
    margin = _thin_side(min(height, width), spec) + halo
    found = []
    for i, (rows, cols) in enumerate(ndi.find_objects(labels), start=1):
        if max(rows.stop - rows.start, cols.stop - cols.start) < length or i in fringe:
            continue
        region = (
            slice(max(0, rows.start * step - margin), min(height, rows.stop * step + margin)),
            slice(max(0, cols.start * step - margin), min(width, cols.stop * step + margin)),
        )
        near = _upsampled(thin & (labels == i), step, (height, width))[region]
        strokes = ink[region] & near
        found.append((region, ndi.maximum_filter(strokes.view(np.uint8), 2 * halo + 1) > 0))
    return found


def _any_pooled(mask: np.ndarray, step: int) -> np.ndarray:
    """``mask`` on a grid ``step`` times coarser: a cell is set if any of its pixels is."""
    if step == 1:
        return mask
    height, width = mask.shape
    padded = np.zeros((-(-height // step) * step, -(-width // step) * step), bool)
    padded[:height, :width] = mask
    return padded.reshape(padded.shape[0] // step, step, -1, step).any(axis=(1, 3))


def _upsampled(grid: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    if step == 1:
        return grid
    return np.repeat(np.repeat(grid, step, 0), step, 1)[: shape[0], : shape[1]]


def _filled(rgb: np.ndarray, mask: np.ndarray, window: int) -> np.ndarray:
    """``rgb`` with the ``mask`` pixels set to the mean colour of the unmasked pixels within
    ``window`` (the median of the brightest tenth of the unmasked ones, the glass, where none
    is)."""
    from scipy import ndimage as ndi

    keep = (~mask).astype(np.float32)
    total = ndi.uniform_filter(rgb * keep[..., None], size=(window, window, 1))
    weight = ndi.uniform_filter(keep, size=window)[..., None]
    fill = np.divide(total, weight, out=np.zeros_like(total), where=weight > 1e-3)
    if (weight[mask] <= 1e-3).any():
        pixels = rgb[~mask]
        grey = pixels.astype(np.int32).sum(axis=1)
        glass = np.median(pixels[grey >= np.quantile(grey, 0.9)], axis=0)
        fill = np.where(weight > 1e-3, fill, glass)
    out = rgb.copy()
    out[mask] = np.clip(np.rint(fill[mask]), 0, 255).astype(np.uint8)
    return out
