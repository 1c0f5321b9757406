"""The pixel spacing an image file states about itself: a microscope camera's calibration.

Lab capture software writes the spacing it was calibrated to into the files it saves: Fiji /
ImageJ into a TIFF's ImageDescription (``unit=micron``) and resolution tags, OME-TIFF
writers (Bio-Formats, QuPath, vendors' exports) as ``PhysicalSizeX`` in the OME-XML, Aperio
ImageScope's region exports as ``MPP = 0.25`` in the description, other camera software as
TIFF resolution in pixels per centimetre, and a few as a PNG's ``pHYs`` chunk or a JPEG's
JFIF density. The client reads it when no spacing is given
(``client.fields``), so such an image reaches the models at its real scale without
``--um-per-pixel`` and without an estimate from its red cells.

A resolution in plain dots per inch is kept only where it is a microscope's: every image an
office program, a phone or a screenshot writes states 72-600 dpi (35-350 µm per pixel), and
that says nothing about the smear. Only values within ``PLAUSIBLE_UM_PER_PIXEL`` are taken,
whatever tag they come from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from marrowdx.image_checks import open_image

#: Pixel spacings (µm/px) a camera on a microscope gives: a 100x oil objective on a small
#: sensor pixel reaches about 0.03, a 4x objective about 2.5; a resolution tag outside this
#: band is a screen's or a printer's (72 dpi is 353 µm/px), not a calibration.
PLAUSIBLE_UM_PER_PIXEL = (0.01, 3.0)
#: Micrometres per unit of the length units the calibrations name (OME's symbols, ImageJ's
#: words, TIFF's inch and centimetre as OpenSlide spells them: ``slides.scanner`` too).
UM_PER_UNIT: Mapping[str, float] = {
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "um": 1.0,
    "µm": 1.0,  # micro sign
    "μm": 1.0,  # Greek mu
    "\\u00b5m": 1.0,  # as ImageJ escapes it
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "centimetre": 1e4,
    "inch": 25_400.0,
    "in": 25_400.0,
}
#: TIFF tags read (TIFF 6.0): the free-text description and the X resolution (the unit
#: tag Pillow reads itself, into the ``dpi`` it gives).
_IMAGE_DESCRIPTION, _X_RESOLUTION = 270, 282
_OME_PIXELS = re.compile(r"<(?:\w+:)?Pixels\b[^>]*>", re.IGNORECASE)
_XML_ATTRIBUTE = re.compile(r'(\w+)\s*=\s*"([^"]*)"')
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


def spacing_in_file(data: bytes) -> float | None:
    """The µm per pixel the encoded image's own metadata states (a TIFF description's
    calibration, else a resolution in pixels per length unit), or None when it states none,
    only a screen's resolution, or cannot be opened (the caller reports that)."""
    try:
        with open_image(data) as image:
            stated = _tiff_calibration(image.tag_v2) if image.format == "TIFF" else None
            dpi = image.info.get("dpi")
    except Exception:  # noqa: BLE001 - unreadable bytes are reported where they are decoded
        return None
    if stated is not None:
        return stated
    try:  # Pillow gives a TIFF's, a PNG's and a JPEG's resolution in dots per inch
        return _plausible(UM_PER_UNIT["inch"] / float(dpi[0]))
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return None


def _tiff_calibration(tags: Mapping[int, object]) -> float | None:
    """The spacing an OME-XML, ImageJ or Aperio description states (ImageJ's in the X
    resolution tag, in the description's unit: TIFF's own unit tag then says "none")."""
    description = tags.get(_IMAGE_DESCRIPTION)
    if not isinstance(description, str):
        return None
    try:  # TIFF says ASCII and Pillow reads Latin-1, but OME writers store UTF-8 ("µm")
        description = description.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    if "<OME" in description[:4096]:
        return _ome_spacing(description)
    if description.startswith("ImageJ="):
        unit = re.search(r"^unit=(.+)$", description, re.MULTILINE)
        return _in_um(tags.get(_X_RESOLUTION), unit and unit.group(1), reciprocal=True)
    if description.startswith("Aperio"):
        mpp = _APERIO_MPP.search(description)
        return _in_um(mpp and mpp.group(1), "µm")
    return None


def _ome_spacing(xml: str) -> float | None:
    """The first image's ``PhysicalSizeX`` in its ``PhysicalSizeXUnit`` (OME's default µm).
    Read from the tag's attributes alone: a user's file is not handed to an XML parser."""
    pixels = _OME_PIXELS.search(xml)
    if pixels is None:
        return None
    attributes = dict(_XML_ATTRIBUTE.findall(pixels.group(0)))
    return _in_um(attributes.get("PhysicalSizeX"), attributes.get("PhysicalSizeXUnit", "µm"))


def _in_um(value: object, unit: str | None, *, reciprocal: bool = False) -> float | None:
    """``value`` units per pixel (``reciprocal``: pixels per unit) in µm per pixel, when it
    is a number, the unit one of ``UM_PER_UNIT`` and the result plausible; else None."""
    per_unit = UM_PER_UNIT.get((unit or "").strip().lower())
    try:
        number = float(value)  # type: ignore[arg-type]
        size = 1.0 / number if reciprocal else number
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return None if per_unit is None else _plausible(size * per_unit)


def _plausible(um_per_pixel: float) -> float | None:
    low, high = PLAUSIBLE_UM_PER_PIXEL
    return um_per_pixel if low <= um_per_pixel <= high else None
