"""Slides end to end against the real Triton server (tiny models): a simulated DICOM cohort,
with an image folder beside it and a truncated slide among it, diagnosed with ``--json`` and
``--dicom-annotations``; the annotations read back with highdicom; the bench's slide workload.

Model quality is not asserted (the tiny preset); what is: the slide path goes through the
served ensemble, its ROIs and boxes are in base-level slide pixels, a cell is reported once,
a bad slide fails only its patient, and the DICOM output agrees with the JSON.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from marrowdx import cli

pytestmark = [pytest.mark.server, pytest.mark.slow]
pytest.importorskip("wsidicom", reason="slides need the 'slides' extra (wsidicom)")
highdicom = pytest.importorskip("highdicom", reason="slides need the 'slides' extra (highdicom)")

SLIDES = ("P0001", "P0002")
BAD = "BAD01"
IMAGES = "IMG01"
#: Small slides: 2 ROIs of 1100 px, each tiled into 2 x 2 overlapping fields of 1024.
SIM_ARGS = ["--size", "3072x1536", "--rois", "2", "--roi-size", "1100x1100"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slide-cohort")
    out = root / "cohort"
    argv = ["simulate", "--format", "dicom", "--patients", "2", "--seed", "41", "--no-progress"]
    assert cli.main([*argv, *SIM_ARGS, "--out", str(out)]) == 0
    # A folder of JPEG fields beside the slides: today's input still works in the same run.
    images = root / "images"
    argv = ["simulate", "--patients", "1", "--seed", "5", "--out", str(images)]
    assert cli.main([*argv, "--images-per-patient", "2", "--size", "640x480", "--no-progress"]) == 0
    shutil.copytree(images / "P0001", out / IMAGES)
    # A slide whose base level lost its last bytes (a broken download).
    shutil.copytree(out / SLIDES[0], out / BAD)
    level0 = out / BAD / "level_0.dcm"
    level0.write_bytes(level0.read_bytes()[:-20000])
    return out


@pytest.fixture(scope="module")
def diagnosed(triton_server, cohort: Path, tmp_path_factory) -> tuple[int, dict, Path]:
    out = tmp_path_factory.mktemp("slide-out")
    argv = [
        "diagnose", str(cohort),
        "--url", triton_server.grpc_url,
        "--json", str(out / "report.json"),
        "--dicom-annotations", str(out / "annotations"),
        "--target-cells", "0",
        "--no-progress",
    ]  # fmt: skip
    code = cli.main(argv)
    return code, json.loads((out / "report.json").read_text()), out / "annotations"


def n_tiled(folder: Path, tiling: str | None = None) -> int:
    """Fields ``tiling`` sends (default: the client's default tiling)."""
    from marrowdx.slides import open_slide
    from marrowdx.slides.tiling import TILINGS, tile

    with open_slide(folder) as slide:
        return sum(1 for _ in tile(slide, tiling or TILINGS[0]))


def _patients(doc: dict) -> dict[str, dict]:
    return {p["patient_id"]: p for p in doc["patients"]}


def test_slides_are_diagnosed_beside_image_folders(diagnosed, cohort: Path) -> None:
    code, doc, _ = diagnosed
    assert code == 1, "the truncated slide makes the run incomplete"
    patients = _patients(doc)
    assert set(patients) == {*SLIDES, BAD, IMAGES}
    truth = {
        p["patient_id"]: p
        for p in json.loads((cohort / "ground_truth.json").read_text())["patients"]
    }
    for pid in SLIDES:
        p = patients[pid]
        assert p["failed_images"] == {}, p["failed_images"]
        assert p["n_fields"] == n_tiled(cohort / pid) > 0  # every field served
        assert p["roi_source"] == "annotation" and p["roi_search"] is None
        # the cells as GeoJSON for QuPath, beside the JSON report by default
        geo = json.loads(Path(p["geojson"]).read_text())
        detections = [f for f in geo["features"] if f["properties"]["objectType"] == "detection"]
        assert len(detections) == sum(len(image["cells"]) for image in p["images"])
        rois = [image["roi"] for image in p["images"]]
        assert rois == [image["roi"] for image in truth[pid]["images"]]
        assert {image["file"] for image in p["images"]} == {pid}
        n = 0
        for image in p["images"]:
            x0, y0, x1, y1 = image["roi"]
            for cell in image["cells"]:
                bx0, by0, bx1, by1 = cell["box"]
                cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
                assert x0 <= cx < x1 and y0 <= cy < y1, "base-level box centred in its ROI"
            n += len(image["cells"])
        assert n > 0
        counted = sum(p["counts"].values())
        # unidentified and unfamiliar cells are listed, not counted
        listed = sum(
            c.get("unidentified", False) or c.get("unfamiliar", False)
            for i in p["images"]
            for c in i["cells"]
        )
        assert counted == n - listed == p["n_cells"]
    assert patients[IMAGES]["n_images"] == 2 and patients[IMAGES]["failed_images"] == {}


def test_a_cell_in_an_overlap_is_reported_once(diagnosed) -> None:
    """No two reported cells of one ROI are the same cell seen by two fields."""
    _, doc, _ = diagnosed
    for pid in SLIDES:
        for image in _patients(doc)[pid]["images"]:
            boxes = np.array([c["box"] for c in image["cells"]])
            if len(boxes) < 2:
                continue
            x0 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
            y0 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
            x1 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
            y1 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
            inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            iou = inter / (area[:, None] + area[None, :] - inter)
            np.fill_diagonal(iou, 0)
            assert iou.max() < 0.9, "two near-identical boxes: an overlap cell counted twice"


def test_bad_slide_fails_only_its_patient(diagnosed) -> None:
    _, doc, annotations = diagnosed
    bad = _patients(doc)[BAD]
    assert list(bad["failed_images"]) == [BAD]
    assert "trunc" in bad["failed_images"][BAD].lower()
    assert bad["diagnosis"] is None and bad["n_cells"] == 0
    assert not (annotations / BAD).exists()


def test_dicom_annotations_read_back_equal_the_json(diagnosed, cohort: Path) -> None:
    from marrowdx.slides import read_annotations

    _, doc, annotations = diagnosed
    for pid in SLIDES:
        p = _patients(doc)[pid]
        (path,) = sorted((annotations / pid).glob("*.dcm"))
        assert p["dicom_annotations"] == str(path)
        json_counts = Counter(c["label"] for i in p["images"] for c in i["cells"])
        ann = highdicom.ann.annread(path)
        assert ann.SOPClassUID == "1.2.840.10008.5.1.4.1.1.91.1"
        hd_counts = Counter()
        for group in ann.get_annotation_groups():
            hd_counts[group.label] += group.number_of_annotations
        assert hd_counts == json_counts
        # It references the slide it annotates.
        source = next(f for f in (cohort / pid).glob("level_0.dcm"))
        import pydicom

        series = pydicom.dcmread(source, stop_before_pixels=True).SeriesInstanceUID
        referenced = {s.SeriesInstanceUID for s in ann.ReferencedSeriesSequence}
        assert series in referenced
        # The package's own reader gives the same cells back, with scores.
        cells = read_annotations(path)
        assert Counter(c.label for c in cells) == json_counts
        assert all(c.score is not None for c in cells)


def test_bench_slide_workload(triton_server, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "bench", "--workload", "slides", "--json", str(out),
        "--url", triton_server.grpc_url, "--admin-key", triton_server.admin_key,
        "--slide-rounds", "1", "--slide-concurrency", "4",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())["slides"]
    (row,) = doc["rounds"]
    assert row["files_fields"] == row["slide_fields"] == doc["slide"]["fields"] > 0
    assert row["files_failed"] == row["slide_failed"] == 0
    assert doc["slide_over_files"] == pytest.approx(
        row["slide_fields_per_s"] / row["files_fields_per_s"]
    )
    assert doc["slides_per_hour"] > 0 and doc["slide"]["roi_megapixels"] > 0


def test_frame_tiling(triton_server, cohort: Path, tmp_path) -> None:
    """``--slide-tiling frame_fields``: the slide's own frames as stored (abutting, cells cut
    on seams joined), merged per ROI; boxes still in base-level pixels."""
    one = tmp_path / "one"
    shutil.copytree(cohort / SLIDES[0], one / SLIDES[0])
    out = tmp_path / "frames.json"
    argv = ["diagnose", str(one), "--url", triton_server.grpc_url, "--json", str(out)]
    assert cli.main([*argv, "--slide-tiling", "frame_fields", "--no-progress"]) == 0
    (p,) = json.loads(out.read_text())["patients"]
    expected = n_tiled(one / SLIDES[0], "frame_fields")
    assert p["failed_images"] == {} and p["n_fields"] == expected > 0
    for image in p["images"]:
        x0, y0, x1, y1 = image["roi"]
        for cell in image["cells"]:
            cx, cy = (cell["box"][0] + cell["box"][2]) / 2, (cell["box"][1] + cell["box"][3]) / 2
            assert x0 <= cx < x1 and y0 <= cy < y1


def test_scanner_file_patient(triton_server, cohort: Path, tmp_path) -> None:
    """A patient folder holding one SVS file is a slide patient: ROIs found automatically,
    cells in base-level pixels, GeoJSON beside the JSON, and --dicom-annotations reported as
    not written (no DICOM instance to reference) while the count stands."""
    pytest.importorskip("openslide", reason="scanner formats need the slides extra (openslide)")
    from marrowdx.simulate.scanner_slide import copy_as_scanner_file

    scans = tmp_path / "scans"
    copy_as_scanner_file(cohort / SLIDES[0], scans / "S0001" / "slide.svs", "svs")
    out = tmp_path / "scans.json"
    argv = ["diagnose", str(scans), "--url", triton_server.grpc_url, "--json", str(out)]
    argv += ["--dicom-annotations", str(tmp_path / "ann"), "--no-progress"]
    cli.main(argv)
    (p,) = json.loads(out.read_text())["patients"]
    assert p["roi_source"] == "automatic" and p["n_fields"] > 0
    assert p["roi_search"]["base_tiles_read"] <= p["roi_search"]["base_tiles_total"]
    assert set(p["failed_images"]) == {"S0001#dicom-annotations"}
    assert "no DICOM instance" in p["failed_images"]["S0001#dicom-annotations"]
    assert Path(p["geojson"]) == tmp_path / "scans-geojson" / "S0001.geojson"
    geo = json.loads(Path(p["geojson"]).read_text())
    detections = [f for f in geo["features"] if f["properties"]["objectType"] == "detection"]
    assert len(detections) == sum(len(image["cells"]) for image in p["images"])
