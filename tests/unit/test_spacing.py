"""Pixel spacing: the red-cell estimate follows a field resampled by known factors, and the
one field plan pads a small image (never enlarging it) and tiles a large one."""

from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from marrowdx import config, spacing
from marrowdx.encoding import encode
from marrowdx.simulate.field import NEUTRAL_STYLE, render_field
from marrowdx.slides import tiling
from marrowdx.slides.tiling import DEFAULT_OVERLAP_PX

FIELD = config.FIELD_SIZE[0]


@functools.lru_cache(maxsize=1)
def simulated_field() -> np.ndarray:
    """One 1024 x 1024 simulated field at the models' spacing (0.25 µm/px, exact truth)."""
    rng = np.random.default_rng(11)
    labels = ["lymphocyte", "myelocytic_blast", "neutrophilic_band", "lymphocyte"]
    return render_field(labels, config.FIELD_SIZE, NEUTRAL_STYLE, rng).image


def resampled(image: np.ndarray, factor: float) -> np.ndarray:
    size = (round(image.shape[1] * factor), round(image.shape[0] * factor))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def test_red_cell_diameter_is_the_simulators() -> None:
    assert spacing.RED_CELL_UM == pytest.approx(8.0)


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.7, 3.0])
def test_estimate_follows_a_field_resampled_by_a_known_factor(factor: float) -> None:
    """0.6x is a 614 px field at 0.42 µm/px; 3x a 3072 px one at 0.083 µm/px (a camera)."""
    image = resampled(simulated_field(), factor)
    truth = config.MODEL_UM_PER_PIXEL / factor
    estimate = spacing.estimate_um_per_pixel(image)
    assert estimate.source == "estimated" and estimate.n_red_cells >= spacing.MIN_RED_CELLS
    assert estimate.um_per_pixel == pytest.approx(truth, rel=spacing.ESTIMATE_TOLERANCE)
    assert not estimate.uncertain and estimate.warning() is None


@pytest.mark.parametrize("edge_light", [0.8, 0.65, 0.45])
def test_a_vignetted_field_is_estimated_as_its_evenly_lit_self(edge_light: float) -> None:
    """A phone or a trinocular camera dims a field's corners: its dim glass passed the
    one density threshold and red cells merged with it, measured larger. The illumination
    is divided out first (an evenly lit field's estimate is untouched by that). Before, a
    field with its edges at 0.8 of the light was estimated at 0.014 instead of 0.125."""
    field = resampled(simulated_field(), 2.0)  # 0.125 um/px, as a camera at 63x
    height, width = field.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    r = np.hypot(xx - width / 2, yy - height / 2) / (0.5 * max(height, width))
    light = np.clip(1.0 - (1.0 - edge_light) * r**2, 0.0, 1.0)  # 0.45: black corners
    vignetted = (field * light[..., None]).astype(np.uint8)
    even = spacing.estimate_um_per_pixel(field).um_per_pixel
    assert even == pytest.approx(0.125, rel=spacing.ESTIMATE_TOLERANCE)
    estimate = spacing.estimate_um_per_pixel(vignetted).um_per_pixel
    assert estimate == pytest.approx(even, rel=0.1)
    green = np.ascontiguousarray(field[..., 1])
    assert spacing._flat_fielded(green) is green


def framed(image: np.ndarray, margin: tuple[int, int], round_view: bool = False) -> np.ndarray:
    """``image`` in a frame of camera black ``margin`` (x, y) pixels wide, as a photograph
    taken at the eyepiece holds its field; ``round_view`` also blacks out what lies outside
    the circle inscribed in the field's diagonal at 0.85."""
    height, width = image.shape[:2]
    shown = image.copy()
    if round_view:
        yy, xx = np.mgrid[0:height, 0:width]
        outside = np.hypot(xx - width / 2, yy - height / 2) > 0.85 * 0.5 * np.hypot(width, height)
        shown[outside] = (5, 5, 7)
    mx, my = margin
    out = np.full((height + 2 * my, width + 2 * mx, 3), (5, 5, 7), np.uint8)
    out[my : my + height, mx : mx + width] = shown
    return out


