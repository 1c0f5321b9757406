"""The bad-input corpus: malformed and odd images, generated in memory by the tests.

Why generated and not checked in: every entry is a few lines of Pillow/numpy/zlib, the
limits it probes (bytes, pixels, smallest side) come from the server's configuration, and
binary fixtures would hide what each one is. Each entry says what the server must do with
it: ``ok-rgb`` (a valid but odd image that is converted to RGB and processed, with the
original size the server must report) or ``error`` (refused with a per-image error whose
message contains one of ``error_substrings``, case-insensitive).

``tensor_cases`` lists requests that are wrong at the tensor level (dtype, shape, names),
sent with raw ``tritonclient``; Triton itself or the model must refuse them.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from marrowdx import config

OK = "ok-rgb"
ERROR = "error"

#: Side of the ordinary small test images (big enough for the MIN_IMAGE_SIDE check).
SMALL_SIDE = 64
#: Declared side of the header-only decompression bombs (tens of thousands per side).
BOMB_SIDE = 50_000
#: Declared side of the complete 1-bit PNG bomb: ~110 kB on disk, 2.7 GB as decoded RGB.
COMPLETE_BOMB_SIDE = 30_000
#: A real, large image that stays inside the default pixel limit (24 megapixels).
HUGE_OK_SIZE = (6000, 4000)  # width, height
#: Seed of every random image, so a failure reproduces byte for byte.
SEED = 20251022

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class BadInput:
    """One corpus entry: its bytes and what the server must do with them."""

    name: str
    data: bytes
    expect: str  # OK or ERROR
    #: For ERROR: the message must contain one of these (lower-case) substrings.
    error_substrings: tuple[str, ...] = ()
    #: For OK: the (height, width) the server must report in IMAGE_SIZE (after EXIF rotation).
    size: tuple[int, int] | None = None
    #: A file extension the patient-folder test gives it (what a lab export might use).
    suffix: str = ".jpg"
    why: str = ""


@dataclass(frozen=True)
class TensorCase:
    """A request that is wrong at the tensor level, sent with raw tritonclient."""

    name: str
    model: str
    #: (input name, array, Triton datatype) triples.
    inputs: tuple[tuple[str, np.ndarray, str], ...] = field(default_factory=tuple)
    error_substrings: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- encoders
def _rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def _smear_like(width: int, height: int, channels: int = 3) -> np.ndarray:
    """A smooth, cell-free but non-constant uint8 image (compresses well, decodes fast)."""
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    planes = [(x * (0.3 + 0.2 * c) + y * (0.7 - 0.2 * c)) % 256 for c in range(channels)]
    return np.stack(planes, axis=-1).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def jpeg_bytes(width: int = SMALL_SIDE, height: int = SMALL_SIDE, **params: object) -> bytes:
    return _encode(Image.fromarray(_smear_like(width, height)), "JPEG", quality=90, **params)


def png_bytes(width: int = SMALL_SIDE, height: int = SMALL_SIDE) -> bytes:
    return _encode(Image.fromarray(_smear_like(width, height)), "PNG")


def _first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def bit_flipped(data: bytes, n_bits: int = 8, start: float = 0.4, seed: int = SEED) -> bytes:
    """``data`` with ``n_bits`` single-bit errors in its last ``1 - start`` (the compressed
    pixel data, past the headers), as a bad disk, cable or upload would leave it."""
    out = bytearray(data)
    rng = np.random.default_rng(seed)
    for pos in rng.integers(int(len(data) * start), len(data) - 4, n_bits):
        out[int(pos)] ^= 1 << int(rng.integers(8))
    return bytes(out)


def png_without_iend(data: bytes) -> bytes:
    """A PNG cut right before its IEND chunk: all pixel data present, the end missing."""
    return data[: data.rindex(b"IEND") - 4]


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def _ihdr(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))


def png_from_rows(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written chunk by chunk: Pillow cannot write 16-bit RGB, nor lie about sizes."""
    return (
        PNG_SIGNATURE
        + _ihdr(width, height, bit_depth, color_type)
        + _chunk(b"IDAT", zlib.compress(rows, 6))
        + _chunk(b"IEND", b"")
    )


def png16_rgb_bytes(width: int = SMALL_SIDE, height: int = SMALL_SIDE) -> bytes:
    img = _smear_like(width, height).astype(">u2") * 257  # full 16-bit range
    rows = b"".join(b"\x00" + img[r].tobytes() for r in range(height))
    return png_from_rows(width, height, 16, 2, rows)


