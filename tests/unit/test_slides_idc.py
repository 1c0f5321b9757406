"""The IDC collection from the offline index, downloads (network: skipped where the data store
is unreachable), and ROI-frame fetching, tested against a local HTTP server with range
requests serving a simulated slide: the same code path as the data store."""

from __future__ import annotations

import functools
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("idc_index", reason="needs the slides extra: pip install 'marrowdx[slides]'")
pytest.importorskip("wsidicom", reason="needs the slides extra: pip install 'marrowdx[slides]'")

import pydicom  # noqa: E402

from marrowdx import cli  # noqa: E402
from marrowdx.slides import open_slide  # noqa: E402
from marrowdx.slides.idc import (  # noqa: E402
    EXPECTED_ANNOTATION_SERIES,
    EXPECTED_PATIENTS,
    collection_index,
    data_store_reachable,
    download,
    plan_download,
)
from marrowdx.slides.remote import download_roi_frames  # noqa: E402
from tests.helpers.slides import small_slide_cohort  # noqa: E402


@pytest.fixture(scope="module")
def index():
    return collection_index()


def test_offline_index_holds_the_papers_collection(index) -> None:
    assert len(index.patients) == EXPECTED_PATIENTS == 246
    assert index.n_annotation_series == EXPECTED_ANNOTATION_SERIES == 1033
    assert index.n_slides == 246 and all(len(p.slides) == 1 for p in index.patients)
    by_desc = index.annotation_descriptions()
    assert by_desc["Monolayer regions of interest for cell classification"] == 246
    assert by_desc["Consensus: cell bounding boxes with cell type labels"] == 114
    assert index.license == "CC BY 4.0"


def test_idc_list_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "idc.json"
    assert cli.main(["idc", "list", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "patients 246" in printed and "annotation series 1033" in printed
    import json

    doc = json.loads(out.read_text())
    assert doc["n_patients"] == 246 and len(doc["patients"]) == 246


def test_download_plan(index, tmp_path: Path) -> None:
    plan = plan_download(index, tmp_path, limit=2)
    assert len(plan.patients) == 2 and plan.megabytes() < 1.0  # annotations only: small
    full = plan_download(index, tmp_path, limit=2, slides="full")
    assert full.megabytes() > 1000  # whole slides are GBs
    with pytest.raises(ValueError, match="not in"):
        plan_download(index, tmp_path, patients=["NOPE"])


def test_download_annotations_from_the_data_store(index, tmp_path: Path) -> None:
    reachable, why = data_store_reachable()
    if not reachable:
        pytest.skip(f"network: {why}")
    plan = plan_download(index, tmp_path, limit=1)
    (folder,) = download(plan)
    assert len(list(folder.glob("*.dcm"))) == len(plan.patients[0].annotations)


def test_download_without_the_data_store_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    from marrowdx.slides import idc

    monkeypatch.setattr(idc, "data_store_reachable", lambda: (False, "IDC data store unreachable"))
    code = cli.main(["idc", "download", "--out", str(tmp_path), "--limit", "1"])
    assert code == 3


class _RangeHandler(SimpleHTTPRequestHandler):
    """Static files with HTTP range requests (what the data store's HTTPS endpoint does)."""

    requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        data = Path(self.translate_path(self.path)).read_bytes()
        wanted = self.headers.get("Range")
        self.requests.append(wanted or "all")
        if wanted:
            a, b = wanted.split("=")[1].split("-")
            body = data[int(a) : (int(b) if b else len(data) - 1) + 1]
            self.send_response(206)
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def served_slide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    root, gt = small_slide_cohort(tmp_path_factory.mktemp("slides"))
    folder = root / gt["patients"][0]["patient_id"]
    handler = functools.partial(_RangeHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_roi_frames_only(served_slide: tuple[Path, str], tmp_path: Path) -> None:
    folder, url = served_slide
    local = tmp_path / folder.name
    local.mkdir()
    for path in folder.glob("ann_*.dcm"):
        shutil.copy(path, local)
    _RangeHandler.requests = []
    urls = [f"{url}/level_{i}.dcm" for i in (2, 1, 0)]
    written = download_roi_frames(local, urls, margin=0)
    assert "all" not in _RangeHandler.requests  # only ranges were fetched
    level = pydicom.dcmread(written)
    full = pydicom.dcmread(folder / "level_0.dcm")
    assert level.SOPInstanceUID == full.SOPInstanceUID
    assert level.DimensionOrganizationType == "TILED_SPARSE"
    assert 0 < level.NumberOfFrames < full.NumberOfFrames
    if shutil.which("dciodvfy"):  # valid but for the count of a full tiling (docs/contracts.md)
        run = subprocess.run(["dciodvfy", str(written)], capture_output=True, text=True)
        errors = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]
        assert [e for e in errors if "NumberOfFrames does not match" not in e] == []
    with open_slide(folder) as original, open_slide(local) as partial:
        assert partial.rois == original.rois
        a, b = list(original.fields()), list(partial.fields())
        assert [f.box for f in a] == [f.box for f in b]
        assert all(x.data == y.data for x, y in zip(a, b, strict=True))  # same pixels
        assert partial.ground_truth() == original.ground_truth()
