"""Is it a stained smear at the models' spacing? Images that are not (gradients, text, a
greyscale copy, photo-like noise, clip art) are excluded with a reason that says so and
count no cell; simulated fields, lab-shifted ones included, are counted. The measures come
from the real preprocessing graph (DALI on the CPU); the images are generated here."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from marrowdx import config, taxonomy
from marrowdx.client import aggregate
from marrowdx.client import quality as q
from marrowdx.contract import QUALITY_FIELDS
from tests.helpers.bad_inputs import png_from_rows

SIDE = 1024
T = config.TENSORS


def _encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _png16(rgb16: np.ndarray) -> bytes:
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    return png_from_rows(rgb16.shape[1], rgb16.shape[0], 16, 2, rows)


def _gradient(start: tuple[int, int, int], end: tuple[int, int, int]) -> Image.Image:
    t = np.linspace(0, 1, SIDE)[None, :, None]
    row = np.array(start) * (1 - t) + np.array(end) * t
    return Image.fromarray(row.repeat(SIDE, 0).astype(np.uint8))


def _text() -> Image.Image:
    image = Image.new("RGB", (SIDE, SIDE), "white")
    draw = ImageDraw.Draw(image)
    for i in range(40):
        draw.text((10, 25 * i + 5), "Bone marrow aspirate, page 3: differential", fill="black")
    return image


def _shapes(rng: np.random.Generator) -> Image.Image:
    """Clip art: flat shapes of any colour on white."""
    image = Image.new("RGB", (SIDE, SIDE), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = (int(v) for v in rng.integers(0, SIDE, 2))
        w, h = (int(v) for v in rng.integers(20, 160, 2))
        draw.ellipse((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def _photo_like(rng: np.random.Generator) -> Image.Image:
    """Smooth random colour fields: the statistics of a photo, no bright background."""
    walk = rng.normal(0, 1, (SIDE // 8, SIDE // 8, 3)).cumsum(0).cumsum(1)
    walk = (walk - walk.min()) / np.ptp(walk) * 255
    return Image.fromarray(walk.astype(np.uint8)).resize((SIDE, SIDE), Image.Resampling.BICUBIC)


def _fluorescence(rng: np.random.Generator) -> Image.Image:
    """A fluorescence (or dark-field) image: coloured glowing spots, blurred by the optics
    and with camera noise, on black."""
    dark = rng.normal(8, 3, (SIDE, SIDE, 3))
    image = Image.fromarray(dark.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = (int(v) for v in rng.integers(0, SIDE, 2))
        r = int(rng.integers(6, 30))
        colour = ((60, 255, 90), (80, 120, 255), (255, 80, 60))[int(rng.integers(0, 3))]
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(2))


def _green_logo(rng: np.random.Generator) -> Image.Image:
    """A logo photographed or scanned: a green and an orange half-disc on white, with grain,
    drawn lines and cell-sized dots (so it is neither flat nor structureless)."""
    image = Image.new("RGB", (SIDE, SIDE), "white")
    draw = ImageDraw.Draw(image)
    draw.pieslice((60, 60, SIDE - 60, SIDE - 60), 180, 360, fill=(140, 195, 70))
    draw.pieslice((60, 60, SIDE - 60, SIDE - 60), 0, 180, fill=(250, 140, 60))
    for _ in range(80):
        x, y = (int(v) for v in rng.integers(100, SIDE - 100, 2))
        draw.ellipse((x, y, x + 30, y + 30), outline=(60, 90, 40), width=3)
    grain = rng.normal(0, 6, (SIDE, SIDE, 3))
    return Image.fromarray((np.asarray(image, np.float64) + grain).clip(0, 255).astype(np.uint8))


def _in_black_frame(field: np.ndarray, side: int) -> Image.Image:
    """``field`` shrunk to ``side`` pixels in a SIDE x SIDE frame of camera black (as the
    client sends a photograph taken at the eyepiece at the models' size and spacing)."""
    out = Image.new("RGB", (SIDE, SIDE), (4, 4, 6))
    out.paste(Image.fromarray(field).resize((side, side), Image.Resampling.LANCZOS), (212, 212))
    return out


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    from marrowdx.simulate import field as fl
    from marrowdx.simulate import lab_variation as lv

    rng = np.random.default_rng(22)
    style = fl.SlideStyle.draw(rng)
    labels = [taxonomy.CLASSES[i] for i in rng.integers(0, taxonomy.N_CLASSES, 30)]
    field = fl.render_field(labels, (SIDE, SIDE), style, rng).image
    grey16 = np.asarray(Image.fromarray(field).convert("L")).astype(np.uint16) * 257
    # a pale stain or a washed-out camera: a quarter of the field's contrast to white left
    pale = (255.0 - (255.0 - field.astype(np.float32)) * 0.25).astype(np.uint8)
    out = {
        "smear_pale": _encode(Image.fromarray(pale)),
        "grey_pale": _encode(Image.fromarray(pale).convert("L")),
        "smear": _encode(Image.fromarray(field)),
        "grey": _encode(Image.fromarray(field).convert("L")),
        "grey16_png": _encode(Image.fromarray(grey16), "PNG"),
        "gradient_purple_pink": _encode(_gradient((120, 60, 160), (240, 170, 200))),
        "gradient_blue_white": _encode(_gradient((20, 40, 200), (255, 255, 255))),
        "text": _encode(_text()),
        "photo_like": _encode(_photo_like(rng)),
        "clip_art": _encode(_shapes(rng)),
        "fluorescence": _encode(_fluorescence(rng)),
        "green_logo": _encode(_green_logo(rng)),
        # a camera without white balance: its green cast cancels in the measure's balance
        "smear_green_cast": _encode(Image.fromarray((field * [0.75, 1.0, 0.8]).astype(np.uint8))),
        # an overexposed camera: the glass clipped to a texture-less white, as a drawing's paper
        "smear_overexposed": _encode(Image.fromarray((field * 1.7).clip(0, 255).astype(np.uint8))),
        # a field photographed at the eyepiece: a third of it in a frame of camera black
        "smear_in_black_frame": _encode(_in_black_frame(field, 600)),
        # a 12-bit camera image stored unscaled in a 16-bit PNG: decoders keep the high byte
        "smear_12_bit_in_16": _png16(field.astype(np.uint16) * 16),
    }
    for kind in ("stain", "scanner"):
        shift = lv.LabShift.draw(kind, 1.0, lv.shift_rng(22, 0))
        out[f"smear_{kind}_shift"] = _encode(Image.fromarray(shift.apply(field, rng)))
    return out


@pytest.fixture(scope="module")
def measured(images: dict[str, bytes]) -> dict[str, dict[str, float]]:
    pytest.importorskip("nvidia.dali", reason="DALI (server extra) not installed")
    from marrowdx.preprocess import CpuPreprocessor

    names = list(images)
    *_, quality = CpuPreprocessor(max_batch_size=4)([images[n] for n in names])
    return {
        n: dict(zip(QUALITY_FIELDS, map(float, quality[i]), strict=True))
        for i, n in enumerate(names)
    }


@pytest.mark.parametrize(
    "name",
    [
        "smear",
        "smear_stain_shift",
        "smear_scanner_shift",
        "smear_green_cast",
        "smear_overexposed",
        "smear_in_black_frame",
    ],
)
def test_smears_are_counted(measured, name) -> None:
    assert q.quality_verdict(measured[name]) is None, measured[name]


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("grey", "no stain colour"),
        ("grey16_png", "no stain colour"),
        ("text", "no stain colour"),
        ("gradient_purple_pink", "no cell-sized structure"),
        ("gradient_blue_white", "no cell-sized structure"),
        ("photo_like", "(or one too thick or blurred to count): no background"),
        ("clip_art", "flat colours without texture"),
        ("fluorescence", "(or one far too dark to count): mean grey level"),
        ("smear_12_bit_in_16", "(or one far too dark to count): mean grey level"),
        ("green_logo", "green"),
    ],
)
def test_non_smears_are_excluded_as_such(measured, name, what) -> None:
    reason = q.quality_verdict(measured[name])
    sep = " " if what.startswith("(") else ": "
    assert reason is not None and reason.startswith(f"{q.NOT_A_SMEAR}{sep}{what}"), reason


