"""The client sends every image at the models' spacing: a fake transport that detects dark
squares in the fields it is sent checks that a 1024 x 1024 field at 0.25 µm/px goes out as
its own bytes, that a small image is padded (not enlarged) and its mirrored cells dropped,
that a large one is tiled and a cell on a seam counted once, and that boxes come back in the
input image's pixels. Also the spacing options: per-image values, spacing.json, the flag."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

from marrowdx import config, spacing, taxonomy
from marrowdx.client import AsyncMarrowClient
from marrowdx.client import quality as q
from marrowdx.client.cli import configure_diagnose
from marrowdx.client.cohort import SPACING_FILE, discover
from marrowdx.client.fields import SpacedImageResult
from marrowdx.client.report import PatientReport
from marrowdx.encoding import encode
from marrowdx.errors import CohortError, InputError
from marrowdx.simulate.field import NEUTRAL_STYLE, render_field

T = config.TENSORS
FIELD = config.FIELD_SIZE[0]
BACKGROUND = (232, 222, 228)
CELL = (90, 40, 140)  # a nucleus-dark purple square: what the fake detector finds


class FakeTransport:
    """Answers like the ensemble: one cell per dark square of the field it is sent, boxes in
    letterboxed pixels (the longer side resized to INPUT_SIZE), label 'lymphocyte'."""

    retries = 0

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def infer_image(self, data: bytes) -> dict[str, np.ndarray]:
        self.sent.append(data)
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        height, width = pixels.shape[:2]
        scale = config.INPUT_SIZE / max(height, width)
        labels, n = ndi.label(pixels[..., 1] < 100)
        k = config.MAX_DETECTIONS
        boxes = np.zeros((k, 4), np.float32)
        probs = np.zeros((k, config.N_CLASSES), np.float32)
        for i, (ys, xs) in enumerate(ndi.find_objects(labels)[:k]):
            boxes[i] = np.array([xs.start, ys.start, xs.stop, ys.stop]) * scale
            probs[i, taxonomy.CLASS_INDEX["lymphocyte"]] = 0.9
            probs[i, 0] = 0.1
        counts = np.bincount(probs[:n].argmax(1), minlength=config.N_CLASSES).astype(np.float32)
        return {
            T.boxes: boxes,
            T.scores: np.where(np.arange(k) < n, 0.9, 0.0).astype(np.float32),
            T.num_detections: np.array([n], np.int32),
            T.class_probs: probs,
            T.attribute_probs: np.zeros((k, config.N_ATTRIBUTES), np.float32),
            T.class_counts: counts,
            T.letterbox: np.array([scale, scale, 0, 0], np.float32),
            T.image_size: np.array([height, width], np.int32),
        }

    async def infer_diagnosis(self, fractions, total, lab_values, lab_mask) -> np.ndarray:
        return np.array([0.2, 0.5, 0.3], np.float32)

    async def close(self) -> None:
        pass


def picture(size: tuple[int, int], squares: list[tuple[int, int, int]]) -> bytes:
    """A PNG of ``size`` (w, h) with dark squares (x0, y0, side) on a pale background."""
    image = np.empty((size[1], size[0], 3), np.uint8)
    image[:] = BACKGROUND
    for x0, y0, side in squares:
        image[y0 : y0 + side, x0 : x0 + side] = CELL
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


def analyse(
    data: bytes, quality: object = None, **options: object
) -> tuple[SpacedImageResult, FakeTransport]:
    """``options`` go to ``analyse_image``; ``quality`` (thresholds) to the client."""
    transport = FakeTransport()
    gate = {} if quality is None else {"quality": quality}
    client = AsyncMarrowClient(transport=transport, **gate)  # type: ignore[arg-type]
    result = asyncio.run(client.analyse_image(data, "img", **options))  # type: ignore[arg-type]
    assert isinstance(result, SpacedImageResult)
    return result, transport


def test_a_simulated_field_at_the_models_spacing_is_sent_byte_identical() -> None:
    rng = np.random.default_rng(3)
    field = render_field(["lymphocyte", "neutrophilic_band"], config.FIELD_SIZE, NEUTRAL_STYLE, rng)
    data = encode(field.image, "jpg")
    estimated, sent = analyse(data)
    assert sent.sent == [data]
    assert estimated.spacing.source == "estimated" and estimated.spacing.fields == 1
    assert estimated.spacing.um_per_pixel == pytest.approx(config.MODEL_UM_PER_PIXEL, rel=0.2)
    given, sent = analyse(data, um_per_pixel=config.MODEL_UM_PER_PIXEL)
    assert sent.sent == [data] and given.spacing.source == "given"
    assert given.to_dict()["spacing"] == {
        "um_per_pixel": config.MODEL_UM_PER_PIXEL,
        "source": "given",
        "relative_uncertainty": None,
        "n_red_cells": None,
        "n_images": None,
        "fields": 1,
    }


def test_a_small_image_is_padded_not_enlarged_and_its_mirrored_cells_are_dropped() -> None:
    """640 x 480 at 0.075 µm/px -> 192 x 144 model pixels in one mirror-padded field."""
    squares = [(100, 100, 100), (400, 300, 120), (560, 50, 80)]  # the last touches the edge
    data = picture((640, 480), squares)
    result, sent = analyse(data, um_per_pixel=0.075)
    assert len(sent.sent) == 1
    field = np.asarray(Image.open(io.BytesIO(sent.sent[0])))
    assert field.shape == (FIELD, FIELD, 3)
    # the image sits in the middle at its resampled size (0.3x), mirrored around it
    top, left = (FIELD - 144) // 2, (FIELD - 192) // 2
    dark = ndi.label(field[..., 1] < 100)[1]
    assert dark > len(squares)  # the fake detector saw the mirrored copies too
    assert result.size == (480, 640) and result.spacing.fields == 1
    boxes = sorted(c.box for c in result.cells)
    assert len(boxes) == len(squares)  # ... which are not the image's cells
    for box, (x0, y0, side) in zip(boxes, sorted(squares), strict=True):
        assert box == pytest.approx((x0, y0, x0 + side, y0 + side), abs=6)
    assert result.counts["lymphocyte"] == len(squares)
    assert field[top + 72, left + 96].tolist() != list(CELL)  # a background pixel, unscaled


def test_a_burned_in_scale_bar_and_label_reach_no_model() -> None:
    """A camera program's black scale bar and its length are painted over before the image
    is resampled (``marrowdx.burned_in``): the fake detector, which finds any dark object,
    counts the cells only; the same bar in a stain's colour is counted, so the test can
    fail."""
    squares = [(100, 100, 100), (400, 260, 120)]

    def with_bar(colour: tuple[int, int, int]) -> bytes:
        image = Image.open(io.BytesIO(picture((640, 480), squares)))
        draw = ImageDraw.Draw(image)
        draw.rectangle((480, 446, 610, 453), fill=colour)
        draw.text((480, 430), "10 um", fill=colour)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()

    result, _ = analyse(with_bar((0, 0, 0)), um_per_pixel=0.075)
    assert result.counts["lymphocyte"] == len(squares)
    for box, (x0, y0, side) in zip(sorted(c.box for c in result.cells), squares, strict=True):
        assert box == pytest.approx((x0, y0, x0 + side, y0 + side), abs=6)
    stained, _ = analyse(with_bar(CELL), um_per_pixel=0.075)
    assert stained.counts["lymphocyte"] > len(squares)


def test_a_large_image_is_tiled_and_a_cell_on_a_seam_is_counted_once() -> None:
    """1600 x 1200 at the models' spacing: 2 x 2 fields overlapping by >= 256 px; one cell
    in the middle of the overlaps (seen whole by all four fields), one cut by a field edge."""
    squares = [(780, 580, 40), (100, 100, 40), (1500, 1100, 40), (1010, 300, 40)]
    data = picture((1600, 1200), squares)
    result, sent = analyse(data, um_per_pixel=config.MODEL_UM_PER_PIXEL)
    assert len(sent.sent) == 4 and result.spacing.fields == 4
    assert all(Image.open(io.BytesIO(f)).size == (FIELD, FIELD) for f in sent.sent)
    boxes = sorted(c.box for c in result.cells)
    assert len(boxes) == len(squares)
    for box, (x0, y0, side) in zip(boxes, sorted(squares), strict=True):
        assert box == pytest.approx((x0, y0, x0 + side, y0 + side), abs=2)
    assert sum(result.counts.values()) == len(squares)


def test_a_tiled_image_is_sized_by_all_its_cells_where_no_field_holds_enough() -> None:
    """1600 x 1200 at the models' spacing, 2 x 2 fields: two cells far too small (10 px:
    5 model pixels, a third of the smallest size counted) in each field's own corner, so no
    field holds the MIN_CELLS_FOR_SPACING it needs to judge, but the image does. Cells of
    the models' size are counted."""
    corners = [(60, 60), (1450, 60), (60, 1050), (1450, 1050)]
    small = [(x + dx, y + dy, 10) for x, y in corners for dx, dy in ((0, 0), (40, 40))]
    result, sent = analyse(picture((1600, 1200), small), um_per_pixel=config.MODEL_UM_PER_PIXEL)
    assert len(sent.sent) == 4 and len(result.cells) == len(small)
    assert result.excluded.startswith(q.WRONG_SPACING) and sum(result.counts.values()) == 0
    right = [(x + dx, y + dy, 60) for x, y in corners for dx, dy in ((0, 0), (0, 80))]
    result, _ = analyse(picture((1600, 1200), right), um_per_pixel=config.MODEL_UM_PER_PIXEL)
    assert result.excluded is None and sum(result.counts.values()) == len(right)


