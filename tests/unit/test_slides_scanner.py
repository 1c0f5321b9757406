"""Scanner formats and automatic ROIs, on copies of a simulated DICOM slide.

The SVS-style and tiled-TIFF copies hold the DICOM slide's JPEG frames unchanged
(``simulate.scanner_slide``), so everything downstream of reading must agree with the DICOM
slide read without its ROI annotations: the same pixels, the same automatic ROIs, the same
fields sent (hence the same counts under any model). The automatic ROIs are compared with
the annotated ones (area IoU, and the ground-truth differential of the cells each holds),
and a big mostly-empty slide is searched from a small share of its base-level tiles.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("wsidicom", reason="needs the slides extra: pip install 'marrowdx[slides]'")
pytest.importorskip("openslide", reason="needs the slides extra (openslide-python, openslide-bin)")
pytest.importorskip("tifffile", reason="needs the slides extra (tifffile, imagecodecs)")

from marrowdx import taxonomy  # noqa: E402
from marrowdx.simulate.scanner_slide import (  # noqa: E402
    BigSlideSpec,
    copy_as_scanner_file,
    write_big_slide,
)
from marrowdx.slides import SlideError, is_slide_folder, open_slide  # noqa: E402
from marrowdx.slides.detect import scanner_file  # noqa: E402
from marrowdx.slides.roi_finder import rois_iou  # noqa: E402
from tests.helpers.slides import copy_slide, small_slide_cohort  # noqa: E402

ROI_SERIES = "ann_monolayer_regions_of_interest_for_cell_classification.dcm"
#: The goals: found areas against annotated ones.
MIN_IOU = 0.85
MAX_TVD = 0.05


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The first simulated slide as DICOM (ROI series removed), SVS and tiled TIFF."""
    root, gt = small_slide_cohort(tmp_path_factory.mktemp("slides"))
    pid = gt["patients"][0]["patient_id"]
    out = tmp_path_factory.mktemp("scanner")
    dicom = copy_slide(root / pid, out / "dicom")
    (dicom / ROI_SERIES).unlink()
    svs = copy_as_scanner_file(root / pid, out / "svs" / pid / "slide.svs", "svs")
    tif = copy_as_scanner_file(root / pid, out / "tiff" / pid / "slide.tif", "tiff")
    return {"annotated": root / pid, "dicom": dicom, "svs": svs.parent, "tiff": tif.parent}


def _cells(gt: dict, pid: str) -> list[dict]:
    patient = next(p for p in gt["patients"] if p["patient_id"] == pid)
    return [c for image in patient["images"] for c in image["cells"]]