def test_a_dark_image_names_an_unscaled_16_bit_file_among_its_causes(measured) -> None:
    reason = q.quality_verdict(measured["smear_12_bit_in_16"])
    assert "stored unscaled in a 16-bit file" in reason and "full range" in reason


def test_a_pale_colour_field_is_no_greyscale_image(measured) -> None:
    """Washed out so that nothing is darker than 0.8 of its background, a colour field still
    has its stained pixels judged (half-way down to its darkest area) and keeps its colour;
    its greyscale copy has none."""
    pale, grey = measured["smear_pale"], measured["grey_pale"]
    assert pale["stain_colour"] >= q.DEFAULT_MIN_STAIN_COLOUR, pale  # 0 at a fixed 0.8
    assert "no stain colour" not in (q.smear_verdict(pale) or "")
    assert grey["stain_colour"] < q.DEFAULT_MIN_STAIN_COLOUR
    assert q.smear_verdict(grey).startswith(f"{q.NOT_A_SMEAR}: no stain colour")


def test_what_the_models_found_can_exclude_a_field(measured) -> None:
    """Images whose colour and texture pass (a shaded drawing, a smear of something else) are
    excluded when the objects found are mostly unfamiliar, or when a stained field holds no
    cell at all (what the served models say is measured in the README, not here)."""
    m = measured["smear"]
    assert q.cells_verdict(12, 10, m).startswith(q.NOT_A_SMEAR)
    assert q.cells_verdict(0, 0, {**m, "foreground": 0.12}).startswith(f"{q.NOT_A_SMEAR}: ")
    crop = q.cells_verdict(0, 0, {**m, "foreground": 0.9}, small_image=True)
    assert crop.startswith(f"{q.NOT_A_SMEAR} (or a cell crop whose cell the models cannot find)")
    assert q.cells_verdict(12, 1, m) is None
    assert q.cells_verdict(12, 10, m, q.NO_GATING) is None