@pytest.mark.parametrize("round_view", [False, True])
def test_a_field_in_a_black_frame_is_estimated_as_the_field_alone(round_view: bool) -> None:
    """The estimate reads the field without its frame of camera black: counted as the
    densest stain the frame was the foreground, and the field inside it one hole that filled
    to a single "red cell" the field's size (a real blood field framed so was estimated at a
    twentieth of its spacing). A round field of view's black corners stay (flat-fielding
    reads them as glass), framed or not."""
    field = resampled(simulated_field(), 2.0)  # 0.125 um/px
    alone = spacing.estimate_um_per_pixel(framed(field, (0, 0), round_view)).um_per_pixel
    assert alone == pytest.approx(0.125, rel=spacing.ESTIMATE_TOLERANCE)
    for margin in ((600, 300), (80, 0)):
        estimate = spacing.estimate_um_per_pixel(framed(field, margin, round_view))
        # (a wide frame reads the field on a coarser working copy: within 10%, as vignetting)
        assert estimate.um_per_pixel == pytest.approx(alone, rel=0.1)
        assert estimate.n_red_cells >= spacing.MIN_RED_CELLS
    black = spacing.estimate_um_per_pixel(np.full((400, 400, 3), 5, np.uint8))
    assert black.um_per_pixel is None


def test_estimate_from_jpeg_bytes_matches_the_decoded_estimate() -> None:
    data = encode(simulated_field(), "jpg")
    from_bytes = spacing.estimate_from_bytes(data)
    assert from_bytes.um_per_pixel == pytest.approx(config.MODEL_UM_PER_PIXEL, rel=0.2)
    assert spacing.at_model_spacing(from_bytes.um_per_pixel, spacing.ESTIMATE_TOLERANCE)


def test_an_image_without_red_cells_gets_no_estimate_and_a_warning() -> None:
    blank = np.full((300, 400, 3), 235, np.uint8)
    estimate = spacing.estimate_um_per_pixel(blank)
    assert estimate.um_per_pixel is None and estimate.uncertain
    assert "--um-per-pixel" in (estimate.warning() or "")


def test_few_red_cells_make_an_uncertain_estimate() -> None:
    image = np.full((400, 400, 3), 235, np.uint8)
    yy, xx = np.mgrid[0:400, 0:400]
    for cx, cy in ((100, 100), (300, 120), (200, 300)):  # three pink discs, 40 px across
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < 20**2] = (220, 150, 150)
    estimate = spacing.estimate_um_per_pixel(image)
    assert estimate.n_red_cells == 3 and estimate.uncertain
    assert estimate.um_per_pixel == pytest.approx(spacing.RED_CELL_UM / 40, rel=0.15)
    assert "uncertain" in (estimate.warning() or "")


def crop_with_discs(size: int, diameter: int, centres: list[tuple[int, int]]) -> np.ndarray:
    """A pale ``size`` px square with pink discs (red cells) ``diameter`` px across."""
    image = np.full((size, size, 3), 235, np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for cx, cy in centres:
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < (diameter / 2) ** 2] = (220, 150, 150)
    return image


#: Where the red cells of eight 200 px crops lie: one or two each, apart.
CROP_RED_CELLS = [
    [(50, 50)], [(60, 140), (150, 60)], [(100, 100)], [(40, 160), (160, 40)],
    [(150, 150)], [(50, 100), (150, 100)], [(100, 50)], [(100, 160)],
]  # fmt: skip


def crops_of_one_camera(diameter: int = 40) -> list[spacing.SpacingEstimate]:
    """The estimates of eight crops at one spacing: each alone is uncertain."""
    return [
        spacing.estimate_um_per_pixel(crop_with_discs(200, diameter, centres))
        for centres in CROP_RED_CELLS
    ]


def test_a_pool_of_crops_from_one_camera_is_certain_where_each_crop_is_not() -> None:
    own = crops_of_one_camera()
    assert all(e.uncertain for e in own)
    pooled = spacing.pooled_estimate(own)
    assert pooled.source == "pooled" and pooled.n_images == len(own)
    assert pooled.n_red_cells == sum(e.n_red_cells for e in own)
    assert pooled.um_per_pixel == pytest.approx(spacing.RED_CELL_UM / 40, rel=0.1)
    assert pooled.n_red_cells < spacing.MIN_POOLED_RED_CELLS and pooled.uncertain
    many = spacing.pooled_estimate(own * 2)  # enough red cells: certain
    assert many.n_red_cells >= spacing.MIN_POOLED_RED_CELLS and not many.uncertain
    assert "in 16 images" in (dataclasses.replace(many, n_red_cells=3).warning() or "")


