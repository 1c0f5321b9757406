"""Slides in scanner formats: Aperio SVS, Hamamatsu NDPI, 3DHISTECH MRXS, tiled TIFF.

Read with OpenSlide (``openslide-python`` and the ``openslide-bin`` wheel, which ships the C
library: nothing to install from the system). OpenSlide reads all four formats, MRXS
included (tiffslide and opentile do not read MIRAX, the format the collection this project
follows was scanned in), and its region reads are what the field tiling needs. A scanner
file carries no ROI annotations, so its monolayer areas are found automatically
(``roi_finder``); everything after reading a region (fields at the models' spacing, served
fields, seam de-duplication, the JSON) is the DICOM path's (``pyramid.PyramidSlide``).

Pixel spacing, in this order: ``openslide.mpp-x`` (OpenSlide fills it from Aperio's ``MPP``,
Hamamatsu's and MIRAX's metadata), the TIFF resolution tags, the value the caller gives
(``um_per_pixel``), else the red-cell estimator (``marrowdx.spacing``) when it is installed;
otherwise the slide is refused with "pixel spacing unknown".
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from marrowdx.file_spacing import UM_PER_UNIT
from marrowdx.slides.base import SlideError
from marrowdx.slides.detect import scanner_file
from marrowdx.slides.pyramid import PyramidLevel, PyramidSlide

#: OpenSlide's tile cache per open slide (bytes): bounds what one slide holds decoded.
CACHE_BYTES = 64 * 1024 * 1024
#: Tile size assumed when a format does not report one (OpenSlide's usual tiles).
_DEFAULT_TILE = 256


def _fail(path: Path, problem: str) -> SlideError:
    return SlideError(f"slide {path}: {problem}")


def spacing_from_properties(props: dict[str, str]) -> tuple[float | None, str]:
    """Base-level µm/pixel from OpenSlide's properties and where it came from, or None."""
    for key in ("openslide.mpp-x", "aperio.MPP"):
        try:
            value = float(props[key])
        except (KeyError, ValueError):
            continue
        if value > 0 and math.isfinite(value):
            return value, key
    unit = props.get("tiff.ResolutionUnit", "").lower()
    try:
        per_unit = float(props["tiff.XResolution"])
    except (KeyError, ValueError):
        per_unit = 0.0
    if unit in ("centimeter", "inch") and per_unit > 0:
        return UM_PER_UNIT[unit] / per_unit, "tiff.XResolution"
    return None, "none"


class ScannerSlide(PyramidSlide):
    """One scanner-format slide opened with OpenSlide (a ``PyramidSlide``).

    ``path`` is the slide file, ``vendor`` OpenSlide's format name (aperio, hamamatsu,
    mirax, generic-tiff, ...), ``spacing_source`` where ``um_per_pixel`` came from.
    """

    def __init__(self, folder: Path, path: Path, osr, um_per_pixel: float, spacing_source: str):
        super().__init__()
        self.folder = folder
        self.path = path
        self._osr = osr
        props = dict(osr.properties)
        self.vendor = props.get("openslide.vendor", "unknown")
        self.levels = []
        for i, (w, h) in enumerate(osr.level_dimensions):
            tw = int(props.get(f"openslide.level[{i}].tile-width", _DEFAULT_TILE) or _DEFAULT_TILE)
            th = int(props.get(f"openslide.level[{i}].tile-height", _DEFAULT_TILE) or _DEFAULT_TILE)
            ds = max(1, round(float(osr.level_downsamples[i])))
            self.levels.append(PyramidLevel(int(w), int(h), tw, th, ds))
        self.width, self.height = self.levels[0].width, self.levels[0].height
        self.um_per_pixel = um_per_pixel
        self.spacing_source = spacing_source
        self.patient_id = folder.name
        self.rois = []

    def _read_region(self, index: int, x: int, y: int, w: int, h: int):
        from PIL import Image

        d = self.levels[index].downsample
        rgba = self._osr.read_region((x * d, y * d), index, (w, h))
        if rgba.getextrema()[3][0] == 255:  # fully opaque: no area outside the scan
            return rgba.convert("RGB")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white

    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None


def _estimated_spacing(osr, path: Path) -> tuple[float, str]:
    """The red-cell estimate on a patch of the base level, when the estimator is installed."""
    if importlib.util.find_spec("marrowdx.spacing") is None:
        raise _fail(path, "pixel spacing unknown: give --um-per-pixel")
    import numpy as np

    from marrowdx.spacing import estimate_um_per_pixel

    w, h = osr.level_dimensions[0]
    side = min(2048, w, h)
    patch = osr.read_region(((w - side) // 2, (h - side) // 2), 0, (side, side)).convert("RGB")
    try:
        estimate = estimate_um_per_pixel(np.asarray(patch))
    except Exception as exc:  # noqa: BLE001 - the estimate failed: say so, ask for the value
        raise _fail(
            path, f"pixel spacing unknown (red-cell estimate failed: {exc}): give --um-per-pixel"
        ) from exc
    value = estimate.um_per_pixel
    if value is None or not (value > 0 and math.isfinite(value)) or estimate.uncertain:
        why = getattr(estimate, "reason", None) or "the red cells' sizes disagree"
        raise _fail(path, f"pixel spacing unknown ({why}): give --um-per-pixel")
    return float(value), "estimated from red cells"


def open_scanner_slide(
    folder: Path, rois: str = "auto", *, um_per_pixel: float | None = None
) -> ScannerSlide:
    """Open the one scanner file in ``folder`` and find its monolayer ROIs."""
    folder = Path(folder)
    path = scanner_file(folder)
    if path is None:
        raise _fail(folder, "no scanner-format slide file (.svs, .ndpi, .mrxs, tiled .tif)")
    if rois == "annotation":
        raise _fail(path, "a scanner file carries no ROI annotation; use automatic ROIs")
    try:
        import openslide
    except ImportError as exc:  # the slides extra
        need = "scanner formats need openslide: pip install 'marrowdx[slides]'"
        raise _fail(path, f"{need} ({exc})") from exc
    try:
        osr = openslide.OpenSlide(str(path))
    except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError
        raise _fail(path, f"OpenSlide cannot open it: {type(exc).__name__}: {exc}") from exc
    try:
        osr.set_cache(openslide.OpenSlideCache(CACHE_BYTES))
        spacing, source = spacing_from_properties(dict(osr.properties))
        if spacing is None and um_per_pixel is not None:
            spacing, source = float(um_per_pixel), "given"
        if spacing is None:
            spacing, source = _estimated_spacing(osr, path)
    except BaseException:
        osr.close()
        raise
    slide = ScannerSlide(folder, path, osr, spacing, source)
    from marrowdx.slides.roi_finder import use_automatic_rois

    use_automatic_rois(slide)
    return slide