def _outputs(
    quality: dict[str, float], side: float, n: int = 12, labels: list[int] | None = None
) -> dict[str, np.ndarray]:
    """Served outputs of ``n`` certain cells (segmented neutrophils, or ``labels``)."""
    k = config.MAX_DETECTIONS
    label = labels if labels is not None else [taxonomy.CLASS_INDEX["segmented_neutrophil"]] * n
    n = len(label)
    probs = np.zeros((k, config.N_CLASSES), np.float32)
    probs[np.arange(n), label] = 1.0
    boxes = np.zeros((k, 4), np.float32)
    boxes[:n] = [(40 * i, 40, 40 * i + side, 40 + side) for i in range(n)]
    return {
        T.boxes: boxes,
        T.scores: np.where(np.arange(k) < n, 0.9, 0).astype(np.float32),
        T.num_detections: np.array([n], np.int32),
        T.class_probs: probs,
        T.attribute_probs: np.zeros((k, config.N_ATTRIBUTES), np.float32),
        T.class_counts: np.bincount(label, minlength=config.N_CLASSES).astype(np.float32),
        T.letterbox: np.array([0.5, 0.5, 0, 0], np.float32),
        T.image_size: np.array([SIDE, SIDE], np.int32),
        T.field_quality: np.array([quality[f] for f in QUALITY_FIELDS], np.float32),
        T.familiarity: np.where(np.arange(k) < n, 0.5, 0).astype(np.float32),
    }


