"""Validate encoded image bytes *before* DALI sees them.

Why before: a decoder handed a "decompression bomb" (a tiny file declaring 100k x 100k
pixels) allocates first and fails late; a DALI pipeline that raised is unusable and must be
rebuilt, which costs the other images of the batch time. Reading the header with Pillow
(``Image.open`` parses the header only, it never decodes pixel data) gives the format and the
declared size cheaply, so most bad requests are refused with a precise message without
touching DALI.

Damaged compressed data: a decoder often still produces pixels from a truncated or
bit-flipped stream (libjpeg-turbo inside DALI 2.4 warns "Corrupt JPEG data: N extraneous
bytes" and returns a half-garbled field), and counting cells in it silently changes a
patient's differential.
:func:`check_integrity` therefore checks the stream itself, cheaply: PNG chunk CRCs and the
IEND chunk (zlib's CRC-32), JPEG's end-of-image marker and the
markers inside the entropy-coded data, and, where ``simplejpeg`` is installed (the server
extra), a strict libjpeg-turbo decode at 1/8 scale: entropy decoding touches every coded
bit, so libjpeg's corrupt-data warnings become errors while the inverse DCT is skipped
(docs/performance.md has what these checks cost). What still slips through is
caught by the preprocess step when DALI raises.

Valid-but-odd images (grayscale, palette, RGBA/LA, 16-bit PNG, CMYK JPEG, EXIF-rotated JPEG)
need no special treatment here: DALI 2.4's decoder converts all of them to RGB and applies the
EXIF orientation, to the same pixels as Pillow's ``exif_transpose(...).convert("RGB")``
(``tests/integration/test_serving_repository.py`` keeps that true).

Error messages never include the image content (only sizes and formats), so they are safe
to log and to return to clients.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from marrowdx import config
from marrowdx.errors import ImageRejected

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

#: Leading bytes of the formats the pipeline accepts: JPEG or PNG.
_MAGIC: dict[str, tuple[bytes, ...]] = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
}
#: File suffixes of the formats the server decodes (``_MAGIC``); the bench sends only these.
SERVED_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
#: Camera formats the client decodes itself (Pillow) and sends as re-encoded model fields:
#: lab cameras and public sets (AML-Cytomorphology_LMU) store TIFF, some capture software
#: BMP, web exports and image archives WebP, and a phone held to the eyepiece HEIF (iPhones'
#: default; read with pillow-heif, the client extra). The server's contract stays JPEG/PNG.
CLIENT_DECODED_SUFFIXES: frozenset[str] = frozenset(
    {".tif", ".tiff", ".bmp", ".webp", ".heic", ".heif"}
)
#: Image files the client, ``diagnose`` and the data-set readers take (case-insensitively).
IMAGE_SUFFIXES: frozenset[str] = SERVED_SUFFIXES | CLIENT_DECODED_SUFFIXES
#: Names (lower case) that Windows Explorer or a zip tool on macOS writes beside a user's files.
SYSTEM_NAMES: frozenset[str] = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"})
#: Leading bytes of TIFF and BigTIFF in both byte orders.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Leading bytes of the client-decoded formats: TIFF, BMP.
_CLIENT_DECODED_MAGIC = (*TIFF_MAGIC, b"BM")
#: Major brands (ISO BMFF ``ftyp`` box, bytes 8-12) of HEIF still images.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})


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


#: The EXIF (and TIFF) orientation tag, and the orientations that swap width and height: the
#: server's decoder applies them.
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
#: TIFF tags read to find a camera's wide samples (:func:`_wide_tiff_rgb`), and their values.
_BITS_PER_SAMPLE, _PHOTOMETRIC, _SAMPLE_FORMAT = 258, 262, 339
_MIN_IS_BLACK, _RGB = 1, 2
#: A PNG's IHDR chunk, which must come first, and the offset of its bit depth in the file.
_PNG_IHDR, _PNG_BIT_DEPTH_AT = b"IHDR", 24


#: A row or column of an image lit (not camera black) on at most this share of its pixels is
#: part of a black frame around the field (``field_region``): the specks of JPEG noise and a
#: burned-in label in the frame stay under it.
MAX_FRAME_LIT_SHARE = 0.02
#: ... and a frame of less than this share of the image's area is left on: mirrored, a thin
#: black border costs a field little, and the image is sent as it always was (1-26 px
#: borders of 83 of the real sets' 4,947 images).
MIN_FRAME_AREA = 0.1
#: A light frame is taken off only when at most this share of the field inside it is of its
#: colour: then it is a page or a viewer's background, not the field's own glass. An
#: overexposed field's clipped glass is as white as a page (288 TXL-PBC ``val`` fields at
#: 1.7 times their light: 85% of their pixels clipped, median), a smear's glass is not of
#: one colour (1,296 TXL-PBC fields and 160 blood crops: at most 0.05% of their pixels
#: white).
MAX_FRAME_COLOUR_INSIDE = 0.01
#: A light frame: the median colour of the image's outermost rows and columns at least this
#: grey in every channel (a page, a viewer's background), and the pixels within this of it
#: in every channel (JPEG noise, a scanned page's grain).
MIN_FRAME_GREY = 200
FRAME_COLOUR_TOLERANCE = 6
#: ... and only when the field inside it meets it along straight edges, at least this share
#: of each of its outermost rows and columns not of the frame's colour (a pasted picture's),
#: found within ``MAX_EDGE_PEEL`` of its side inwards of the frame's last speck (the ringing
#: a JPEG leaves beside an edge). Where the glass of a field with few cells is as even as a
#: frame, the box around the cells meets the glass only at the cells (a round cell's chord
#: reaches 0.9 of its width only 28% of its width in), and the glass is left on.
MIN_EDGE_CONTENT = 0.9
MAX_EDGE_PEEL = 0.05
#: ... and at least this share of the image's area: a field pasted on a page or shown in a
#: viewer fills much of it (288 TXL-PBC fields set in 1.4 x 1.2 their size: 60%), where a
#: logo's lone shape on its background is no field.
MIN_PASTED_AREA = 0.2


def is_system_entry(path: Path) -> bool:
    """Hidden (a leading dot: ``.DS_Store``) or written by the operating system: never a lab's
    image, so the cohort scanner and the data-set readers skip it. Why a leading dot counts:
    macOS writes an AppleDouble ``._name.jpg`` beside every file copied to a network or FAT
    share, with an image's suffix and no image in it."""
    return path.name.startswith(".") or path.name.lower() in SYSTEM_NAMES


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as :func:`upright_rgb` gives it, from its header only."""
    if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS:
        return int(image.height), int(image.width)
    return int(image.width), int(image.height)


def upright_rgb(source: bytes | str | Path | BinaryIO | np.ndarray | Image.Image) -> Image.Image:
    """The input image (:func:`open_image`'s ``source``, or one decoded: an array,
    :func:`array_rgb`, or a Pillow image, :func:`pillow_rgb`) as the server's decoder gives
    it: EXIF orientation applied, converted to RGB, decoded.

    Why one function: the client, the pictures drawn for people, the data-set readers and
    training must see the same pixels in the same orientation, or a data set's boxes (in the
    pixels a viewer shows) would fall beside their cells in training while the client scores
    them upright."""
    from PIL import Image as PilImage
    from PIL import ImageOps

    if isinstance(source, np.ndarray):
        return PilImage.fromarray(array_rgb(source))
    if isinstance(source, PilImage.Image):
        return PilImage.fromarray(pillow_rgb(source))
    with open_image(source) as image:
        wide = _wide_rgb(image)
        return ImageOps.exif_transpose(image).convert("RGB") if wide is None else wide


def rgb_of(image: Image.Image) -> Image.Image:
    """An opened image's pixels as 8-bit RGB, as :func:`upright_rgb` reads them (a JPEG's
    EXIF orientation not applied): for the spacing estimate, which decodes at a reduced
    size."""
    wide = _wide_rgb(image)
    return image.convert("RGB") if wide is None else wide


def _wide_rgb(image: Image.Image) -> Image.Image | None:
    """A TIFF's or PNG's 16-bit samples as 8-bit RGB scaled by the bits they use, upright;
    None for any other image, or where they cannot be read so (Pillow's reading stands)."""
    if image.format == "PNG":
        return _wide_png_rgb(image)
    return _wide_tiff_rgb(image)


def sixteen_bit_png(data: bytes) -> bool:
    """Whether ``data`` starts like a PNG of 16-bit samples (grey, RGB, with or without
    alpha), which the client reads itself rather than letting the server keep the high byte
    of each sample."""
    return (
        data.startswith(_MAGIC["PNG"])
        and data[12:16] == _PNG_IHDR
        and len(data) > _PNG_BIT_DEPTH_AT
        and data[_PNG_BIT_DEPTH_AT] == 16
    )


def _wide_png_rgb(image: Image.Image) -> Image.Image | None:
    """A 16-bit PNG as 8-bit RGB scaled by the bits its samples use (a camera's 12 bits in a
    16-bit PNG are as dark to a decoder as in a TIFF: see :func:`_wide_tiff_rgb`). Pillow
    reads 16-bit grey at full depth but keeps only the high byte of 16-bit RGB, which
    imagecodecs (the slides extra) reads whole; without it, Pillow's reading stands (right
    for a full-range file, dark for a narrower one: excluded with a reason naming this)."""
    if getattr(image, "fp", None) is None:  # made in memory, or its file already closed
        return None
    image.fp.seek(0)
    if not sixteen_bit_png(image.fp.read(_PNG_BIT_DEPTH_AT + 1)):
        return None
    if image.mode.startswith("I"):  # grey: Pillow's "I;16" (or "I") holds every bit
        samples = np.asarray(image).astype(np.uint16)  # a PNG's samples fit 16 bits
    else:
        try:
            import imagecodecs

            image.fp.seek(0)
            samples = imagecodecs.png_decode(image.fp.read())
        except Exception:  # noqa: BLE001 - not installed, or a file it refuses
            return None
    samples = samples[..., np.newaxis] if samples.ndim == 2 else samples
    return _upright_eight_bit(samples, image.getexif().get(EXIF_ORIENTATION, 1))


def _wide_tiff_rgb(image: Image.Image) -> Image.Image | None:
    """A TIFF of 16-bit integer samples (RGB, RGBA or greyscale) as 8-bit RGB scaled by the
    bits its samples use, upright (Pillow applies a TIFF's orientation when it loads one);
    None for any other image, or without tifffile (the client extra), or where tifffile
    cannot read it (LZW and JPEG compression need imagecodecs, the slides extra): Pillow's
    conversion stands then, right for a full-range file, dark for a camera's narrower one
    (excluded with a reason that names this).

    Why: microscope cameras write their 10-, 12- or 14-bit samples unscaled into 16-bit
    TIFFs, and Pillow keeps the high byte of each (grey levels 0-15 for 12 bits: a black
    field, excluded as far too dark) and clips 16-bit greyscale. The bits used are those of
    the largest sample: a bright-field smear's glass is its brightest part and lies near
    its camera's top level, so 4,095 at most is a 12-bit camera. A full-range file keeps its
    high byte, as Pillow gives it."""
    if image.format != "TIFF" or not _sixteen_bit_integer(image.tag_v2):
        return None
    try:
        import tifffile
    except ImportError:
        return None
    try:
        image.fp.seek(0)  # tifffile reads the file Pillow opened, from its start, in place
        with tifffile.TiffFile(image.fp) as tiff:
            page = tiff.pages[0]
            samples = page.asarray()
            separate = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
    except Exception:  # noqa: BLE001 - a codec tifffile lacks: Pillow's reading stands
        return None
    if separate and samples.ndim == 3:
        samples = np.moveaxis(samples, 0, -1)
    if samples.ndim == 2:
        samples = samples[..., None]
    orientation = image.tag_v2.get(EXIF_ORIENTATION, 1)
    stored = (image.width, image.height)  # Pillow gives the upright size
    if orientation not in TRANSPOSED_ORIENTATIONS:
        stored = stored[::-1]
    if samples.shape[:2] != stored or samples.shape[2] not in (1, 2, 3, 4):
        return None
    return _upright_eight_bit(samples, orientation)


def _upright_eight_bit(samples: np.ndarray, orientation: int) -> Image.Image:
    """A file's wide samples (H x W x C) as the 8-bit RGB image :func:`upright_rgb` gives,
    turned by the file's orientation as Pillow turns an image it decodes itself."""
    from PIL import Image as PilImage
    from PIL import ImageOps

    wide = PilImage.fromarray(eight_bit_rgb(samples))
    wide.getexif()[EXIF_ORIENTATION] = orientation
    return ImageOps.exif_transpose(wide)


def array_rgb(array: np.ndarray) -> np.ndarray:
    """An image a program holds decoded, as 8-bit RGB: height x width x 3 (x 4 RGBA, x 1 or
    no third axis greyscale), uint8, or uint16 scaled as a camera's TIFF is
    (:func:`eight_bit_rgb`). Raises ImageRejected naming what is wrong: a float image's
    scale (0-1 or 0-255) and a channels-first array's layout are not ours to guess."""
    shape = "x".join(map(str, array.shape))
    samples = array[..., np.newaxis] if array.ndim == 2 else array
    if samples.ndim != 3 or samples.shape[2] not in (1, 2, 3, 4):
        raise ImageRejected(
            f"array of shape {shape}: give height x width x 3 (RGB; x 4 RGBA, or height x "
            "width greyscale), channels last"
        )
    if samples.dtype not in (np.uint8, np.uint16):
        raise ImageRejected(
            f"array of dtype {samples.dtype}: give uint8 samples (0-255) or a camera's uint16 "
            "ones; a float image's scale is not known"
        )
    return eight_bit_rgb(samples)


def pillow_rgb(image: Image.Image) -> np.ndarray:
    """An image a program holds as a Pillow image, as :func:`array_rgb` gives an array: its
    EXIF orientation applied (as for its file), 16-bit grey scaled by the bits it uses,
    other modes (palette, CMYK, 1-bit) through Pillow's RGB. A float image ("F") is refused:
    its scale is not known."""
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(image)
    if upright.mode == "F":
        raise ImageRejected("Pillow image of mode F (float): its scale is not known")
    if upright.mode.startswith("I"):  # 16-bit grey ("I;16") or 32-bit integer ("I")
        samples = np.asarray(upright)
        if samples.min(initial=0) < 0 or samples.max(initial=0) > np.iinfo(np.uint16).max:
            raise ImageRejected("Pillow image of mode I with samples beyond 16 bits")
        return array_rgb(samples.astype(np.uint16))
    kept = upright if upright.mode in ("RGB", "RGBA", "L", "LA") else upright.convert("RGB")
    return array_rgb(np.asarray(kept))


def field_region(pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1) of an RGB image without its frame: camera black (rows and
    columns of which at most ``MAX_FRAME_LIT_SHARE`` is lit, some channel at
    ``config.CAMERA_BLACK_LEVEL`` or above), or a light one (white or light grey: a page, a
    viewer's background) around a field that meets it along straight edges and shows almost
    none of its colour (``MIN_EDGE_CONTENT``, ``MAX_FRAME_COLOUR_INSIDE``). None when there
    is no such frame to take off: none, one under ``MIN_FRAME_AREA``, or nothing but it.

    Why: a photograph taken at the eyepiece holds its field in a black frame. The red-cell
    estimate took the frame for the densest stain and the field inside it for one hole,
    filled to a single "red cell" the field's size (estimates at a twentieth of the
    spacing), and the mirror padding of a small image repeated the frame until the field
    sent was mostly black. A field pasted on a page or exported from a viewer on white is
    framed in white, which the models' stain normalisation read as the field's glass: every
    stained pixel looked darker, and red cells were counted as white cells (288 real blood
    fields so framed: 0.5 extra white cells a field). Both read the field without it
    (``spacing``, ``client.fields``; docs/magnification.md, "A black frame" and "A white
    frame")."""
    # the channels' maximum by two elementwise maxima: a tenth of ndarray.max over the
    # channel axis (25 against 210 ms for 12 megapixels)
    brightest = np.maximum(np.maximum(pixels[..., 0], pixels[..., 1]), pixels[..., 2])
    lit = brightest >= config.CAMERA_BLACK_LEVEL
    black_framed = _framed_box(lit)
    frame_coloured = _frame_coloured(pixels)
    if frame_coloured is None:
        return black_framed
    content = lit & ~frame_coloured
    framed = _framed_box(content)
    pasted = None if framed is None else _straight_edged(content, framed)
    if pasted is None or pasted == black_framed:
        return black_framed
    x0, y0, x1, y1 = pasted
    large = (x1 - x0) * (y1 - y0) >= MIN_PASTED_AREA * content.size
    of_frame = frame_coloured[y0:y1, x0:x1].mean()
    return pasted if large and of_frame <= MAX_FRAME_COLOUR_INSIDE else black_framed


def _straight_edged(
    content: np.ndarray, box: tuple[int, int, int, int]
) -> tuple[int, int, int, int] | None:
    """``box`` narrowed, each side by at most ``MAX_EDGE_PEEL`` of its length, until each of
    its outermost rows and columns is at least ``MIN_EDGE_CONTENT`` ``content``; None when
    that takes more (no pasted rectangle: cells on even glass)."""
    x0, y0, x1, y1 = box
    peel_x, peel_y = MAX_EDGE_PEEL * (x1 - x0), MAX_EDGE_PEEL * (y1 - y0)
    left, top, right, bottom = x0, y0, x1, y1
    while True:
        if content[top:bottom, left].mean() < MIN_EDGE_CONTENT and left - x0 < peel_x:
            left += 1
        elif content[top:bottom, right - 1].mean() < MIN_EDGE_CONTENT and x1 - right < peel_x:
            right -= 1
        elif content[top, left:right].mean() < MIN_EDGE_CONTENT and top - y0 < peel_y:
            top += 1
        elif content[bottom - 1, left:right].mean() < MIN_EDGE_CONTENT and y1 - bottom < peel_y:
            bottom -= 1
        else:
            break
    edges = (content[top, left:right], content[bottom - 1, left:right])
    edges += (content[top:bottom, left], content[top:bottom, right - 1])
    if min(edge.mean() for edge in edges) < MIN_EDGE_CONTENT:
        return None
    return left, top, right, bottom


def _frame_coloured(pixels: np.ndarray) -> np.ndarray | None:
    """The pixels of the colour of a light frame (within ``FRAME_COLOUR_TOLERANCE`` in every
    channel of the median of the image's outermost rows and columns), when that colour is
    light (``MIN_FRAME_GREY`` in every channel); None otherwise."""
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colour = np.median(ring, axis=0)
    if colour.min() < MIN_FRAME_GREY:
        return None
    off = np.abs(pixels.astype(np.int16) - colour.astype(np.int16))
    return np.maximum(np.maximum(off[..., 0], off[..., 1]), off[..., 2]) <= FRAME_COLOUR_TOLERANCE


def _framed_box(content: np.ndarray) -> tuple[int, int, int, int] | None:
    """The box of the rows and columns of which more than ``MAX_FRAME_LIT_SHARE`` is
    ``content``; None when what lies outside it is under ``MIN_FRAME_AREA`` of the image or
    when nothing, or a sliver narrower than any image, is left."""
    height, width = content.shape
    rows = np.flatnonzero(np.count_nonzero(content, axis=1) > MAX_FRAME_LIT_SHARE * width)
    cols = np.flatnonzero(np.count_nonzero(content, axis=0) > MAX_FRAME_LIT_SHARE * height)
    if not rows.size or not cols.size:
        return None
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    side_x, side_y = box[2] - box[0], box[3] - box[1]
    if side_x * side_y > (1.0 - MIN_FRAME_AREA) * width * height:
        return None
    return None if min(side_x, side_y) < config.MIN_IMAGE_SIDE else box


def transparent_share(data: bytes) -> float:
    """The share of an encoded image's pixels that are not fully opaque (alpha under 255, or
    a palette's or greyscale's transparent entry); 0.0 for an image without transparency,
    which is not decoded. Why: a microscope camera writes no alpha, and what lies under a
    transparent pixel is no image (the server's decoder and :func:`upright_rgb` drop the
    alpha and read whatever colour is stored there)."""
    with open_image(data) as image:
        if not image.has_transparency_data:
            return 0.0
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
    return float((alpha < 255).mean())


#: Side of the copy :func:`pink_or_purple_share` and :func:`light_level` read: shares of
#: colours and a light level need few pixels.
HUE_SIDE = 64


def pink_or_purple_share(data: bytes) -> tuple[float, int]:
    """The share of an encoded image's coloured stained pixels that are pink to purple (green
    their weakest channel once white-balanced), and how many coloured stained pixels there
    are, on a copy at most ``HUE_SIDE`` pixels a side. White: the brightest of an 8 x 8
    grid's means per channel; stained and coloured as the preprocessing graph's
    ``stain_colour`` takes them (``QualitySpec.stained_below_background``,
    ``coloured_chroma``), on the image rather than its padded field. Why: eosin and the
    azure-eosin complex, which stain a smear's nuclei, platelets and red cells, absorb green
    most; a photograph of skin, wood or coffee, a brown immunohistochemistry stain or a blue
    chart has almost none (docs/field_quality.md)."""
    from marrowdx.preprocess import QualitySpec

    spec = QualitySpec()
    pixels = _small_copy(data)
    balanced = (pixels + 1.0) / (_grid_means(pixels).reshape(-1, 3).max(axis=0) + 1.0)
    darkest = balanced.min(axis=2)
    lit = pixels.max(axis=2) >= config.CAMERA_BLACK_LEVEL
    stained = (darkest < spec.stained_below_background) & lit
    coloured = stained & (balanced.max(axis=2) - darkest >= spec.coloured_chroma)
    green_weakest = balanced[..., 1] <= np.minimum(balanced[..., 0], balanced[..., 2])
    n_coloured = int(coloured.sum())
    return float((coloured & green_weakest).sum() / max(n_coloured, 1)), n_coloured


def light_level(data: bytes) -> float:
    """The grey level of an encoded image's glass: the brightest of an 8 x 8 grid's mean
    grey levels, on a copy at most ``HUE_SIDE`` pixels a side (as
    :func:`pink_or_purple_share` takes its white). Why: the focus measure is a variance of
    grey levels, which a dim camera lowers with the square of its light
    (``client.quality.at_full_light``)."""
    return float(_grid_means(_small_copy(data)).mean(axis=-1).max())


def _small_copy(data: bytes) -> np.ndarray:
    """An encoded image upright, at most ``HUE_SIDE`` pixels a side, as float RGB: shares
    of colours and light levels need few pixels."""
    from PIL import Image as PilImage

    image = upright_rgb(data)
    image.thumbnail((HUE_SIDE, HUE_SIDE), PilImage.Resampling.BILINEAR)
    return np.asarray(image, np.float32)


def _grid_means(pixels: np.ndarray) -> np.ndarray:
    """The mean colour of each cell of a grid about 8 x 8 cells across ``pixels`` (square
    cells, the remainder left out): the brightest cell is the image's glass."""
    height, width = pixels.shape[:2]
    k = max(1, min(height, width) // 8)
    grid = pixels[: height // k * k, : width // k * k]
    return grid.reshape(height // k, k, width // k, k, 3).mean(axis=(1, 3))


def decoded_alpha(image: np.ndarray | Image.Image) -> np.ndarray | None:
    """The 8-bit alpha channel of an image a program holds decoded (an array of 2 or 4
    channels, a uint16 one scaled as :func:`eight_bit_rgb` scales a full-range 16-bit image;
    a Pillow image with transparency), upright as :func:`upright_rgb` gives its colour; None
    without one. So that the PNG the client makes of it keeps what its file would have."""
    from PIL import Image as PilImage
    from PIL import ImageOps

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (2, 4):
            return None
        alpha = image[..., -1]
        return alpha if alpha.dtype == np.uint8 else (alpha >> 8).astype(np.uint8)
    if isinstance(image, PilImage.Image) and image.has_transparency_data:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGBA"))[..., 3]
    return None


def eight_bit_rgb(samples: np.ndarray) -> np.ndarray:
    """H x W x C (C 1-4: grey, grey + alpha, RGB, RGBA) samples of up to 16 bits as 8-bit
    RGB, shifted by the bits the largest colour sample uses (at least 8: an 8-bit image is
    kept as it is, a full-range 16-bit one keeps its high byte); alpha is dropped.

    Why by the bits used: a camera's 10-14-bit samples are stored unscaled in 16 bits, and
    a bright-field smear's glass, its brightest part, lies near its camera's top level."""
    colour = samples[..., :3] if samples.shape[2] >= 3 else samples[..., :1].repeat(3, axis=2)
    if colour.dtype == np.uint8:  # 8 bits used at most: kept as it is
        return np.ascontiguousarray(colour)
    used = max(8, int(colour.max(initial=0)).bit_length())
    return np.ascontiguousarray(colour >> (used - 8)).astype(np.uint8)


def _sixteen_bit_integer(tags) -> bool:
    """Whether a TIFF's tags (Pillow's ``tag_v2``) declare 16-bit unsigned integer samples
    that read as an image (black is zero: RGB or greyscale)."""
    bits = tags.get(_BITS_PER_SAMPLE)
    bits = bits if isinstance(bits, tuple) else (bits,)
    fmt = tags.get(_SAMPLE_FORMAT, 1)
    fmt = fmt if isinstance(fmt, tuple) else (fmt,)
    return (
        bool(bits)
        and all(b == 16 for b in bits)
        and all(f == 1 for f in fmt)
        and tags.get(_PHOTOMETRIC) in (_MIN_IS_BLACK, _RGB)
    )


def sniff_format(data: bytes) -> str | None:
    """The accepted format whose magic bytes start ``data``, else None."""
    for name, magics in _MAGIC.items():
        if any(data.startswith(m) for m in magics):
            return name
    return None


def client_decoded(data: bytes) -> bool:
    """Whether ``data`` starts like a TIFF, BMP, WebP or HEIF file, or a 16-bit PNG, which
    the client decodes itself."""
    # WebP: a RIFF container, its form type after the 4-byte size
    webp = data.startswith(b"RIFF") and data[8:12] == b"WEBP"
    heif = data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS
    return webp or heif or data.startswith(_CLIENT_DECODED_MAGIC) or sixteen_bit_png(data)


def open_image(source: bytes | str | Path | BinaryIO) -> Image.Image:
    """``PIL.Image.open`` of an input image (encoded bytes, a path or a file), with every
    format the client decodes registered: Pillow's own, and HEIF where pillow-heif (the
    client extra) is installed. Why one function: the client, the spacing estimate and the
    data-set readers must read the same files."""
    from PIL import Image

    _register_heif()
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    return Image.open(source)


@functools.cache
def _register_heif() -> bool:
    """Pillow's HEIF opener, registered once per process; False without pillow-heif (a HEIF
    file is then an image format Pillow cannot open, reported as such)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


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
    check_integrity(data, fmt)
    return ImageHeader(format=fmt, width=width, height=height, mode=mode)


# ------------------------------------------------------------------ compressed-data integrity
_PNG_SIGNATURE_LEN = 8
_JPEG_EOI = b"\xff\xd9"
#: Bytes that may follow 0xFF inside JPEG entropy-coded data: stuffing (00), restart markers
#: (D0-D7), fill bytes (FF), and the markers that may end a scan or separate scans.
_JPEG_SCAN_OK = np.array(
    [0x00, 0xFF, *range(0xD0, 0xD8), 0xD9, 0xDA, 0xC4, 0xDB, 0xDD, *range(0xE0, 0xF0), 0xFE],
    np.uint8,
)


def _damaged(fmt: str, detail: str) -> ImageRejected:
    """The rejection of damaged data; worded like DALI's own decode failures
    (``guarded_preprocess.dali_error_reason``), so a client sees one kind of message."""
    return ImageRejected(f"image could not be decoded (corrupt {fmt} data): {detail}")


def check_integrity(data: bytes, fmt: str, *, strict_decode: bool = True) -> None:
    """Raise :class:`ImageRejected` if the compressed stream is damaged (truncated, a
    failed checksum, a marker where none may be, or, with ``strict_decode``, a decoder
    warning about corrupt data). The client runs it without ``strict_decode`` before
    sending (the structural part, under a millisecond), so the gpu target, whose DALI
    backend has no Python hook, never counts a truncated or checksum-failing field either."""
    if fmt == "PNG":
        check_png_integrity(data)
    elif fmt == "JPEG":
        check_jpeg_integrity(data, strict_decode=strict_decode)


def check_png_integrity(data: bytes) -> None:
    """Every chunk's CRC-32 matches and the stream ends with IEND."""
    pos, n = _PNG_SIGNATURE_LEN, len(data)
    seen_idat = False
    while True:
        if pos + 12 > n:
            raise _damaged("PNG", f"truncated after {pos} of {n} bytes (no IEND chunk)")
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            raise _damaged("PNG", f"truncated inside chunk {kind!r} ({n} bytes, chunk needs {end})")
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise _damaged("PNG", f"CRC mismatch in chunk {kind!r} at byte {pos}")
        seen_idat |= kind == b"IDAT"
        if kind == b"IEND":
            if not seen_idat:
                raise _damaged("PNG", "no image data (IDAT) before IEND")
            return
        pos = end


def check_jpeg_integrity(data: bytes, *, strict_decode: bool = True) -> None:
    """End-of-image marker present, no stray marker inside the scans, and (with simplejpeg)
    no libjpeg warning during a strict 1/8-scale decode."""
    body = data.rstrip(b"\x00")  # zero padding after EOI is harmless (some cameras write it)
    if not body.endswith(_JPEG_EOI):
        raise _damaged("JPEG", f"truncated ({len(data)} bytes, no end-of-image marker)")
    sos = body.find(b"\xff\xda")
    if sos < 0:
        raise _damaged("JPEG", "no start-of-scan marker")
    scan = np.frombuffer(body, np.uint8, count=len(body) - sos - 2, offset=sos + 2)
    ff = np.flatnonzero(scan[:-1] == 0xFF)
    if len(ff):
        follow = scan[ff + 1]
        bad = ~np.isin(follow, _JPEG_SCAN_OK)
        if bad.any():
            where = sos + 2 + int(ff[np.argmax(bad)])
            marker = int(follow[np.argmax(bad)])
            raise _damaged("JPEG", f"marker 0xFF{marker:02X} inside the scan at byte {where}")
    if strict_decode:
        _strict_jpeg_decode(data)


def _strict_jpeg_decode(data: bytes) -> None:
    try:
        import simplejpeg
    except ImportError:  # the thin client installs without it: structural checks only
        return
    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, min_height=1, min_width=1)
    except ValueError as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "decoder error"
        if "unsupported color conversion" in text.lower():  # CMYK/YCCK: DALI converts these
            return
        raise _damaged("JPEG", f"the decoder reports: {text}") from None
