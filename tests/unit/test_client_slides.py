"""The client's slide path without a server or a DICOM file: a fake slide source and a fake
client check that overlapping fields are merged per ROI into base-level pixels, that failed
fields and unreadable slides are reported per patient, and that image cohorts never import
the DICOM libraries."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from marrowdx import slides, taxonomy
from marrowdx.client.quality import DEFAULT_QUALITY, TOO_COARSE
from marrowdx.client.report import Cell, ImageResult, write_json
from marrowdx.client.review import DEFAULT_THRESHOLDS
from marrowdx.client.slides import SlidePatient, SlideReport, diagnose_slide, field_name
from marrowdx.errors import RequestFailed
from marrowdx.slides.base import Field, Roi, SlideError

ROI_A = Roi(0, (1000, 1000, 1800, 1400))
ROI_B = Roi(1, (5000, 5000, 5400, 5400))
SIZE = 60.0
ATTRS = {name: taxonomy.attribute_value(name, False) for name in taxonomy.ATTRIBUTE_NAMES}


def fields_for(roi: Roi, width: float, overlap: float, scale: float) -> list[Field]:
    """Two fields side by side across ``roi`` (field pixels = base / scale)."""
    x0, y0, x1, y1 = roi.box
    left = (x0, y0, x0 + width, y1)
    right = (x1 - width, y0, x1, y1)
    assert left[2] - right[0] == overlap
    return [
        Field(roi, box, f"{roi.index}:{i}".encode(), scale) for i, box in enumerate((left, right))
    ]


class FakeSource:
    """What ``open_slide`` returns, reduced to what the client uses."""

    def __init__(
        self, fields: list[Field], fail_after: int | None = None, um_per_pixel: float = 0.25
    ) -> None:
        self.rois = sorted({f.roi for f in fields}, key=lambda r: r.index)
        self.um_per_pixel = um_per_pixel  # base level
        self._fields = fields
        self._fail_after = fail_after
        self.closed = False

    def fields(self):
        for i, f in enumerate(self._fields):
            if self._fail_after is not None and i == self._fail_after:
                raise SlideError("slide P: frame 7 of level 0 is truncated")
            yield f

    def frame_fields(self):
        """Like a slide without a level at the models' spacing: ``auto`` falls back."""
        raise SlideError("slide P: no pyramid level within 2% of 0.25 um/pixel")
        yield  # a generator, as the reader's: the error comes with the first frame

    def close(self) -> None:
        self.closed = True

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeClient:
    """Answers each field with the true cells it sees (cut at its edges), in field pixels."""

    concurrency = 3
    review = DEFAULT_THRESHOLDS
    quality = DEFAULT_QUALITY
    unidentified_below = 0.0
    min_familiarity = float("-inf")  # every cell familiar: the fake answers have none

    def __init__(self, cells: dict[int, np.ndarray], fields: list[Field], fail: set[bytes]) -> None:
        self.cells, self.by_data, self.fail = cells, {f.data: f for f in fields}, fail
        self.diagnosed: list[np.ndarray] = []

    async def analyse_field(self, data: bytes, name: str) -> ImageResult:
        await asyncio.sleep(0)
        if data in self.fail:
            raise RequestFailed("image rejected: corrupt JPEG")
        f = self.by_data[data]
        out = []
        for box in self.cells[f.roi.index]:
            cut = (
                max(box[0], f.box[0]),
                max(box[1], f.box[1]),
                min(box[2], f.box[2]),
                min(box[3], f.box[3]),
            )
            if (cut[2] - cut[0]) * (cut[3] - cut[1]) >= 0.3 * SIZE**2 and cut[2] > cut[0]:
                out.append(Cell(f.to_field(cut), "lymphocyte", 0.9, dict(ATTRS)))
        counts = {c: 0 for c in taxonomy.CLASSES} | {"lymphocyte": len(out)}
        return ImageResult(name, tuple(out), counts, (400, 400))

    async def diagnose_counts(self, counts, labs):
        self.diagnosed.append(counts)
        return {d: (1.0 if d == taxonomy.DIAGNOSES[0] else 0.0) for d in taxonomy.DIAGNOSES}, None


def boxes(centres: list[tuple[float, float]]) -> np.ndarray:
    h = SIZE / 2
    return np.array([(x - h, y - h, x + h, y + h) for x, y in centres])