def test_an_image_without_red_cells_is_assumed_at_the_models_spacing_and_warned() -> None:
    data = picture((FIELD, FIELD), [])
    result, sent = analyse(data)
    assert sent.sent == [data]
    assert result.spacing.source == "assumed"
    assert result.spacing.um_per_pixel == config.MODEL_UM_PER_PIXEL
    out = result.to_dict()
    assert out["spacing"]["source"] == "assumed" and "--um-per-pixel" in out["warnings"][0]


def test_an_estimate_from_one_object_is_used_but_warned_as_uncertain() -> None:
    data = picture((FIELD, FIELD), [(100, 100, 40)])
    result, _ = analyse(data)
    assert result.spacing.source == "estimated" and result.spacing.n_red_cells == 1
    assert result.spacing.relative_uncertainty is None  # one diameter has no spread
    assert "uncertain" in result.warnings[0] and "--um-per-pixel" in result.warnings[0]
    assert "unknown spread" in result.warnings[0]


class MeasuredTransport(FakeTransport):
    """FakeTransport with a server's smear measures (stained, coloured, in focus: not what is
    judged here) whose cells get top class probability ``top``."""

    def __init__(self, top: float) -> None:
        super().__init__()
        self.top = top

    async def infer_image(self, data: bytes) -> dict[str, np.ndarray]:
        outputs = await super().infer_image(data)
        probs = outputs[T.class_probs]
        found = probs.max(1) > 0
        probs[found] = 0.0
        probs[found, taxonomy.CLASS_INDEX["lymphocyte"]] = self.top
        probs[found, 0] = 1.0 - self.top
        outputs[T.field_quality] = np.array([5000, 0.05, 0, 200, 0.9, 0.6, 0.1], np.float32)
        return outputs


def test_an_image_with_one_round_object_and_no_identified_cell_is_no_smear() -> None:
    """A logo: one round object (the estimate's only "red cell") that the models cannot
    place. With no spacing stated nothing in it speaks for a smear: excluded, the reason
    says so. Given a spacing, or with its cell identified, it is judged as before."""
    data = picture((FIELD, FIELD), [(100, 100, 40)])

    def run(top: float, **options: object) -> SpacedImageResult:
        client = AsyncMarrowClient(transport=MeasuredTransport(top))  # type: ignore[arg-type]
        return asyncio.run(client.analyse_image(data, "logo", **options))  # type: ignore[arg-type]

    unsure = run(0.55)
    assert unsure.spacing.n_red_cells == 1 and len(unsure.cells) == 1
    assert unsure.excluded.startswith(q.NOT_A_SMEAR) and "1 round object" in unsure.excluded
    assert sum(unsure.counts.values()) == 0
    identified = run(0.9)
    assert identified.excluded is None and sum(identified.counts.values()) == 1


class DimTransport(MeasuredTransport):
    """MeasuredTransport whose fields measure ``focus`` (their other measures in focus)."""

    def __init__(self, focus: float) -> None:
        super().__init__(0.9)
        self.focus = focus

    async def infer_image(self, data: bytes) -> dict[str, np.ndarray]:
        outputs = await super().infer_image(data)
        outputs[T.field_quality][0] = self.focus
        return outputs


def test_a_sharp_field_photographed_dim_is_not_excluded_as_out_of_focus() -> None:
    """A dim camera lowers the focus measure with the square of its light: the client reads
    the image's glass (only when a field measures blurred) and judges it at full light. The
    same measure on a field lit as the limit's is still out of focus."""
    from marrowdx.image_checks import light_level

    squares = [(100, 100, 100), (400, 300, 120)]
    bright = np.asarray(Image.open(io.BytesIO(picture((640, 480), squares))))
    dim = (bright * 0.5).astype(np.uint8)
    assert light_level(_encoded(dim, "PNG")) == pytest.approx(
        light_level(_encoded(bright, "PNG")) / 2, abs=1
    )

    def run(pixels: np.ndarray, focus: float) -> SpacedImageResult:
        client = AsyncMarrowClient(transport=DimTransport(focus))  # type: ignore[arg-type]
        data = _encoded(pixels, "PNG")
        return asyncio.run(client.analyse_image(data, "f", um_per_pixel=0.1))  # type: ignore[arg-type]

    # BACKGROUND's grey is 227, over REFERENCE_LIGHT: a bright field is judged as measured
    assert run(bright, 500).excluded.startswith("out of focus")
    at_half = run(dim, 500)  # glass at 113: 500 x (200 / 113)^2 = 1,566
    assert at_half.excluded is None and sum(at_half.counts.values()) == 2
    assert at_half.quality["focus"] == 500  # reported as measured
    assert run(dim, 200).excluded.startswith("out of focus")  # blurred at any light


def smear_picture(size: tuple[int, int], squares: list[tuple[int, int, int]]) -> bytes:
    """``picture`` with pale red cells (30 px across: 7.5 µm at the models' spacing) in
    rows below y = 400, which the fake detector does not find."""
    image = Image.open(io.BytesIO(picture(size, squares)))
    draw = ImageDraw.Draw(image)
    for x in range(60, size[0] - 30, 70):
        for y in range(400, size[1] - 30, 70):
            draw.ellipse([x - 15, y - 15, x + 15, y + 15], fill=(215, 150, 170))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_a_field_without_red_cells_of_their_size_at_a_stated_spacing_is_no_smear() -> None:
    """Given a spacing, a field (not a crop) whose one object the models cannot place is
    asked for red cells of a red cell's size at that spacing: none (a logo, or a spacing
    far from the image's) excludes it as possibly no smear; a smear's red cells keep it
    counted, as does an identified cell. A crop, which holds few red cells, is not asked."""

    def run(data: bytes, top: float, um_per_pixel: float) -> SpacedImageResult:
        client = AsyncMarrowClient(transport=MeasuredTransport(top))  # type: ignore[arg-type]
        return asyncio.run(client.analyse_image(data, "x", um_per_pixel=um_per_pixel))  # type: ignore[arg-type]

    at = config.MODEL_UM_PER_PIXEL
    logo = run(picture((FIELD, FIELD), [(100, 100, 40)]), 0.55, at)
    assert logo.excluded.startswith(q.NOT_A_SMEAR) and f"stated {at:g} µm/px" in logo.excluded
    assert sum(logo.counts.values()) == 0
    smear = smear_picture((FIELD, FIELD), [(100, 100, 40)])
    assert spacing.red_cells_at(smear, at) > 50
    assert run(smear, 0.55, at).excluded is None
    assert "stated 0.1 µm/px" in run(smear, 0.55, 0.1).excluded  # red cells 2.5x too small
    assert run(picture((FIELD, FIELD), [(100, 100, 40)]), 0.9, at).excluded is None
    crop = run(picture((200, 200), [(80, 80, 40)]), 0.55, at)
    assert crop.excluded is None and crop.spacing.fields == 1


def test_an_excluded_image_says_when_its_spacing_was_only_an_uncertain_estimate() -> None:
    """A single-cell crop sent without its spacing is judged as a field and may be excluded
    ("too thick"); the reason then carries the spacing warning, which says what to do, unless
    it says so itself or names what no spacing changes. In the patient report too."""
    from marrowdx.client.aggregate import build_report, exclusion
    from marrowdx.client.fields import SpacingInfo

    warning = (
        "pixel spacing estimate 0.08 um/px is uncertain (1 red cell, unknown spread); give "
        "the spacing with --um-per-pixel"
    )
    uncertain = SpacingInfo(0.08, "estimated", None, 1, warning=warning)
    counts = dict.fromkeys(taxonomy.CLASSES, 0)

    def image(name: str, excluded: str, info: SpacingInfo) -> SpacedImageResult:
        return SpacedImageResult(name, (), counts, (250, 250), excluded=excluded, spacing=info)

    thick = image("a.jpg", "too thick: 27%", uncertain)
    assert exclusion(thick) == f"too thick: 27%; {warning}"
    for reason in (
        "not a stained smear (...): 1 round object; give the spacing (--um-per-pixel)",
        f"{q.NOT_A_SMEAR}: no stain colour (0.0% of the stained pixels coloured)",
    ):
        assert exclusion(image("b.jpg", reason, uncertain)) == reason
    maybe = f"{q.NOT_A_SMEAR} (or one too thick to count): no cell identified; too thick: 27%"
    assert exclusion(image("c.jpg", maybe, uncertain)) == f"{maybe}; {warning}"
    given = image("d.jpg", "too thick: 27%", SpacingInfo(0.1, "given"))
    assert exclusion(given) == "too thick: 27%"
    empty = np.zeros(config.N_CLASSES, np.int64)
    report = build_report("P1", [thick, given], {}, empty, None, "no cells")
    assert report.excluded_images == {"a.jpg": exclusion(thick), "d.jpg": "too thick: 27%"}