def _counts(cells: list[dict], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    counts = np.zeros(taxonomy.N_CLASSES)
    for c in cells:
        x0, y0, x1, y1 = c["box"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if any(b[0] <= cx < b[2] and b[1] <= cy < b[3] for b in boxes):
            counts[taxonomy.CLASSES.index(c["label"])] += 1
    return counts


def test_scanner_files_are_recognised_as_slides(copies: dict[str, Path], tmp_path: Path) -> None:
    assert scanner_file(copies["svs"]).suffix == ".svs" and is_slide_folder(copies["svs"])
    assert scanner_file(copies["tiff"]).suffix == ".tif" and is_slide_folder(copies["tiff"])
    # a striped TIFF (one field of view, as a camera writes it) is an image, not a slide
    from PIL import Image

    (tmp_path / "P9").mkdir()
    Image.new("RGB", (64, 64), "white").save(tmp_path / "P9" / "field.tif")
    assert scanner_file(tmp_path / "P9") is None and not is_slide_folder(tmp_path / "P9")


@pytest.mark.parametrize("layout", ["svs", "tiff"])
def test_scanner_copy_reads_as_the_dicom_slide(copies: dict[str, Path], layout: str) -> None:
    """Spacing from the file (Aperio MPP / TIFF resolution), the DICOM pixels, found ROIs."""
    with open_slide(copies["dicom"]) as dicom, open_slide(copies[layout]) as scanned:
        assert scanned.vendor == {"svs": "aperio", "tiff": "generic-tiff"}[layout]
        assert scanned.um_per_pixel == pytest.approx(dicom.um_per_pixel, rel=1e-3)
        assert [lv.downsample for lv in scanned.levels] == [lv.downsample for lv in dicom.levels]
        box = (dicom.width // 3, dicom.height // 3, dicom.width // 3 + 700, dicom.height // 3 + 500)
        a = np.asarray(dicom.read_box(box, 1.0), np.int16)
        b = np.asarray(scanned.read_box(box, 1.0), np.int16)
        assert np.abs(a - b).max() <= 1
        assert scanned.roi_source == dicom.roi_source == "automatic"
        assert [r.box for r in scanned.rois] == [r.box for r in dicom.rois]


def test_scanner_copies_send_the_dicom_slides_fields(copies: dict[str, Path]) -> None:
    """Same fields (boxes and pixels) from the three files: the same counts under any model
    (the goal asks within 1%)."""
    import io

    from PIL import Image

    def fields(folder: Path) -> list[tuple[tuple, np.ndarray]]:
        with open_slide(folder) as slide:
            return [
                (f.box, np.asarray(Image.open(io.BytesIO(f.data)), np.int16))
                for f in slide.fields()
            ]

    dicom = fields(copies["dicom"])
    assert dicom
    for layout in ("svs", "tiff"):
        other = fields(copies[layout])
        assert [box for box, _ in other] == [box for box, _ in dicom]
        for (_, a), (_, b) in zip(dicom, other, strict=True):
            assert np.abs(a - b).mean() < 0.5


def test_automatic_rois_match_the_annotated_ones(copies: dict[str, Path]) -> None:
    """Area IoU with the annotators' ROIs, and the ground-truth differential of the cells
    in each set (count TVD), within the goals; the JSON-ready record says what was read."""
    gt = json.loads((copies["annotated"].parent / "ground_truth.json").read_text())
    pid = copies["annotated"].name
    with open_slide(copies["annotated"]) as annotated, open_slide(copies["dicom"]) as found:
        assert annotated.roi_source == "annotation" and found.roi_source == "automatic"
        ann = [r.box for r in annotated.rois]
        auto = [r.box for r in found.rois]
        record = found.roi_search.to_dict()
    assert rois_iou(ann, auto) >= MIN_IOU, (ann, auto)
    cells = _cells(gt, pid)
    a, b = _counts(cells, ann), _counts(cells, auto)
    # this CI slide holds a few dozen cells: a border cell lost to the margin kept from the
    # thick area (16 µm away here) moves the TVD by a few percent; the cohort-level goal
    # (TVD <= 0.05) is measured on bigger slides (docs/performance.md)
    assert b.sum() >= a.sum() - len(ann)
    tvd = 0.5 * np.abs(a / a.sum() - b / b.sum()).sum()
    assert tvd <= 2 * MAX_TVD
    assert record["candidates"] and all(c["kept"] for c in record["candidates"])
    assert 0 < record["base_tiles_read"] <= record["base_tiles_total"]


def test_annotated_slide_found_with_automatic_rois_on_request(copies: dict[str, Path]) -> None:
    """``rois="automatic"`` ignores the series; ground truth is then assigned by position."""
    with open_slide(copies["annotated"], "automatic") as slide:
        assert slide.roi_source == "automatic"
        truth = slide.ground_truth()
    assert sum(len(im["cells"]) for im in truth["images"]) > 0
    with pytest.raises(SlideError, match="no ROI annotation"):
        open_slide(copies["svs"], "annotation")


def test_tiff_without_spacing_is_refused_or_estimated(
    copies: dict[str, Path], tmp_path: Path
) -> None:
    """No MPP and no resolution tags: the red-cell estimator, else a clear error; the
    spacing given by the caller is used when the file states none."""
    import tifffile

    src = scanner_file(copies["tiff"])
    folder = tmp_path / "NOMPP"
    folder.mkdir()
    target = folder / "slide.tif"
    shutil.copy(src, target)
    with tifffile.TiffFile(target, mode="r+") as tif:
        for page in tif.pages:
            page.tags["ResolutionUnit"].overwrite(1)  # NONE: the resolution says nothing
    try:
        with open_slide(folder) as slide:
            assert slide.spacing_source == "estimated from red cells"
            assert slide.um_per_pixel == pytest.approx(0.25, rel=0.25)
    except SlideError as exc:
        assert "pixel spacing unknown" in str(exc) and "--um-per-pixel" in str(exc)
    with open_slide(folder, um_per_pixel=0.25) as slide:  # diagnose --um-per-pixel 0.25
        assert slide.spacing_source == "given" and slide.um_per_pixel == 0.25
        assert slide.roi_source == "automatic" and slide.rois


def test_big_slide_is_searched_from_a_few_base_tiles(tmp_path: Path) -> None:
    """A 20,000 x 10,000 slide, mostly glass, written tile by tile: its monolayer areas are
    found from the overview and a few full-resolution patches (<= 10% of the base tiles)."""
    spec = BigSlideSpec(
        width=20_000, height=10_000, n_areas=2, area_size=(1536, 1536), thick_width=800
    )
    big = write_big_slide(tmp_path / "BIG" / "slide.svs", spec)
    with open_slide(tmp_path / "BIG") as slide:
        search = slide.roi_search
        found = [r.box for r in slide.rois]
        assert slide.read_log.n_read(0) == search.base_tiles_read
    assert search.base_tiles_total == 40 * 20
    assert 0 < search.base_fraction <= 0.10, search.to_dict()
    assert rois_iou(big.areas, found) >= MIN_IOU, (big.areas, found)


def test_scanner_file_has_no_ground_truth(copies: dict[str, Path]) -> None:
    """Training and evaluation need labels: a scanner file says it has none."""
    with open_slide(copies["svs"]) as slide:
        assert slide.annotation_sources() == []
        with pytest.raises(SlideError, match="carries no labels"):
            slide.ground_truth()


@pytest.mark.parametrize("strength", [0.5, 2.0])
def test_automatic_rois_under_weaker_and_stronger_stain(
    copies: dict[str, Path], strength: float
) -> None:
    """The same slide stained half or twice as strongly (optical density scaled): the finder
    scales its overview to the reference stain first, so the thick band does not pass for
    monolayer (weak stain) nor the monolayer for thick (strong stain)."""
    from PIL import Image

    from marrowdx.slides.roi_finder import find_rois

    table = np.clip(255 * (np.arange(256) / 255.0) ** strength, 0, 255).astype(np.uint8)
    with open_slide(copies["annotated"]) as slide:
        ann = [r.box for r in slide.rois]
        read = slide._read_region
        slide._read_region = lambda *a: Image.fromarray(table[np.asarray(read(*a).convert("RGB"))])
        search = find_rois(slide)
    found = [r.box for r in search.rois]
    assert rois_iou(ann, found) >= MIN_IOU, (strength, ann, found)
    assert search.stain_gain == pytest.approx(1 / strength, rel=0.35)
