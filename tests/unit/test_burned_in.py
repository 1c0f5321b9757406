"""Burned-in scale bars and labels are painted over; a smear's own pixels never are. Fields
come from the simulator (every class, lab shifts), annotations are drawn here as camera
programs draw them (black bar and length, a yellow label), saved as PNG and as JPEG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from marrowdx import taxonomy
from marrowdx.burned_in import BurnedInSpec, annotation_mask, paint_over
from marrowdx.simulate import field as fl
from marrowdx.simulate import lab_variation as lv

SIZE = (640, 480)


@pytest.fixture(scope="module")
def fields() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {}
    for i in range(3):
        style = fl.SlideStyle.draw(rng)
        labels = [taxonomy.CLASSES[k] for k in rng.integers(0, taxonomy.N_CLASSES, 12)]
        out[f"field{i}"] = fl.render_field(labels, SIZE, style, rng).image
    shift = lv.LabShift.draw("mixed", 2.0, lv.shift_rng(7, 0))
    out["mixed_shift"] = shift.apply(out["field0"], rng)
    dim = out["field1"].astype(np.float32) * 0.4  # a lamp at 0.4: dark nuclei stay coloured
    out["dim"] = dim.astype(np.uint8)
    return out


def _annotated(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``rgb`` with a black scale bar, its length and a yellow label; the pixels drawn in
    black and those drawn in yellow."""
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    w, h = image.size
    draw.rectangle((int(0.75 * w), int(0.93 * h), int(0.95 * w), int(0.945 * h)), fill="black")
    draw.text((int(0.75 * w), int(0.93 * h) - 14), "10 um", fill="black")
    black = (np.asarray(image) != rgb).any(axis=2)
    draw.text((5, 5), "Sample 12-06 100x oil", fill=(255, 255, 0))
    out = np.asarray(image)
    return out, black, (out != rgb).any(axis=2) & ~black


def _jpeg(rgb: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=80)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_a_smear_without_annotations_is_left_as_it_is(fields) -> None:
    for name, rgb in fields.items():
        assert paint_over(rgb) is rgb, name
        assert paint_over(_jpeg(rgb)).tobytes() == _jpeg(rgb).tobytes(), name


@pytest.mark.parametrize("jpeg", [False, True])
def test_a_scale_bar_and_labels_are_painted_with_the_colours_around_them(fields, jpeg) -> None:
    for name, rgb in fields.items():
        annotated, black, yellow = _annotated(rgb)
        if jpeg:
            annotated = _jpeg(annotated)
        mask = annotation_mask(annotated)
        # the bar and its length (JPEG tints thin black letters over a cell with its colour)
        assert mask[black].mean() > (0.9 if jpeg else 0.99), name
        if not jpeg:
            # JPEG's halved colour resolution washes one-pixel yellow letters to a pale tint
            # that some labs' glass has too (green over blue by up to 100): not asked there
            assert mask[yellow].mean() > 0.95, name
            drawn = black | yellow
        else:
            drawn = black
        assert mask.mean() < 0.03, name  # and little else
        painted = paint_over(annotated)
        # where the drawing was, the painted field is close to the field as it was
        error = np.abs(painted[drawn].astype(int) - rgb[drawn].astype(int)).mean()
        drawn_error = np.abs(annotated[drawn].astype(int) - rgb[drawn].astype(int)).mean()
        assert error < 0.25 * drawn_error, name
        assert not annotation_mask(painted)[black].any(), name


def test_large_images_are_looked_at_on_a_coarser_grid_with_the_same_result(fields) -> None:
    annotated, black, yellow = _annotated(fields["field0"])
    drawn = black | yellow
    large = np.asarray(Image.fromarray(annotated).resize((2560, 1920), Image.Resampling.NEAREST))
    drawn_large = np.repeat(np.repeat(drawn, 4, 0), 4, 1)
    mask = annotation_mask(large)
    assert mask[drawn_large].mean() > 0.95 and mask.mean() < 0.03


def test_wide_black_and_drawings_are_not_annotations(fields) -> None:
    """A round field of view's black corners (and its fringe where it nears the edge), a
    dark-field picture, and strokes covering much of the image are left to the quality gate."""
    rgb = fields["field2"].copy()
    yy, xx = np.mgrid[: SIZE[1], : SIZE[0]]
    outside = (xx - SIZE[0] / 2) ** 2 + (yy - SIZE[1] / 2) ** 2 > (0.52 * SIZE[0]) ** 2
    rgb[outside] = 0
    assert paint_over(rgb) is rgb
    dark_field = np.zeros((480, 640, 3), np.uint8)
    dark_field[100:140, 100:140] = (60, 255, 90)
    assert paint_over(dark_field) is dark_field
    grid = np.full((480, 640, 3), 255, np.uint8)
    grid[::12] = 0
    grid[:, ::12] = 0  # a chart's grid lines: thin, but a fifth of the image
    assert annotation_mask(grid).mean() > BurnedInSpec().max_share
    assert paint_over(grid) is grid
    assert paint_over(grid, BurnedInSpec(enabled=False)) is grid