def test_pooling_replaces_only_uncertain_estimates_and_only_within_one_size() -> None:
    own = crops_of_one_camera()
    certain = spacing.estimate_um_per_pixel(resampled(simulated_field(), 0.5))
    assert not certain.uncertain
    other_camera = crops_of_one_camera(diameter=60)[:2]
    estimates = [*own, certain, *other_camera]
    sizes = [(200, 200)] * len(own) + [(512, 512)] + [(300, 300)] * 2
    out = spacing.pool_uncertain(estimates, sizes)
    assert all(e.source == "pooled" and e.n_images == len(own) for e in out[: len(own)])
    assert out[len(own)] is certain  # its own evidence is kept
    # the other camera's two crops pool only with each other, at their own spacing
    assert all(e.source == "pooled" and e.n_images == 2 for e in out[len(own) + 1 :])
    assert out[-1].um_per_pixel == pytest.approx(spacing.RED_CELL_UM / 60, rel=0.1)
    # a lone image of its size has no companions to pool with
    assert spacing.pool_uncertain(own[:1], [(200, 200)]) == own[:1]
    with pytest.raises(ValueError, match="sizes"):
        spacing.pool_uncertain(own, [(200, 200)])


def test_a_crop_with_one_round_object_takes_the_certain_pool_of_crops_of_other_sizes() -> None:
    """Crops cut to each cell's size share no size, so none has a size pool; the ones whose
    estimate is one object's size take the pool of all of them when it is certain (one
    spacing), those with two or more objects keep their own. Crops of two magnifications
    pool to a spread too wide to be certain: each keeps its own."""
    own = crops_of_one_camera() * 2
    sizes = [(200 + i, 200) for i in range(len(own))]  # every crop its own size
    out = spacing.pool_uncertain(own, sizes)
    whole = spacing.pooled_estimate(own)
    assert not whole.uncertain
    for before, after in zip(own, out, strict=True):
        if before.n_red_cells < spacing.MIN_OWN_RED_CELLS:
            assert after == whole and after.source == "pooled"
        else:
            assert after is before
    assert whole.um_per_pixel == pytest.approx(spacing.RED_CELL_UM / 40, rel=0.1)
    other = crops_of_one_camera(diameter=64) * 2  # the same crops at 1.6 times the magnification
    mixed = [*own, *other]
    # the median keeps one magnification's red cells, certain as if it were all of them
    assert not spacing.pooled_estimate(mixed).uncertain
    sizes = [(200 + i, 200) for i in range(len(mixed))]
    assert spacing.pool_uncertain(mixed, sizes) == mixed


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), "0.1", None, True])
def test_a_spacing_must_be_a_positive_number(bad: object) -> None:
    with pytest.raises(ValueError, match="um_per_pixel"):
        spacing.check_um_per_pixel(bad)


def test_scale_rule_is_spacing_over_the_models_spacing() -> None:
    assert spacing.scale_to_model(0.125) == pytest.approx(0.5)
    assert spacing.scale_to_model(0.5) == pytest.approx(2.0)
    assert spacing.at_model_spacing(0.26) and not spacing.at_model_spacing(0.3)


def test_a_small_image_is_padded_to_one_field_never_enlarged() -> None:
    """640 x 480 at 0.075 µm/px is 192 x 144 model pixels: one field, centred, padded."""
    (plan,) = tiling.plan_fields(640, 480, 0.075)
    assert plan.size == (FIELD, FIELD) and plan.image_size == (192, 144)
    assert plan.scale == pytest.approx(0.3)
    assert plan.crop == (0, 0, 192, 144)
    (top, bottom), (left, right) = plan.pad
    assert top + bottom + 144 == FIELD and left + right + 192 == FIELD
    assert abs(top - bottom) <= 1 and abs(left - right) <= 1
    assert plan.input_box == pytest.approx((0, 0, 640, 480))


def test_padding_mirrors_the_image_and_keeps_it_at_its_resampled_size() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (144, 192, 3), dtype=np.uint8)
    (plan,) = tiling.plan_fields(192, 144, config.MODEL_UM_PER_PIXEL)
    field = plan.render(image)
    assert field.shape == (FIELD, FIELD, 3)
    (top, _), (left, _) = plan.pad
    np.testing.assert_array_equal(field[top : top + 144, left : left + 192], image)
    # mirrored, not a constant colour: the padding holds the image's own pixel values
    np.testing.assert_array_equal(field[top - 1, left : left + 192], image[0])
    np.testing.assert_array_equal(field[top : top + 144, left - 1], image[:, 0])
    assert set(np.unique(field)) <= set(np.unique(image))


