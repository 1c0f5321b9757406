"""Counts through the models (tiny preset, in-process pipeline): a simulated DICOM slide
without its ROI annotations, and its SVS-style and tiled-TIFF copies, diagnosed by
``diagnose``'s own slide code, give the same counts (the goal: within 1%); every report
says its ROIs were found automatically. Model quality is not asserted (the tiny preset).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("wsidicom", reason="needs the slides extra: pip install 'marrowdx[slides]'")
pytest.importorskip("openslide", reason="needs the slides extra (openslide-python, openslide-bin)")
pytest.importorskip("onnxruntime", reason="the in-process pipeline needs the server extra")

pytestmark = pytest.mark.slow

ROI_SERIES = "ann_monolayer_regions_of_interest_for_cell_classification.dcm"


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from marrowdx.simulate.dicom_slide import DicomCohortSpec, simulate_dicom_cohort
    from marrowdx.simulate.scanner_slide import copy_as_scanner_file

    root = tmp_path_factory.mktemp("scanner-counts")
    spec = DicomCohortSpec(seed=23, canvas=(3072, 1536), n_rois=2, roi_size=(1100, 1100))
    gt = simulate_dicom_cohort(root / "annotated", 1, spec)
    out = {"annotated": root / "annotated"}
    for kind in ("dicom", "svs", "tiff"):
        folder = root / kind
        folder.mkdir()
        shutil.copy(root / "annotated" / "ground_truth.json", folder / "ground_truth.json")
        for patient in gt["patients"]:
            pid = patient["patient_id"]
            if kind == "dicom":
                shutil.copytree(root / "annotated" / pid, folder / pid)
                (folder / pid / ROI_SERIES).unlink()
            else:
                name = "slide.svs" if kind == "svs" else "slide.tif"
                copy_as_scanner_file(root / "annotated" / pid, folder / pid / name, kind)
        out[kind] = folder
    return out


def test_scanner_copies_count_as_the_dicom_slide(built_repository: Path, cohorts) -> None:
    from marrowdx.bench.slides import slide_quality

    results = {k: slide_quality(cohorts[k], built_repository) for k in ("dicom", "svs", "tiff")}
    annotated = slide_quality(cohorts["annotated"], built_repository)
    assert annotated.roi_source == "annotation"
    dicom = results["dicom"]
    assert dicom.roi_source == "automatic" and dicom.kept > 0
    for kind in ("svs", "tiff"):
        other = results[kind]
        assert other.roi_source == "automatic"
        assert abs(other.kept - dicom.kept) <= 0.01 * dicom.kept, (kind, other, dicom)
        assert other.matched == pytest.approx(dicom.matched, rel=0.01)
    truth = json.loads((cohorts["annotated"] / "ground_truth.json").read_text())
    assert (
        annotated.cells
        == dicom.cells
        == sum(len(im["cells"]) for p in truth["patients"] for im in p["images"])
    )