def test_an_image_too_thick_is_named_as_its_fields_named_it_when_all_said_no_smear() -> None:
    """A photograph padded at an uncertain spacing: its own two detections look like a
    smear's (one identified), its field, copies and all, holds 5 identified of 77 objects.
    The image's "too thick" takes the fields' naming when every field gave it; a name is
    all that changes (the counts are 0 either way)."""
    from marrowdx.client.fields import _as_its_fields_name_it as named
    from marrowdx.client.report import ImageResult

    counts = dict.fromkeys(taxonomy.CLASSES, 0)

    def field(reason: str | None) -> ImageResult:
        return ImageResult("field", (), counts, (1024, 1024), excluded=reason)

    no_smear = (
        f"{q.NOT_A_SMEAR} (or one too thick to count): 5 of 77 objects identified as "
        "nucleated cells; too thick: 30%"
    )
    assert named("too thick: 30%", [field(no_smear)]) == no_smear
    assert named("too thick: 30%", [field(no_smear), field(no_smear)]) == no_smear
    for others in ([field(no_smear), field("too thick: 31%")], [field(no_smear), field(None)]):
        assert named("too thick: 30%", others) == "too thick: 30%"
    assert named(None, [field(no_smear)]) is None
    wrong = f"{q.WRONG_SPACING}: cells measure 0.4 times their size"
    assert named(wrong, [field(no_smear)]) == wrong


def test_client_default_and_per_image_spacings() -> None:
    small = picture((640, 480), [(100, 100, 100)])
    transport = FakeTransport()
    client = AsyncMarrowClient(transport=transport, um_per_pixel=0.075)  # type: ignore[arg-type]
    report = asyncio.run(
        client.diagnose_patient("P", [small, small], um_per_pixel=[None, 0.15], target_cells=0)
    )
    first, second = report.images
    assert first.spacing.um_per_pixel == 0.075 and first.spacing.source == "given"
    assert second.spacing.um_per_pixel == 0.15
    sides = []
    for field in transport.sent:  # in any order: the two images are sent concurrently
        labels, _ = ndi.label(np.asarray(Image.open(io.BytesIO(field)))[..., 1] < 100)
        sides.append(max(xs.stop - xs.start for _, xs in ndi.find_objects(labels)))
    # a 100 px cell: 30 model px at 0.075 µm/px, 60 at 0.15 (not the letterbox's 512/640)
    assert sorted(sides) == [pytest.approx(30, abs=2), pytest.approx(60, abs=2)]


@pytest.mark.parametrize("bad", [-0.1, 0, "0.1", float("nan"), [0.1]])
def test_bad_spacings_are_refused_before_any_request(bad: object) -> None:
    transport = FakeTransport()
    client = AsyncMarrowClient(transport=transport)  # type: ignore[arg-type]
    data = picture((640, 480), [(100, 100, 100)])
    with pytest.raises(InputError, match="um_per_pixel"):
        asyncio.run(client.diagnose_patient("P", [data, data], um_per_pixel=bad))  # type: ignore[arg-type]
    assert transport.sent == []
    with pytest.raises(InputError):
        AsyncMarrowClient(transport=transport, um_per_pixel=-1.0)  # type: ignore[arg-type]


def test_spacing_json_gives_a_patient_its_spacing(tmp_path: Path) -> None:
    for patient in ("P1", "P2"):
        (tmp_path / patient).mkdir()
        (tmp_path / patient / "a.png").write_bytes(picture((64, 64), []))
    (tmp_path / "P1" / SPACING_FILE).write_text(json.dumps({"um_per_pixel": 0.1}))
    cohort = discover(tmp_path)
    assert [p.um_per_pixel for p in cohort.patients] == [0.1, None]
    assert not cohort.patients[0].problems  # spacing.json is read, not reported


@pytest.mark.parametrize(
    "content",
    ['{"um_per_pixel": -0.1}', '{"um_per_pixel": 0}', '{"um_per_pixel": "x"}', "0.1", "{"],
)
def test_a_bad_spacing_json_is_refused_naming_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "P1").mkdir()
    (tmp_path / "P1" / "a.png").write_bytes(picture((64, 64), []))
    (tmp_path / "P1" / SPACING_FILE).write_text(content)
    with pytest.raises(CohortError, match=SPACING_FILE):
        discover(tmp_path)


@pytest.mark.parametrize("text", ["-1", "0", "abc", "nan", "inf"])
def test_the_um_per_pixel_flag_refuses_what_is_not_a_positive_number(text: str) -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    configure_diagnose(parser)
    with pytest.raises(argparse.ArgumentError, match="um-per-pixel"):
        parser.parse_args(["DIR", f"--um-per-pixel={text}"])
    assert parser.parse_args(["DIR", "--um-per-pixel", "0.1"]).um_per_pixel == 0.1


def test_an_image_beyond_the_size_limits_goes_undecoded_for_the_server_to_refuse() -> None:
    from marrowdx.client.fields import prepare_image

    small = picture((8, 400), [])
    # a PNG header of 9000 x 8000 pixels: nothing is decoded on this side either
    ihdr = struct.pack(">IIBBBBB", 9000, 8000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    huge = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
    huge += struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 0) + b"IEND"
    huge += struct.pack(">I", zlib.crc32(b"IEND"))
    for data in (small, huge, b"not an image"):
        prepared = prepare_image(data, 0.1)
        assert prepared.fields == [data] and prepared.plans is None


def _encoded(pixels: np.ndarray, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **options)
    return out.getvalue()


def _squares(size: tuple[int, int], squares: list[tuple[int, int, int]]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(picture(size, squares))).convert("RGB"))


def _counted_as(data: bytes, png_result: SpacedImageResult, tolerance: float) -> None:
    """``data`` (a 1024 x 1024 field at the models' spacing, in a format the client decodes)
    went out as one JPEG field and was counted as its PNG, boxes within ``tolerance`` px."""
    result, sent = analyse(data, um_per_pixel=config.MODEL_UM_PER_PIXEL)
    (sent_field,) = sent.sent
    assert sent_field.startswith(b"\xff\xd8\xff")  # re-encoded as a JPEG field
    assert result.counts == png_result.counts
    for cell, png_cell in zip(result.cells, png_result.cells, strict=True):
        assert cell.box == pytest.approx(png_cell.box, abs=tolerance)


def test_tiff_bmp_and_webp_images_are_decoded_by_the_client_and_counted_as_the_png_is() -> None:
    """The server decodes JPEG/PNG only; a camera's TIFF or BMP (or a lossless WebP) of the
    same pixels becomes the same fields: resampled, the very same bytes; at the models'
    spacing one JPEG field (a PNG goes as its own bytes)."""
    squares = [(100, 100, 100), (400, 300, 120), (700, 800, 90)]
    field = _squares(config.FIELD_SIZE, squares)
    png = _encoded(field, "PNG")
    png_result, png_sent = analyse(png, um_per_pixel=config.MODEL_UM_PER_PIXEL)
    assert png_sent.sent == [png]
    for data in (
        _encoded(field, "TIFF", compression="tiff_lzw"),
        _encoded(field, "BMP"),
        _encoded(field, "WEBP", lossless=True),
    ):
        _counted_as(data, png_result, tolerance=2)
    small = _squares((640, 480), squares[:2])
    resampled = {
        fmt: analyse(_encoded(small, fmt), um_per_pixel=0.075)[1].sent
        for fmt in ("PNG", "TIFF", "BMP")
    }
    resampled["WEBP"] = analyse(_encoded(small, "WEBP", lossless=True), um_per_pixel=0.075)[1].sent
    assert resampled["TIFF"] == resampled["PNG"] == resampled["BMP"] == resampled["WEBP"]


def _sent_as_the_png(source: object, png: bytes) -> None:
    """``source`` goes out as the very fields of ``png`` (an 8-bit PNG of the same pixels),
    with the same spacing and counts, at a given spacing and at the one estimated."""
    for um_per_pixel in (0.075, None):
        png_result, png_sent = analyse(png, um_per_pixel=um_per_pixel)
        result, sent = analyse(source, um_per_pixel=um_per_pixel)  # type: ignore[arg-type]
        assert sent.sent == png_sent.sent
        assert result.spacing == png_result.spacing and result.counts == png_result.counts


@pytest.mark.parametrize("bits", [10, 12, 14, 16])
def test_a_cameras_wide_samples_in_a_16_bit_tiff_are_scaled_by_the_bits_they_use(bits) -> None:
    """A microscope camera's 10-14-bit samples written unscaled into a 16-bit RGB TIFF (and a
    full-range 16-bit one) go out as the very fields of the 8-bit PNG: resampled at a given
    spacing, and at the spacing estimated from them. Before, the client kept each sample's
    high byte: grey levels 0-15 for 12 bits, a black field excluded as far too dark."""
    tifffile = pytest.importorskip("tifffile", reason="tifffile (client extra) not installed")
    small = _squares((640, 480), [(100, 100, 100), (400, 300, 120)])
    wide = small.astype(np.uint16) << (bits - 8)
    wide |= np.random.default_rng(bits).integers(0, 1 << (bits - 8), wide.shape, np.uint16)
    out = io.BytesIO()
    tifffile.imwrite(out, wide, photometric="rgb")
    _sent_as_the_png(out.getvalue(), _encoded(small, "PNG"))


def test_a_cameras_12_bits_in_a_16_bit_png_are_scaled_as_in_a_tiff() -> None:
    """A 16-bit RGB PNG of a camera's 12 bits is decoded by the client (the server's decoder
    keeps each sample's high byte: a black field) and goes out as the fields of the 8-bit
    PNG; at the models' spacing as one JPEG field counted as that PNG."""
    imagecodecs = pytest.importorskip("imagecodecs", reason="imagecodecs (slides extra)")
    small = _squares((640, 480), [(100, 100, 100), (400, 300, 120)])
    wide = imagecodecs.png_encode((small.astype(np.uint16) << 4) | 9)
    _sent_as_the_png(wide, _encoded(small, "PNG"))
    field = _squares(config.FIELD_SIZE, [(100, 100, 100), (700, 800, 90)])
    png_result, _ = analyse(_encoded(field, "PNG"), um_per_pixel=config.MODEL_UM_PER_PIXEL)
    _counted_as(imagecodecs.png_encode(field.astype(np.uint16) << 4), png_result, tolerance=2)


