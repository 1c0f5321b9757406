"""Slides in a DICOMweb archive: a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``)
started on loopback, holding a simulated slide and its annotation series sent with STOW-RS.

- the slide read over DICOMweb (``WebSlide.open_source``) is the slide read from its folder:
  same levels, ROIs, diagnosis, ground truth, and byte-identical fields;
- round trip: the archived slide diagnosed (a stand-in model that finds the Consensus
  cells, so counts are checkable), the result object stored back with STOW-RS, retrieved
  whole over WADO-RS and read back equal to the report's cells; Orthanc 1.10's DICOM JSON
  cuts the coordinates to one value, its bulk data route gives them all;
- the command line's flags, and the errors a user meets (unknown study, no archive);
- archives that need credentials: TLS with a private CA and a bearer token (a small proxy
  in front of Orthanc that terminates TLS or refuses requests without the token);
- ``marrowdx diagnose --dicomweb ... --store`` against the real Triton server (server, slow).

Skips with the reason where Orthanc or its DICOMweb plugin is not installed.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import ssl
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import orthanc as orthanc_helper

pytest.importorskip("wsidicom", reason="needs the slides extra: pip install 'marrowdx[slides]'")
if (_why := orthanc_helper.skip_reason()) is not None:
    pytest.skip(_why, allow_module_level=True)

import pydicom  # noqa: E402

from marrowdx import cli  # noqa: E402
from marrowdx.client.slides import SlidePatient, diagnose_slide  # noqa: E402
from marrowdx.slides import SlideError, open_slide, read_annotations  # noqa: E402
from marrowdx.slides.dicomweb import (  # noqa: E402
    TOKEN_ENV,
    DicomWebEndpoint,
    WebSlide,
    endpoint_from_options,
)
from tests.helpers.slides import ConsensusModel, small_slide_cohort  # noqa: E402


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, dict]:
    root, gt = small_slide_cohort(tmp_path_factory.mktemp("dicomweb-slides"))
    patient = gt["patients"][0]
    return root / patient["patient_id"], patient


def _stow(endpoint: DicomWebEndpoint, folder: Path) -> str:
    files = sorted(folder.glob("*.dcm"))
    endpoint.client().store_instances([pydicom.dcmread(f) for f in files])
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="module")
def archive(slide, tmp_path_factory) -> Iterator[tuple[orthanc_helper.RunningOrthanc, str]]:
    with orthanc_helper.orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        study = _stow(DicomWebEndpoint(server.dicomweb), slide[0])
        yield server, study


def test_slide_over_dicomweb_is_the_slide_of_the_folder(archive, slide) -> None:
    server, study = archive
    folder, _ = slide
    with (
        WebSlide(DicomWebEndpoint(server.dicomweb), study).open_source() as web,
        open_slide(folder) as local,
    ):
        assert web.patient_id == local.patient_id
        assert (web.diagnosis, web.um_per_pixel) == (local.diagnosis, local.um_per_pixel)
        assert web.rois == local.rois
        assert [(lv.width, lv.downsample) for lv in web.levels] == [
            (lv.width, lv.downsample) for lv in local.levels
        ]
        assert sorted(web.annotation_sources()) == sorted(local.annotation_sources())
        ours = [(f.box, f.data) for f in web.fields()]
        theirs = [(f.box, f.data) for f in local.fields()]
        assert len(ours) >= 2 and ours == theirs  # byte-identical fields
        for source in ("consensus", "1"):
            a, b = web.ground_truth(source), local.ground_truth(source)
            assert [i["cells"] for i in a["images"]] == [i["cells"] for i in b["images"]]
        assert study in str(web.folder)


def test_archived_slide_without_roi_series_gets_automatic_rois(archive, tmp_path_factory) -> None:
    """A slide straight from a scanner (its levels only) is counted where the ROI finder
    sees monolayer areas, as a folder would be; ``annotation`` refuses it by name."""
    server, _ = archive
    root, gt = small_slide_cohort(tmp_path_factory.mktemp("dicomweb-slides"))
    folder = root / gt["patients"][1]["patient_id"]
    endpoint = DicomWebEndpoint(server.dicomweb)
    levels = sorted(folder.glob("level_*.dcm"))
    endpoint.client().store_instances([pydicom.dcmread(f) for f in levels])
    study = str(pydicom.dcmread(levels[0], stop_before_pixels=True).StudyInstanceUID)
    with WebSlide(endpoint, study).open_source() as web, open_slide(folder, "automatic") as local:
        assert web.roi_source == "automatic" and web.rois and web.rois == local.rois
    with pytest.raises(SlideError, match="no ROI annotation"):
        WebSlide(endpoint, study).open_source("annotation")


def test_round_trip_diagnose_store_and_read_back(archive, slide, tmp_path: Path) -> None:
    server, study = archive
    folder, patient = slide
    endpoint = DicomWebEndpoint(server.dicomweb)
    web = WebSlide(endpoint, study, store_results=True)
    model = ConsensusModel(folder, patient)
    job = SlidePatient(patient["patient_id"], web, web.name, annotations_dir=tmp_path)
    report = asyncio.run(diagnose_slide(model, job))  # type: ignore[arg-type]
    assert report.failed_images == {} and model.unknown == 0
    truth = Counter(c["label"] for image in patient["images"] for c in image["cells"])
    assert {k: v for k, v in report.counts.items() if v} == dict(truth)  # each cell once
    url = report.stored_annotations
    assert url and url.startswith(server.dicomweb)

    # Retrieved whole (WADO-RS instance) from the archive, it is the report's cells.
    sop = url.rstrip("/").split("/")[-1]
    series = url.rstrip("/").split("/")[-3]
    stored = endpoint.client().retrieve_instance(study, series, sop)
    stored.save_as(tmp_path / "stored.dcm", enforce_file_format=True)
    doc = report.to_dict()
    expected = sorted(
        (tuple(round(v, 3) for v in c["box"]), c["label"], round(c["score"], 4))
        for image in doc["images"]
        for c in image["cells"]
    )
    got = sorted(
        (tuple(round(v, 3) for v in c.box), c.label, round(c.score, 4))
        for c in read_annotations(tmp_path / "stored.dcm")
    )
    assert got == expected and len(got) == sum(truth.values())

    # The DICOM JSON route cuts float arrays; the bulk data route has every coordinate.
    meta = endpoint.client().retrieve_instance_metadata(study, series, sop)
    group = meta["006A0002"]["Value"][0]
    n = group["006A000C"]["Value"][0]  # NumberOfAnnotations
    inline = group.get("00660016", {}).get("Value")
    bulk_url = f"{server.dicomweb}/studies/{study}/series/{series}/instances/{sop}"
    with urllib.request.urlopen(f"{bulk_url}/bulk/006a0002/1/00660016", timeout=10) as r:
        body = r.read()
    points = _bulk_floats(body, r.headers.get("Content-Type", ""))
    assert points.size == n * 4 * 2  # 4 corners of x, y per cell
    if inline is not None:
        assert len(inline) < points.size  # what Orthanc 1.10 does; a fixed one passes too


def _bulk_floats(body: bytes, content_type: str) -> np.ndarray:
    """The float32 values of a bulk data answer (multipart/related or plain octets)."""
    if "multipart" in content_type:
        boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
        part = body.split(b"--" + boundary)[1]
        payload = part.split(b"\r\n\r\n", 1)[1]
        body = payload[: payload.rfind(b"\r\n")]
    return np.frombuffer(body, np.float32)


def test_command_line_errors_name_the_problem(archive, capsys) -> None:
    server, study = archive
    base = ["diagnose", "--dicomweb", server.dicomweb, "--no-progress"]
    assert cli.main(base) == 2
    assert "--study" in capsys.readouterr().err
    assert cli.main([*base, "--study", "1.2.3.4"]) == 2
    assert "no study 1.2.3.4" in capsys.readouterr().err
    assert cli.main(["diagnose", "somewhere", "--store", "--no-progress"]) == 2
    assert "--store needs --dicomweb" in capsys.readouterr().err
    web = WebSlide(DicomWebEndpoint(server.dicomweb), study, series="1.2.3.4")
    with pytest.raises(SlideError, match="not a slide .SM. series"):
        web.open_source()


def test_unreachable_archive_is_one_clear_error() -> None:
    web = WebSlide(DicomWebEndpoint("http://127.0.0.1:9/dicom-web", timeout_s=3), "1.2.3")
    with pytest.raises(SlideError, match="cannot connect"):
        web.open_source()


class _Proxy(http.server.BaseHTTPRequestHandler):
    """In front of Orthanc: forwards requests, refusing those without ``Authorization:
    Bearer <token>`` when a token is set. (Debian's Orthanc 1.10 exits on the first HTTPS
    request here, so TLS is this proxy's too.)"""

    upstream = ""
    token: str | None = None
    seen: list[str] = []

    def _forward(self) -> None:
        self.seen.append(self.path)
        if self.token is not None and self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.send_header("WWW-Authenticate", "Bearer")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        keep = ("Accept", "Content-Type")
        headers = {k: v for k, v in self.headers.items() if k in keep}
        request = urllib.request.Request(
            self.upstream + self.path, data=body, headers=headers, method=self.command
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, data, ctype = answer.status, answer.read(), answer.headers["Content-Type"]
        except urllib.error.HTTPError as exc:
            status, data, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward

    def log_message(self, *args) -> None:
        pass


@contextmanager
def proxy(upstream: str, token: str | None = None, cert_pem: Path | None = None):
    """(DICOMweb URL of the proxy, its handler class with the paths it saw)."""
    handler = type("Proxy", (_Proxy,), {"upstream": upstream, "token": token, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    scheme = "http"
    if cert_pem is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert_pem))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}/dicom-web", handler
    finally:
        server.shutdown()
        server.server_close()


def test_tls_archive_needs_its_ca(archive, slide, tmp_path: Path, monkeypatch) -> None:
    """An archive whose certificate comes from a private CA: refused without that CA (the
    error names --dicomweb-ca), read with it, even where $REQUESTS_CA_BUNDLE is set."""
    import requests

    trustme = pytest.importorskip("trustme")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
    server, study = archive
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with proxy(server.url, cert_pem=pem) as (url, seen):
        with pytest.raises(SlideError, match="--dicomweb-ca"):
            WebSlide(DicomWebEndpoint(url), study).patient_id()
        web = WebSlide(DicomWebEndpoint(url, ca_file=ca_file), study)
        assert web.patient_id() == slide[1]["patient_id"]
        with web.open_source() as source:
            assert next(iter(source.fields())).data[:2] == b"\xff\xd8"
        assert any("/frames/" in p for p in seen.seen)


def test_bearer_token_goes_with_every_request(archive, tmp_path: Path) -> None:
    server, study = archive
    with proxy(server.url, token="s3cret") as (url, seen):
        with pytest.raises(SlideError, match="HTTP 401.*bearer token"):
            WebSlide(DicomWebEndpoint(url), study).open_source()
        token_file = tmp_path / "token"
        token_file.write_text("s3cret\n")
        endpoint = endpoint_from_options(url, token_file, None, env={})
        seen.seen.clear()
        with WebSlide(endpoint, study).open_source() as source:
            assert sum(1 for _ in source.fields()) >= 2
        assert any("/frames/" in p for p in seen.seen)  # the pixels went through it too
    env = endpoint_from_options(url, None, None, env={TOKEN_ENV: "s3cret"})
    assert env.token == "s3cret"


@pytest.mark.server
@pytest.mark.slow
def test_diagnose_dicomweb_store_with_the_served_models(
    triton_server, archive, tmp_path: Path
) -> None:
    """The command a lab runs: diagnose the archived slide, store the result, read it back."""
    server, study = archive
    out = tmp_path / "report.json"
    argv = [
        "diagnose", "--dicomweb", server.dicomweb, "--study", study, "--store",
        "--url", triton_server.grpc_url, "--json", str(out), "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    (patient,) = json.loads(out.read_text())["patients"]
    assert patient["dicom_annotations"] is None and patient["stored_annotations"]
    url = patient["stored_annotations"]
    parts = url.rstrip("/").split("/")
    stored = (
        DicomWebEndpoint(server.dicomweb).client().retrieve_instance(study, parts[-3], parts[-1])
    )
    stored.save_as(tmp_path / "stored.dcm", enforce_file_format=True)
    cells = read_annotations(tmp_path / "stored.dcm")
    expected = Counter(c["label"] for image in patient["images"] for c in image["cells"])
    assert Counter(c.label for c in cells) == expected and sum(expected.values()) > 0