def test_boxes_map_back_to_input_pixels() -> None:
    (plan,) = tiling.plan_fields(640, 480, 0.075)
    (top, _), (left, _) = plan.pad
    # a cell at input (100, 200)-(130, 230) is at model scale 0.3, shifted by the padding
    field_box = np.array([[left + 30, top + 60, left + 39, top + 69]], np.float64)
    np.testing.assert_allclose(plan.to_input(field_box), [[100, 200, 130, 230]])


def test_a_large_image_is_tiled_with_overlapping_fields() -> None:
    """4000 x 3000 at 0.1 µm/px is 1600 x 1200 model pixels: 2 x 2 fields."""
    plans = tiling.plan_fields(4000, 3000, 0.1)
    assert len(plans) == 4 and all(p.size == (FIELD, FIELD) for p in plans)
    xs = sorted({p.x0 for p in plans})
    ys = sorted({p.y0 for p in plans})
    assert xs[0] == 0 and xs[-1] + FIELD == 1600 and ys[0] == 0 and ys[-1] + FIELD == 1200
    assert FIELD - (xs[1] - xs[0]) >= DEFAULT_OVERLAP_PX
    assert all(p.pad == ((0, 0), (0, 0)) for p in plans)


def test_a_long_strip_is_tiled_along_its_length_and_padded_across() -> None:
    plans = tiling.plan_fields(3000, 400, config.MODEL_UM_PER_PIXEL)
    assert len(plans) == 4 and {p.y0 for p in plans} == {(400 - FIELD) // 2}


def test_resample_shrinks_by_the_scale_rule() -> None:
    image = Image.new("RGB", (640, 480), (200, 150, 150))
    assert spacing.resample(image, 0.075).size == (192, 144)
    assert spacing.resample(image, config.MODEL_UM_PER_PIXEL) is image


def test_estimate_costs_little() -> None:
    """The client estimates every image given without spacing: keep it cheap (the measured
    figure is in docs/performance.md; this bound only catches a gross regression)."""
    import time

    buffer = io.BytesIO()
    Image.fromarray(simulated_field()).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    spacing.estimate_from_bytes(data)
    start = time.process_time()
    for _ in range(5):
        spacing.estimate_from_bytes(data)
    assert (time.process_time() - start) / 5 < 0.25


@pytest.mark.parametrize(("width", "height"), [(192, 144), (1600, 300), (50, 70)])
def test_ground_truth_in_a_field_covers_exactly_what_the_field_shows(width, height) -> None:
    """``FieldPlan.shown`` (mirror images included, clipped) paints the same pixels as the
    rendered field: the evaluation scores the fields the models are given."""
    rng = np.random.default_rng(width)
    image = np.zeros((height, width, 1), np.uint8)
    boxes = []
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width - 3)), int(rng.integers(0, height - 3))
        x1, y1 = (
            min(width, x0 + int(rng.integers(2, 30))),
            min(height, y0 + int(rng.integers(2, 30))),
        )
        boxes.append((x0, y0, x1, y1))
        image[y0:y1, x0:x1] = 1
    for plan in tiling.plan_fields(width, height, config.MODEL_UM_PER_PIXEL):
        field = plan.render(image)[..., 0]
        _, shown = plan.shown(np.array(boxes, np.float64), min_visible=0.0)
        painted = np.zeros_like(field)
        for x0, y0, x1, y1 in shown.astype(int):
            painted[y0:y1, x0:x1] = 1
        np.testing.assert_array_equal(painted, field)