def test_a_non_smear_counts_no_cell_and_a_wrong_spacing_is_named(measured) -> None:
    text = aggregate.decode_image("text.jpg", _outputs(measured["text"], 29.0))
    assert text.excluded.startswith(q.NOT_A_SMEAR) and sum(text.counts.values()) == 0
    smear = aggregate.decode_image("a.jpg", _outputs(measured["smear"], 29.0))
    assert smear.excluded is None and sum(smear.counts.values()) == 12
    for side in (12.0, 70.0):  # cells 2.4 times too small / large: wrong magnification
        far = aggregate.decode_image("b.jpg", _outputs(measured["smear"], side))
        assert far.excluded.startswith(q.WRONG_SPACING) and sum(far.counts.values()) == 0
    near = aggregate.decode_image("c.jpg", _outputs(measured["smear"], 40.0))
    assert near.excluded is None
    gate_off = aggregate.decode_image(
        "b.jpg", _outputs(measured["text"], 12.0), quality=q.NO_GATING
    )
    assert gate_off.excluded is None


def test_the_magnification_check_sizes_nucleated_cells_not_platelets() -> None:
    """A blood field: 5 white cells of the models' size among 12 platelets a quarter of it.
    Platelets' sizes say nothing of the magnification; the same small boxes called white
    cells do."""
    white, platelet = taxonomy.CLASS_INDEX["lymphocyte"], taxonomy.CLASS_INDEX["thrombocyte"]
    boxes = np.array(
        [(40 * i, 40, 40 * i + 29, 69) for i in range(5)]
        + [(40 * i, 200, 40 * i + 7, 207) for i in range(12)],
        np.float32,
    )
    labels = np.array([white] * 5 + [platelet] * 12)
    assert q.spacing_verdict(boxes, labels) is None
    assert q.spacing_verdict(boxes, np.full(17, white)).startswith(q.WRONG_SPACING)
    assert q.spacing_verdict(boxes[5:], np.full(12, white)).startswith(q.WRONG_SPACING)
    assert q.spacing_verdict(boxes[:4], labels[:4]) is None  # too few to judge


def test_cells_no_larger_than_red_cells_at_an_estimated_spacing_may_be_no_smear() -> None:
    """A chart's dots or a pattern's blobs all have one size: at a spacing estimated from
    them as red cells, its "white cells" come out too small. When the models identify
    few of them, the reason says it may be no smear; at a stated spacing only when they
    identify none (the user's spacing is trusted), and with enough cells identified it
    stays a wrong magnification."""
    white = taxonomy.CLASS_INDEX["lymphocyte"]
    boxes = np.array([(40 * i, 40, 40 * i + 14, 54) for i in range(8)], np.float32)
    labels = np.full(8, white)
    few = q.SmearEvidence(identified=1, objects=8)
    named = q.spacing_verdict(boxes, labels, source="estimated", evidence=few)
    assert named.startswith(q.NOT_A_SMEAR) and q.WRONG_SPACING in named
    assert "1 of 8 objects" in named
    for source, evidence in (
        ("given", few),
        ("patient", few),
        ("estimated", q.SmearEvidence(identified=6, objects=8)),
        ("estimated", None),
    ):
        verdict = q.spacing_verdict(boxes, labels, source=source, evidence=evidence)
        assert verdict.startswith(q.WRONG_SPACING)
    assert q.spacing_verdict(boxes * 2, labels, source="estimated", evidence=few) is None
    # a reason the image's fields gave (its own cells too few to judge) is named the same way
    field_reason = q.spacing_verdict(boxes, labels)
    assert q.wrong_spacing_named(field_reason, "estimated", few) == named
    assert q.wrong_spacing_named(field_reason, "given", few) == field_reason
    none = q.SmearEvidence(identified=0, objects=8)
    for stated in ("given", "patient", "file"):
        renamed = q.wrong_spacing_named(field_reason, stated, none)
        assert renamed.startswith(f"{q.NOT_A_SMEAR} (or one at another magnification)")
        assert renamed.endswith(field_reason) and "no cell identified" in renamed
    assert q.wrong_spacing_named(field_reason, None, none) == field_reason
    assert q.wrong_spacing_named("out of focus: ...", "estimated", few) == "out of focus: ..."
    assert q.wrong_spacing_named(None, "estimated", few) is None