def test_a_numpy_array_is_counted_as_the_png_of_its_pixels() -> None:
    """A pipeline that holds images decoded gives them as arrays: the same fields go out as
    for the PNG of the same pixels (8-bit RGB, greyscale, a camera's 12 bits in uint16), at a
    given spacing and at the spacing estimated from them."""
    small = _squares((640, 480), [(100, 100, 100), (400, 300, 120)])
    grey = small.mean(axis=2).astype(np.uint8)
    twelve = (small.astype(np.uint16) << 4) | 7
    for array, same_as in ((small, small), (grey, grey), (twelve, small)):
        _sent_as_the_png(array, _encoded(same_as, "PNG"))
    # a field at the models' spacing goes as one lossless PNG of its pixels, as a PNG would
    field = _squares(config.FIELD_SIZE, [(100, 100, 100), (700, 800, 90)])
    png_result, _ = analyse(_encoded(field, "PNG"), um_per_pixel=config.MODEL_UM_PER_PIXEL)
    result, sent = analyse(field, um_per_pixel=config.MODEL_UM_PER_PIXEL)  # type: ignore[arg-type]
    (sent_field,) = sent.sent
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sent_field))), field)
    assert result.counts == png_result.counts and result.cells == png_result.cells


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((480, 640, 3), np.float32), "dtype float32: give uint8"),
        (np.zeros((3, 480, 640), np.uint8), "shape 3x480x640: .* channels last"),
        (np.zeros((480, 640, 3, 1), np.uint8), "shape 480x640x3x1"),
        (np.zeros((8, 400, 3), np.uint8), "array of 400x8 pixels is beyond"),
    ],
)
def test_an_array_the_client_cannot_read_as_an_image_fails_with_what_is_wrong(
    array: np.ndarray, reason: str
) -> None:
    from marrowdx.client.transport import RequestFailed

    with pytest.raises(RequestFailed, match=reason):
        analyse(array, um_per_pixel=0.1)  # type: ignore[arg-type]


def test_a_pillow_image_is_counted_as_its_file_is() -> None:
    """A Pillow image a program opened (or made) goes out as its file would: upright (an
    EXIF-rotated JPEG), palette and 16-bit grey modes read as their file is read."""
    from marrowdx.client.transport import RequestFailed

    small = _squares((640, 480), [(100, 100, 100), (400, 300, 120)])
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera held sideways
    Image.fromarray(small).save(rotated, "JPEG", quality=95, exif=exif.tobytes())
    palette = _encoded(np.asarray(Image.fromarray(small).quantize(64).convert("RGB")), "PNG")
    grey16 = io.BytesIO()
    Image.fromarray(small[..., 1].astype(np.uint16) << 4).save(grey16, "PNG")
    for data in (rotated.getvalue(), palette, grey16.getvalue()):
        file_result, file_sent = analyse(data, um_per_pixel=0.075)
        result, sent = analyse(Image.open(io.BytesIO(data)), um_per_pixel=0.075)  # type: ignore[arg-type]
        assert sent.sent == file_sent.sent and result.counts == file_result.counts
        assert result.size == file_result.size
    with pytest.raises(RequestFailed, match="mode F \\(float\\): its scale is not known"):
        analyse(Image.fromarray(small[..., 0].astype(np.float32)), um_per_pixel=0.1)  # type: ignore[arg-type]


def test_a_patients_images_are_any_iterable_arrays_named_by_position_a_wrong_type_named() -> None:
    client = AsyncMarrowClient(transport=FakeTransport())  # type: ignore[arg-type]
    array = _squares((640, 480), [(100, 100, 100)])
    report = asyncio.run(client.diagnose_patient("P", [array, array], um_per_pixel=0.1))
    assert [image.file for image in report.images] == ["#0", "#1"] and not report.failed_images
    batch = asyncio.run(client.diagnose_patient("P", np.stack([array, array]), um_per_pixel=0.1))
    assert batch.counts == report.counts  # a batch array is its images, as a list of them
    streamed = asyncio.run(client.diagnose_patient("P", (a for a in [array]), um_per_pixel=0.1))
    assert streamed.n_images == 1  # any iterable, e.g. Path.glob's generator
    for one in (array, "field.png", b"\x89PNG", Image.fromarray(array)):  # not in a list
        with pytest.raises(TypeError, match="give a list of images \\(for one, \\[image\\]\\)"):
            asyncio.run(client.diagnose_patient("P", one))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"images\[1\] is a int: give a file path"):
        asyncio.run(client.diagnose_patient("P", [array, 7], um_per_pixel=0.1))  # type: ignore[list-item]


def test_a_phones_heif_photograph_is_decoded_by_the_client_and_counted_as_the_png_is(
    tmp_path: Path,
) -> None:
    """iPhones save HEIF (``.heic``): with pillow-heif (the client extra) the client decodes
    it like a TIFF; ``diagnose`` takes the suffix, the bytes are known as client-decoded."""
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif (client extra)")
    from marrowdx.image_checks import client_decoded

    pillow_heif.register_heif_opener()
    squares = [(100, 100, 100), (400, 300, 120), (700, 800, 90)]
    field = _squares(config.FIELD_SIZE, squares)
    png_result, _ = analyse(_encoded(field, "PNG"), um_per_pixel=config.MODEL_UM_PER_PIXEL)
    heif = _encoded(field, "HEIF", quality=90)
    assert client_decoded(heif) and not client_decoded(_encoded(field, "PNG"))
    _counted_as(heif, png_result, tolerance=3)  # lossy: boxes a pixel further
    (tmp_path / "P1").mkdir()
    (tmp_path / "P1" / "IMG_0001.HEIC").write_bytes(heif)
    (patient,) = discover(tmp_path).patients
    assert patient.names == ["P1/IMG_0001.HEIC"] and not patient.problems


