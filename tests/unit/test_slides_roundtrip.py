"""Simulated DICOM slides read back through the same path real slides take.

The slide itself (every pyramid level) must open in pydicom and wsidicom; each annotation
object must load in highdicom with the simulator's counts, and our fast reader must agree
with highdicom on every box and label; predictions written back must round-trip with their
scores and attributes; Consensus must give back ground_truth.json; the two sessions must
differ from it exactly where the simulator made them disagree; unmapped labels are counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("wsidicom", reason="needs the slides extra: pip install 'marrowdx[slides]'")
pytest.importorskip("highdicom", reason="needs the slides extra: pip install 'marrowdx[slides]'")

import highdicom as hd  # noqa: E402
import pydicom  # noqa: E402
from wsidicom import WsiDicom  # noqa: E402

from marrowdx import cli, taxonomy  # noqa: E402
from marrowdx.slides import (  # noqa: E402
    SlideCell,
    is_slide_folder,
    open_slide,
    read_annotations,
    write_annotations,
)
from marrowdx.slides.annotations import (  # noqa: E402
    DEFAULT_GRAPHIC,
    SCORE_CODE,
    load_annotation_object,
    write_cell_annotations,
)
from marrowdx.slides.detect import ANN_SOP_CLASS, WSI_SOP_CLASS, dicom_files  # noqa: E402
from marrowdx.slides.reader import _diagnosis  # noqa: E402
from tests.helpers.slides import small_slide_cohort  # noqa: E402


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return small_slide_cohort(tmp_path_factory.mktemp("slides"))


def _key(cell: dict) -> tuple:
    return tuple(round(float(v), 3) for v in cell["box"])


def _by_box(images: list[dict]) -> dict[tuple, dict]:
    return {_key(c): c for im in images for c in im["cells"]}


def test_every_level_opens_in_pydicom_and_wsidicom(cohort: tuple[Path, dict]) -> None:
    root, gt = cohort
    folder = root / gt["patients"][0]["patient_id"]
    files = dicom_files(folder)
    levels = sorted(p for p, sop in files.items() if sop == WSI_SOP_CLASS)
    assert len(levels) == 3 and sum(sop == ANN_SOP_CLASS for sop in files.values()) == 4
    for path in levels:
        ds = pydicom.dcmread(path)
        assert ds.PhotometricInterpretation == "YBR_FULL_422"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
        assert ds.DimensionOrganizationType == "TILED_FULL"
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        assert frame[:3] == b"\xff\xd8\xff"  # a JPEG frame
    with WsiDicom.open(levels) as wsi:
        assert [(lv.size.width, lv.size.height) for lv in wsi.levels] == [
            (2048, 1536),
            (1024, 768),
            (512, 384),
        ]
        for index, level in enumerate(wsi.levels):
            region = wsi.read_region((0, 0), index, (level.size.width, level.size.height))
            assert region.size == (level.size.width, level.size.height)
        assert float(wsi.levels[0].pixel_spacing.width) == pytest.approx(0.00025)


def test_highdicom_reads_each_object_and_agrees_with_our_reader(
    cohort: tuple[Path, dict],
) -> None:
    root, gt = cohort
    patient = gt["patients"][0]
    folder = root / patient["patient_id"]
    base = pydicom.dcmread(folder / "level_0.dcm", stop_before_pixels=True)
    n_cells = sum(len(im["cells"]) for im in patient["images"])
    seen = set()
    for path in sorted(folder.glob("ann_*.dcm")):
        ann = hd.ann.annread(path)
        ref = ann.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == base.SeriesInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == base.SOPInstanceUID
        ours = load_annotation_object(path)
        theirs = []
        for group in ann.get_annotation_groups():
            assert group.graphic_type.value == DEFAULT_GRAPHIC
            for coords in group.get_graphic_data(ann.annotation_coordinate_type):
                theirs.append((str(group.label), tuple(coords.min(0)) + tuple(coords.max(0))))
        assert sorted((r.label, r.box) for r in ours.records) == sorted(theirs)
        seen.add(ours.description.split(":")[0])
        expected = len(patient["images"]) if ours.is_roi else n_cells
        assert len(ours.records) == expected, ours.description
    assert seen == {
        "Monolayer regions of interest for cell classification",
        "Consensus",
        "Session 0",
        "Session 1",
    }


def test_consensus_gives_back_the_simulated_ground_truth(cohort: tuple[Path, dict]) -> None:
    root, gt = cohort
    for patient in gt["patients"]:
        with open_slide(root / patient["patient_id"]) as slide:
            assert slide.patient_id == patient["patient_id"]
            assert slide.diagnosis == patient["diagnosis"] and slide.diagnosis_note is None
            assert slide.um_per_pixel == pytest.approx(0.25)
            truth = slide.ground_truth(relative_to=root)
        assert [im["roi"] for im in truth["images"]] == [im["roi"] for im in patient["images"]]
        assert [im["file"] for im in truth["images"]] == [patient["patient_id"]] * 2
        for ours, theirs in zip(truth["images"], patient["images"], strict=True):
            assert _by_box([ours]) == _by_box([theirs])  # boxes, labels and attributes
        assert truth["unmapped_labels"] == {} and truth["cells_outside_rois"] == 0


def test_sessions_disagree_with_consensus_where_the_simulator_made_them(
    cohort: tuple[Path, dict],
) -> None:
    root, gt = cohort
    patient = gt["patients"][0]
    with open_slide(root / patient["patient_id"]) as slide:
        assert slide.annotation_sources() == ["consensus", "0", "1"]
        consensus = _by_box(slide.ground_truth()["images"])
        changed = {}
        for session in ("0", "session 1"):
            cells = _by_box(slide.ground_truth(session)["images"])
            assert cells.keys() == consensus.keys()  # same cells, some other labels
            changed[session] = {k for k in cells if cells[k]["label"] != consensus[k]["label"]}
    expected = patient["slide"]["session_disagreements"]
    assert len(changed["0"]) == expected["0"] >= 2
    assert len(changed["session 1"]) == expected["1"] >= 2
    assert not changed["0"] & changed["session 1"]  # the sessions relabel different cells


def test_predictions_round_trip_with_scores_and_attributes(
    cohort: tuple[Path, dict], tmp_path: Path
) -> None:
    root, gt = cohort
    patient = gt["patients"][0]
    with open_slide(root / patient["patient_id"]) as slide:
        cells = [
            SlideCell(
                tuple(float(v) + 0.5 for v in c["box"]),
                c["label"],
                0.5 + 0.01 * i,
                dict(c["attributes"]),
            )
            for i, c in enumerate(c for im in patient["images"] for c in im["cells"])
        ]
        path = write_annotations(slide, cells, tmp_path, description="marrowdx predictions")
    ann = hd.ann.annread(path)
    assert ann.SeriesDescription == "marrowdx predictions"
    counts = {str(g.label): int(g.number_of_annotations) for g in ann.get_annotation_groups()}
    expected: dict[str, int] = {}
    for c in cells:
        expected[c.label] = expected.get(c.label, 0) + 1
    assert counts == expected
    for group in ann.get_annotation_groups():
        code = taxonomy.CLASS_CODES[str(group.label)].concept
        concept = group.annotated_property_type
        assert (concept.value, concept.scheme_designator) == (code.value, code.scheme)
        names, values, _ = group.get_measurements()
        assert any(n.value == SCORE_CODE.value for n in names)
        assert values.shape == (group.number_of_annotations, 2 + 1 + 7)  # ids, roi, score, attrs

    def rows(items: list[SlideCell]) -> list[tuple]:
        return sorted(
            (c.box, c.label, round(c.score, 6), sorted(c.attributes.items())) for c in items
        )

    assert rows(read_annotations(path)) == rows(cells)


def test_unmapped_labels_are_counted_not_dropped(cohort: tuple[Path, dict], tmp_path: Path) -> None:
    root, gt = cohort
    patient = gt["patients"][1]
    folder = tmp_path / patient["patient_id"]
    import shutil

    shutil.copytree(root / patient["patient_id"], folder)
    base = pydicom.dcmread(folder / "level_0.dcm", stop_before_pixels=True)
    roi = patient["images"][0]["roi"]
    x, y = roi[0] + 10, roi[1] + 10
    cells = [
        SlideCell((x, y, x + 40, y + 40), "lymphocyte"),
        SlideCell((x + 50, y, x + 90, y + 40), "damaged_cell"),
        SlideCell((x + 100, y, x + 140, y + 40), "damaged_cell"),
        SlideCell((x + 150, y, x + 190, y + 40), "no_consensus_found"),
        SlideCell((x, y + 50, x + 40, y + 90), "basophilic_band"),  # maps to basophil_precursor
        SlideCell((1.0, 1.0, 20.0, 20.0), "lymphocyte"),  # in no ROI
    ]
    write_cell_annotations(base, cells, folder, description="Session 9: relabelled", session="9")
    with open_slide(folder) as slide:
        truth = slide.ground_truth("session 9")
    assert truth["unmapped_labels"] == {"damaged_cell": 2, "no_consensus_found": 1}
    assert truth["cells_outside_rois"] == 1
    labels = sorted(c["label"] for im in truth["images"] for c in im["cells"])
    assert labels == ["basophil_precursor", "lymphocyte"]


def test_diagnosis_from_dicom_attributes() -> None:
    def with_code(scheme: str, value: str, meaning: str) -> pydicom.Dataset:
        item = pydicom.Dataset()
        item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning = scheme, value, meaning
        ds = pydicom.Dataset()
        ds.AdmittingDiagnosesCodeSequence = [item]
        return ds

    for name, code in taxonomy.DIAGNOSIS_CODES.items():
        assert _diagnosis(with_code(code.scheme, code.value, code.meaning)) == (name, None)
    other = with_code("NCIt", "C9233", "Juvenile Myelomonocytic Leukemia")
    assert _diagnosis(other) == (None, "Juvenile Myelomonocytic Leukemia (NCIT C9233)")
    text = pydicom.Dataset()
    text.AdmittingDiagnosesDescription = "aplastic anaemia"
    assert _diagnosis(text) == (None, "aplastic anaemia")
    assert _diagnosis(pydicom.Dataset()) == (None, None)


def test_slide_folders_are_found_by_content(cohort: tuple[Path, dict], tmp_path: Path) -> None:
    root, gt = cohort
    folder = root / gt["patients"][0]["patient_id"]
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, path in enumerate(sorted(folder.iterdir())):
        (renamed / f"x{i}").write_bytes(path.read_bytes())  # no extension at all
    assert is_slide_folder(folder) and is_slide_folder(renamed)
    with open_slide(renamed) as slide:
        assert len(slide.rois) == 2
    fields = tmp_path / "fields"
    fields.mkdir()
    (fields / "a.dcm").write_bytes(b"not dicom" * 100)  # the extension does not decide
    (fields / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 200)
    assert not is_slide_folder(fields)
    ann_only = tmp_path / "ann_only"
    ann_only.mkdir()
    for path in folder.glob("ann_*.dcm"):
        (ann_only / path.name).write_bytes(path.read_bytes())
    assert not is_slide_folder(ann_only)


def test_simulate_format_dicom_cli(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    argv = ["simulate", "--format", "dicom", "--patients", "1", "--seed", "5", "--out", str(out)]
    argv += ["--size", "1536x1024", "--rois", "1", "--roi-size", "512x512", "--no-progress"]
    assert cli.main(argv) == 0
    from marrowdx.simulate import load_ground_truth

    gt = load_ground_truth(out)
    (patient,) = gt["patients"]
    assert gt["simulator"]["format"] == "dicom" and len(patient["images"]) == 1
    with open_slide(out / patient["patient_id"]) as slide:
        assert (slide.width, slide.height) == (1536, 1024)
        assert np.array(slide.rois[0].box).tolist() == patient["images"][0]["roi"]
    bad = ["simulate", "--format", "dicom", "--patients", "1", "--out", str(tmp_path / "b")]
    assert cli.main([*bad, "--size", "600x600"]) == 2  # three 1280 ROIs cannot fit


def test_a_different_result_gets_new_uids_and_the_same_result_the_same(
    cohort: tuple[Path, dict], tmp_path: Path
) -> None:
    """An archive keeps the first object stored under a UID: a new result for the same slide
    must not reuse the previous result's UIDs, and the same result written twice is the same
    object."""
    root, gt = cohort
    base = pydicom.dcmread(root / gt["patients"][0]["patient_id"] / "level_0.dcm", True)
    cells = [SlideCell((10.0, 20.0, 40.0, 52.0), taxonomy.CLASSES[0], 0.9)]
    moved = [SlideCell((11.0, 20.0, 40.0, 52.0), taxonomy.CLASSES[0], 0.9)]

    def uids(cells: list[SlideCell], out: str) -> tuple[str, str]:
        path = write_cell_annotations(base, cells, tmp_path / out, description="predictions")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)

    first = uids(cells, "a")
    assert uids(cells, "b") == first
    again = uids(moved, "c")
    assert again[0] != first[0] and again[1] != first[1]
