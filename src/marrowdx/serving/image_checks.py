"""Validate encoded image bytes *before* DALI sees them.

Why before: a decoder handed a "decompression bomb" (a tiny file declaring 100k x 100k
pixels) allocates first and fails late; a DALI pipeline that raised is unusable and must be
rebuilt, which costs the other images of the batch time. Reading the header with Pillow
(``Image.open`` parses the header only, it never decodes pixel data) gives the format and the
declared size cheaply, so most bad requests are refused with a precise message without
touching DALI. What the header cannot reveal (a truncated or corrupt pixel stream) is still
caught by the preprocess step when DALI raises.

Valid-but-odd images (grayscale, palette, RGBA/LA, 16-bit PNG, CMYK JPEG, EXIF-rotated JPEG)
need no special treatment here: DALI 2.4's decoder converts all of them to RGB and applies the
EXIF orientation (measured: identical pixels to Pillow's ``exif_transpose(...).convert("RGB")``;
``tests/test_serving_images.py`` keeps that true).

Error messages never include the image content (only sizes and formats), so they are safe
to log and to return to clients.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from marrowdx import config

#: Leading bytes of the formats the pipeline accepts (the DESIGN contract: JPEG or PNG).
_MAGIC: dict[str, tuple[bytes, ...]] = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
}


class ImageRejected(ValueError):
    """The encoded bytes are not an image the pipeline accepts; the message says why."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = config.MAX_IMAGE_BYTES
    max_pixels: int = config.MAX_IMAGE_PIXELS
    min_side: int = config.MIN_IMAGE_SIDE


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "JPEG" or "PNG"
    width: int
    height: int
    mode: str  # Pillow mode as declared by the header (e.g. "RGB", "L", "CMYK", "I;16")


def sniff_format(data: bytes) -> str | None:
    """The accepted format whose magic bytes start ``data``, else None."""
    for name, magics in _MAGIC.items():
        if any(data.startswith(m) for m in magics):
            return name
    return None


def _read_header(data: bytes, fmt: str) -> tuple[int, int, str]:
    """(width, height, mode) declared by the header; never decodes pixel data.

    Why the format's plugin class and not ``Image.open``: ``Image.open`` applies Pillow's
    own decompression-bomb limit (the process-wide ``Image.MAX_IMAGE_PIXELS``, ~179 MP for
    an error) before we see the size, so a deployment's ``max_pixels`` above it would be
    overridden by Pillow and refused with a wrong limit in the message. The plugin class
    parses the same header without that check; :class:`ImageLimits` is the one limit that
    applies, and no process-wide setting is touched (other threads may use Pillow)."""
    from PIL import JpegImagePlugin, PngImagePlugin

    opener = {"JPEG": JpegImagePlugin.JpegImageFile, "PNG": PngImagePlugin.PngImageFile}[fmt]
    with opener(io.BytesIO(data)) as img:
        width, height = img.size
        return width, height, img.mode


def check_encoded_image(
    data: bytes | memoryview, limits: ImageLimits = ImageLimits()
) -> ImageHeader:
    """Return the header facts of an acceptable image or raise :class:`ImageRejected`."""
    from PIL import Image

    size = len(data)
    if size == 0:
        raise ImageRejected("empty image: the request carried 0 bytes")
    if size > limits.max_bytes:
        raise ImageRejected(
            f"image too large: {size} bytes exceeds the limit of {limits.max_bytes} bytes"
        )
    data = bytes(data)
    fmt = sniff_format(data)
    if fmt is None:
        accepted = " or ".join(_MAGIC)
        raise ImageRejected(f"not an image: {size} bytes that do not start like a {accepted} file")
    try:
        width, height, mode = _read_header(data, fmt)
    except (SyntaxError, Image.UnidentifiedImageError):  # Pillow's "not a valid header"
        raise ImageRejected(f"corrupt {fmt} header: Pillow cannot parse it") from None
    except Exception as exc:  # PIL raises several types for broken headers
        raise ImageRejected(f"corrupt {fmt} header: {type(exc).__name__}: {exc}") from None
    if width * height > limits.max_pixels:
        raise ImageRejected(
            f"image dimensions too large: declared {width}x{height} = {width * height} pixels "
            f"exceeds the limit of {limits.max_pixels}"
        )
    if min(width, height) < limits.min_side:
        raise ImageRejected(
            f"image too small: declared {width}x{height}, "
            f"the shorter side must be at least {limits.min_side} pixels"
        )
    return ImageHeader(format=fmt, width=width, height=height, mode=mode)