def test_a_multi_page_animated_or_damaged_image_fails_with_its_reason_and_is_never_sent() -> None:
    from marrowdx.client.transport import RequestFailed

    page = _squares((400, 300), [(50, 50, 60)])
    out = io.BytesIO()
    Image.fromarray(page).save(out, "TIFF", save_all=True, append_images=[Image.fromarray(page)])
    with pytest.raises(RequestFailed, match="multi-page TIFF \\(2 pages"):
        analyse(out.getvalue(), um_per_pixel=0.1)
    animated = io.BytesIO()
    frames = [Image.fromarray(page), Image.fromarray(255 - page)]
    frames[0].save(animated, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    with pytest.raises(RequestFailed, match="multi-page WEBP \\(2 pages"):
        analyse(animated.getvalue(), um_per_pixel=0.1)
    for kind in ("GIF", "PNG"):  # an animated GIF, an APNG
        moving = io.BytesIO()
        frames[0].save(moving, kind, save_all=True, append_images=frames[1:])
        with pytest.raises(RequestFailed, match=f"multi-page {kind} \\(2 pages"):
            analyse(moving.getvalue(), um_per_pixel=0.1)
    whole = _encoded(page, "TIFF")
    with pytest.raises(RequestFailed, match="not decodable"):
        analyse(whole[: len(whole) // 2], um_per_pixel=0.1)
    with pytest.raises(RequestFailed, match="not decodable"):
        analyse(whole[: len(whole) // 2])  # the spacing estimate decodes it first
    floats = io.BytesIO()
    tifffile.imwrite(floats, page.astype(np.float32) / 255, photometric="rgb")  # 0-1 floats
    with pytest.raises(RequestFailed, match="TIFF Pillow cannot open: .* 8- or 16-bit TIFF"):
        analyse(floats.getvalue(), um_per_pixel=0.1)
    with pytest.raises(RequestFailed, match="8x400 is beyond"):
        analyse(_encoded(np.zeros((400, 8, 3), np.uint8), "TIFF"), um_per_pixel=0.1)


def test_a_tiff_is_held_to_the_decoded_pixel_limit_not_the_request_byte_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An uncompressed camera TIFF is larger than the JPEG fields the client sends for it."""
    from marrowdx.client.async_client import read_image
    from marrowdx.client.transport import RequestFailed

    pixels = _squares((200, 200), [])
    tiff, png = _encoded(pixels, "TIFF"), _encoded(pixels, "PNG")
    monkeypatch.setattr(config, "MAX_IMAGE_BYTES", len(png) - 1)
    assert read_image(tiff) == tiff
    with pytest.raises(RequestFailed, match="above the limit"):
        read_image(png)
    monkeypatch.setattr(config, "MAX_CLIENT_DECODED_BYTES", len(tiff) - 1)
    with pytest.raises(RequestFailed, match="above the limit"):
        read_image(tiff)


class FixedMeasuresTransport(FakeTransport):
    """FakeTransport whose every field measures ``measures`` (the field-quality measures by
    name), whatever the image."""

    measures: dict[str, float] = {}

    async def infer_image(self, data: bytes) -> dict[str, np.ndarray]:
        from marrowdx.contract import QUALITY_FIELDS

        out = await super().infer_image(data)
        out[T.field_quality] = np.array([self.measures[k] for k in QUALITY_FIELDS], np.float32)
        return out


class ThickTransport(FixedMeasuresTransport):
    """Every field 60% under dense clumps, as the padded field of a real marrow crop (a cell
    filling most of it, mirrored all around) measures."""

    measures = {
        "focus": 20000.0, "foreground": 0.5, "thick": 0.6, "brightness": 140.0,
        "stain_colour": 0.9, "background": 0.3, "flat": 0.01, "fine_focus": 0.3, "green": 0.0,
        "thick_wide": 0.6, "clipped": 0.0,
    }  # fmt: skip


def _analysed(data: bytes, **options: object) -> SpacedImageResult:
    client = AsyncMarrowClient(transport=ThickTransport())  # type: ignore[arg-type]
    return asyncio.run(client.analyse_image(data, "img", **options))  # type: ignore[arg-type]


def test_a_crop_at_a_known_spacing_is_judged_by_its_own_cells_not_as_too_thick() -> None:
    """250 px at 0.1 µm/px is 100 model pixels: a crop, whose padded field is not a region
    of smear. A field, or a crop whose spacing is only an uncertain estimate (any picture
    could be shrunk to a crop's size by one), is still judged too thick: the crop, whose
    estimate rests on one round object, as possibly no smear."""
    crop = picture((250, 250), [(90, 90, 70)])
    counted = _analysed(crop, um_per_pixel=0.1)
    assert counted.excluded is None and counted.counts["lymphocyte"] == 1
    unsure = _analysed(crop)
    assert unsure.spacing.source in ("estimated", "assumed") and unsure.warnings
    assert unsure.excluded is not None and f"; {q.TOO_THICK}: 60%" in unsure.excluded
    assert unsure.excluded.startswith(f"{q.NOT_A_SMEAR} (or one too thick to count): 1 round")
    field = _analysed(picture(config.FIELD_SIZE, [(90, 90, 70)]), um_per_pixel=0.25)
    assert field.excluded is not None and field.excluded.startswith("too thick")
    empty = _analysed(picture((250, 250), []), um_per_pixel=0.1)
    assert empty.excluded is not None and "stained but no cell found" in empty.excluded
    assert sum(empty.counts.values()) == 0


class MissesTheOriginal(ThickTransport):
    """ThickTransport (a crop's field measures) whose detector misses the cell at the
    field's centre (the crop itself, centred in its padded field) and, with ``keep`` set,
    all but that many of its copies."""

    def __init__(self, keep: int | None = None) -> None:
        super().__init__()
        self.keep = keep

    async def infer_image(self, data: bytes) -> dict[str, np.ndarray]:
        out = await super().infer_image(data)
        n = int(out[T.num_detections][0])
        boxes = out[T.boxes][:n]
        centre = config.INPUT_SIZE / 2
        distance = np.abs((boxes[:, 0] + boxes[:, 2]) / 2 - centre) + np.abs(
            (boxes[:, 1] + boxes[:, 3]) / 2 - centre
        )
        rows = np.argsort(distance)[1:]  # the original is the nearest to the centre
        if self.keep is not None:
            rows = rows[-self.keep :]  # the farthest copies only
        for name in (T.boxes, T.scores, T.class_probs):
            kept = out[name][rows]
            out[name][:] = 0
            out[name][: len(rows)] = kept
        out[T.num_detections][:] = len(rows)
        return out


def _crop_through(transport: FakeTransport) -> SpacedImageResult:
    client = AsyncMarrowClient(transport=transport)  # type: ignore[arg-type]
    crop = picture((250, 250), [(100, 110, 50)])
    return asyncio.run(client.analyse_image(crop, "crop", um_per_pixel=0.1))  # type: ignore[arg-type]


def test_a_cell_the_detector_found_only_in_its_mirror_images_counts_once_where_it_is() -> None:
    """A crop is mirrored about a hundred times around itself in its field; a cell found in
    those copies and not in the crop is counted once, its box on the crop; one found in a
    single copy of the hundred is chance, and the crop then has no cell (excluded)."""
    seen = _crop_through(ThickTransport())
    missed = _crop_through(MissesTheOriginal())
    assert seen.counts["lymphocyte"] == missed.counts["lymphocyte"] == 1 and not missed.excluded
    (cell,) = missed.cells
    np.testing.assert_allclose(cell.box, seen.cells[0].box, atol=2.0)
    np.testing.assert_allclose(cell.box, (100, 110, 150, 160), atol=3.0)
    chance = _crop_through(MissesTheOriginal(keep=1))
    assert sum(chance.counts.values()) == 0 and "but no cell found" in (chance.excluded or "")


def test_an_image_coarser_than_the_models_can_read_is_excluded_not_counted() -> None:
    """Given or estimated, a spacing beyond ``max_um_per_pixel`` excludes the image with the
    magnification in its reason; its cells stay listed; the gate off counts them."""
    from marrowdx.client.quality import NO_GATING, TOO_COARSE, QualityThresholds

    data = picture((400, 300), [(100, 100, 24), (250, 150, 24)])
    readable, _ = analyse(data, um_per_pixel=0.5)
    assert readable.excluded is None and readable.counts["lymphocyte"] == 2
    coarse, _ = analyse(data, um_per_pixel=0.8)
    assert coarse.excluded.startswith(f"{TOO_COARSE}: 0.8 µm/px (given)")
    assert sum(coarse.counts.values()) == 0 and len(coarse.cells) == 2
    counted, _ = analyse(data, um_per_pixel=0.8, quality=NO_GATING)
    assert counted.excluded is None and counted.counts["lymphocyte"] == 2
    with pytest.raises(InputError):
        QualityThresholds(max_um_per_pixel=0)


def test_an_exif_orientation_is_applied_before_resampling(tmp_path: Path) -> None:
    """Stored 200 wide and 100 high, displayed (orientation 6) 100 wide and 200 high."""
    from marrowdx.client.fields import prepare_image

    stored = np.full((100, 200, 3), 230, np.uint8)
    stored[:, :20] = CELL  # a dark band on the stored left edge: on the top when displayed
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(stored).save(out, "JPEG", quality=95, exif=exif)
    prepared = prepare_image(out.getvalue(), config.MODEL_UM_PER_PIXEL)
    assert prepared.size == (200, 100)
    (plan,) = prepared.plans
    field = np.asarray(Image.open(io.BytesIO(prepared.fields[0])))
    (top, _), (left, _) = plan.pad
    assert field[top + 5, left + 50, 1] < 100 and field[top + 195, left + 50, 1] > 150
    # the pictures drawn for people show the image upright too, as its boxes are: the
    # review page's (image_checks.upright_rgb) and the overlays
    from marrowdx.client.overlays import draw_image_overlay
    from marrowdx.image_checks import upright_rgb

    assert upright_rgb(out.getvalue()).size == (100, 200)
    result, _ = analyse(out.getvalue(), um_per_pixel=config.MODEL_UM_PER_PIXEL)
    assert result.size == (200, 100)
    overlay = np.asarray(Image.open(draw_image_overlay(out.getvalue(), result, tmp_path / "o.png")))
    assert overlay[5, 50, 1] < 100 and overlay[195, 50, 1] > 150


def test_the_json_and_the_command_output_carry_the_spacing_and_its_warning(capsys) -> None:
    from marrowdx.client.cli import print_image_warnings
    from marrowdx.client.report import cohort_to_dict

    transport = FakeTransport()
    client = AsyncMarrowClient(transport=transport)  # type: ignore[arg-type]
    blank = picture((FIELD, FIELD), [])
    report = asyncio.run(client.diagnose_patient("P", [blank], names=["P/a.png"]))
    (image,) = cohort_to_dict([report])["patients"][0]["images"]
    assert image["spacing"]["source"] == "assumed" and image["spacing"]["fields"] == 1
    print_image_warnings([report], sys.stderr)
    err = capsys.readouterr().err
    assert err.startswith("warning: P/a.png: pixel spacing could not be estimated")


def test_a_warning_several_images_share_is_printed_once_naming_them(capsys) -> None:
    from marrowdx.client.cli import WARNING_NAMES_SHOWN, print_image_warnings

    client = AsyncMarrowClient(transport=FakeTransport())  # type: ignore[arg-type]
    blank = picture((FIELD, FIELD), [])
    names = [f"P/{i}.png" for i in range(WARNING_NAMES_SHOWN + 2)]
    report = asyncio.run(client.diagnose_patient("P", [blank] * len(names), names=names))
    print_image_warnings([report], sys.stderr)
    (line,) = capsys.readouterr().err.splitlines()
    shown = ", ".join(names[:WARNING_NAMES_SHOWN])
    assert line.startswith(f"warning: P, {len(names)} images ({shown} and 2 more): pixel spacing")


def test_warnings_that_differ_only_in_their_figures_are_one_line_with_their_ranges(
    capsys,
) -> None:
    """Each overexposed field's own share (the JSON keeps each text), one line for them all;
    a warning of other words stays a line of its own."""
    from types import SimpleNamespace

    from marrowdx.client.cli import print_image_warnings
    from marrowdx.client.quality import exposure_warning

    shares = (0.31, 0.47, 0.28)
    images = [
        SimpleNamespace(file=f"P/{i}.png", warnings=[exposure_warning({"clipped": share})])
        for i, share in enumerate(shares)
    ]
    images.append(SimpleNamespace(file="P/blank.png", warnings=["pixel spacing could not be"]))
    report = SimpleNamespace(patient_id="P", images=images)
    print_image_warnings([report], sys.stderr)  # type: ignore[list-item]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(
        "warning: P, 3 images (P/0.png, P/1.png, P/2.png): overexposed: 28-47%"
    )
    assert lines[0].endswith(exposure_warning({"clipped": 0.31}).split("31%", 1)[1])
    assert lines[1] == "warning: P/blank.png: pixel spacing could not be"


def crop(red_cells: list[tuple[int, int]], red_diameter: int = 40) -> bytes:
    """A 200 px single-cell crop: a dark 40 px square (the cell) in the middle and pink
    discs (red cells) ``red_diameter`` across, too few for an estimate of its own."""
    image = np.empty((200, 200, 3), np.uint8)
    image[:] = BACKGROUND
    yy, xx = np.mgrid[0:200, 0:200]
    for cx, cy in red_cells:
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < (red_diameter / 2) ** 2] = (220, 150, 150)
    image[80:120, 80:120] = CELL
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


#: One or two red cells per crop, away from the centre cell and from each other.
CROP_RED_CELLS = [[(30, 30)], [(30, 170), (170, 30)], [(170, 170)], [(30, 100), (170, 100)]]


def test_a_patients_crops_share_a_pooled_spacing_from_all_their_red_cells() -> None:
    """Red cells 40 px across: 0.2 µm/px. Each crop alone is uncertain; the patient's crops
    of one size pool their red cells; an unreadable image does not hold the others up."""
    crops = [crop(cells) for cells in CROP_RED_CELLS * 4]
    transport = FakeTransport()
    client = AsyncMarrowClient(transport=transport, concurrency=2)  # type: ignore[arg-type]
    report = asyncio.run(
        asyncio.wait_for(client.diagnose_patient("P", [*crops, b"not an image"]), 60)
    )
    assert len(report.images) == len(crops) and len(report.failed_images) == 1
    for image in report.images:
        info = image.spacing
        assert info.source == "pooled" and info.n_images == len(crops)
        assert info.um_per_pixel == pytest.approx(spacing.RED_CELL_UM / 40, rel=0.1)
        assert info.n_red_cells == sum(spacing.estimate_from_bytes(c).n_red_cells for c in crops)
        assert info.to_dict()["n_images"] == len(crops) and "warnings" not in image.to_dict()
    # the centre cell reached the models at 0.2 / 0.25 of its 40 px (the unreadable bytes
    # went as they were, for the server to refuse)
    for field in [f for f in transport.sent if f != b"not an image"]:
        labels, n = ndi.label(np.asarray(Image.open(io.BytesIO(field)))[..., 1] < 100)
        sides = [xs.stop - xs.start for _, xs in ndi.find_objects(labels)]
        assert n >= 1 and np.median(sides) == pytest.approx(32, abs=2)
    alone = asyncio.run(client.analyse_image(crops[0], "one crop"))
    assert alone.spacing.source == "estimated" and "uncertain" in alone.warnings[0]


def test_an_image_stated_far_off_the_spacing_its_red_cells_give_is_excluded() -> None:
    """A blood field stated at a fraction of its spacing shrinks to a crop's size, whose
    white cells' size is not judged: its own red cells (30 px: about 0.27 µm/px) are. At
    0.25 µm/px it is counted; at 0.1 excluded, the reason naming both; a crop whose red
    cells are too few for a certain estimate keeps the spacing it was given."""
    grid = [(x, y) for x in (25, 75, 125, 175) for y in (25, 75, 125, 175)]
    around = [c for c in grid if not (75 <= c[0] <= 125 and 75 <= c[1] <= 125)]  # 12
    assert len(around) >= q.MIN_RED_CELLS_AGAINST_STATED
    field = crop(around, red_diameter=30)
    right, _ = analyse(field, um_per_pixel=0.25)
    assert right.excluded is None and right.counts["lymphocyte"] == 1
    wrong, _ = analyse(field, um_per_pixel=0.1)
    assert wrong.excluded is not None and wrong.excluded.startswith(q.WRONG_SPACING)
    assert "at the stated 0.1 µm/px" in wrong.excluded and sum(wrong.counts.values()) == 0
    few, _ = analyse(crop(around[:2], red_diameter=30), um_per_pixel=0.1)
    assert few.excluded is None and few.counts["lymphocyte"] == 1
    unchecked, _ = analyse(field, q.NO_GATING, um_per_pixel=0.1)
    assert unchecked.excluded is None


def field_of(
    side: int,
    red_diameter: int,
    *,
    disc: tuple[int, int, int] = (220, 150, 150),
    cell: tuple[int, int, int] = CELL,
    background: tuple[int, int, int] = BACKGROUND,
) -> bytes:
    """A 1024 x 1024 field: a row of six dark squares of ``side`` px (the cells the fake
    detector finds) between rows of discs ``red_diameter`` across (48 red cells), pink
    unless other colours are given."""
    image = np.empty((FIELD, FIELD, 3), np.uint8)
    image[:] = background
    yy, xx = np.mgrid[0:FIELD, 0:FIELD]
    for cy in (64, 192, 576, 704, 832, 960):
        for cx in range(64, FIELD, 128):
            image[(xx - cx) ** 2 + (yy - cy) ** 2 < (red_diameter / 2) ** 2] = disc
    for i in range(6):
        image[300 : 300 + side, 40 + i * 160 : 40 + i * 160 + side] = cell
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


def test_a_field_stated_at_half_or_twice_its_spacing_is_excluded_by_its_red_cells() -> None:
    """A field whose cells are of a suspect size, yet within the size rule's tolerance, has
    its red cells asked. At 0.125 µm/px (red cells 64 px) stated as 0.25, its 11.6 µm cells
    1.6 times the typical size, it is sent as its own bytes and excluded, the reason naming
    its red cells; at 0.25 µm/px (red cells 32 px) stated as 0.125, its cells 0.6 times the
    typical size once resampled, too. At their right spacing both are counted, as is a
    field of cells that large whose red cells agree with the stated spacing."""
    typical = 2 * q.TYPICAL_CELL_SIDE  # in a 1024 field; the model input is 512
    fine = field_of(round(1.6 * typical), red_diameter=64)
    wrong, sent = analyse(fine, um_per_pixel=0.25)
    assert sent.sent == [fine] and wrong.red_cell_estimate is not None
    assert wrong.excluded is not None and wrong.excluded.startswith(
        f"{q.WRONG_SPACING}: its red cells measure 16"
    ), wrong.excluded
    assert "at the stated 0.25 µm/px" in wrong.excluded
    assert sum(wrong.counts.values()) == 0 and len(wrong.cells) == 6
    assert analyse(fine, q.NO_GATING, um_per_pixel=0.25)[0].excluded is None
    large = field_of(round(1.6 * typical), red_diameter=32)
    counted, _ = analyse(large, um_per_pixel=0.25)
    assert counted.excluded is None and counted.counts["lymphocyte"] == 6
    coarse = field_of(round(1.2 * typical), red_diameter=32)
    right, _ = analyse(coarse, um_per_pixel=0.25)
    assert right.excluded is None and right.red_cell_estimate is None  # not suspect: not asked
    shrunk, _ = analyse(coarse, um_per_pixel=0.125)
    assert shrunk.excluded is not None and "its red cells measure 4" in shrunk.excluded


def test_a_patients_crops_stated_far_off_their_pooled_red_cells_are_excluded() -> None:
    """Each crop shows one or two red cells (40 px: 0.2 µm/px), too few to overrule the
    spacing it is given; the patient's crops of one size pooled are enough. Stated at 0.1
    µm/px every crop is excluded, the reason naming the pool; at 0.2 every one is counted."""
    crops = [crop(cells) for cells in CROP_RED_CELLS * 4]

    def patient(um_per_pixel: float) -> PatientReport:
        client = AsyncMarrowClient(transport=FakeTransport())  # type: ignore[arg-type]
        job = client.diagnose_patient("P", crops, um_per_pixel=um_per_pixel, target_cells=0)
        return asyncio.run(job)

    alone, _ = analyse(crops[0], um_per_pixel=0.1)
    assert alone.excluded is None
    wrong = patient(0.1)
    assert not wrong.images and not wrong.failed_images
    assert len(wrong.excluded_images) == len(crops)
    pooled = f"the red cells of the {len(crops)} images of its size"
    assert all(r.startswith(f"{q.WRONG_SPACING}: {pooled}") for r in wrong.excluded_images.values())
    right = patient(0.2)
    assert len(right.images) == len(crops) and not right.excluded_images
    assert right.counts["lymphocyte"] == len(crops)


def test_crops_pooled_at_an_uncertain_spread_are_judged_as_crops_not_as_too_thick() -> None:
    """Real crops add pieces of red cells cut by their borders to a pool: it spreads wider
    than a pool is trusted (warned) while its median stays near the truth. Enough red cells
    from several images still tell a crop from a field, so each crop is judged by its own
    cell, not as a region of smear ("too thick" in ThickTransport's measures). A pool of
    fewer red cells than one image's estimate needs does not: judged as before."""
    mixed = [crop(cells, red_diameter=d) for d in (30, 52) for cells in CROP_RED_CELLS]
    client = AsyncMarrowClient(transport=ThickTransport())  # type: ignore[arg-type]
    report = asyncio.run(client.diagnose_patient("P", mixed, target_cells=0))
    assert len(report.images) == len(mixed) and not report.excluded_images
    for image in report.images:
        info = image.spacing
        assert info.source == "pooled" and info.n_images == len(mixed) and not info.known
        assert info.relative_uncertainty > spacing.MAX_POOLED_SPREAD and image.warnings
        assert image.counts["lymphocyte"] == 1
    few = [crop([(30, 30)]), crop([(170, 170)])]
    report = asyncio.run(client.diagnose_patient("P", few, target_cells=0))
    assert len(report.excluded_images) == len(few) and not report.images
    assert all(f"{q.TOO_THICK}: 60%" in r for r in report.excluded_images.values())


def test_a_patients_arrays_are_pooled_as_their_pngs_are_and_encoded_once(monkeypatch) -> None:
    """Crops a pipeline holds as arrays take the pool their PNGs take, and each is encoded
    once, not again after waiting for the pool (a file is read again: not all held)."""
    from marrowdx.client import fields

    crops = [crop(cells) for cells in CROP_RED_CELLS * 2]
    arrays = [np.asarray(Image.open(io.BytesIO(c)).convert("RGB")) for c in crops]
    encoded: list[int] = []
    encode = fields.encode_decoded
    monkeypatch.setattr(fields, "encode_decoded", lambda a: encoded.append(1) or encode(a))

    def pooled(images: list) -> tuple[list[bytes], object]:
        transport = FakeTransport()
        client = AsyncMarrowClient(transport=transport, concurrency=2)  # type: ignore[arg-type]
        report = asyncio.run(asyncio.wait_for(client.diagnose_patient("P", images), 60))
        return sorted(transport.sent), report

    png_sent, png_report = pooled(crops)
    assert not encoded
    array_sent, array_report = pooled(arrays)
    assert len(encoded) == len(arrays) and array_sent == png_sent
    assert {i.spacing.source for i in array_report.images} == {"pooled"}
    assert [i.counts for i in array_report.images] == [i.counts for i in png_report.images]


def test_an_image_file_stating_its_calibration_is_sent_at_it_not_estimated() -> None:
    """A camera's TIFF whose resolution says 0.075 µm/px (pixels per centimetre) goes out as
    the very fields of its PNG given 0.075, says so in the JSON and carries no warning; a
    spacing the caller gives still wins; in a patient it is not pooled with the crops (nor
    held up by them), and a crop saved with its calibration keeps it."""
    small = _squares((640, 480), [(100, 100, 100), (400, 300, 120)])
    calibrated = _encoded(small, "TIFF", resolution=1e4 / 0.075, resolution_unit="cm")
    given, given_sent = analyse(_encoded(small, "PNG"), um_per_pixel=0.075)
    stated, stated_sent = analyse(calibrated)
    assert stated_sent.sent == given_sent.sent
    assert stated.spacing.source == "file" and stated.spacing.um_per_pixel == pytest.approx(0.075)
    assert stated.counts == given.counts and stated.excluded == given.excluded
    assert "warnings" not in stated.to_dict()
    overridden, _ = analyse(calibrated, um_per_pixel=0.1)
    assert overridden.spacing.source == "given" and overridden.spacing.um_per_pixel == 0.1
    crops = [crop(cells) for cells in CROP_RED_CELLS * 2]
    as_png = Image.open(io.BytesIO(crops[0]))
    calibrated_crop = _encoded(np.asarray(as_png), "PNG", dpi=(25_400 / 0.3, 25_400 / 0.3))
    client = AsyncMarrowClient(transport=FakeTransport(), concurrency=2)  # type: ignore[arg-type]
    report = asyncio.run(
        asyncio.wait_for(client.diagnose_patient("P", [calibrated, calibrated_crop, *crops]), 60)
    )
    first, second, *pooled = report.images
    assert first.spacing.source == second.spacing.source == "file"
    assert second.spacing.um_per_pixel == pytest.approx(0.3, rel=1e-3)
    assert {p.spacing.source for p in pooled} == {"pooled"}
    assert {p.spacing.n_images for p in pooled} == {len(crops)}


def test_a_pooled_patient_stops_at_its_target_without_waiting_forever() -> None:
    crops = [crop(cells) for cells in CROP_RED_CELLS * 3]
    client = AsyncMarrowClient(transport=FakeTransport(), concurrency=1)  # type: ignore[arg-type]
    report = asyncio.run(asyncio.wait_for(client.diagnose_patient("P", crops, target_cells=2), 60))
    assert 2 <= sum(sum(i.counts.values()) for i in report.images) < len(crops)


def _with_alpha(rgb: np.ndarray, transparent: float) -> np.ndarray:
    """``rgb`` with an alpha channel whose top ``transparent`` share of rows is clear."""
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[: int(round(transparent * rgb.shape[0]))] = 0
    return np.dstack([rgb, alpha])


def test_a_mostly_transparent_image_is_no_smear_as_a_file_an_array_or_a_pillow_image() -> None:
    """A logo or an icon saved with transparency is excluded as no smear, however it comes
    (a PNG, a palette PNG with a clear colour, an RGBA array of 8 or 16 bits, a Pillow image,
    a field at the models' spacing sent as its own bytes), with no cell counted; an opaque
    alpha, or a few clear pixels, is counted as the RGB image is; the gate off counts it."""
    small = _squares((640, 480), [(100, 300, 100), (400, 300, 120)])
    rgba = _with_alpha(small, 0.4)
    palette = Image.fromarray(small).quantize(8)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # the background is clear
    field = _with_alpha(_squares(config.FIELD_SIZE, [(100, 600, 100)]), 0.4)
    wide = rgba.astype(np.uint16) * 257
    for source, um_per_pixel in (
        (_encoded(rgba, "PNG"), 0.1),
        (rgba, 0.1),
        (wide, 0.1),
        (Image.fromarray(rgba), 0.1),
        (_palette_png(palette), 0.1),
        (_encoded(field, "PNG"), config.MODEL_UM_PER_PIXEL),
    ):
        result, _ = analyse(source, um_per_pixel=um_per_pixel)  # type: ignore[arg-type]
        assert result.excluded.startswith(f"{q.NOT_A_SMEAR}: ") and "transparent" in result.excluded
        assert sum(result.counts.values()) == 0 and result.cells
    rgb_result, _ = analyse(_encoded(small, "PNG"), um_per_pixel=0.1)
    assert rgb_result.excluded is None and sum(rgb_result.counts.values()) == 2
    for counted in (_with_alpha(small, 0.0), _with_alpha(small, 0.005)):
        for source in (_encoded(counted, "PNG"), counted):
            result, _ = analyse(source, um_per_pixel=0.1)  # type: ignore[arg-type]
            assert result.excluded is None and result.counts == rgb_result.counts
    ungated, _ = analyse(_encoded(rgba, "PNG"), q.NO_GATING, um_per_pixel=0.1)
    assert ungated.excluded is None and ungated.counts == rgb_result.counts


def _palette_png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", transparency=image.info["transparency"])
    return out.getvalue()


CAMERA_BLACK, PAGE_WHITE, VIEWER_GREY = (5, 5, 7), (255, 255, 255), (240, 240, 240)


def _in_frame(
    pixels: np.ndarray, margin: tuple[int, int], colour: tuple[int, int, int] = CAMERA_BLACK
) -> np.ndarray:
    mx, my = margin
    height, width = pixels.shape[:2]
    out = np.full((height + 2 * my, width + 2 * mx, 3), colour, np.uint8)
    out[my : my + height, mx : mx + width] = pixels
    return out


@pytest.mark.parametrize("colour", [CAMERA_BLACK, PAGE_WHITE, VIEWER_GREY])
@pytest.mark.parametrize(("size", "um_per_pixel"), [((640, 480), 0.1), ((2400, 1800), 0.2)])
def test_a_frame_is_taken_off_and_the_boxes_stay_in_the_images_pixels(
    size: tuple[int, int], um_per_pixel: float, colour: tuple[int, int, int]
) -> None:
    """A photograph taken at the eyepiece holds its field in camera black, which the mirror
    padding would repeat until the field sent is mostly black; a field pasted on a page or
    exported from a viewer sits on white or light grey, which the models' stain
    normalisation would read as its glass: the frame is taken off, the image sends the very
    fields of its unframed self (padded or tiled), counts the same, and its boxes are those
    boxes in its own pixels."""
    pixels = _squares(size, [(100, 100, 100), (400, 300, 120)])
    margin = (230, 170)
    plain, plain_sent = analyse(_encoded(pixels, "PNG"), um_per_pixel=um_per_pixel)
    result, sent = analyse(
        _encoded(_in_frame(pixels, margin, colour), "PNG"), um_per_pixel=um_per_pixel
    )
    assert sent.sent == plain_sent.sent and result.counts == plain.counts
    assert result.size == (size[1] + 2 * margin[1], size[0] + 2 * margin[0])
    shift = np.array([*margin, *margin])
    assert len(result.cells) == len(plain.cells) == 2
    for framed, alone in zip(result.cells, plain.cells, strict=True):
        np.testing.assert_allclose(np.array(framed.box) - shift, alone.box, atol=1e-6)


def test_the_field_region_takes_off_a_frame_of_camera_black_and_nothing_else() -> None:
    from marrowdx.image_checks import field_region

    pixels = _squares((300, 200), [(50, 50, 40), (200, 120, 30)])
    assert field_region(pixels) is None  # no frame
    assert field_region(_in_frame(pixels, (3, 2))) is None  # a thin border is left on
    framed = _in_frame(pixels, (40, 25))
    assert field_region(framed) == (40, 25, 340, 225)
    framed[5, 5:10] = 200  # a speck of noise (or a label) in the frame
    assert field_region(framed) == (40, 25, 340, 225)
    assert field_region(np.full((200, 300, 3), 5, np.uint8)) is None  # all black
    sliver = np.full((200, 300, 3), 5, np.uint8)
    sliver[:, 100:108] = 220
    assert field_region(sliver) is None  # what is left is narrower than any image
    dark_smear = (pixels // 4).astype(np.uint8)  # an underexposed field: dim, not black
    assert field_region(dark_smear) is None


def test_a_light_frame_is_taken_off_only_around_a_field_whose_glass_is_not_of_its_colour() -> None:
    """White or light grey around a field is a page or a viewer's background when the field
    inside does not show that colour; an overexposed field's clipped glass is as white as a
    page, and its white border rows are the field's own."""
    from marrowdx.image_checks import field_region

    pixels = _squares((300, 200), [(50, 50, 40), (200, 120, 30)])
    for colour in (PAGE_WHITE, VIEWER_GREY):
        framed = _in_frame(pixels, (40, 25), colour)
        assert field_region(framed) == (40, 25, 340, 225)
        noisy = framed.astype(np.int16) + np.random.default_rng(1).integers(-3, 4, framed.shape)
        assert field_region(np.clip(noisy, 0, 255).astype(np.uint8)) == (40, 25, 340, 225)
    overexposed = pixels.copy()
    overexposed[(pixels == BACKGROUND).all(axis=2)] = PAGE_WHITE  # clipped glass
    assert field_region(_in_frame(overexposed, (40, 25), PAGE_WHITE)) is None
    on_its_glass = _in_frame(pixels, (40, 25), BACKGROUND)  # the glass's own colour
    assert field_region(on_its_glass) is None
    in_both = _in_frame(_in_frame(pixels, (30, 20)), (20, 15), PAGE_WHITE)  # black in white
    assert field_region(in_both) == (50, 35, 350, 235)


def test_a_path_is_read_while_another_thread_is_still_importing_pillow(
    monkeypatch, tmp_path
) -> None:
    """The first images of a cold-started client are read concurrently: while a worker
    thread imports ``PIL.Image``, the module is in ``sys.modules`` without its ``Image``
    class yet. Asking whether a path is a Pillow image must not fail then (it did: 25-28 of
    32 images "client error: ... partially initialized module")."""
    import types

    from marrowdx.client.async_client import in_memory, read_image

    path = tmp_path / "field.png"
    Image.new("RGB", (64, 64), (200, 150, 170)).save(path)
    monkeypatch.setitem(sys.modules, "PIL.Image", types.ModuleType("PIL.Image"))
    assert read_image(path) == path.read_bytes()
    assert not in_memory(str(path)) and in_memory(path.read_bytes())


class PackedTransport(FixedMeasuresTransport):
    """Fields measured as a packed monolayer: 45% of the field under dark grid cells (over
    the thick limit), none of it in areas wider than a cell."""

    measures = {
        "focus": 20000.0, "foreground": 0.5, "thick": 0.45, "brightness": 140.0,
        "stain_colour": 0.9, "background": 0.2, "flat": 0.01, "fine_focus": 0.3, "green": 0.0,
        "thick_wide": 0.02, "clipped": 0.0,
    }  # fmt: skip


def test_a_packed_field_counts_only_at_a_spacing_known_for_sure() -> None:
    """Six identified cells, dark areas no wider than a cell: counted when the spacing is
    given, whether the field is sent as it is or resampled; at an uncertain estimate (the
    same pixels could be anything at another scale) it is too thick, as before."""
    cells = [(60 + 150 * i, 300, 60) for i in range(6)]

    def run(data: bytes, **options: object) -> SpacedImageResult:
        client = AsyncMarrowClient(transport=PackedTransport())  # type: ignore[arg-type]
        return asyncio.run(client.analyse_image(data, "img", **options))  # type: ignore[arg-type]

    field = picture(config.FIELD_SIZE, cells)
    as_sent = run(field, um_per_pixel=0.25)
    assert as_sent.excluded is None and as_sent.counts["lymphocyte"] == 6
    resampled = run(picture((1400, 700), cells), um_per_pixel=0.2)
    assert resampled.spacing.fields > 0 and resampled.excluded is None
    assert resampled.counts["lymphocyte"] == 6
    one_object = {"spacing_estimate": spacing.SpacingEstimate(0.25, None, 1)}
    for unsure in (run(field, **one_object), run(picture((1400, 700), cells), **one_object)):
        assert not unsure.spacing.known
        assert unsure.excluded is not None and f"{q.TOO_THICK}: 45%" in unsure.excluded
        assert sum(unsure.counts.values()) == 0


class PlateletsOnly(ThickTransport):
    """ThickTransport (a crop's field measures) whose every object is a platelet: the models
    identify no nucleated cell, as in a photograph shrunk to a crop's size."""

    async def infer_image(self, data: bytes) -> dict[str, np.ndarray]:
        out = await super().infer_image(data)
        probs = out[T.class_probs]
        found = probs.sum(axis=1) > 0
        probs[found] = 0.0
        probs[found, taxonomy.CLASS_INDEX[taxonomy.PLATELET]] = 1.0
        n = int(out[T.num_detections][0])
        out[T.class_counts] = np.bincount(probs[:n].argmax(1), minlength=config.N_CLASSES).astype(
            np.float32
        )
        return out


#: Browns of wood, coffee, skin or an immunohistochemistry stain: beige, brown discs and a
#: dark brown the fake detector finds.
BEIGE, BROWN, DARK_BROWN = (236, 224, 200), (205, 155, 95), (90, 50, 20)


def brown_crop() -> bytes:
    """A 200 px crop in browns: brown discs and a dark brown square (what the fake detector
    finds) on beige."""
    image = Image.new("RGB", (200, 200), BEIGE)
    draw = ImageDraw.Draw(image)
    for x, y in ((20, 20), (120, 30), (30, 120), (130, 130)):
        draw.ellipse((x, y, x + 50, y + 50), fill=BROWN)
    draw.rectangle((80, 80, 120, 120), fill=DARK_BROWN)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_a_crop_of_no_pink_or_purple_with_no_cell_identified_is_no_smear() -> None:
    """A crop-sized image in browns whose objects the models take for platelets only is no
    Romanowsky-stained smear; a crop of pink red cells and a purple cell with the same
    detections is counted as before, and so is the brown crop once a cell in it is
    identified: the hue alone never excludes a crop that shows a smear's cells."""
    from marrowdx.image_checks import pink_or_purple_share

    def run(transport: FakeTransport, data: bytes, gate: object = q.DEFAULT_QUALITY):
        client = AsyncMarrowClient(transport=transport, quality=gate)  # type: ignore[arg-type]
        return asyncio.run(client.analyse_image(data, "img", um_per_pixel=0.1))

    brown = brown_crop()
    share, n_coloured = pink_or_purple_share(brown)
    assert share < q.MIN_PINK_OR_PURPLE and n_coloured >= q.MIN_COLOURED_FOR_HUE
    excluded = run(PlateletsOnly(), brown)
    assert excluded.excluded is not None, excluded
    assert excluded.excluded.startswith(f"{q.NOT_A_SMEAR}: no pink or purple (")
    assert "no cell identified" in excluded.excluded and sum(excluded.counts.values()) == 0
    smear_like = crop(CROP_RED_CELLS[1])
    assert pink_or_purple_share(smear_like)[0] > 10 * q.MIN_PINK_OR_PURPLE
    assert run(PlateletsOnly(), smear_like).excluded is None
    identified = run(ThickTransport(), brown)
    assert identified.excluded is None and identified.counts["lymphocyte"] == 1
    assert run(PlateletsOnly(), brown, q.NO_GATING).excluded is None


#: A region of smear's measures (thin, with glass): the rules about a region of smear let
#: such a field through, as they did photographs of orange, brown or red things.
THIN_FIELD_MEASURES = {
    **ThickTransport.measures, "thick": 0.02, "thick_wide": 0.0, "background": 0.6,
}  # fmt: skip


class PlateletsOnlyField(PlateletsOnly):
    """PlateletsOnly on a field that measures as a region of smear does."""

    measures = THIN_FIELD_MEASURES


class FieldMeasures(ThickTransport):
    """ThickTransport (cells identified as lymphocytes) on such a field."""

    measures = THIN_FIELD_MEASURES


def test_a_field_of_no_pink_or_purple_with_no_cell_identified_is_no_smear() -> None:
    """The hue rule is asked of a field as of a crop: a 1024 px field in browns at 0.25
    µm/px whose objects the models take for platelets only is excluded as no smear; a field
    of pink red cells with the same detections is not, nor is the brown field once its cells
    are identified."""

    def run(transport: FakeTransport, data: bytes):
        client = AsyncMarrowClient(transport=transport)  # type: ignore[arg-type]
        return asyncio.run(client.analyse_image(data, "img", um_per_pixel=0.25))

    side = round(2 * q.TYPICAL_CELL_SIDE)
    brown = field_of(side, red_diameter=40, disc=BROWN, cell=DARK_BROWN, background=BEIGE)
    excluded = run(PlateletsOnlyField(), brown)
    assert excluded.excluded is not None, excluded
    assert excluded.excluded.startswith(f"{q.NOT_A_SMEAR}: no pink or purple ("), excluded
    assert sum(excluded.counts.values()) == 0
    pink = field_of(side, red_diameter=32)
    smear_like = run(PlateletsOnlyField(), pink)
    assert "no pink or purple" not in (smear_like.excluded or ""), smear_like.excluded
    identified = run(FieldMeasures(), brown)
    assert identified.excluded is None, identified.excluded
    assert identified.counts["lymphocyte"] == 6
