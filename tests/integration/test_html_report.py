"""``diagnose --html``: the review page renders in a real headless Chromium, every image in
it loads, nothing is fetched from anywhere, and its numbers equal the JSON report's."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from marrowdx.client.html_report import INDEX_FILE
from tests.helpers.html_page import expected_lineages, expected_row, read_page, shown_row

FIELD_SIZE = (512, 384)
SEED = 4242
#: Small enough that the tiny cohort reaches it in some patients, so both states show.
TARGET_CELLS = 12
#: Appended to a copy of the page (the page itself has no script): after load, records
#: every image that did not decode in a <pre> that --dump-dom then prints.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt);
  const pre = document.createElement("pre");
  pre.id = "image-check";
  pre.textContent = JSON.stringify({total: images.length, broken: broken});
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip(
        "no chromium on PATH: `make browser` installs Debian's chromium (needs root and apt-get)"
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from marrowdx.simulate import simulate_cohort

    root = tmp_path_factory.mktemp("html-cohort")
    simulate_cohort(root, 3, SEED, images_per_patient=3, size=FIELD_SIZE)
    return root


@pytest.mark.server
def test_review_page_renders_loads_every_image_and_matches_the_json(
    triton_server, cohort, tmp_path
):
    browser = chromium()
    out = tmp_path / "html"
    run = subprocess.run(
        [
            sys.executable, "-m", "marrowdx", "diagnose", str(cohort), "--url",
            triton_server.grpc_url, "--json", str(tmp_path / "d.json"), "--html", str(out),
            "--target-cells", str(TARGET_CELLS), "--no-progress",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    page = (out / INDEX_FILE).read_text(encoding="utf-8")
    patients = json.loads((tmp_path / "d.json").read_text())["patients"]

    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", IMAGE_CHECK + "</body>"), encoding="utf-8")
    dump = subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--virtual-time-budget=20000", "--dump-dom", probe.as_uri(),
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert dump.returncode == 0, dump.stderr[-2000:]
    dom = read_page(dump.stdout)

    # It rendered (the load handler ran) and every image decoded.
    assert dom.check, "the page's load event never fired in Chromium"
    check = json.loads(dom.check)
    n_cells = sum(len(i["cells"]) for p in patients for i in p["images"])
    n_fields = sum(len(p["images"]) for p in patients)
    assert check["total"] >= n_fields + min(n_cells, 1)  # field pictures and cell crops
    assert check["broken"] == []
    # Offline: every image is inline, no link leaves the page.
    assert all(src.startswith("data:image/") for src in dom.image_sources)
    assert not [u for u in dom.urls if re.match(r"[a-z]+://", u)]

    # The numbers equal the JSON's.
    assert list(dom.rows) == [p["patient_id"] for p in patients]
    for p in patients:
        assert shown_row(dom.rows[p["patient_id"]]) == expected_row(p)
        lineages = {k: int(v) for k, v in dom.lineages[p["patient_id"]].items()}
        assert lineages == expected_lineages(p)
        for reason in p["review_reasons"]:
            assert html.escape(reason["message"], quote=False) in dump.stdout
    assert p["target_cells"] == TARGET_CELLS
