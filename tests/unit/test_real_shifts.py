"""Real images under other labs' shifts (``evaluate --data DIR --shifts``): one draw per
image, the same on every run, the image's size kept, the blur set in µm, copies cached."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from marrowdx.errors import InputError
from marrowdx.simulate.lab_variation import LabShift
from marrowdx.training.real_shifts import STAMP, image_rng, shifted_copies

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "real" / "matek_bm_crops"


def _crops() -> list[Path]:
    return sorted(SAMPLES.glob("*/*.jpg"))


def _sharpness(data: bytes) -> float:
    grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float64)
    return float(np.var(np.diff(grey, 2, axis=0)) + np.var(np.diff(grey, 2, axis=1)))


def test_copies_keep_size_and_are_drawn_per_image_the_same_on_every_run(tmp_path: Path) -> None:
    crops = _crops()
    first = shifted_copies(crops, SAMPLES, [0.1] * len(crops), "mixed", 1.0, tmp_path / "a")
    again = shifted_copies(crops, SAMPLES, [0.1] * len(crops), "mixed", 1.0, tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    for src, copy in zip(crops, first, strict=True):
        assert (
            copy.relative_to(tmp_path / "a")
            .as_posix()
            .startswith(src.relative_to(SAMPLES).as_posix())
        )
        assert Image.open(copy).size == Image.open(src).size
    # the images are shifted, each by its own draw (not all alike, none unchanged)
    changed = [
        not np.array_equal(np.asarray(Image.open(s).convert("RGB")), np.asarray(Image.open(c)))
        for s, c in zip(crops, first, strict=True)
    ]
    assert all(changed)
    keys = [p.relative_to(SAMPLES).as_posix() for p in crops]
    draws = {LabShift.draw("mixed", 1.0, image_rng(key, "mixed")) for key in keys}
    assert len(draws) > 1


def test_jpeg_shift_writes_jpeg_and_others_lossless_png(tmp_path: Path) -> None:
    crops = _crops()[:2]
    jpeg = shifted_copies(crops, SAMPLES, [0.1, 0.1], "jpeg", 1.0, tmp_path / "j")
    stain = shifted_copies(crops, SAMPLES, [0.1, 0.1], "stain", 1.0, tmp_path / "s")
    assert {Image.open(p).format for p in jpeg} == {"JPEG"}
    assert {Image.open(p).format for p in stain} == {"PNG"}


def test_blur_is_set_in_micrometres_from_the_spacing() -> None:
    rgb = np.asarray(Image.open(_crops()[0]).convert("RGB"))
    shift = LabShift(kind="defocus", blur_sigma=2.0)
    rng = np.random.default_rng(0)

    def encoded(um: float | None) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(shift.apply(rgb, rng, um_per_pixel=um)).save(buf, format="PNG")
        return buf.getvalue()

    # a crop at 0.1 µm/px shows the same µm in 2.5x its pixels: 2.5x the blur in pixels
    fine, model, by_width = encoded(0.1), encoded(0.25), encoded(None)
    assert _sharpness(fine) < _sharpness(model) < _sharpness(by_width)


def test_cached_copies_are_reused_and_a_new_strength_rewrites_them(tmp_path: Path) -> None:
    crops = _crops()[:2]
    out = tmp_path / "c"
    first = shifted_copies(crops, SAMPLES, [0.1, 0.1], "scanner", 1.0, out)
    stamp = (out / STAMP).stat().st_mtime_ns
    assert shifted_copies(crops, SAMPLES, [0.1, 0.1], "scanner", 1.0, out) == first
    assert (out / STAMP).stat().st_mtime_ns == stamp
    before = first[0].read_bytes()
    shifted_copies(crops, SAMPLES, [0.1, 0.1], "scanner", 2.0, out)
    assert first[0].read_bytes() != before
    assert not out.with_name("c.partial").exists()
    # the spacing sets the blur in pixels: a copy made at another spacing is not reused
    blurred = tmp_path / "d"
    fine = shifted_copies(crops, SAMPLES, [0.1, 0.1], "defocus", 1.0, blurred)[0].read_bytes()
    coarse = shifted_copies(crops, SAMPLES, [0.25, 0.25], "defocus", 1.0, blurred)[0]
    assert coarse.read_bytes() != fine


@pytest.mark.parametrize("kind", ["none", "sepia"])
def test_unknown_or_empty_kind_is_refused(kind: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown shift kind"):
        shifted_copies(_crops()[:1], SAMPLES, [0.1], kind, 1.0, tmp_path / "x")
