"""Scanner-format copies of simulated slides, and a whole slide at real size, as tiled TIFF.

``copy_as_scanner_file`` writes a simulated DICOM slide's pyramid as an Aperio-style SVS
(``ImageDescription`` "Aperio Image Library ... |MPP = ...", the layout OpenSlide's aperio
reader accepts) or as a generic pyramidal tiled TIFF (spacing in the resolution tags): the
DICOM frames' JPEG bytes are copied into the TIFF tiles unchanged, so both copies decode to
the DICOM slide's pixels and must give its counts.

``write_big_slide`` writes a slide of real size (100,000 x 50,000 pixels by default) tile by
tile: mostly empty glass, a thick band and a few monolayer areas rendered by the field
renderer. No level is ever held whole: glass tiles are a handful of pre-encoded variants,
the thick band a few rendered stripes repeated, each monolayer area is rendered once and
cut into tiles, and every coarser level is made from the same pieces shrunk.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from marrowdx import config

#: File layouts ``copy_as_scanner_file`` writes.
LAYOUTS = ("svs", "tiff")
#: JPEG quality of the tiles write_big_slide encodes (as the DICOM writer's).
TILE_QUALITY = 90


def aperio_description(width: int, height: int, tile: int, um_per_pixel: float) -> str:
    """An Aperio-style ImageDescription: OpenSlide's aperio reader keys on the "Aperio"
    prefix and reads ``MPP`` (µm per pixel) and ``AppMag`` from the ``|``-separated pairs."""
    mag = round(10.0 / um_per_pixel)  # 0.25 µm/pixel is a 40x scan
    return (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile}x{tile}) JPEG/RGB Q={TILE_QUALITY}|AppMag = {mag}|MPP = {um_per_pixel:.4f}"
        f"|Filename = marrowdx-simulated"
    )


def _dicom_levels(folder: Path) -> list[tuple[int, int, int, int, list[bytes]]]:
    """(width, height, tile width, tile height, JPEG frames row-major) per level, base first."""
    import pydicom
    from pydicom.encaps import generate_frames

    from marrowdx.slides.detect import WSI_SOP_CLASS, dicom_files

    levels = []
    for path, sop in dicom_files(folder).items():
        if sop != WSI_SOP_CLASS:
            continue
        ds = pydicom.dcmread(path)
        n = int(getattr(ds, "NumberOfFrames", 1))
        frames = list(generate_frames(ds.PixelData, number_of_frames=n))
        w, h = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
        levels.append((w, h, int(ds.Columns), int(ds.Rows), frames))
    levels.sort(key=lambda lv: -lv[0])
    return levels


def _write_levels(
    out: Path,
    levels: list[tuple[int, int, int, int, Iterator[bytes] | list[bytes]]],
    um_per_pixel: float,
    layout: str,
) -> Path:
    """Pre-encoded JPEG tiles (YCbCr 4:2:2, as Pillow writes them) into a pyramidal TIFF:
    base level first, every level a tiled directory (what OpenSlide's aperio and generic
    TIFF readers take as levels)."""
    import tifffile

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_cm = 1e4 / um_per_pixel
    w0, h0, t0 = levels[0][0], levels[0][1], levels[0][2]
    with tifffile.TiffWriter(out, bigtiff=True) as tw:
        for i, (w, h, tile_w, tile_h, frames) in enumerate(levels):
            d = w0 / w
            description = None
            if layout == "svs" and i == 0:
                description = aperio_description(w0, h0, t0, um_per_pixel)
            tw.write(
                iter(frames),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile_h, tile_w),
                compression="jpeg",
                photometric="ycbcr",
                subsampling=(2, 1),
                description=description,
                resolution=(per_cm / d, per_cm / d),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
                metadata=None,
            )
    return out


def copy_as_scanner_file(dicom_folder: Path, out: Path, layout: str = "svs") -> Path:
    """The DICOM slide in ``dicom_folder`` as one SVS-style or tiled-TIFF file at ``out``
    (its JPEG frames copied unchanged; no annotations: a scanner file has none)."""
    import pydicom

    from marrowdx.slides.detect import WSI_SOP_CLASS, dicom_files

    base = next(p for p, sop in dicom_files(dicom_folder).items() if sop == WSI_SOP_CLASS)
    ds = pydicom.dcmread(base, stop_before_pixels=True)
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    um = float(spacing[1]) * 1000.0
    return _write_levels(Path(out), _dicom_levels(Path(dicom_folder)), um, layout)


# ------------------------------------------------------------------ a slide at real size
@dataclass(frozen=True)
class BigSlideSpec:
    """A large, mostly empty slide: base size, tile, levels, and where the monolayer is."""

    width: int = 100_000
    height: int = 50_000
    tile: int = 512
    n_areas: int = 4
    area_size: tuple[int, int] = (2048, 2048)
    thick_width: int = 4096
    #: Downsample of each level after the base (the ROI search reads the coarsest <= 4 µm).
    downsamples: tuple[int, ...] = (4, 16, 64)
    um_per_pixel: float = config.MODEL_UM_PER_PIXEL
    seed: int = 7


@dataclass
class BigSlide:
    """What write_big_slide wrote: the file, its monolayer areas (base pixels) and cells."""

    path: Path
    spec: BigSlideSpec
    areas: list[tuple[int, int, int, int]] = field(default_factory=list)
    cells: list[dict] = field(default_factory=list)


def _encode(tile: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tile, "RGB").save(buf, format="JPEG", quality=TILE_QUALITY, subsampling=1)
    return buf.getvalue()


def _shrink(image: np.ndarray, d: int) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    size = (max(1, -(-w // d)), max(1, -(-h // d)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def _area_slots(spec: BigSlideSpec, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners of the monolayer areas: right of the thick band, apart, tile-aligned
    to nothing in particular (a real smear is not)."""
    aw, ah = spec.area_size
    x_lo = spec.thick_width + 2 * aw
    slots: list[tuple[int, int]] = []
    tries = 0
    while len(slots) < spec.n_areas and tries < 10_000:
        tries += 1
        x = int(rng.integers(x_lo, spec.width - aw - 64))
        y = int(rng.integers(64, spec.height - ah - 64))
        if all(abs(x - sx) > aw + 512 or abs(y - sy) > ah + 512 for sx, sy in slots):
            slots.append((x, y))
    if len(slots) < spec.n_areas:
        raise ValueError(f"{spec.n_areas} areas of {aw}x{ah} do not fit on the slide")
    return slots