def test_no_red_cells_and_no_identified_cell_at_an_unstated_spacing_is_no_smear() -> None:
    none = q.SmearEvidence(identified=0, objects=1)
    for source, red in (("estimated", 1), ("assumed", 0), ("estimated", None)):
        verdict = q.red_cells_verdict(source, red, none)
        assert verdict.startswith(q.NOT_A_SMEAR) and "--um-per-pixel" in verdict
    assert q.red_cells_verdict("estimated", 2, none) is None  # red cells: a smear
    assert q.red_cells_verdict("estimated", 1, q.SmearEvidence(1, 1)) is None
    assert q.red_cells_verdict("estimated", 1, none, q.NO_GATING) is None


def test_round_objects_all_of_one_size_at_an_estimated_spacing_are_drawn(images) -> None:
    """A chart's dots measure the same to the pixel; a smear's red cells never do. The
    estimate's spread tells them apart, and an image whose models found no smear's cells is
    then no smear; cells identified, a stated spacing or too few objects ask nothing."""
    from marrowdx.spacing import estimate_from_bytes

    chart = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(chart)
    for i in range(6):
        draw.ellipse((40 + 100 * i, 200, 100 + 100 * i, 260), fill=(200, 80, 90))
    drawn = estimate_from_bytes(_encode(chart, "PNG"))
    smear = estimate_from_bytes(images["smear"])
    assert drawn.n_red_cells >= q.MIN_DRAWN_OBJECTS
    assert drawn.relative_uncertainty <= q.MAX_DRAWN_SPREAD < 0.05 < smear.relative_uncertainty

    few = q.SmearEvidence(identified=1, objects=8)
    verdict = q.red_cells_verdict(
        "estimated", drawn.n_red_cells, few, red_cell_spread=drawn.relative_uncertainty
    )
    assert verdict.startswith(q.NOT_A_SMEAR) and "all measure the same" in verdict
    assert "1 of 8 objects" in verdict and "--um-per-pixel" in verdict
    n, spread = drawn.n_red_cells, drawn.relative_uncertainty
    assert q.red_cells_verdict("pooled", n, few, red_cell_spread=spread) is not None
    for args, kwargs in (
        (("estimated", n, q.SmearEvidence(identified=6, objects=8)), {}),  # cells identified
        (("given", n, few), {"um_per_pixel": 0.25}),  # the user's word
        (("estimated", q.MIN_DRAWN_OBJECTS - 1, few), {}),  # too few to tell
        (("estimated", n, few, q.NO_GATING), {}),
    ):
        assert q.red_cells_verdict(*args, red_cell_spread=spread, **kwargs) is None
    assert q.red_cells_verdict("estimated", n, few, red_cell_spread=0.05) is None
    assert q.red_cells_verdict("estimated", n, few, red_cell_spread=None) is None

    # three drawn dots are enough to tell (a bar chart's three bar ends were): red cells
    # estimated from three objects spread 0.004 and up in the real sets
    three = Image.new("RGB", (640, 480), "white")
    for i in range(3):
        ImageDraw.Draw(three).ellipse((40 + 200 * i, 200, 100 + 200 * i, 260), fill=(200, 80, 90))
    dots = estimate_from_bytes(_encode(three, "PNG"))
    assert dots.n_red_cells == 3 and dots.relative_uncertainty <= q.MAX_DRAWN_SPREAD
    verdict = q.red_cells_verdict("estimated", 3, few, red_cell_spread=dots.relative_uncertainty)
    assert verdict is not None and "the 3 round objects taken for red cells" in verdict