def png_header_bomb(side: int = BOMB_SIDE) -> bytes:
    """Declares side x side RGB pixels but carries a few hundred bytes."""
    rows = b"\x00" * ((1 + 3 * side) * 4)  # four rows of data, the rest missing
    return png_from_rows(side, side, 8, 2, rows)


def png_complete_bomb(side: int = COMPLETE_BOMB_SIDE) -> bytes:
    """A *complete, valid* 1-bit PNG of side x side zeros: ~100 kB that decodes to gigabytes."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(comp.compress(row * (side % 1000)))
    parts.append(comp.flush())
    return (
        PNG_SIGNATURE
        + _ihdr(side, side, 1, 0)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


def jpeg_with_declared_size(width: int, height: int) -> bytes:
    """A real baseline JPEG whose SOF0 header is patched to declare another size."""
    data = bytearray(jpeg_bytes())
    sof = data.find(b"\xff\xc0")
    assert sof > 0, "Pillow wrote no baseline SOF0 marker"
    # SOF0: marker(2) length(2) precision(1) height(2) width(2)
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def exif_rotated_jpeg(width: int = 96, height: int = 48, orientation: int = 6) -> bytes:
    """Stored as width x height, displayed rotated 90 degrees (EXIF orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(
        Image.fromarray(_smear_like(width, height)), "JPEG", quality=90, exif=exif.tobytes()
    )


def cmyk_jpeg(width: int = SMALL_SIDE, height: int = SMALL_SIDE) -> bytes:
    return _encode(Image.fromarray(_smear_like(width, height)).convert("CMYK"), "JPEG", quality=90)


def flat_jpeg(width: int, height: int) -> bytes:
    """A real, huge, quickly encoded JPEG (one colour compresses to almost nothing)."""
    return _encode(Image.new("RGB", (width, height), (200, 150, 190)), "JPEG", quality=75)


def huge_jpeg(width: int, height: int) -> bytes:
    return _encode(Image.fromarray(_smear_like(width, height)), "JPEG", quality=80)


# ------------------------------------------------------------------------------- corpus
def corpus(
    *,
    max_bytes: int = config.MAX_IMAGE_BYTES,
    max_pixels: int = config.MAX_IMAGE_PIXELS,
    min_side: int = config.MIN_IMAGE_SIDE,
    include_heavy: bool = True,
) -> list[BadInput]:
    """Every entry, built against the given limits (the server's configuration).

    ``include_heavy`` adds the entries that cost real CPU/memory to build or send (an image
    just over the byte limit, a real image just over the pixel limit, a 24-megapixel image).
    """
    s = SMALL_SIDE
    good_jpeg, good_png = jpeg_bytes(), png_bytes()
    gray = Image.fromarray(_smear_like(s, s, 1)[..., 0])
    rgb = Image.fromarray(_smear_like(s, s))
    rgba = Image.fromarray(np.dstack([_smear_like(s, s), np.full((s, s), 128, np.uint8)]))
    noise = _rng().integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    over_side = int(np.sqrt(max_pixels)) + 1
    entries = [
        # --- valid but odd: converted to RGB and processed
        BadInput("rgb_jpeg", good_jpeg, OK, size=(s, s), why="the control"),
        BadInput("rgb_png", good_png, OK, size=(s, s), suffix=".png"),
        BadInput(
            "png_named_jpg", good_png, OK, size=(s, s), suffix=".jpg", why="format by content"
        ),
        BadInput("progressive_jpeg", jpeg_bytes(progressive=True), OK, size=(s, s)),
        BadInput("min_side_jpeg", jpeg_bytes(min_side, min_side), OK, size=(min_side, min_side)),
        BadInput(
            "thin_jpeg", jpeg_bytes(1000, min_side), OK, size=(min_side, 1000), why="extreme aspect"
        ),
        BadInput("grayscale_jpeg", _encode(gray, "JPEG"), OK, size=(s, s)),
        BadInput("grayscale_png", _encode(gray, "PNG"), OK, size=(s, s), suffix=".png"),
        BadInput("palette_png", _encode(rgb.convert("P"), "PNG"), OK, size=(s, s), suffix=".png"),
        BadInput("rgba_png", _encode(rgba, "PNG"), OK, size=(s, s), suffix=".png"),
        BadInput("la_png", _encode(rgba.convert("LA"), "PNG"), OK, size=(s, s), suffix=".png"),
        BadInput(
            "gray16_png",
            _encode(Image.fromarray(_smear_like(s, s, 1)[..., 0].astype(np.uint16) * 257), "PNG"),
            OK,
            size=(s, s),
            suffix=".png",
        ),
        BadInput("rgb16_png", png16_rgb_bytes(), OK, size=(s, s), suffix=".png"),
        BadInput("cmyk_jpeg", cmyk_jpeg(), OK, size=(s, s)),
        BadInput(
            "exif_rotated_jpeg",
            exif_rotated_jpeg(96, 48),
            OK,
            size=(96, 48),
            why="displayed 48 wide, 96 high",
        ),
        # --- invalid: a clear per-image error
        BadInput("empty", b"", ERROR, ("empty",)),
        BadInput(
            "one_pixel_png",
            _encode(Image.new("RGB", (1, 1)), "PNG"),
            ERROR,
            ("too small",),
            suffix=".png",
        ),
        BadInput("tiny_jpeg", jpeg_bytes(8, 8), ERROR, ("too small",)),
        BadInput("below_min_side", jpeg_bytes(min_side - 1, 200), ERROR, ("too small",)),
        BadInput("text_as_jpg", b"patient notes, not an image\n" * 20, ERROR, ("not an image",)),
        BadInput("noise_as_png", noise, ERROR, ("not an image",), suffix=".png"),
        BadInput(
            "gif_as_jpg",
            _encode(rgb.convert("P"), "GIF"),
            ERROR,
            ("not an image",),
            why="not JPEG/PNG",
        ),
        BadInput("jpeg_soi_only", b"\xff\xd8\xff", ERROR, ("corrupt", "decode", "truncat")),
        BadInput(
            "png_signature_only",
            PNG_SIGNATURE,
            ERROR,
            ("corrupt", "decode", "truncat"),
            suffix=".png",
        ),
        BadInput(
            "truncated_jpeg",
            _first_half(jpeg_bytes(256, 256)),
            ERROR,
            ("corrupt", "decode", "truncat"),
        ),
        BadInput(
            "truncated_png",
            _first_half(png_bytes(256, 256)),
            ERROR,
            ("corrupt", "decode", "truncat"),
            suffix=".png",
        ),
        # --- damaged compressed data: decoders may still produce pixels
        BadInput(
            "bitflipped_jpeg",
            bit_flipped(jpeg_bytes(256, 256)),
            ERROR,
            ("corrupt",),
            why="8 flipped bits in the scan: libjpeg warns and returns garbled pixels",
        ),
        BadInput(
            "bitflipped_png",
            bit_flipped(png_bytes(256, 256), n_bits=1),
            ERROR,
            ("corrupt",),
            suffix=".png",
            why="one flipped bit: the chunk CRC no longer matches",
        ),
        BadInput(
            "jpeg_without_eoi",
            jpeg_bytes(256, 256)[:-2],
            ERROR,
            ("corrupt", "truncat"),
            why="every scan byte present, only the end-of-image marker missing",
        ),
        BadInput(
            "png_without_iend",
            png_without_iend(png_bytes(256, 256)),
            ERROR,
            ("corrupt", "truncat"),
            suffix=".png",
        ),
        BadInput(
            "jpeg_garbage_after_header",
            jpeg_bytes()[:200] + noise,
            ERROR,
            ("corrupt", "decode", "truncat"),
        ),
        BadInput(
            "png_header_bomb",
            png_header_bomb(),
            ERROR,
            ("too large",),
            suffix=".png",
            why="declares 50000x50000 RGB in a few hundred bytes",
        ),
        BadInput(
            "png_complete_bomb",
            png_complete_bomb(),
            ERROR,
            ("too large",),
            suffix=".png",
            why="a complete 1-bit PNG, ~100 kB, 2.7 GB decoded",
        ),
        BadInput(
            "png_complete_bomb_over_limit",
            png_complete_bomb(over_side),
            ERROR,
            ("too large",),
            suffix=".png",
            why="complete, valid, and within Pillow's own bomb limit: only ours refuses it",
        ),
        BadInput(
            "jpeg_header_bomb", jpeg_with_declared_size(60_000, 60_000), ERROR, ("too large",)
        ),
        BadInput(
            "just_over_pixel_limit_header",
            jpeg_with_declared_size(over_side, over_side),
            ERROR,
            ("too large",),
        ),
    ]
    if include_heavy:
        w, h = HUGE_OK_SIZE
        if w * h <= max_pixels:
            entries.append(
                BadInput(
                    "huge_real_jpeg", huge_jpeg(w, h), OK, size=(h, w), why="a real 24 MP image"
                )
            )
        entries.append(
            BadInput(
                "real_jpeg_over_pixel_limit",
                flat_jpeg(over_side, over_side),
                ERROR,
                ("too large",),
                why="a real image one pixel-row over the limit",
            )
        )
        entries.append(
            BadInput(
                "over_byte_limit",
                good_jpeg + b"\x00" * (max_bytes + 1 - len(good_jpeg)),
                ERROR,
                ("too large",),
                why="a valid JPEG padded past the byte limit",
            )
        )
    names = [e.name for e in entries]
    assert len(names) == len(set(names)), "corpus names must be unique"
    return entries


def by_name(entries: list[BadInput]) -> dict[str, BadInput]:
    return {e.name: e for e in entries}


# ------------------------------------------------------------------------- tensor cases
def tensor_cases() -> Iterator[TensorCase]:
    """Requests with wrong dtypes, shapes and names (what a buggy custom client might send)."""
    t = config.TENSORS
    m = config.MODELS
    jpeg = np.frombuffer(jpeg_bytes(), dtype=np.uint8)[None, :]
    yield TensorCase(
        "image_as_fp32",
        m.pipeline,
        ((t.image, jpeg.astype(np.float32), "FP32"),),
        ("data-type", "datatype", "dtype"),
    )
    yield TensorCase(
        "image_as_int8",
        m.pipeline,
        ((t.image, jpeg.astype(np.int8), "INT8"),),
        ("data-type", "datatype", "dtype"),
    )
    yield TensorCase(
        "image_as_bytes",
        m.pipeline,
        ((t.image, np.array([[jpeg.tobytes()]], dtype=np.object_), "BYTES"),),
        ("data-type", "datatype", "dtype"),
    )
    yield TensorCase(
        "image_3d", m.pipeline, ((t.image, jpeg.reshape(1, 1, -1), "UINT8"),), ("shape", "dims")
    )
    yield TensorCase(
        "image_wrong_name", m.pipeline, (("PICTURE", jpeg, "UINT8"),), ("picture", "input")
    )
    yield TensorCase(
        "image_zero_length",
        m.pipeline,
        ((t.image, np.zeros((1, 0), np.uint8), "UINT8"),),
        ("empty", "0 bytes", "shape"),
    )
    yield TensorCase(
        "pixels_wrong_shape",
        m.detector,
        ((t.pixels, np.zeros((1, 3, 100, 100), np.uint8), "UINT8"),),
        ("shape", "dims"),
    )
    yield TensorCase(
        "pixels_wrong_dtype",
        m.detector,
        ((t.pixels, np.zeros((1, 3, config.INPUT_SIZE, config.INPUT_SIZE), np.float16), "FP16"),),
        ("data-type", "datatype", "dtype"),
    )
    n = config.N_CLASSES
    fractions = np.full((1, n), 1.0 / n, np.float32)
    good_diag = (
        (t.total_cells, np.array([[100.0]], np.float32), "FP32"),
        (t.lab_values, np.zeros((1, config.N_LAB_VALUES), np.float32), "FP32"),
        (t.lab_mask, np.zeros((1, config.N_LAB_VALUES), np.float32), "FP32"),
    )
    yield TensorCase(
        "fractions_wrong_length",
        m.diagnosis,
        ((t.fractions, fractions[:, :-1].copy(), "FP32"),) + good_diag,
        ("shape", "dims"),
    )
    yield TensorCase(
        "fractions_as_int32",
        m.diagnosis,
        ((t.fractions, fractions.astype(np.int32), "INT32"),) + good_diag,
        ("data-type", "datatype", "dtype"),
    )
    yield TensorCase(
        "diagnosis_missing_input",
        m.diagnosis,
        ((t.fractions, fractions, "FP32"),) + good_diag[:1],
        ("expected", "input", "missing"),
    )


def reference_rgb(data: bytes) -> np.ndarray:
    """What the server must decode ``data`` to: Pillow's displayed image as 8-bit RGB.

    EXIF orientation applied; 16-bit samples scaled to 8 bits (Pillow's own 16-bit to RGB
    conversion clips instead of scaling, which is not what a viewer shows).
    """
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16") or img.mode == "I":
            gray = (np.asarray(img).astype(np.uint32) // 257).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=-1)
        return np.asarray(img.convert("RGB"))


def png_of(rgb: np.ndarray) -> bytes:
    """Lossless encoding of a reference image, to send beside the odd original."""
    return _encode(Image.fromarray(rgb), "PNG")
