"""Our slides and result annotations in the reference slide viewer, as a pathologist sees them.

A simulated slide is sent to a real Orthanc (DICOMweb), diagnosed over DICOMweb (a stand-in
model that finds the Consensus cells) and the result object stored back; a small page
served by that Orthanc loads ``dicom-microscopy-viewer`` (the library of IDC's Slim viewer,
the version pinned in ``tests/viewer/package-lock.json``, installed with ``npm ci`` into
``build/viewer-npm``) in Debian's Chromium, driven headless by Playwright. From the page:
the slide's frames load and paint (with the ICC profile of its optical path), the viewer
draws one feature per cell of the JSON, and each class group gets the class's colour
(RecommendedDisplayCIELabValue), not the default.
The screenshot is kept in ``build/viewer/``.

Skips with the reason where Orthanc, npm (or the npm registry), Chromium or Playwright is
missing. Marked slow: it installs npm packages once and starts a browser.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from marrowdx import config
from tests.helpers import orthanc as orthanc_helper

pytestmark = pytest.mark.slow

pytest.importorskip("wsidicom", reason="needs the slides extra: pip install 'marrowdx[slides]'")
playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (dev extra)")
if (_why := orthanc_helper.skip_reason(serve_folders=True)) is not None:
    pytest.skip(_why, allow_module_level=True)

import pydicom  # noqa: E402

from marrowdx.client.slides import SlidePatient, diagnose_slide  # noqa: E402
from marrowdx.slides.annotations import display_colour  # noqa: E402
from marrowdx.slides.dicomweb import DicomWebEndpoint, WebSlide  # noqa: E402
from tests.helpers.slides import ConsensusModel, small_slide_cohort  # noqa: E402

PAGE = Path(__file__).resolve().parents[1] / "viewer"
NPM_DIR = config.project_root() / "build" / "viewer-npm"
SCREENSHOTS = config.project_root() / "build" / "viewer"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
NPM_TIMEOUT_S = 300
#: How long the page may take to draw every feature (it fetches frames and bulk data).
DRAW_TIMEOUT_MS = 30_000
#: Counts the distinct annotation features in the viewer's OpenLayers sources (a cluster
#: source is unwrapped to the points it clusters; features carry their group's UID).
COUNT_FEATURES = """() => {
  const ids = new Set();
  for (const layer of window.viewer.getMap().getAllLayers()) {
    let source = layer.getSource && layer.getSource();
    if (source && typeof source.getSource === "function" && source.getSource()) {
      source = source.getSource();
    }
    if (!source || typeof source.getFeatures !== "function") continue;
    for (const feature of source.getFeatures()) {
      if (feature.get("annotationGroupUID") !== undefined) ids.add(feature.getId());
    }
  }
  return ids.size;
}"""
GROUP_COLOURS = """() => window.viewer.getAllAnnotationGroups().map(
  (g) => [g.label, window.viewer.getAnnotationGroupStyle(g.uid).color])"""


def _install_viewer() -> Path:
    """``npm ci`` of the pinned viewer into build/viewer-npm (again only when the lock file
    changed), the page beside it. Skips when npm or its registry is unavailable."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm not installed: the reference viewer (npm package) cannot be installed")
    NPM_DIR.mkdir(parents=True, exist_ok=True)
    lock = (PAGE / "package-lock.json").read_bytes()
    stamp = NPM_DIR / "node_modules" / f".marrowdx-{hashlib.sha256(lock).hexdigest()[:16]}"
    if not stamp.exists():
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(PAGE / name, NPM_DIR / name)
        run = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=NPM_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
        )
        if run.returncode != 0:
            pytest.skip(f"npm ci of the viewer failed (registry unreachable?): {run.stderr[-400:]}")
        stamp.touch()
    for name in ("index.html", "page.js"):
        shutil.copy2(PAGE / name, NPM_DIR / name)
    return NPM_DIR


def test_reference_viewer_draws_every_cell_in_its_class_colour(tmp_path_factory) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (make test's browser target installs it)")
    served = _install_viewer()
    root, gt = small_slide_cohort(tmp_path_factory.mktemp("viewer-slides"))
    patient = gt["patients"][0]
    folder = root / patient["patient_id"]
    with orthanc_helper.orthanc(tmp_path_factory.mktemp("orthanc"), {"/viewer": served}) as server:
        endpoint = DicomWebEndpoint(server.dicomweb)
        files = sorted(folder.glob("*.dcm"))
        endpoint.client().store_instances([pydicom.dcmread(f) for f in files])
        level = pydicom.dcmread(folder / "level_0.dcm", stop_before_pixels=True)
        study, slide_series = str(level.StudyInstanceUID), str(level.SeriesInstanceUID)

        web = WebSlide(endpoint, study, store_results=True)
        job = SlidePatient(
            patient["patient_id"], web, web.name, annotations_dir=tmp_path_factory.mktemp("out")
        )
        report = asyncio.run(diagnose_slide(ConsensusModel(folder, patient), job))  # type: ignore[arg-type]
        doc = report.to_dict()
        n_cells = sum(len(image["cells"]) for image in doc["images"])
        assert n_cells > 0 and report.stored_annotations
        result_series = report.stored_annotations.split("/series/")[1].split("/")[0]

        url = (
            f"{server.url}/viewer/index.html?study={study}&slide={slide_series}&ann={result_series}"
        )
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / "slide_viewer.png"
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
            )
            try:
                page = browser.new_page(viewport={"width": 1024, "height": 768})
                console: list[str] = []
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.goto(url)
                page.wait_for_function("window.result.status !== 'loading'", timeout=20_000)
                result = page.evaluate("window.result")
                assert result["status"] == "ready", (result, console[-20:])
                try:
                    page.wait_for_function(
                        f"({COUNT_FEATURES})() >= {n_cells} && window.result.framesLoaded > 0",
                        timeout=DRAW_TIMEOUT_MS,
                    )
                except playwright.TimeoutError:
                    pass  # the assertions below say what was missing
                page.wait_for_timeout(500)  # the last tiles paint
                drawn = page.evaluate(COUNT_FEATURES)
                result = page.evaluate("window.result")
                colours = page.evaluate(GROUP_COLOURS)
                page.screenshot(path=str(shot))
            finally:
                browser.close()

    assert result["errors"] == [], (result["errors"], console[-20:])
    assert result["framesLoaded"] > 0, console[-20:]
    assert not [m for m in console if "ICC Profile was not found" in m]  # the optical path has one
    assert drawn == n_cells, f"viewer drew {drawn} features for {n_cells} cells"
    labels = {c["label"] for image in doc["images"] for c in image["cells"]}
    assert {label for label, _ in colours} == labels
    for label, rgb in colours:
        expected = display_colour(label)
        assert max(abs(a - b) for a, b in zip(rgb[:3], expected, strict=True)) <= 2, label
    # The slide painted: the picture holds the stain's colours, not a blank canvas.
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    assert pixels.std() > 10 and (pixels.mean(axis=2) < 200).mean() > 0.01, shot