def test_no_red_cell_of_its_size_at_a_stated_spacing_and_no_identified_cell_is_no_smear() -> None:
    """At a stated spacing the red cells are those of a red cell's size at it, counted by
    the caller for a field only (None: not counted, a crop): nothing is asked without them,
    nor of a field with any identified cell."""
    none = q.SmearEvidence(identified=0, objects=3)
    for source in ("given", "patient"):
        verdict = q.red_cells_verdict(source, 1, none, um_per_pixel=0.25)
        assert verdict.startswith(q.NOT_A_SMEAR) and "stated 0.25 µm/px" in verdict
        assert "1 red cell of a red cell's size" in verdict
        assert q.red_cells_verdict(source, None, none, um_per_pixel=0.25) is None
    assert q.red_cells_verdict("given", 2, none, um_per_pixel=0.25) is None
    assert q.red_cells_verdict("given", 0, q.SmearEvidence(1, 1), um_per_pixel=0.25) is None
    # one identified cell among many unplaced objects: lacking, yet the stated spacing holds
    assert q.red_cells_verdict("given", 0, q.SmearEvidence(1, 9), um_per_pixel=0.25) is None
    assert q.red_cells_verdict("estimated", 0, q.SmearEvidence(1, 9)) is not None
    with pytest.raises(ValueError, match="um_per_pixel"):
        q.red_cells_verdict("given", 0, none)


def test_a_thick_field_without_one_identified_cell_may_be_no_smear(measured) -> None:
    """A photo is as dark and as crowded as a thick smear, but the models identify no cell
    in it: the reason then says it may be no smear. Where a nucleated cell was identified,
    or the field is blurred or empty, the reason stays what the measure says (a blurred smear
    seen by weak models has no identified cell either); counts are 0 either way."""
    thick = {**measured["smear"], "thick": 0.6, "thick_wide": 0.5}
    assert q.quality_verdict(thick, evidence=q.SmearEvidence(1, 0)).startswith("too thick")
    assert q.quality_verdict(thick).startswith("too thick")  # cells not known yet
    named = q.quality_verdict(thick, evidence=q.SmearEvidence(0, 0))
    assert named.startswith(f"{q.NOT_A_SMEAR} (or one too thick to count)")
    assert "too thick: 60%" in named
    blurred = {**thick, "focus": 500.0}
    assert q.quality_verdict(blurred, evidence=q.SmearEvidence(0, 0)).startswith("out of focus")
    empty = {**thick, "foreground": 0.0}
    assert q.quality_verdict(empty, evidence=q.SmearEvidence(0, 0)).startswith("empty")
    assert (
        q.quality_verdict(thick, evidence=q.SmearEvidence(0, 0), small_image=True) is None
    )  # a crop
    photo = _outputs(thick, 29.0)
    photo[T.class_probs][photo[T.class_probs] > 0] = 0.3  # no class probable: unidentified
    image = aggregate.decode_image("photo.jpg", photo)
    assert image.excluded.startswith(q.NOT_A_SMEAR) and sum(image.counts.values()) == 0
    smear = aggregate.decode_image("thick.jpg", _outputs(thick, 29.0))
    assert smear.excluded.startswith("too thick")


def test_a_field_with_a_cell_found_is_not_empty_whatever_its_stained_share(measured) -> None:
    """A pale stain's nuclei stay lighter than the fixed grey level ``foreground`` counts
    (real blood fields of one lab measured 0.00%): a field in which the models found a cell
    is judged by the other rules; one with nothing found, or not yet known, is empty."""
    pale = {**measured["smear"], "foreground": 0.0}
    assert q.quality_verdict(pale, evidence=q.SmearEvidence(0, 1)) is None
    assert q.quality_verdict(pale, evidence=q.SmearEvidence(1, 1)) is None
    assert q.quality_verdict(pale, evidence=q.SmearEvidence(0, 0)).startswith("empty")
    assert q.quality_verdict(pale).startswith("empty")
    blurred = {**pale, "focus": 500.0}
    assert q.quality_verdict(blurred, evidence=q.SmearEvidence(0, 1)).startswith("out of focus")


