"""A camera's 16-bit TIFF or PNG read as the 8-bit image it shows (``image_checks.upright_rgb``):
its samples scaled by the bits they use, in every layout tifffile writes and Pillow orients."""

from __future__ import annotations

import io

import numpy as np
import pytest

from marrowdx.image_checks import open_image, rgb_of, upright_rgb

tifffile = pytest.importorskip("tifffile", reason="tifffile (client extra) not installed")

RGB = np.random.default_rng(7).integers(0, 256, (40, 60, 3), dtype=np.uint8)


def _tiff(samples: np.ndarray, **options: object) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, samples, **options)
    return out.getvalue()


def _twelve_bit(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.uint16) << 4


@pytest.mark.parametrize(
    ("samples", "options"),
    [
        (_twelve_bit(RGB), {"photometric": "rgb"}),
        (_twelve_bit(RGB), {"photometric": "rgb", "compression": "zlib"}),
        (np.moveaxis(_twelve_bit(RGB), -1, 0), {"photometric": "rgb", "planarconfig": "separate"}),
        (
            np.dstack([_twelve_bit(RGB), np.full(RGB.shape[:2], 4095, np.uint16)]),
            {"photometric": "rgb", "extrasamples": ["unassalpha"]},
        ),
        (RGB.astype(np.uint16) * 257, {"photometric": "rgb"}),  # full range: the high byte
    ],
    ids=["rgb", "deflate", "planar", "rgba", "full_range"],
)
def test_16_bit_samples_read_as_the_8_bit_image(samples: np.ndarray, options: dict) -> None:
    data = _tiff(samples, **options)
    assert np.array_equal(np.asarray(upright_rgb(data)), RGB)
    with open_image(data) as image:
        assert np.array_equal(np.asarray(rgb_of(image)), RGB)


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    grey = RGB[..., 1]
    scaled = np.asarray(upright_rgb(_tiff(grey.astype(np.uint16) << 6)))  # 14 bits
    assert np.array_equal(scaled, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_16_bit_tiff_is_oriented_as_its_8_bit_copy(orientation: int) -> None:
    tag = [(274, "H", 1, orientation, True)]
    eight = np.asarray(upright_rgb(_tiff(RGB, photometric="rgb", extratags=tag)))
    wide = np.asarray(upright_rgb(_tiff(_twelve_bit(RGB), photometric="rgb", extratags=tag)))
    assert np.array_equal(wide, eight)


def _png(samples: np.ndarray) -> bytes:
    """A 16-bit PNG: RGB through imagecodecs (Pillow writes no 16-bit colour), grey Pillow."""
    if samples.ndim == 3:
        return pytest.importorskip("imagecodecs", reason="imagecodecs (slides extra)").png_encode(
            samples
        )
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(samples).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("bits", [10, 12, 16])
def test_a_16_bit_png_is_read_as_the_8_bit_image(bits: int) -> None:
    """Pillow keeps the high byte of a 16-bit RGB PNG (grey levels 0-15 for 12 bits) and
    clips 16-bit grey to white: both are read whole and scaled, and the client decodes them
    itself (the server's decoder would keep the high byte too)."""
    from marrowdx.image_checks import client_decoded

    wide = RGB.astype(np.uint16) << (bits - 8)
    grey = RGB[..., 1].astype(np.uint16) << (bits - 8)
    expected_grey = np.repeat(RGB[..., 1:2], 3, axis=2)
    for data, expected in ((_png(grey), expected_grey), (_png(wide), RGB)):
        assert client_decoded(data)
        assert np.array_equal(np.asarray(upright_rgb(data)), expected)
        with open_image(data) as image:
            assert np.array_equal(np.asarray(rgb_of(image)), expected)
    eight = io.BytesIO()
    from PIL import Image

    Image.fromarray(RGB).save(eight, "PNG")
    assert not client_decoded(eight.getvalue())  # an 8-bit PNG stays the server's to decode
