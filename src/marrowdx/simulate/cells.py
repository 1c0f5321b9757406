"""Draw one cell's morphology from its class morphology and render it as an optical-density patch.

Rendering works on a small square patch around the cell with whole-array numpy operations
(signed distances, smooth noise, masks): no per-pixel Python loops. The attributes of a cell
are computed from what was actually drawn (diameter, chromatin clumping, nucleus shape,
nucleoli and vacuoles that made it into the patch, cytoplasm area), so they are learnable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from marrowdx import taxonomy
from marrowdx.simulate import morphology as morph

#: Width (pixels) of the soft edge of cell and nucleus outlines.
EDGE_PX = 1.4
#: Outline harmonics used for irregular cell borders.
_HARMONICS = np.arange(2, 7, dtype=np.float32)
#: Lobe radius (as a fraction of the nucleus extent radius) for n lobes of a segmented nucleus.
_LOBE_RADIUS = {2: 0.42, 3: 0.37, 4: 0.33, 5: 0.30}
#: Distance between neighbouring lobe centres, in lobe radii (> 2 leaves a visible strand).
_LOBE_SPACING = 2.5


@dataclass
class CellSpec:
    """Everything drawn for one cell (full-resolution pixels); the renderer adds no new randomness
    that changes attributes except where vacuoles fit, which it reports back."""

    label: str
    diameter: float
    aspect: float
    angle: float
    outline_amps: np.ndarray
    outline_phases: np.ndarray
    nucleus: str
    nucleus_radius: float
    nucleus_offset: tuple[float, float]
    nucleus_angle: float
    lobes: int
    clumping: float
    darkness: float
    nucleoli: int
    nucleolus_px: float
    basophilia: float
    cyto_density: float
    granule: str
    granule_density: float
    vacuoles: int
    vacuole_px: tuple[float, float]
    auer: bool
    hof: bool
    rim: float
    inclusions: int
    precipitate: bool
    seed: int  # seeds the texture noise of this cell

    @property
    def radius(self) -> float:
        return self.diameter / 2.0

    @property
    def extent(self) -> float:
        """Largest distance of the outline from the centre (for patch size and placement)."""
        return self.radius * math.sqrt(self.aspect) * (1.0 + float(np.sum(self.outline_amps)))


@dataclass
class CellRender:
    """A rendered cell: OD patch (weighted by coverage), coverage alpha and what was drawn."""

    od: np.ndarray  # (S, S, 3) float32
    alpha: np.ndarray  # (S, S) float32 in [0, 1]
    cyto_fraction: float
    vacuoles_drawn: int
    nucleoli_drawn: int
    extra: dict = field(default_factory=dict)


def _u(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def draw_cell(label: str, rng: np.random.Generator) -> CellSpec:
    """Draw one cell of class ``label`` from its morphology."""
    p = morph.MORPHOLOGY[label]
    diameter = _u(rng, p.diameter)
    outline = _u(rng, p.outline)
    w = rng.random(len(_HARMONICS)).astype(np.float32)
    amps = (outline * w / max(float(w.sum()), 1e-6)).astype(np.float32)
    nucleoli = 0
    if p.nucleoli[0] > 0 and rng.random() < p.nucleoli[0]:
        nucleoli = int(rng.integers(p.nucleoli[1], p.nucleoli[2] + 1))
    vacuoles = 0
    if p.vacuoles[0] > 0 and rng.random() < p.vacuoles[0]:
        vacuoles = int(rng.integers(p.vacuoles[1], p.vacuoles[2] + 1))
    inclusions = 0
    if p.inclusions[0] > 0 and rng.random() < p.inclusions[0]:
        inclusions = int(rng.integers(p.inclusions[1], p.inclusions[2] + 1))
    off_r = _u(rng, p.offset)
    off_a = float(rng.uniform(0, 2 * math.pi))
    return CellSpec(
        label=label,
        diameter=diameter,
        aspect=_u(rng, p.aspect),
        angle=float(rng.uniform(0, math.pi)),
        outline_amps=amps,
        outline_phases=rng.uniform(0, 2 * math.pi, len(_HARMONICS)).astype(np.float32),
        nucleus=p.nucleus,
        nucleus_radius=_u(rng, p.nc) * diameter / 2.0,
        nucleus_offset=(off_r * math.cos(off_a), off_r * math.sin(off_a)),
        nucleus_angle=float(rng.uniform(0, 2 * math.pi)),
        lobes=int(rng.integers(int(p.lobes[0]), int(p.lobes[1]) + 1)),
        clumping=_u(rng, p.clumping),
        darkness=_u(rng, p.darkness),
        nucleoli=nucleoli,
        nucleolus_px=_u(rng, p.nucleolus_px),
        basophilia=_u(rng, p.basophilia),
        cyto_density=_u(rng, p.cyto_density),
        granule=p.granule,
        granule_density=_u(rng, p.granule_density),
        vacuoles=vacuoles,
        vacuole_px=p.vacuole_px,
        auer=bool(p.auer > 0 and rng.random() < p.auer),
        hof=bool(p.hof > 0 and rng.random() < p.hof),
        rim=p.rim,
        inclusions=inclusions,
        precipitate=p.precipitate,
        seed=int(rng.integers(0, 2**31 - 1)),
    )


# --------------------------------------------------------------------------- geometry helpers
def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Standardised value noise with features about ``scale`` pixels across."""
    g = max(2, int(size / scale) + 2)
    grid = rng.random((g, g), dtype=np.float32)
    up = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR))
    return (up - up.mean()) / (up.std() + 1e-6)


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Soft coverage (0..1) from a signed distance in pixels (negative inside)."""
    return np.minimum(np.maximum(0.5 - sdf * (1.0 / EDGE_PX), 0.0), 1.0)


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return x * c + y * s, -x * s + y * c


def _disc_sdf(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return np.hypot(x - cx, y - cy) - r


def _ellipse_sdf(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (exact enough for soft edges)."""
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return (rho - 1.0) * min(a, b)