def test_a_thick_field_of_mostly_unplaced_objects_may_be_no_smear(measured) -> None:
    """One identified cell among many detected objects the models cannot place (a circuit
    board's parts) is no smear's evidence either; platelets are not counted as objects (a
    blood field holds many per white cell)."""
    thick = {**measured["smear"], "thick": 0.6, "thick_wide": 0.5}
    named = q.quality_verdict(thick, evidence=q.SmearEvidence(1, 8))
    assert named.startswith(f"{q.NOT_A_SMEAR} (or one too thick to count): 1 of 8 objects")
    assert q.quality_verdict(thick, evidence=q.SmearEvidence(2, 8)).startswith("too thick")
    assert q.SmearEvidence(0, 0).lacking and not q.SmearEvidence(1, 1).lacking
    labels = [taxonomy.CLASS_INDEX["lymphocyte"]] + [taxonomy.CLASS_INDEX[taxonomy.PLATELET]] * 7
    blood = _outputs(thick, 29.0, labels=labels)
    assert aggregate.decode_image("blood.jpg", blood).excluded.startswith("too thick")


def test_too_low_an_estimated_magnification_may_be_no_smear() -> None:
    """An estimated spacing came from round blobs that may be no red cells, and at a
    magnification too low to read cells what the models identify says nothing: the reason
    says it may be no smear, with what they found. A spacing the user gave is trusted."""
    plain = q.magnification_verdict(0.9, "estimated")
    assert plain.startswith(q.TOO_COARSE)  # cells not known
    named = q.magnification_verdict(0.9, "estimated", evidence=q.SmearEvidence(2, 9))
    assert named.startswith(f"{q.NOT_A_SMEAR} (or one at too low a magnification): 2 of 9")
    assert q.TOO_COARSE in named
    assert q.magnification_verdict(0.9, "given", evidence=q.SmearEvidence(0, 9)).startswith(
        q.TOO_COARSE
    )
    dots = q.magnification_verdict(1.26, "pooled", evidence=q.SmearEvidence(67, 160))
    assert dots.startswith(f"{q.NOT_A_SMEAR} (or one at too low a magnification): 67 of 160")
    assert q.magnification_verdict(0.5, "estimated", evidence=q.SmearEvidence(0, 9)) is None


def test_too_thick_at_an_estimate_from_under_two_round_objects_is_named_as_maybe_no_smear() -> None:
    """A smear too thick to count still shows red cells between its clumps; a photograph's
    dark areas (a cup of coffee) gave the estimate one round object. Only the name changes;
    a stated spacing, or an estimate from red cells, keeps "too thick"."""
    thick = "too thick: 30% of the field under dense clumps, above 25%"
    for red in (0, 1):
        named = q.thick_named(thick, "estimated", red)
        assert named.startswith(f"{q.NOT_A_SMEAR} (or one too thick to count)")
        assert named.endswith(thick) and "taken for a red cell" in named
    for source, red in (("estimated", 2), ("given", 0), ("patient", 1), ("estimated", None)):
        assert q.thick_named(thick, source, red) == thick
    assert q.thick_named("out of focus: ...", "estimated", 0) == "out of focus: ..."
    assert q.thick_named(None, "estimated", 0) is None


def test_transparency_is_no_smear_beyond_a_few_pixels() -> None:
    assert q.transparency_verdict(0.0) is None
    assert q.transparency_verdict(q.MAX_TRANSPARENT_SHARE) is None
    reason = q.transparency_verdict(0.47)
    assert reason.startswith(f"{q.NOT_A_SMEAR}: 47% of the image transparent")
    assert q.transparency_verdict(0.47, q.NO_GATING) is None