def run(patient: SlidePatient, client: FakeClient, source, monkeypatch) -> SlideReport:
    def fake_open(folder: Path, rois: str = "auto", um_per_pixel: float | None = None):
        if isinstance(source, Exception):
            raise source
        return source

    monkeypatch.setattr(slides, "open_slide", fake_open, raising=False)
    ticks: list[tuple[str, str | None]] = []
    report = asyncio.run(
        diagnose_slide(client, patient, lambda _p, name, err: ticks.append((name, err)))
    )
    report.ticks = ticks  # type: ignore[attr-defined]
    return report


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_cells_on_the_seam_count_once_in_base_pixels(monkeypatch, scale: float) -> None:
    fields = fields_for(ROI_A, 480, 160, scale) + fields_for(ROI_B, 250, 100, scale)
    # ROI A: seam from x=1320 to 1480; cells left, on the seam (whole in both), cut, right.
    cells = {
        0: boxes([(1100, 1100), (1400, 1200), (1470, 1300), (1700, 1100)]),
        1: boxes([(5100, 5200), (5200, 5300)]),
    }
    client = FakeClient(cells, fields, fail=set())
    source = FakeSource(fields)
    report = run(SlidePatient("P1", Path("x/P1"), "P1"), client, source, monkeypatch)
    assert source.closed
    assert report.failed_images == {}
    assert [r.roi for r in report.images] == [ROI_A.box, ROI_B.box]
    assert [len(r.cells) for r in report.images] == [4, 2]
    assert report.n_cells == 6 and report.counts["lymphocyte"] == 6
    assert report.n_fields == 4
    got = np.array(sorted(c.box for c in report.images[0].cells))
    assert np.allclose(got, np.array(sorted(map(tuple, cells[0]))), atol=1e-6)
    assert client.diagnosed[0].sum() == 6
    # the model's answer is kept; 6 cells are too few to name a leukaemia from
    assert report.model_probabilities[taxonomy.DIAGNOSES[0]] == 1.0
    assert report.diagnosis is None and report.leukemia_pattern == "too_few_cells"
    doc = report.to_dict()
    assert doc["images"][0]["file"] == "P1" and doc["images"][0]["roi"] == list(ROI_A.box)
    assert doc["n_fields"] == 4 and doc["dicom_annotations"] is None


def test_failed_field_and_truncated_slide_are_reported(monkeypatch) -> None:
    fields = fields_for(ROI_A, 480, 160, 1.0) + fields_for(ROI_B, 250, 100, 1.0)
    cells = {0: boxes([(1100, 1100), (1700, 1100)]), 1: boxes([(5100, 5200)])}
    client = FakeClient(cells, fields, fail={fields[1].data})
    source = FakeSource(fields, fail_after=3)  # the slide breaks while ROI B is tiled
    report = run(SlidePatient("P2", Path("x/P2"), "P2"), client, source, monkeypatch)
    assert report.failed_images == {
        field_name("P2", ROI_A, 1): "image rejected: corrupt JPEG",
        "P2": "slide P: frame 7 of level 0 is truncated",
    }
    assert not report.complete
    # What was processed is still counted: ROI A's left field, ROI B's first field.
    assert report.n_fields == 2 and report.n_cells == 2
    names = [n for n, _ in report.ticks]  # type: ignore[attr-defined]
    assert sorted(names) == ["P2#roi0/field0", "P2#roi0/field1", "P2#roi1/field0"]


def test_unreadable_slide_fails_that_patient_only(monkeypatch) -> None:
    client = FakeClient({}, [], fail=set())
    bad = SlideError("P3: no 'Monolayer regions of interest' annotation series")
    report = run(SlidePatient("P3", Path("x/P3"), "P3"), client, bad, monkeypatch)
    assert report.failed_images == {"P3": str(bad)}
    assert report.diagnosis is None and report.diagnosis_error == "the slide could not be read"
    assert report.n_cells == 0 and report.images == []


def test_a_slide_scanned_at_too_low_a_magnification_fails_with_its_reason(monkeypatch) -> None:
    """A 10x scan (1 µm/px at its base level) has no level with the detail the models read:
    the patient fails naming the magnification, and no field is sent."""
    fields = fields_for(ROI_A, 480, 160, 1.0)
    client = FakeClient({0: boxes([(1100, 1100)])}, fields, fail=set())
    report = run(
        SlidePatient("P4", Path("x/P4"), "P4"), client, FakeSource(fields, um_per_pixel=1.0),
        monkeypatch,
    )  # fmt: skip
    assert report.failed_images["P4"].startswith(f"slide P4: {TOO_COARSE}: 1 µm/px")
    assert report.n_fields == 0 and report.diagnosis is None and not client.diagnosed


def test_slide_report_json_round_trip(monkeypatch, tmp_path: Path) -> None:
    fields = fields_for(ROI_A, 480, 160, 1.0)
    client = FakeClient({0: boxes([(1400, 1200)])}, fields, fail=set())
    report = run(SlidePatient("P4", Path("x/P4"), "P4"), client, FakeSource(fields), monkeypatch)
    doc = json.loads(write_json([report], tmp_path / "r.json").read_text())
    (image,) = doc["patients"][0]["images"]
    assert image["roi"] == list(ROI_A.box) and len(image["cells"]) == 1
    assert doc["patients"][0]["n_cells"] == 1


