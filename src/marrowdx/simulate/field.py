"""Render one field of view: red-cell background, placed white cells, stain, optics and sensor.

Composition happens in optical density (absorbances add, stain strength scales them), then
light is applied once per image: I = illumination * exp(-OD * stain_gain) * vignette, followed
by optical blur, sensor noise and JPEG/PNG encoding. Boxes come from a label map painted with
the cells, so a partly covered cell's box is tight around what is still visible.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from marrowdx import config
from marrowdx.simulate import cells as cl
from marrowdx.simulate import morphology as morph

#: Largest fraction of an already placed cell that later cells may cover.
MAX_OCCLUDED = 0.15
#: Largest fraction of a new cell that may lie over already placed cells.
MAX_OVERLAP_NEW = 0.25
#: Placement attempts per cell before it is dropped from the field.
PLACEMENT_TRIES = 60
#: Probability that a cell is first tried right next to an already placed one (touching pairs
#: and small clusters, as in a real aspirate), and the centre distance used, in sums of radii.
TOUCH_PROBABILITY = 0.4
TOUCH_DISTANCE = (0.86, 1.02)
#: Red-cell diameter range (pixels at full resolution).
RBC_DIAMETER = config.RED_CELL_DIAMETER_PX
#: Distinct red-cell sprites rendered per image (each pasted many times).
RBC_SPRITES = 6
#: Default cells per 1024x1024 field; scaled with the field area for other sizes.
DEFAULT_CELLS = (15, 40)
REFERENCE_AREA = 1024 * 1024


@dataclass(frozen=True)
class SlideStyle:
    """Per-slide staining, illumination and optics (one patient = one slide)."""

    stain_gain: tuple[float, float, float]  # OD multiplier per RGB channel (stain strength/hue)
    illumination: tuple[float, float, float]  # white level per channel (0-255)
    rbc_coverage: tuple[float, float]  # fraction of the field covered by red cells, per image
    blur_sigma: tuple[float, float]  # optical blur radius range per image (pixels)
    noise_sigma: float  # sensor noise (0-255 grey levels)
    vignette: float  # relative brightness loss in the corners

    @staticmethod
    def draw(rng: np.random.Generator) -> SlideStyle:
        gain = rng.uniform(0.88, 1.12, 3) * rng.uniform(0.92, 1.08)
        illum = 255.0 * rng.uniform(0.94, 1.0) * rng.uniform(0.97, 1.0, 3)
        cov = float(rng.uniform(0.15, 0.65))
        blur = float(rng.uniform(0.4, 0.8))
        return SlideStyle(
            stain_gain=tuple(float(g) for g in gain),
            illumination=tuple(float(v) for v in illum),
            rbc_coverage=(cov * 0.8, min(cov * 1.25, 0.85)),
            blur_sigma=(blur, blur + 0.4),
            noise_sigma=float(rng.uniform(1.0, 3.5)),
            vignette=float(rng.uniform(0.0, 0.12)),
        )

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


NEUTRAL_STYLE = SlideStyle((1.0, 1.0, 1.0), (252.0, 252.0, 252.0), (0.3, 0.3), (0.5, 0.5), 1.0, 0.0)


@dataclass
class PlacedCell:
    label: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1/y1 exclusive), around the visible cell
    attributes: dict[str, str]
    visible_fraction: float


@dataclass
class FieldRender:
    image: np.ndarray  # (H, W, 3) uint8
    cells: list[PlacedCell]
    label_map: np.ndarray = field(repr=False)  # (H, W) int32, 0 = background, i+1 = cells[i]


def _lens_area(d: np.ndarray, r1: float, r2: np.ndarray) -> np.ndarray:
    """Intersection area of a disc of radius r1 with discs r2 at centre distances d (broadcast)."""
    d = np.maximum(d, 1e-6)
    r2 = np.broadcast_to(r2, d.shape)
    rmin = np.minimum(r1, r2)
    c1 = np.clip((d * d + r1 * r1 - r2 * r2) / (2 * d * r1), -1, 1)
    c2 = np.clip((d * d + r2 * r2 - r1 * r1) / (2 * d * r2), -1, 1)
    k = (-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2)
    part = r1 * r1 * np.arccos(c1) + r2 * r2 * np.arccos(c2) - 0.5 * np.sqrt(np.maximum(k, 0))
    out = np.where(d <= np.abs(r1 - r2), math.pi * rmin * rmin, part)
    return np.where(d >= r1 + r2, 0.0, out)


def _rbc_sprite(rng: np.random.Generator) -> np.ndarray:
    """One red cell (OD patch): a biconcave disc, darker rim, pale centre."""
    d = float(rng.uniform(*RBC_DIAMETER))
    aspect = float(rng.uniform(1.0, 1.15))
    size = int(math.ceil(d * aspect)) + 4
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5 - size / 2
    u, v = cl._rotate(xx, yy, float(rng.uniform(0, math.pi)))
    rho = np.sqrt((u / (d / 2 * math.sqrt(aspect))) ** 2 + (v / (d / 2 / math.sqrt(aspect))) ** 2)
    cov = np.clip(0.5 - (rho - 1) * d / 2 / cl.EDGE_PX, 0, 1)
    profile = 1.0 - 0.55 * np.exp(-((rho / 0.5) ** 2))
    strength = float(rng.uniform(0.8, 1.1))
    return (cov * profile * strength)[..., None] * morph.RBC_OD


def _paint_background(h: int, w: int, coverage: float, rng: np.random.Generator) -> np.ndarray:
    od = np.empty((h, w, 3), np.float32)
    od[:] = morph.PLASMA_OD
    sprites = [_rbc_sprite(rng) for _ in range(RBC_SPRITES)]
    mean_area = math.pi * (sum(RBC_DIAMETER) / 4) ** 2
    n = int(coverage * h * w / mean_area)
    which = rng.integers(0, RBC_SPRITES, n)
    xs = rng.integers(-20, w, n)
    ys = rng.integers(-20, h, n)
    for k, x0, y0 in zip(which.tolist(), xs.tolist(), ys.tolist(), strict=True):
        s = sprites[k]
        sh, sw = s.shape[:2]
        ax0, ay0 = max(x0, 0), max(y0, 0)
        ax1, ay1 = min(x0 + sw, w), min(y0 + sh, h)
        if ax1 <= ax0 or ay1 <= ay0:
            continue
        # maximum, not sum: red cells in a monolayer lie side by side, overlaps stay light
        np.maximum(
            od[ay0:ay1, ax0:ax1],
            s[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0],
            out=od[ay0:ay1, ax0:ax1],
        )
    return od


@functools.lru_cache(maxsize=8)
def _exposure_offset(style: SlideStyle, h: int, w: int) -> np.ndarray:
    """ln(illumination * vignette) per pixel and channel, so exposure is exp(offset - OD*gain)."""
    y = (np.arange(h, dtype=np.float32) + 0.5) / h - 0.5
    x = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
    shape = (y[:, None] ** 2 + x[None, :] ** 2) * 2.0
    vig = np.log(1.0 - style.vignette * shape)[..., None]
    return (vig + np.log(np.asarray(style.illumination, np.float32))).astype(np.float32)


def cells_for_area(w: int, h: int, cells: tuple[int, int] = DEFAULT_CELLS) -> tuple[int, int]:
    """Cells per image for a field of w x h: the 1024x1024 range scaled by area (at least 1)."""
    f = w * h / REFERENCE_AREA
    return max(1, round(cells[0] * f)), max(1, round(cells[1] * f))


def render_field(
    labels: list[str],
    size: tuple[int, int],
    style: SlideStyle,
    rng: np.random.Generator,
) -> FieldRender:
    """Render a field holding (as many as fit of) the given cell classes.

    ``size`` is (width, height). Cells are placed whole inside the field, larger ones first,
    with limited overlap so every cell stays at least ~75% visible.
    """
    w, h = size
    specs = [cl.draw_cell(lb, rng) for lb in labels]
    specs.sort(key=lambda s: -s.extent)
    od = _paint_background(h, w, float(rng.uniform(*style.rbc_coverage)), rng)
    label_map = np.zeros((h, w), np.int32)

    cx_l: list[float] = []
    cy_l: list[float] = []
    r_l: list[float] = []
    occ_l: list[float] = []
    placed: list[tuple[cl.CellSpec, cl.CellRender, int, int]] = []
    for spec in specs:
        ext = spec.extent + 2
        if 2 * ext >= min(w, h):
            continue
        r = spec.radius
        area = math.pi * r * r
        cand_x = rng.uniform(ext, w - ext, PLACEMENT_TRIES)
        cand_y = rng.uniform(ext, h - ext, PLACEMENT_TRIES)
        if r_l and rng.random() < TOUCH_PROBABILITY:
            half = PLACEMENT_TRIES // 2  # the first half of the tries hug a placed cell
            nb = rng.integers(0, len(r_l), half)
            dist = (np.array(r_l)[nb] + r) * rng.uniform(*TOUCH_DISTANCE, half)
            ang = rng.uniform(0, 2 * math.pi, half)
            tx = np.array(cx_l)[nb] + dist * np.cos(ang)
            ty = np.array(cy_l)[nb] + dist * np.sin(ang)
            inside = (tx >= ext) & (tx <= w - ext) & (ty >= ext) & (ty <= h - ext)
            cand_x[:half] = np.where(inside, tx, cand_x[:half])
            cand_y[:half] = np.where(inside, ty, cand_y[:half])
        chosen = None
        if not r_l:
            chosen, lens = 0, np.zeros((PLACEMENT_TRIES, 0))
        else:
            ex, ey, er = np.array(cx_l), np.array(cy_l), np.array(r_l)
            d = np.hypot(ex[None] - cand_x[:, None], ey[None] - cand_y[:, None])
            lens = _lens_area(d, r, er)  # (tries, placed)
            cap = MAX_OCCLUDED * np.pi * er**2 - np.array(occ_l)
            ok = (lens.sum(axis=1) <= MAX_OVERLAP_NEW * area) & np.all(lens <= cap, axis=1)
            hits = np.flatnonzero(ok)
            chosen = int(hits[0]) if hits.size else None
        if chosen is None:
            continue
        x, y = float(cand_x[chosen]), float(cand_y[chosen])
        if r_l:
            occ_l = (np.array(occ_l) + lens[chosen]).tolist()
        cx_l.append(x)
        cy_l.append(y)
        r_l.append(r)
        occ_l.append(0.0)
        rend = cl.render_cell(spec)
        s = rend.alpha.shape[0]
        x0, y0 = int(round(x - s / 2)), int(round(y - s / 2))
        # patch may poke out of the field by its margin: clip
        ax0, ay0 = max(x0, 0), max(y0, 0)
        ax1, ay1 = min(x0 + s, w), min(y0 + s, h)
        sub = (slice(ay0 - y0, ay1 - y0), slice(ax0 - x0, ax1 - x0))
        a = rend.alpha[sub]
        od[ay0:ay1, ax0:ax1] = od[ay0:ay1, ax0:ax1] * (1 - a)[..., None] + rend.od[sub]
        label_map[ay0:ay1, ax0:ax1][a > 0.5] = len(placed) + 1
        placed.append((spec, rend, x0, y0))

    cells: list[PlacedCell] = []
    for i, (spec, rend, x0, y0) in enumerate(placed):
        s = rend.alpha.shape[0]
        ax0, ay0 = max(x0, 0), max(y0, 0)
        win = label_map[ay0 : min(y0 + s, h), ax0 : min(x0 + s, w)] == i + 1
        ys = np.flatnonzero(win.any(axis=1))
        xs = np.flatnonzero(win.any(axis=0))
        own = max(int((rend.alpha > 0.5).sum()), 1)
        box = (ax0 + int(xs[0]), ay0 + int(ys[0]), ax0 + int(xs[-1]) + 1, ay0 + int(ys[-1]) + 1)
        cells.append(
            PlacedCell(spec.label, box, cl.cell_attributes(spec, rend), float(win.sum()) / own)
        )

    image = _expose(od, style, rng)
    return FieldRender(image=image, cells=cells, label_map=label_map)


#: Sensor noise is clamped to +-NOISE_CLAMP grey levels and the exposed image to
#: [NOISE_CLAMP, 255 - NOISE_CLAMP], so noise can be added in uint8 without overflow.
NOISE_CLAMP = 7


@functools.lru_cache(maxsize=64)
def _noise_lut(sigma: float) -> np.ndarray:
    """Maps a uniform byte to a clamped Gaussian deviate (inverse CDF), as uint8 two's complement:
    sensor noise then costs one lookup and one wrapping uint8 add."""
    from statistics import NormalDist

    nd = NormalDist(0.0, sigma)
    q = [nd.inv_cdf((i + 0.5) / 256) for i in range(256)]
    return np.clip(np.round(q), -NOISE_CLAMP, NOISE_CLAMP).astype(np.int8).view(np.uint8)


def _expose(od: np.ndarray, style: SlideStyle, rng: np.random.Generator) -> np.ndarray:
    """Light through the stained slide, then optics (blur) and sensor (noise)."""
    h, w = od.shape[:2]
    od *= -np.asarray(style.stain_gain, np.float32)
    od += _exposure_offset(style, h, w)
    np.exp(od, out=od)  # OD >= 0 and illumination <= 255, so no value exceeds 255
    arr = od.astype(np.uint8)
    np.clip(arr, NOISE_CLAMP, 255 - NOISE_CLAMP, out=arr)  # clamping bytes is cheap
    img = Image.fromarray(arr, "RGB")
    # one box pass of sub-pixel radius: a cheap stand-in for slight defocus
    img = img.filter(ImageFilter.BoxBlur(float(rng.uniform(*style.blur_sigma))))
    # shot/read noise shared by the three channels (luminance noise): a third of the draws
    noise = np.take(_noise_lut(style.noise_sigma), np.frombuffer(rng.bytes(h * w), np.uint8))
    arr = np.array(img, dtype=np.uint8)
    arr += noise.reshape(h, w, 1)  # wraps exactly like signed addition: values stay in 0..255
    return arr
