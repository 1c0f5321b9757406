"""The calibration an image file states about itself (``marrowdx.file_spacing``), written as
the tools labs use write it: tifffile's ImageJ and OME-TIFF writers (the formats Fiji and
Bio-Formats write), an Aperio region export's description, TIFF and PNG resolution."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from marrowdx.file_spacing import PLAUSIBLE_UM_PER_PIXEL, spacing_in_file

PIXELS = np.full((48, 64, 3), 210, np.uint8)


def _tifffile(**options: object) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, PIXELS, **options)
    return out.getvalue()


def _pillow(fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(PIXELS).save(out, fmt, **options)
    return out.getvalue()


def _ome(size: str, unit: str | None) -> bytes:
    metadata: dict[str, object] = {"PhysicalSizeX": float(size), "PhysicalSizeY": float(size)}
    if unit is not None:
        metadata["PhysicalSizeXUnit"] = unit
    return _tifffile(ome=True, photometric="rgb", metadata=metadata)


APERIO = (
    "Aperio Image Library v12.0.15 \r\n2000x1500 [0,0 2000x1500] (256x256) JPEG/RGB Q=70"
    "|AppMag = 40|Filename = region|MPP = 0.2527|Left = 25.69"
)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_tifffile(imagej=True, resolution=(1 / 0.1, 1 / 0.1), metadata={"unit": "um"}), 0.1),
        (_tifffile(imagej=True, resolution=(1 / 1e-4, 1 / 1e-4), metadata={"unit": "mm"}), 0.1),
        (_ome("0.0875", "µm"), 0.0875),  # UTF-8 in an "ASCII" tag, as Bio-Formats writes it
        (_ome("0.2", None), 0.2),  # OME's default unit is the micrometre
        (_ome("87.5", "nm"), 0.0875),
        (_pillow("TIFF", description=APERIO), 0.2527),
        (_pillow("TIFF", resolution=1e5, resolution_unit="cm"), 0.1),  # 100,000 px per cm
        (_pillow("TIFF", resolution=254_000.0, resolution_unit="inch"), 0.1),
        (_pillow("PNG", dpi=(254_000, 254_000)), 0.1),  # pHYs in pixels per metre
    ],
    ids=["imagej-um", "imagej-mm", "ome-um", "ome-default", "ome-nm", "aperio", "tiff-cm",
         "tiff-inch", "png-phys"],
)  # fmt: skip
def test_a_calibration_is_read_whichever_tool_wrote_it(data: bytes, expected: float) -> None:
    assert spacing_in_file(data) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "data",
    [
        _pillow("PNG"),
        _pillow("JPEG"),
        _pillow("JPEG", dpi=(72, 72)),  # what cameras, phones and office programs write
        _pillow("PNG", dpi=(96, 96)),
        _pillow("TIFF", dpi=(300, 300)),
        _tifffile(resolution=(1e5, 1e5), resolutionunit="NONE"),  # a ratio, not a length
        _tifffile(imagej=True, resolution=(10.0, 10.0)),  # an uncalibrated ImageJ image
        _ome("1e6", "µm"),  # a metre a pixel: no microscope's
        _pillow("TIFF", description="ImageJ=1.54f\nunit=parsec\n", resolution=10.0),
        _pillow("TIFF", description="Aperio Image Library|MPP = |AppMag = 40"),
        b"",
        b"\x89PNG\r\n\x1a\n truncated",
    ],
    ids=["png", "jpeg", "jpeg-72dpi", "png-96dpi", "tiff-300dpi", "tiff-unit-none",
         "imagej-uncalibrated", "ome-implausible", "unknown-unit", "aperio-empty", "empty",
         "damaged"],
)  # fmt: skip
def test_no_calibration_a_screen_resolution_or_a_damaged_file_states_none(data: bytes) -> None:
    assert spacing_in_file(data) is None


def test_the_plausible_band_holds_every_microscope_and_no_screen() -> None:
    low, high = PLAUSIBLE_UM_PER_PIXEL
    assert low <= 0.03 and high >= 2.5  # a 100x oil objective ... a 4x objective
    assert 25_400 / 600 > high  # 600 dpi, the finest an office program writes