def write_big_slide(
    out: Path, spec: BigSlideSpec = BigSlideSpec(), layout: str = "svs"
) -> BigSlide:
    """Write the slide tile by tile (see the module docstring); memory stays at a few areas'
    pixels whatever the slide's size."""
    from marrowdx import taxonomy
    from marrowdx.simulate import dicom_slide as ds_sim
    from marrowdx.simulate import field as fl

    rng = np.random.default_rng(spec.seed)
    style = fl.SlideStyle.draw(rng)
    t = spec.tile
    glass_variants = [ds_sim._glass(t, t, style, rng) for _ in range(4)]
    thick_stripe = ds_sim._thick(t * 4, min(spec.thick_width, t * 4), style, rng)
    result = BigSlide(Path(out), spec)
    pieces: dict[tuple[int, int], np.ndarray] = {}  # (x, y) -> rendered area (base pixels)
    for x, y in _area_slots(spec, rng):
        aw, ah = spec.area_size
        lo, hi = fl.cells_for_area(aw, ah)
        labels = [
            taxonomy.CLASSES[i]
            for i in rng.integers(0, taxonomy.N_CLASSES, int(rng.integers(lo, hi + 1)))
        ]
        render = fl.render_field(labels, (aw, ah), style, rng)
        pieces[(x, y)] = render.image
        result.areas.append((x, y, x + aw, y + ah))
        result.cells += [
            {"box": [c.box[0] + x, c.box[1] + y, c.box[2] + x, c.box[3] + y], "label": c.label}
            for c in render.cells
        ]

    def level_tiles(d: int) -> Iterator[bytes]:
        lw, lh = -(-spec.width // d), -(-spec.height // d)
        glass = [_encode(g) for g in glass_variants]  # glass looks the same at every level
        thick_small = _shrink(thick_stripe, d)
        areas_small = {(x // d, y // d): _shrink(img, d) for (x, y), img in pieces.items()}
        thick_w = spec.thick_width // d
        k = 0
        for ty in range(-(-lh // t)):
            for tx in range(-(-lw // t)):
                x0, y0 = tx * t, ty * t
                touching = [
                    (ax, ay, img)
                    for (ax, ay), img in areas_small.items()
                    if ax < x0 + t
                    and ax + img.shape[1] > x0
                    and ay < y0 + t
                    and ay + img.shape[0] > y0
                ]
                if x0 >= thick_w and not touching:
                    k += 1
                    yield glass[k % len(glass)]
                    continue
                tile = glass_variants[k % len(glass_variants)].copy()
                if x0 < thick_w:
                    sh, sw = thick_small.shape[:2]
                    ys = (np.arange(y0, y0 + t) % sh)[:, None]
                    xs = (np.arange(x0, x0 + t) % sw)[None, :]
                    band = thick_small[ys, xs]
                    cols = min(t, thick_w - x0)
                    tile[:, :cols] = band[:, :cols]
                for ax, ay, img in touching:
                    ix0, iy0 = max(ax, x0), max(ay, y0)
                    ix1 = min(ax + img.shape[1], x0 + t)
                    iy1 = min(ay + img.shape[0], y0 + t)
                    tile[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = img[
                        iy0 - ay : iy1 - ay, ix0 - ax : ix1 - ax
                    ]
                yield _encode(tile)

    levels = []
    for d in (1, *spec.downsamples):
        levels.append((-(-spec.width // d), -(-spec.height // d), t, t, level_tiles(d)))
    _write_levels(Path(out), levels, spec.um_per_pixel, layout)
    return result