def test_evaluate_at_another_spacing_scores_the_fields_the_client_sends(tmp_path) -> None:
    """``evaluate --um-per-pixel``: a 640 x 480 image at 0.075 µm/px becomes one 1024 field
    holding the image at 192 x 144, its cells (and their mirror images) in field pixels."""
    import json

    from marrowdx.training.evaluate import spaced_cohort

    image = np.full((480, 640, 3), 230, np.uint8)
    image[100:200, 300:400] = (90, 40, 140)
    (tmp_path / "P1").mkdir()
    Image.fromarray(image).save(tmp_path / "P1" / "a.png")
    cell = {"box": [300, 100, 400, 200], "label": "lymphocyte", "attributes": {}}
    gt = {
        "classes": [], "attributes": {}, "diagnoses": [],
        "patients": [{"patient_id": "P1", "diagnosis": "ALL", "images": [
            {"file": "P1/a.png", "width": 640, "height": 480, "cells": [cell]}]}],
    }  # fmt: skip
    (tmp_path / "ground_truth.json").write_text(json.dumps(gt))
    out = spaced_cohort(tmp_path, 0.075, tmp_path / "spaced")
    (field,) = json.loads((out / "ground_truth.json").read_text())["patients"][0]["images"]
    assert (field["width"], field["height"]) == (FIELD, FIELD)
    assert Image.open(out / field["file"]).size == (FIELD, FIELD)
    left, top = (FIELD - 192) // 2, (FIELD - 144) // 2
    boxes = sorted(tuple(c["box"]) for c in field["cells"])
    assert (left + 90, top + 30, left + 120, top + 60) in boxes  # the cell, at 0.3x
    assert len(boxes) > 1  # and its mirror images around the image
    assert spaced_cohort(tmp_path, 0.075, tmp_path / "spaced") == out  # written once


@pytest.mark.parametrize(("width", "height"), [(100, 60), (256, 192), (1600, 300)])
def test_mirror_images_fold_back_onto_the_cell_they_show(width, height) -> None:
    """Every whole copy of an object in a padded field folds onto the object (input
    pixels); the object itself and a piece cut by the image's border are no mirror images;
    ``mirror_copies`` counts the copies ``fold_into_image`` takes."""
    image = np.zeros((height, width, 1), np.uint8)
    image[10:20, 30:45] = 1  # whole, inside the image
    image[:, width - 3 :] = 2  # cut by the right-hand border
    scale = 0.4
    for plan in tiling.plan_fields(round(width / scale), round(height / scale), 0.1):
        if not any(any(p) for p in plan.pad):
            continue
        field = plan.render(image)[..., 0]
        boxes = _object_boxes(field == 1)
        folded, mirrored = plan.fold_into_image(boxes)
        on_image = boxes + [plan.x0, plan.y0, plan.x0, plan.y0]
        inside = (on_image[:, 0] >= 0) & (on_image[:, 2] <= width)
        inside &= (on_image[:, 1] >= 0) & (on_image[:, 3] <= height)
        whole = (boxes[:, 2] - boxes[:, 0] == 15) & (boxes[:, 3] - boxes[:, 1] == 10)
        assert not mirrored[inside].any() and (mirrored == (whole & ~inside)).all()
        want = np.tile([30.0, 10.0, 45.0, 20.0], (int(mirrored.sum()), 1))
        np.testing.assert_allclose(folded[mirrored] * scale, want)
        assert plan.mirror_copies(np.array([[30, 10, 45, 20]]) / scale).tolist() == [
            int(mirrored.sum())
        ]
        assert not plan.fold_into_image(_object_boxes(field == 2))[1].any()


def _object_boxes(mask: np.ndarray) -> np.ndarray:
    labels, _ = ndi.label(mask)
    found = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndi.find_objects(labels)]
    return np.array(found, np.float64).reshape(-1, 4)


def test_encode_takes_an_rgb_image_as_its_array() -> None:
    """The slide reader encodes the PIL image it decoded (no round trip through an array):
    the same pixels give the same bytes either way; a mode other than RGB is refused."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    for fmt in ("jpg", "png"):
        assert encode(image, fmt) == encode(pixels, fmt)
    with pytest.raises(ValueError, match="RGB"):
        encode(image.convert("RGBA"), "jpg")


def test_red_cell_spacing_ignores_cells_cut_by_the_border() -> None:
    side = 32.0
    boxes = np.array([[10, 10, 10 + side, 10 + side], [50, 50, 50 + side, 50 + side]])
    assert spacing.red_cell_spacing(boxes, 200, 200) == pytest.approx(config.MODEL_UM_PER_PIXEL)
    cut = np.vstack([boxes, [[0, 0, 5, 5]] * 5])  # small cut cells at the corner: left out
    assert spacing.red_cell_spacing(cut, 200, 200) == pytest.approx(config.MODEL_UM_PER_PIXEL)
    assert spacing.red_cell_spacing(np.zeros((0, 4)), 200, 200) is None