def _segment_dist(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distance to a segment and the projection parameter t in [0, 1]."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    L2 = max(dx * dx + dy * dy, 1e-6)
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / L2, 0.0, 1.0)
    return np.hypot(x - (p0[0] + t * dx), y - (p0[1] + t * dy)), t


def _nucleus_sdf(
    spec: CellSpec, u: np.ndarray, v: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Signed distance (pixels) to the nucleus, in nucleus-centred rotated coordinates."""
    rn = spec.nucleus_radius
    shape = spec.nucleus
    if shape == "round":
        return np.hypot(u, v) - rn
    if shape == "oval":
        return _ellipse_sdf(u, v, rn * 1.14, rn * 0.88)
    if shape == "indented":
        rc = 0.45 * rn
        return np.maximum(np.hypot(u, v) - rn, rc - np.hypot(u - (rn + 0.45 * rc), v))
    if shape == "kidney":
        a, b = rn * 1.15, rn * 0.87
        rc = 0.58 * rn
        return np.maximum(_ellipse_sdf(u, v, a, b), rc - np.hypot(u, v - (b + 0.3 * rc)))
    if shape == "cleaved":
        d, t = _segment_dist(u, v, (rn * 1.2, 0.0), (rn * 0.05, 0.0))
        width = 0.8 + 2.6 * t  # the cleft narrows towards the centre
        return np.maximum(np.hypot(u, v) - rn, width - d)
    if shape == "folded":
        sdf = None
        for k in range(3):
            a = 2 * math.pi * k / 3 + float(rng.uniform(-0.3, 0.3))
            s = _disc_sdf(u, v, 0.4 * rn * math.cos(a), 0.4 * rn * math.sin(a), 0.6 * rn)
            sdf = s if sdf is None else np.minimum(sdf, s)
        return sdf
    if shape == "band":
        rc, half = 0.6 * rn, 0.32 * rn
        gap = float(rng.uniform(1.2, 1.7))  # opening angle of the horseshoe (radians)
        phi = np.abs(np.arctan2(v, u))
        d_ring = np.abs(np.hypot(u, v) - rc)
        e = (rc * math.cos(gap / 2), rc * math.sin(gap / 2))
        d_end = np.minimum(np.hypot(u - e[0], v - e[1]), np.hypot(u - e[0], v + e[1]))
        return np.where(phi > gap / 2, d_ring, d_end) - half
    if shape == "lobed":
        n = spec.lobes
        rl = _LOBE_RADIUS.get(n, 0.3) * rn
        rch = rn - rl
        step = 2 * math.asin(min(0.99, _LOBE_SPACING * rl / (2 * rch)))
        angles = math.pi + (np.arange(n) - (n - 1) / 2) * step
        centres = [
            (rch * math.cos(a) * float(rng.uniform(0.9, 1.05)), rch * math.sin(a)) for a in angles
        ]
        sdf = None
        for cx, cy in centres:
            s = _disc_sdf(u, v, cx, cy, rl * float(rng.uniform(0.92, 1.08)))
            sdf = s if sdf is None else np.minimum(sdf, s)
        strand = max(1.3, 0.14 * rl)
        for c0, c1 in zip(centres[:-1], centres[1:], strict=True):
            sdf = np.minimum(sdf, _segment_dist(u, v, c0, c1)[0] - strand)
        return sdf
    if shape == "multilobed":
        sdf = None
        for _ in range(spec.lobes):
            rl = rn * float(rng.uniform(0.32, 0.48))
            rr = (rn - rl) * math.sqrt(float(rng.random()))
            a = float(rng.uniform(0, 2 * math.pi))
            s = _disc_sdf(u, v, rr * math.cos(a), rr * math.sin(a), rl)
            sdf = s if sdf is None else np.minimum(sdf, s)
        return sdf
    if shape == "mitotic":
        ragged = _smooth_noise(rng, u.shape[0], 2.5)
        return _ellipse_sdf(u, v, rn, 0.34 * rn) + 2.2 * ragged
    raise ValueError(f"unknown nucleus shape {shape!r}")


def _cell_outline(spec: CellSpec, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance to the (irregular, elliptical) cell outline and the normalised radius."""
    r = spec.radius
    a, b = r * math.sqrt(spec.aspect), r / math.sqrt(spec.aspect)
    u, v = _rotate(x, y, spec.angle)
    un, vn = u / a, v / b
    rho = np.sqrt(un * un + vn * vn)
    theta = np.arctan2(vn, un)
    boundary = np.ones_like(theta)
    for k, amp, phase in zip(_HARMONICS, spec.outline_amps, spec.outline_phases, strict=True):
        if amp > 1e-4:  # a plain loop over 5 harmonics: no BLAS threads, no (5, S, S) temporary
            boundary += amp * np.cos(k * theta + phase)
    return (rho - boundary) * r, rho / boundary


def _pick_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    idx = np.flatnonzero(mask)
    if k <= 0 or idx.size == 0:
        return []
    chosen = rng.choice(idx, size=min(k, idx.size), replace=False)
    return [(int(i % mask.shape[1]), int(i // mask.shape[1])) for i in chosen]


def render_cell(spec: CellSpec) -> CellRender:
    """Render a cell on a square patch centred on it (patch centre = cell centre)."""
    rng = np.random.default_rng(spec.seed)
    size = int(2 * math.ceil(spec.extent) + 6)
    c = size / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    x, y = xx + 0.5 - c, yy + 0.5 - c
    cell_sdf, rho = _cell_outline(spec, x, y)
    cell_a = _coverage(cell_sdf)
    inside = cell_a > 0.5

    # --- nucleus
    ncx = ncy = 0.0
    if spec.nucleus == "smudge":
        nuc_a = cell_a.copy()
        nuc_sdf = cell_sdf
    elif spec.nucleus == "none":
        nuc_a = np.zeros_like(cell_a)
        nuc_sdf = np.full_like(cell_a, 1e3)
    else:
        r_min = spec.radius / math.sqrt(spec.aspect) * (1 - float(np.sum(spec.outline_amps)))
        free = max(0.0, r_min - spec.nucleus_radius * 1.05)
        ncx, ncy = spec.nucleus_offset[0] * free, spec.nucleus_offset[1] * free
        u, v = _rotate(x - ncx, y - ncy, spec.nucleus_angle)
        nuc_sdf = _nucleus_sdf(spec, u, v, rng)
        nuc_a = np.minimum(_coverage(nuc_sdf), cell_a)
    nucleus_px = nuc_a > 0.5
    cyto_only = inside & ~nucleus_px

    # --- cytoplasm (or precipitate body)
    tex = _smooth_noise(rng, size, 6.0)
    if spec.precipitate:
        grains = _smooth_noise(rng, size, 2.0)
        body = np.clip(0.75 + 0.35 * tex + 0.45 * grains, 0.15, 2.0) * spec.cyto_density
        cyto_od = body[..., None] * morph.PRECIPITATE_OD
    else:
        base = (1 - spec.basophilia) * morph.CYTO_PINK_OD + spec.basophilia * morph.CYTO_BLUE_OD
        cyto_od = (spec.cyto_density * (1.0 + 0.07 * tex))[..., None] * base
        if spec.rim > 0:
            w = (np.clip(rho, 0.0, 1.0) ** 6 * spec.rim)[..., None]
            cyto_od = cyto_od * (1 - w) + w * (morph.CYTO_BLUE_OD * 1.15)
    if spec.hof and spec.nucleus not in ("none", "smudge"):
        d = math.hypot(*spec.nucleus_offset)
        if d > 1e-3:
            dx, dy = -spec.nucleus_offset[0] / d, -spec.nucleus_offset[1] / d
        else:
            a = float(rng.uniform(0, 2 * math.pi))
            dx, dy = math.cos(a), math.sin(a)
        hx = ncx + dx * spec.nucleus_radius * 0.95
        hy = ncy + dy * spec.nucleus_radius * 0.95
        hof = _coverage(_disc_sdf(x, y, hx, hy, spec.nucleus_radius * 0.42))
        cyto_od = cyto_od * (1 - 0.6 * hof)[..., None]

    # --- vacuoles: only where they fit wholly inside the cytoplasm
    vac_drawn = 0
    if spec.vacuoles:
        radii = rng.uniform(spec.vacuole_px[0], spec.vacuole_px[1], spec.vacuoles)
        room = (cell_sdf < -radii.max() - 1) & (nuc_sdf > radii.max() + 1)
        vac = np.zeros_like(cell_a)
        for (px, py), rv in zip(_pick_points(room, spec.vacuoles, rng), radii, strict=False):
            vac = np.maximum(vac, _coverage(_disc_sdf(x, y, px + 0.5 - c, py + 0.5 - c, rv)))
            vac_drawn += 1
        cyto_od = cyto_od * (1 - 0.88 * vac)[..., None]
    if spec.inclusions:
        room = (cell_sdf < -7) & (nuc_sdf > 7)
        inc = np.zeros_like(cell_a)
        for px, py in _pick_points(room, spec.inclusions, rng):
            r_inc = float(rng.uniform(3.0, 6.0))
            inc = np.maximum(inc, _coverage(_disc_sdf(x, y, px + 0.5 - c, py + 0.5 - c, r_inc)))
        cyto_od = cyto_od * (1 - inc)[..., None] + inc[..., None] * morph.DEBRIS_OD
    if spec.auer:
        room = (cell_sdf < -8) & (nuc_sdf > 3)
        for px, py in _pick_points(room, 1, rng):
            a = float(rng.uniform(0, math.pi))
            half = float(rng.uniform(5.0, 8.0))
            p0 = (px + 0.5 - c - half * math.cos(a), py + 0.5 - c - half * math.sin(a))
            p1 = (px + 0.5 - c + half * math.cos(a), py + 0.5 - c + half * math.sin(a))
            rod = _coverage(_segment_dist(x, y, p0, p1)[0] - 1.1) * cell_a
            cyto_od = cyto_od * (1 - rod)[..., None] + rod[..., None] * morph.AUER_OD

    # --- chromatin and nucleoli
    nuc_od = None
    nucleoli_drawn = 0
    if spec.nucleus != "none":
        clump = _smooth_noise(rng, size, 3.2)
        fine = rng.standard_normal((size, size), dtype=np.float32)
        factor = 1.0 + 0.42 * spec.clumping * clump + 0.07 * fine
        if spec.nucleus == "smudge":
            streak = np.asarray(
                Image.fromarray(rng.random((max(2, size // 10), 3), dtype=np.float32), mode="F")
                .resize((size, size), Image.BILINEAR)
                .rotate(float(rng.uniform(0, 180)), Image.BILINEAR)
            )
            factor = factor * (0.7 + 0.6 * streak)
        nuc_od = (spec.darkness * np.clip(factor, 0.2, 2.0))[..., None] * morph.CHROMATIN_OD
        if spec.nucleoli:
            room = nuc_sdf < -(spec.nucleolus_px + 2.5)
            nl = np.zeros_like(cell_a)
            for px, py in _pick_points(room, spec.nucleoli, rng):
                nl = np.maximum(
                    nl, _coverage(_disc_sdf(x, y, px + 0.5 - c, py + 0.5 - c, spec.nucleolus_px))
                )
                nucleoli_drawn += 1
            nuc_od = (
                nuc_od * (1 - 0.75 * nl)[..., None] + (0.6 * nl)[..., None] * morph.NUCLEOLUS_OD
            )

    # --- granules
    od = cyto_od * (cell_a - nuc_a)[..., None]
    if nuc_od is not None:
        od = od + nuc_od * nuc_a[..., None]
    if spec.granule != "none" and spec.granule_density > 0:
        g = morph.GRANULES[spec.granule]
        n = -(-size // g.grain_px)
        coarse = rng.random((n, n), dtype=np.float32) < spec.granule_density
        gm = np.repeat(np.repeat(coarse, g.grain_px, 0), g.grain_px, 1)[:size, :size]
        region = cell_a if g.over_nucleus else (cell_a - nuc_a)
        if spec.label == "thrombocyte":
            region = region * (rho < 0.65)
        m = (gm * region).astype(np.float32)[..., None]
        od = od * (1 - m) + m * g.colour_od

    inside_count = max(int(inside.sum()), 1)
    return CellRender(
        od=od.astype(np.float32),
        alpha=cell_a.astype(np.float32),
        cyto_fraction=float(cyto_only.sum()) / inside_count,
        vacuoles_drawn=vac_drawn,
        nucleoli_drawn=nucleoli_drawn,
    )


def cell_attributes(spec: CellSpec, render: CellRender) -> dict[str, str]:
    """The seven attributes, as rules over what was drawn (see the thresholds in morphology.py)."""
    present = {
        "cell_size": spec.diameter >= morph.BIG_CELL_PX,
        "nuclear_chromatin": spec.nucleus != "none" and spec.clumping >= morph.COARSE_CHROMATIN,
        "nuclear_shape": spec.nucleus not in morph.REGULAR_SHAPES,
        "nucleolus": render.nucleoli_drawn > 0,
        "cytoplasm": render.cyto_fraction >= morph.ABUNDANT_CYTOPLASM,
        "cytoplasmic_basophilia": spec.basophilia >= morph.MODERATE_BASOPHILIA,
        "cytoplasmic_vacuoles": render.vacuoles_drawn > 0,
    }
    assert tuple(present) == taxonomy.ATTRIBUTE_NAMES
    return {k: taxonomy.attribute_value(k, v) for k, v in present.items()}