def test_image_cohorts_do_not_import_dicom_libraries(tmp_path: Path) -> None:
    """The thin client loads wsidicom/highdicom/pydicom only when a slide is given."""
    patient = tmp_path / "P1"
    patient.mkdir()
    (patient / "a.jpg").write_bytes(b"\xff\xd8\xff" + b"0" * 200)
    (patient / "notes.dcm").write_bytes(b"not dicom")
    code = (
        "import sys\n"
        "from marrowdx.client.cohort import discover\n"
        "import marrowdx.client.slides, marrowdx.client.cli\n"
        f"c = discover({str(tmp_path)!r})\n"
        "assert c.n_slides == 0 and c.n_images == 1, c\n"
        "bad = [m for m in ('wsidicom', 'highdicom', 'pydicom') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class FramesSource(FakeSource):
    """A slide whose frames can be sent as stored (``auto`` takes them)."""

    def frame_fields(self):
        yield from self._fields

    def fields(self):
        raise AssertionError("auto must send the frames, not re-encoded fields")


def test_auto_sends_frames_and_joins_cells_cut_on_their_seams(monkeypatch) -> None:
    roi = Roi(0, (1024, 1024, 2048, 1536))
    frames = [
        Field(roi, (1024 + 512 * i, 1024 + 512 * j, 1536 + 512 * i, 1536 + 512 * j), b"%d" % k, 1.0)
        for k, (i, j) in enumerate([(0, 0), (1, 0)])
    ]
    # one cell halved by the seam at x=1536, one whole in each frame
    cells = {0: boxes([(1536, 1200), (1200, 1300), (1800, 1300)])}
    client = FakeClient(cells, frames, fail=set())
    patient = SlidePatient("P5", Path("x/P5"), "P5", tiling="auto")
    report = run(patient, client, FramesSource(frames), monkeypatch)
    assert report.failed_images == {} and report.n_fields == 2
    got = sorted(c.box for c in report.images[0].cells)
    assert np.allclose(got, sorted(map(tuple, cells[0])), atol=1e-6)


class FieldsOnlySource(FakeSource):
    """A slide that could send its frames: the default must send fields all the same."""

    def frame_fields(self):
        raise AssertionError("the default tiling must not send the slide's frames")


def test_the_default_tiling_sends_fields_and_writes_geojson(monkeypatch, tmp_path) -> None:
    """Frames reach beyond their ROI (thick area, glass) and cut cells on their seams, which
    the models' per-field stain normalisation and classifier never saw: the default sends the
    overlapping fields. The counted cells go out as GeoJSON for QuPath, one detection each."""
    fields = fields_for(ROI_A, 500, 200, 1.0)
    cells = {0: boxes([(1200, 1200), (1700, 1300)])}
    client = FakeClient(cells, fields, fail=set())
    patient = SlidePatient("P6", Path("x/P6"), "P6", geojson_dir=tmp_path / "geo")
    report = run(patient, client, FieldsOnlySource(fields), monkeypatch)
    assert report.failed_images == {} and report.n_fields == 2
    doc = json.loads(Path(report.geojson).read_text())
    assert doc["type"] == "FeatureCollection"
    detections = [f for f in doc["features"] if f["properties"]["objectType"] == "detection"]
    rois = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(detections) == sum(len(r.cells) for r in report.images) == 2
    assert len(rois) == 1 and rois[0]["geometry"]["coordinates"][0][0] == [1000, 1000]
    for feature, cell in zip(detections, report.images[0].cells, strict=True):
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1]
        assert ring[0] == [round(cell.box[0], 1), round(cell.box[1], 1)]
        props = feature["properties"]
        assert props["classification"]["name"] == cell.label
        assert len(props["classification"]["color"]) == 3
        assert 0 <= props["measurements"]["probability"] <= 1


def test_one_slide_given_instead_of_a_cohort_is_named(tmp_path: Path) -> None:
    """DIR holding a slide's DICOM files directly: the error says to give the parent."""
    from marrowdx.client.cohort import discover
    from marrowdx.errors import CohortError
    from marrowdx.slides.detect import WSI_SOP_CLASS

    uid = WSI_SOP_CLASS.encode() + b"\0"
    meta = b"\x02\x00\x02\x00UI" + len(uid).to_bytes(2, "little") + uid
    (tmp_path / "level_0.dcm").write_bytes(b"\0" * 128 + b"DICM" + meta)
    with pytest.raises(CohortError, match="is one slide, not a cohort"):
        discover(tmp_path)
