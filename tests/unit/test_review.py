"""Refer-for-review rules, their thresholds, and how ``diagnose`` shows and validates them."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest

from marrowdx import cli, taxonomy
from marrowdx.client import aggregate, html_report
from marrowdx.client.cli import format_table
from marrowdx.client.report import Cell, ImageResult
from marrowdx.client.review import (
    BLAST_STRADDLES,
    DEFAULT_THRESHOLDS,
    FAILED_FIELDS,
    FEW_CELLS,
    LOW_PROBABILITY,
    NO_DIAGNOSIS,
    NO_LEUKEMIA_PATTERN,
    UNIDENTIFIED,
    ReviewThresholds,
    review_reasons,
)
from tests.helpers.html_page import expected_lineages, expected_row, read_page, shown_row

CONFIDENT = {"ALL": 0.01, "AML": 0.98, "CML": 0.01}


def _counts(blasts: int, others: int) -> np.ndarray:
    counts = np.zeros(taxonomy.N_CLASSES, np.int64)
    counts[taxonomy.CLASS_INDEX["myelocytic_blast"]] = blasts
    counts[taxonomy.CLASS_INDEX["neutrophilic_band"]] = others
    counts[taxonomy.CLASS_INDEX["thrombocyte"]] = 40  # never in the differential
    return counts


def _report(
    blasts: int = 200,
    others: int = 300,
    probs: dict[str, float] | None = CONFIDENT,
    n_images: int = 10,
    failed: int = 0,
    target: int = 500,
    review: ReviewThresholds = DEFAULT_THRESHOLDS,
):
    images = [ImageResult(f"f{i}.jpg", (), {}, (1024, 1024)) for i in range(n_images)]
    failures = {f"bad{i}.jpg": "corrupt JPEG" for i in range(failed)}
    why = None if probs else "all images failed"
    return aggregate.build_report(
        "P1", images, failures, _counts(blasts, others), probs, why, target_cells=target,
        review=review,
    )  # fmt: skip


def codes(report) -> list[str]:
    return [r.code for r in report.review_reasons]


def test_a_clear_confident_full_count_is_not_referred():
    report = _report(blasts=200, others=300)  # 40 % blasts of 500: clearly above 20 %
    assert codes(report) == [] and not report.refer_for_review
    assert report.differential.nucleated_cells == 500 and report.target_reached
    below = _report(blasts=20, others=480)  # 4 %: clearly below, and no CML pattern either
    assert codes(below) == [NO_LEUKEMIA_PATTERN] and below.differential.blast_call == "below"
    assert below.diagnosis is None and below.probabilities == {} and below.complete


def test_each_reason_fires_on_its_own():
    assert codes(_report(probs={"ALL": 0.2, "AML": 0.7, "CML": 0.1})) == [LOW_PROBABILITY]
    assert codes(_report(blasts=100, others=400)) == [BLAST_STRADDLES]  # 20 % of 500
    assert codes(_report(blasts=160, others=240)) == [FEW_CELLS]  # 400 of 500
    assert codes(_report(n_images=8, failed=2)) == [FAILED_FIELDS]  # 2 of 10 > 10 %
    assert codes(_report(n_images=9, failed=1)) == []  # 1 of 10 is not above 10 %
    assert codes(_report(probs=None))[0] == NO_DIAGNOSIS


def test_quality_excluded_fields_count_as_failed_ones():
    report = _report(n_images=8)
    report.excluded_images = {"x1.jpg": "focus 120 < 250", "x2.jpg": "empty"}
    assert [r.code for r in review_reasons(report)] == [FAILED_FIELDS]  # 2 of 10


def test_many_unidentified_cells_refer(tmp_path):
    report = _report()
    report.n_unidentified = 60  # 60 of 560 cells: 10.7 % > 10 %
    assert [r.code for r in review_reasons(report)] == [UNIDENTIFIED]
    report.n_unidentified = 50  # 9.1 %
    assert review_reasons(report) == []


def test_thresholds_are_configurable_and_checked():
    lenient = ReviewThresholds(min_diagnosis_probability=0.5, max_failed_fraction=0.5)
    assert codes(_report(probs={"ALL": 0.2, "AML": 0.7, "CML": 0.1}, review=lenient)) == []
    assert codes(_report(n_images=8, failed=2, review=lenient)) == []
    with pytest.raises(ValueError, match="min_diagnosis_probability"):
        ReviewThresholds(min_diagnosis_probability=1.5)
    # no target, no shortfall (4% blasts among neutrophils alone: no leukaemia pattern)
    assert codes(_report(blasts=2, others=48, target=0)) == [NO_LEUKEMIA_PATTERN]


def test_reasons_carry_the_numbers_for_people():
    (reason,) = _report(blasts=100, others=400).review_reasons
    assert "16.7-23.7%" in reason.message and "20%" in reason.message
    (few,) = _report(blasts=160, others=240).review_reasons
    assert few.message == "400 nucleated cells counted, target 500"


def test_table_shows_blast_interval_me_ratio_and_flags():
    table = format_table([_report(), _report(blasts=100, others=400)])
    header, _, first, second = table.splitlines()
    assert "blast % (95% CI)" in header and "M:E" in header and "review" in header
    assert "40.0 (35.8-44.4)" in first and first.rstrip().endswith("-")
    assert "20.0 (16.7-23.7)" in second and BLAST_STRADDLES in second


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--target-cells", "-1", "--target-cells must be >= 0"),
        ("--review-min-probability", "1.5", "min_diagnosis_probability"),
        ("--review-max-unidentified", "-0.1", "max_unidentified_fraction"),
    ],
)
def test_bad_flags_are_refused_before_any_request(tmp_path, capsys, flag, value, message):
    (tmp_path / "P1").mkdir()
    code = cli.main(["diagnose", str(tmp_path), "--url", "127.0.0.1:1", flag, value])
    assert code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------- the review page, without a browser
def _jpeg(seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _cell(label: str, unidentified: bool = False) -> Cell:
    attributes = {name: taxonomy.attribute_value(name, False) for name in taxonomy.ATTRIBUTE_NAMES}
    return Cell((10.0, 12.0, 40.0, 44.0), label, 0.9, attributes, 0.4 if unidentified else 0.95,
                unidentified)  # fmt: skip


def test_review_page_shows_the_json_numbers_and_puts_unidentified_cells_first():
    cells = (_cell("lymphocyte"), _cell("myelocytic_blast"), _cell("monocyte", unidentified=True))
    counts = dict.fromkeys(taxonomy.CLASSES, 0) | {"lymphocyte": 1, "myelocytic_blast": 1}
    image = ImageResult("P<1>/a.jpg", cells, counts, (96, 128))
    first = aggregate.build_report(
        "P<1>", [image], {}, np.array([counts[c] for c in taxonomy.CLASSES]), CONFIDENT, None,
        target_cells=500,
    )  # fmt: skip
    second = _report(blasts=100, others=400)
    page = html_report.render_html([first, second], {"P<1>": {"P<1>/a.jpg": _jpeg(1)}})
    dom = read_page(page)
    data = [r.to_dict() for r in (first, second)]
    assert list(dom.rows) == ["P<1>", "P1"]  # escaped in the page, read back intact
    for patient in data:
        assert shown_row(dom.rows[patient["patient_id"]]) == expected_row(patient)
        lineages = {k: int(v) for k, v in dom.lineages[patient["patient_id"]].items()}
        assert lineages == expected_lineages(patient)
    missing = html_report.MISSING
    assert dom.rows["P<1>"]["me_ratio"] == missing  # no erythroid cell: null in the JSON
    assert all(src.startswith("data:image/jpeg;base64,") for src in dom.image_sources)
    assert len(dom.image_sources) == 1 + 3  # one field, three crops
    assert not [u for u in dom.urls if "://" in u] and "<script" not in page
    first_section = page[: page.index('id="patient-P1"')]
    galleries = re.findall(r'data-gallery="([^"]+)"', first_section)
    first_two = [html_report.UNFAMILIAR, html_report.UNIDENTIFIED]
    assert galleries == [*first_two, "myelocytic_blast", "lymphocyte"]
    assert "<P<1>" not in page and "P&lt;1&gt;" in page


def test_review_page_and_overlay_draw_an_image_given_as_an_array_as_its_png(tmp_path):
    """A field the Python API was given as a numpy array (or a Pillow image) is drawn from
    its pixels."""
    import io

    from PIL import Image

    from marrowdx.client.overlays import draw_image_overlay

    pixels = np.asarray(Image.open(io.BytesIO(_jpeg(2))))
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    counts = dict.fromkeys(taxonomy.CLASSES, 0) | {"lymphocyte": 1}
    image = ImageResult("#0", (_cell("lymphocyte"),), counts, (96, 128))
    report = aggregate.build_report(
        "P", [image], {}, np.array([counts[c] for c in taxonomy.CLASSES]), CONFIDENT, None
    )
    as_array = html_report.render_html([report], {"P": {"#0": pixels}})
    assert as_array == html_report.render_html([report], {"P": {"#0": png.getvalue()}})
    assert as_array == html_report.render_html([report], {"P": {"#0": Image.fromarray(pixels)}})
    drawn = [
        draw_image_overlay(s, image, tmp_path / f"{i}.png")
        for i, s in enumerate([pixels, png.getvalue()])
    ]
    assert np.array_equal(*(np.asarray(Image.open(d)) for d in drawn))


def test_review_page_shows_each_fields_spacing_and_its_warnings_as_the_json_has_them():
    """A field read at an uncertain estimate carries the JSON's warning under its picture;
    one at a given spacing says so and carries none."""
    from marrowdx.client.fields import SpacingInfo, with_spacing

    warning = "pixel spacing estimate 0.08 um/px is uncertain (3 red cells, 41% spread)"
    counts = dict.fromkeys(taxonomy.CLASSES, 0) | {"lymphocyte": 1}
    guessed = with_spacing(
        ImageResult("P1/a.jpg", (_cell("lymphocyte"),), counts, (96, 128)),
        SpacingInfo(0.08, "estimated", 0.41, 3, warning=warning),
    )
    given = with_spacing(
        ImageResult("P1/b.jpg", (_cell("lymphocyte"),), counts, (96, 128)),
        SpacingInfo(0.1, "given"),
    )
    total = np.array([2 * counts[c] for c in taxonomy.CLASSES])
    report = aggregate.build_report("P1", [guessed, given], {}, total, CONFIDENT, None)
    sources = {"P1": {"P1/a.jpg": _jpeg(1), "P1/b.jpg": _jpeg(2)}}
    page = html_report.render_html([report], sources)
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page, re.S)
    assert len(captions) == 2
    assert '<span data-spacing="estimated">0.08 µm/px (estimated)</span>' in captions[0]
    assert (
        re.findall(r"<li class=\"warning\" data-warning>(.*?)</li>", captions[0])
        == [html.escape(w) for w in report.to_dict()["images"][0]["warnings"]]
        == [html.escape(warning)]
    )
    assert '<span data-spacing="given">0.1 µm/px (given)</span>' in captions[1]
    assert "warning" not in captions[1]


def test_referral_measurement_counts_caught_and_flagged_per_cohort():
    from marrowdx.client.referral import score

    clear = _report()  # AML, confident, 40 % blasts
    unsure = _report(probs={"ALL": 0.3, "AML": 0.6, "CML": 0.1})
    straddling = _report(blasts=100, others=400)
    labelled = [("a", clear, "AML"), ("a", unsure, "ALL"), ("b", straddling, "AML")]
    a, b, total = score(labelled, DEFAULT_THRESHOLDS)
    assert (a.cohort, a.patients, a.wrong, a.wrong_referred, a.correct_referred) == (
        "a",
        2,
        1,
        1,
        0,
    )
    assert (b.correct, b.correct_referred, b.reasons) == (1, 1, {BLAST_STRADDLES: 1})
    assert (total.caught, total.flagged) == (1.0, 0.5)
    lenient = ReviewThresholds(min_diagnosis_probability=0.5)
    assert score(labelled, lenient)[-1].caught == 0.0  # re-scored without running anything
