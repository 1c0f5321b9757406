"""Fields of a slide: they cover every ROI, overlap by at least the largest cell, map field
pixels to base pixels exactly, resample when the spacing differs, and the fast path sends the
slide's own frames byte for byte."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

from marrowdx import config, taxonomy
from marrowdx.simulate import cells as cl
from marrowdx.slides.base import Field, Roi, SlideError
from marrowdx.slides.tiling import DEFAULT_OVERLAP_PX, axis_starts, field_boxes

pytest.importorskip("wsidicom", reason="needs the slides extra: pip install 'marrowdx[slides]'")

import pydicom  # noqa: E402
from PIL import Image  # noqa: E402

from marrowdx.slides import open_slide  # noqa: E402
from tests.helpers.slides import small_slide_cohort  # noqa: E402


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return small_slide_cohort(tmp_path_factory.mktemp("slides"))


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)


@pytest.mark.parametrize("grid", [1, 2, 4])
@pytest.mark.parametrize("span", [100, 1023, 1024, 1025, 1791, 1792, 2048, 2900, 5000])
def test_axis_starts_cover_the_span_with_the_overlap(span: int, grid: int) -> None:
    size, overlap, lo = 1024, 256, 37
    starts = axis_starts(lo, lo + span, size, overlap, grid)
    assert all(s % grid == 0 for s in starts)
    if span <= size:
        assert len(starts) == 1 and starts[0] <= lo and starts[0] + size >= lo + span - grid
        return
    assert starts[0] <= lo and starts[-1] + size >= lo + span
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(size - g >= overlap for g in gaps), gaps  # neighbours overlap enough
    # and not wastefully: one field fewer could not keep the overlap
    n = len(starts)
    assert n == 2 or (span - size) / (n - 2) > size - overlap - 2 * grid


def test_default_overlap_holds_the_largest_simulated_cell() -> None:
    """Megakaryocytes and macrophages, many draws: the widest outline still fits."""
    rng = np.random.default_rng(0)
    widest = max(
        2 * cl.draw_cell(label, rng).extent
        for label in ("megakaryocyte", "macrophage")
        for _ in range(400)
    )
    assert widest <= DEFAULT_OVERLAP_PX, widest


def test_field_boxes_stay_inside_the_slide_and_cover_the_roi() -> None:
    roi = (10, 1900, 1400, 2040)  # near the bottom edge of a 3000x2048 slide
    boxes = field_boxes(roi, 1024, 256, (3000, 2048))
    assert all(b[0] >= 0 and b[1] >= 0 and b[2] <= 3000 and b[3] <= 2048 for b in boxes)
    assert all(b[2] - b[0] == 1024 and b[3] - b[1] == 1024 for b in boxes)
    ys, xs = np.mgrid[roi[1] : roi[3] : 7, roi[0] : roi[2] : 7]
    for x, y in zip(xs.ravel(), ys.ravel(), strict=True):
        assert any(b[0] <= x < b[2] and b[1] <= y < b[3] for b in boxes)


def test_fields_cover_each_roi_and_hold_every_cell_whole(cohort: tuple[Path, dict]) -> None:
    root, gt = cohort
    for patient in gt["patients"]:
        with open_slide(root / patient["patient_id"]) as slide:
            fields = list(slide.fields())
        for image in patient["images"]:
            mine = [f for f in fields if list(f.roi.box) == image["roi"]]
            assert mine and all(f.scale == 1.0 for f in mine)
            x0, y0, x1, y1 = image["roi"]
            for x in range(x0, x1, 16):
                for y in range(y0, y1, 16):
                    assert any(f.box[0] <= x < f.box[2] and f.box[1] <= y < f.box[3] for f in mine)
            for cell in image["cells"]:
                b = cell["box"]
                assert any(
                    f.box[0] <= b[0] and f.box[1] <= b[1] and b[2] <= f.box[2] and b[3] <= f.box[3]
                    for f in mine
                ), f"cell {b} cut by every field"


def test_field_to_base_mapping_is_exact(cohort: tuple[Path, dict]) -> None:
    """A ground-truth cell, mapped into the field that holds it, shows the same pixels the
    base level shows at its slide coordinates."""
    root, gt = cohort
    patient = gt["patients"][0]
    cell = max(patient["images"][0]["cells"], key=lambda c: c["box"][2] - c["box"][0])
    with open_slide(root / patient["patient_id"]) as slide:
        field = next(
            f
            for f in slide.fields()
            if f.box[0] <= cell["box"][0]
            and f.box[1] <= cell["box"][1]
            and cell["box"][2] <= f.box[2]
            and cell["box"][3] <= f.box[3]
        )
        fx0, fy0, fx1, fy1 = (int(round(v)) for v in field.to_field(tuple(cell["box"])))
        assert field.to_base((fx0, fy0, fx1, fy1)) == tuple(float(v) for v in cell["box"])
        x0, y0, x1, y1 = cell["box"]
        base = np.asarray(slide._wsi.read_region((x0, y0), 0, (x1 - x0, y1 - y0)), np.int16)
    crop = _decode(field.data)[fy0:fy1, fx0:fx1]
    assert crop.shape == base.shape
    assert np.abs(crop - base).mean() < 4.0  # one JPEG re-encode apart
    shifted = _decode(field.data)[fy0 + 6 : fy1 + 6, fx0 + 6 : fx1 + 6]
    assert np.abs(shifted - base).mean() > np.abs(crop - base).mean() * 2  # a shift shows


def test_resampled_fields_match_the_coarser_level(cohort: tuple[Path, dict]) -> None:
    root, gt = cohort
    with open_slide(root / gt["patients"][0]["patient_id"]) as slide:
        fields = list(slide.fields(um_per_pixel=0.5, overlap_px=128, field_px=512))
        level1 = slide._wsi
        for field in fields[:2]:
            assert field.scale == pytest.approx(2.0)
            assert field.box[2] - field.box[0] == pytest.approx(1024)
            image = _decode(field.data)
            assert image.shape[:2] == (512, 512)
            x, y = int(field.box[0] // 2), int(field.box[1] // 2)
            ref = np.asarray(level1.read_region((x, y), 1, (512, 512)), np.int16)
            assert np.abs(image - ref).mean() < 4.0
        odd = list(slide.fields(um_per_pixel=0.3))  # between levels: resampled from the base
        assert odd[0].scale == pytest.approx(1.2)
        assert _decode(odd[0].data).shape[:2] == (1024, 1024)
        inputs = list(slide.input_fields())
    factor = config.FIELD_SIZE[0] / config.INPUT_SIZE
    assert all(f.scale == pytest.approx(factor) for f in inputs)
    assert {_decode(f.data).shape[:2] for f in inputs} == {(config.INPUT_SIZE,) * 2}


def test_frame_fields_are_the_slide_frames_unchanged(
    cohort: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, gt = cohort
    folder = root / gt["patients"][0]["patient_id"]
    ds = pydicom.dcmread(folder / "level_0.dcm")
    cols = math.ceil(ds.TotalPixelMatrixColumns / ds.Columns)
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    with open_slide(folder) as slide:
        # frames smaller than the models' field would be letterboxed up: refused ...
        with pytest.raises(SlideError, match="not the models'"):
            list(slide.frame_fields())
        # ... and sent as stored when they are the field size (here: a field of 512)
        with monkeypatch.context() as m:
            m.setattr(config, "FIELD_SIZE", (ds.Columns, ds.Rows))
            fields = list(slide.frame_fields())
        rois = slide.rois
    for f in fields:
        tx, ty = int(f.box[0]) // ds.Columns, int(f.box[1]) // ds.Rows
        assert f.data == frames[ty * cols + tx]
        assert f.scale == 1.0 and f.box[2] - f.box[0] == ds.Columns
    for roi in rois:  # every ROI pixel lies in one of its frames
        mine = [f for f in fields if f.roi == roi]
        for x in range(roi.box[0], roi.box[2], 32):
            for y in range(roi.box[1], roi.box[3], 32):
                assert sum(f.box[0] <= x < f.box[2] and f.box[1] <= y < f.box[3] for f in mine) == 1


def test_field_mapping_helpers_are_inverse() -> None:
    field = Field(Roi(1, (0, 0, 10, 10)), (100.0, 50.0, 1124.0, 1074.0), b"", 2.5)
    box = (10.0, 20.0, 30.5, 44.0)
    assert field.to_field(field.to_base(box)) == pytest.approx(box)
    assert field.to_base((0, 0, 1, 1)) == (100.0, 50.0, 102.5, 52.5)
    assert taxonomy.N_CLASSES == 33
