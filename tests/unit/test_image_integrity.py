"""Damaged compressed data is never counted: truncated and bit-flipped JPEG/PNG are
refused before DALI with a reason naming the damage, even where DALI itself would still
produce (garbled) pixels; intact images of every accepted kind still pass."""

from __future__ import annotations

import pytest

from marrowdx import image_checks as ic
from tests.helpers.bad_inputs import (
    ERROR,
    OK,
    bit_flipped,
    by_name,
    corpus,
    jpeg_bytes,
    png_bytes,
    png_without_iend,
)

ENTRIES = corpus(include_heavy=False)
DAMAGED = ("bitflipped_jpeg", "bitflipped_png", "jpeg_without_eoi", "png_without_iend")


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_header_and_integrity_checks_follow_the_corpus(entry) -> None:
    if entry.expect == OK:
        ic.check_encoded_image(entry.data)
    else:
        assert entry.expect == ERROR
        with pytest.raises(ic.ImageRejected) as err:
            ic.check_encoded_image(entry.data)
        assert any(s in str(err.value).lower() for s in entry.error_substrings), str(err.value)


def test_bitflipped_jpeg_would_decode_silently_without_the_check() -> None:
    """Why the strict check exists: DALI returns pixels for this stream."""
    pytest.importorskip("nvidia.dali", reason="DALI (server extra) not installed")
    pytest.importorskip("simplejpeg", reason="simplejpeg (server extra) not installed")
    from marrowdx.preprocess import CpuPreprocessor

    data = by_name(ENTRIES)["bitflipped_jpeg"].data
    pixels, *_ = CpuPreprocessor(max_batch_size=1)([data])
    assert pixels.shape[0] == 1
    with pytest.raises(ic.ImageRejected, match="decoder reports"):
        ic.check_jpeg_integrity(data)


@pytest.mark.parametrize("name", DAMAGED)
def test_guarded_preprocessor_rejects_damaged_data_and_keeps_neighbours(name: str) -> None:
    pytest.importorskip("nvidia.dali", reason="DALI (server extra) not installed")
    from marrowdx.serving.guarded_preprocess import GuardedPreprocessor, Preprocessed, Rejected

    good = jpeg_bytes(128, 128)
    out = GuardedPreprocessor(max_batch_size=4)([good, by_name(ENTRIES)[name].data, good])
    assert isinstance(out[0], Preprocessed) and isinstance(out[2], Preprocessed)
    assert isinstance(out[1], Rejected) and "corrupt" in out[1].reason


def test_png_checks_name_the_damage() -> None:
    png = png_bytes(128, 128)
    ic.check_png_integrity(png)
    with pytest.raises(ic.ImageRejected, match="CRC mismatch in chunk b'IDAT'"):
        ic.check_png_integrity(bit_flipped(png, n_bits=1, start=0.6))
    with pytest.raises(ic.ImageRejected, match="no IEND"):
        ic.check_png_integrity(png_without_iend(png))
    with pytest.raises(ic.ImageRejected, match="truncated inside chunk"):
        ic.check_png_integrity(png[: len(png) - 40])


def test_jpeg_checks_name_the_damage() -> None:
    jpg = jpeg_bytes(128, 128)
    ic.check_jpeg_integrity(jpg)
    ic.check_jpeg_integrity(jpg + b"\x00" * 64)  # zero padding after EOI is harmless
    with pytest.raises(ic.ImageRejected, match="no end-of-image marker"):
        ic.check_jpeg_integrity(jpg[:-100])
    sos = jpg.index(b"\xff\xda")
    stray = jpg[: sos + 40] + b"\xff\xc0" + jpg[sos + 42 :]  # a frame marker inside the scan
    with pytest.raises(ic.ImageRejected, match="inside the scan"):
        ic.check_jpeg_integrity(stray)


@pytest.mark.parametrize("name", DAMAGED[1:])
def test_client_never_sends_structurally_damaged_data(name: str) -> None:
    """Both targets: the client refuses truncated / CRC-failing data before sending (the gpu
    target's DALI backend has no Python hook for the server-side checks)."""
    from marrowdx.client.async_client import read_image
    from marrowdx.client.transport import RequestFailed

    with pytest.raises(RequestFailed, match="corrupt"):
        read_image(by_name(ENTRIES)[name].data)
    assert read_image(jpeg_bytes(64, 64))  # intact data passes
