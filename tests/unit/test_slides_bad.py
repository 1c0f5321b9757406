"""Bad slides, each made from a simulated one, fail at open with a SlideError naming the
problem: missing levels, no ROIs (neither annotated nor found), unsupported transfer syntax,
truncated frames."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("wsidicom", reason="needs the slides extra: pip install 'marrowdx[slides]'")

import pydicom  # noqa: E402

from marrowdx.errors import InputError  # noqa: E402
from marrowdx.slides import SlideError, open_slide  # noqa: E402
from tests.helpers.slides import copy_slide, small_slide_cohort  # noqa: E402


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, gt = small_slide_cohort(tmp_path_factory.mktemp("slides"))
    return root / gt["patients"][0]["patient_id"]


def _fails(folder: Path, *words: str, rois: str = "auto") -> str:
    with pytest.raises(SlideError) as info:
        open_slide(folder, rois)
    message = str(info.value)
    assert str(folder) in message
    for word in words:
        assert word in message, message
    return message


def test_the_intact_copy_opens(slide: Path, tmp_path: Path) -> None:
    with open_slide(copy_slide(slide, tmp_path)) as source:
        assert len(source.rois) == 2 and len(source.levels) == 3


def test_missing_base_level(slide: Path, tmp_path: Path) -> None:
    folder = copy_slide(slide, tmp_path)
    (folder / "level_0.dcm").unlink()
    _fails(folder, "missing levels", "references SM instance")


def test_no_level_at_all(slide: Path, tmp_path: Path) -> None:
    folder = copy_slide(slide, tmp_path)
    for level in folder.glob("level_*.dcm"):
        level.unlink()
    _fails(folder, "no VL whole-slide image")


def test_no_roi_annotation(slide: Path, tmp_path: Path) -> None:
    """Without its ROI series a slide is counted from automatically found monolayer areas,
    and says so; asked for annotated ROIs only, it is refused with the series it has."""
    folder = copy_slide(slide, tmp_path)
    (folder / "ann_monolayer_regions_of_interest_for_cell_classification.dcm").unlink()
    with open_slide(folder) as source:
        assert source.roi_source == "automatic" and source.rois
    _fails(folder, "no ROI annotation", "Consensus", rois="annotation")


def test_no_monolayer_found(slide: Path, tmp_path: Path) -> None:
    """A slide of empty glass without ROI annotations: refused, naming both problems."""
    import numpy as np

    from marrowdx.slides.wsi_writer import SlideIdentity, write_wsi

    folder = tmp_path / "GLASS"
    glass = np.full((1024, 1536, 3), 236, np.uint8)
    write_wsi(glass, folder, SlideIdentity.new("GLASS"), um_per_pixel=0.25, tile=512)
    _fails(folder, "no ROI annotation", "no monolayer area found")


def test_unsupported_transfer_syntax(slide: Path, tmp_path: Path) -> None:
    folder = copy_slide(slide, tmp_path)
    path = folder / "level_1.dcm"
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
    ds.save_as(path, enforce_file_format=True)
    _fails(folder, "unsupported transfer syntax", "JPEG-LS", "level_1.dcm")


def test_truncated_frames(slide: Path, tmp_path: Path) -> None:
    folder = copy_slide(slide, tmp_path)
    path = folder / "level_0.dcm"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])  # an interrupted download
    _fails(folder, "truncated frames", "level_0.dcm")


def test_not_a_folder_and_not_a_slide(tmp_path: Path) -> None:
    _fails(tmp_path / "nowhere", "not a folder")
    (tmp_path / "img.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)
    _fails(tmp_path, "no VL whole-slide image", "0 DICOM files")


def test_slide_error_is_an_input_error() -> None:
    """The CLI reports it as a user error (exit 2), and ``except ValueError`` still works."""
    assert issubclass(SlideError, InputError) and issubclass(SlideError, ValueError)
