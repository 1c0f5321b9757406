"""Simulated lab/scanner variation: each shift kind changes the pixels the way its
name says, leaves cells and boxes alone, is deterministic per seed, and is recorded in the
ground truth; an unknown kind or strength is refused with a clear message."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from marrowdx.errors import InputError
from marrowdx.simulate import lab_variation as lv
from marrowdx.simulate import load_ground_truth, simulate_cohort

SIZE = (256, 256)


def _field(seed: int = 0) -> np.ndarray:
    """A small field with sharp stained discs on a pale background (edges for blur tests)."""
    from marrowdx.simulate import field as fl

    rng = np.random.default_rng(seed)
    labels = ["lymphocyte", "myelocytic_blast", "segmented_neutrophil", "thrombocyte"]
    return fl.render_field(labels, SIZE, fl.NEUTRAL_STYLE, rng).image


def _laplacian_var(image: np.ndarray) -> float:
    g = image.astype(np.float64).mean(axis=2)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


@pytest.mark.parametrize("kind", lv.SHIFT_KINDS)
def test_draw_is_deterministic_and_round_trips_to_dict(kind: str) -> None:
    a = lv.LabShift.draw(kind, 1.0, lv.shift_rng(7, 0))
    b = lv.LabShift.draw(kind, 1.0, lv.shift_rng(7, 0))
    c = lv.LabShift.draw(kind, 1.0, lv.shift_rng(7, 1))
    assert a == b
    assert a.kind == kind
    assert a.as_dict()["kind"] == kind
    if kind == "none":
        assert a.is_identity
    else:
        assert not a.is_identity
        assert a != c or kind == "jpeg"  # another slide, another draw (jpeg: few qualities)


def test_identity_and_zero_strength_change_nothing() -> None:
    image = _field()
    rng = np.random.default_rng(0)
    assert np.array_equal(lv.LabShift().apply(image, rng), image)
    assert lv.LabShift.draw("mixed", 0.0, rng).is_identity
    # the stain path itself is exact with unit scales and the original vectors
    same = lv.LabShift(stain_vectors=tuple(map(tuple, lv.STAIN_VECTORS)))
    assert np.abs(same.apply(image, rng).astype(int) - image.astype(int)).max() <= 1


def test_defocus_blurs_and_stronger_blurs_more() -> None:
    image = _field()
    rng = np.random.default_rng(0)
    sharp = _laplacian_var(image)
    # sigma is given at 1024 px width: 4 and 16 are 1 and 4 px on this 256 px field
    mild = _laplacian_var(lv.LabShift(blur_sigma=4.0).apply(image, rng))
    heavy = _laplacian_var(lv.LabShift(blur_sigma=16.0).apply(image, rng))
    assert heavy < mild < sharp * 0.8


def test_stain_shift_changes_colour_not_geometry() -> None:
    image = _field()
    shift = lv.LabShift.draw("stain", 1.0, lv.shift_rng(3, 0))
    out = shift.apply(image, np.random.default_rng(0))
    assert out.shape == image.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - image.astype(int)).mean(axis=(0, 1))
    assert diff.max() > 3.0  # a visible colour change
    # dark (stained) pixels stay the darkest: the shift acts on stain, not on layout
    dark = image.mean(axis=2) < np.percentile(image.mean(axis=2), 5)
    assert out.mean(axis=2)[dark].mean() < out.mean(axis=2)[~dark].mean()


def test_scanner_shift_applies_gamma_gains_and_noise() -> None:
    flat = np.full((64, 64, 3), 128, np.uint8)
    shift = lv.LabShift(gamma=2.0, gains=(1.0, 0.5, 1.0), noise_sigma=5.0)
    out = shift.apply(flat, np.random.default_rng(0)).astype(np.float64)
    expected = 255 * (128 / 255) ** 2.0
    assert abs(out[..., 0].mean() - expected) < 1.5
    assert abs(out[..., 1].mean() - expected * 0.5) < 1.5
    assert 4.0 < out[..., 0].std() < 6.0


def test_light_shift_darkens_one_side_and_the_corners() -> None:
    flat = np.full((100, 200, 3), 200, np.uint8)
    towards_left = lv.LabShift(kind="light", light_slope=0.4, light_angle=np.pi)
    out = towards_left.apply(flat, np.random.default_rng(0)).astype(np.float64)[..., 0]
    assert out[:, :5].mean() < 0.65 * 200 < out[:, -5:].mean()  # 40% lost across the width
    assert np.allclose(out[0], out[-1])  # and nothing up or down
    corners = lv.LabShift(kind="light", vignette=0.2).apply(flat, np.random.default_rng(0))
    centre, corner = float(corners[50, 100, 0]), float(corners[0, 0, 0])
    assert centre == 200 and corner < centre
    drawn = lv.LabShift.draw("light", 1.0, lv.shift_rng(7, 0))
    assert lv.LIGHT_SLOPE[0] <= drawn.light_slope <= lv.LIGHT_SLOPE[1]
    assert lv.VIGNETTE[0] <= drawn.vignette <= lv.VIGNETTE[1]


def test_light_shift_is_set_in_um_when_the_spacing_is_known() -> None:
    """A 25 µm crop sits in one part of a camera field: it sees a tenth of the slope across a
    256 µm field, not all of it."""
    crop = np.full((250, 250, 3), 200, np.uint8)
    shift = lv.LabShift(kind="light", light_slope=0.4)
    across = shift.light_map(250, 250, um_per_pixel=None)
    at_spacing = shift.light_map(250, 250, um_per_pixel=0.1)
    assert across[0, 0] - across[0, -1] > 0.39
    assert 0.03 < at_spacing[0, 0] - at_spacing[0, -1] < 0.05
    assert shift.apply(crop, np.random.default_rng(0), um_per_pixel=0.1).min() > 150


def test_exposure_shift_clips_the_glass_and_the_pale_parts() -> None:
    """Set on the image's own glass: a dim lab's field and a bright one both clip."""
    for glass in (160, 230):
        field = np.full((64, 64, 3), glass, np.uint8)
        field[:16] = int(glass * 0.85)  # a pale red cell
        field[-16:] = int(glass * 0.4)  # a nucleus
        out = lv.LabShift(kind="exposure", exposure=1.3).apply(field, np.random.default_rng(0))
        assert (out[16:-16] == 255).all() and (out[:16] == 255).all()  # 0.85 x 1.3 > 1
        assert abs(float(out[-16:].mean()) - 0.4 * 1.3 * 255) < 2  # the nucleus, brighter
    drawn = lv.LabShift.draw("exposure", 1.0, lv.shift_rng(7, 0))
    assert lv.EXPOSURE_GLASS[0] <= drawn.exposure <= lv.EXPOSURE_GLASS[1]
    assert lv.LabShift.draw("exposure", 0.0, lv.shift_rng(7, 0)).is_identity


def test_jpeg_shift_encodes_at_its_quality() -> None:
    image = _field()
    low = lv.LabShift(jpeg_quality=20).encode(image, "jpg")
    default = lv.LabShift().encode(image, "jpg")
    assert len(low) < len(default)
    decoded = np.asarray(Image.open(io.BytesIO(low)).convert("RGB"))
    assert decoded.shape == image.shape
    # png output is lossless whatever the shift says
    png = lv.LabShift(jpeg_quality=20).encode(image, "png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), image)


@pytest.mark.parametrize(
    ("kind", "strength", "needle"),
    [("blue", 1.0, "unknown shift kind"), ("stain", -1.0, "strength"), ("stain", 9, "strength")],
)
def test_bad_kind_or_strength_is_refused(kind: str, strength: float, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        lv.LabShift.draw(kind, strength, np.random.default_rng(0))


def test_parse_shift_list() -> None:
    assert lv.parse_shift_list("stain, jpeg") == ("stain", "jpeg")
    with pytest.raises(InputError, match="sepia"):
        lv.parse_shift_list("stain,sepia")
    with pytest.raises(InputError):
        lv.parse_shift_list(" , ")


def test_shifted_cohort_keeps_cells_and_records_the_shift(tmp_path: Path) -> None:
    plain = simulate_cohort(tmp_path / "plain", 2, 5, images_per_patient=1, size=SIZE)
    shifted = simulate_cohort(
        tmp_path / "stain", 2, 5, images_per_patient=1, size=SIZE, shift="stain"
    )
    # same cells, boxes and labels: only the pixels differ
    for p, q in zip(plain["patients"], shifted["patients"], strict=True):
        assert p["images"][0]["cells"] == q["images"][0]["cells"]
        assert "lab_shift" not in p
        assert q["lab_shift"]["kind"] == "stain"
    assert "shift" not in plain["simulator"]
    assert shifted["simulator"]["shift"] == "stain"
    a = (tmp_path / "plain" / "P0001" / "img_000.jpg").read_bytes()
    b = (tmp_path / "stain" / "P0001" / "img_000.jpg").read_bytes()
    assert a != b
    assert load_ground_truth(tmp_path / "stain")["patients"][0]["lab_shift"]["kind"] == "stain"
    # deterministic: the same seed gives the same bytes
    again = simulate_cohort(
        tmp_path / "again", 1, 5, images_per_patient=1, size=SIZE, shift="stain"
    )
    assert again["patients"][0]["lab_shift"] == shifted["patients"][0]["lab_shift"]
    assert (tmp_path / "again" / "P0001" / "img_000.jpg").read_bytes() == b


def test_simulate_cli_shift_options(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "marrowdx", "simulate", "--patients", "1", "--seed", "2"]
    cmd += ["--images-per-patient", "1", "--size", "256x256", "--no-progress"]
    ok = subprocess.run(
        [*cmd, "--out", str(tmp_path / "c"), "--shift", "defocus", "--shift-strength", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    shift = load_ground_truth(tmp_path / "c")["patients"][0]["lab_shift"]
    assert shift["kind"] == "defocus" and 0.7 <= shift["blur_sigma"] <= 1.3
    bad = subprocess.run(
        [*cmd, "--out", str(tmp_path / "d"), "--shift", "defocus", "--shift-strength", "7"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "strength" in bad.stderr
