"""One small simulated DICOM slide cohort per test session, built through the simulator.

Small on purpose (2048x1536 canvas, two 640x640 ROIs, 512-pixel tiles: three pyramid levels)
so the slide tests stay fast, yet every part real slides have is there: levels, ROI,
Consensus and two session annotation series, coded diagnosis.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from marrowdx.simulate.dicom_slide import DicomCohortSpec, simulate_dicom_cohort

SMALL_SPEC = DicomCohortSpec(seed=11, canvas=(2048, 1536), n_rois=2, roi_size=(640, 640), tile=512)
_BUILT: dict[str, tuple[Path, dict]] = {}


def small_slide_cohort(root: Path, patients: int = 2) -> tuple[Path, dict]:
    """(cohort folder, its ground truth), simulated once per session under ``root``."""
    key = f"{patients}"
    if key not in _BUILT:
        out = Path(root) / f"slide-cohort-{patients}"
        _BUILT[key] = (out, simulate_dicom_cohort(out, patients, SMALL_SPEC))
    return _BUILT[key]


def copy_slide(folder: Path, dest: Path) -> Path:
    """A private copy of one slide folder, to damage in a test."""
    target = Path(dest) / folder.name
    shutil.copytree(folder, target)
    return target


class ConsensusModel:
    """Stands in for the served models: answers a field with the Consensus cells that lie
    whole in it (field pixels), recognising the field by its bytes among those the slide
    folder tiles into, so a field read elsewhere (over DICOMweb) that differs fails."""

    concurrency = 4
    unidentified_below = 0.0

    def __init__(self, folder: Path, patient: dict) -> None:
        from marrowdx.client.aggregate import DEFAULT_MIN_FAMILIARITY
        from marrowdx.client.quality import DEFAULT_QUALITY
        from marrowdx.client.review import DEFAULT_THRESHOLDS
        from marrowdx.slides import open_slide
        from marrowdx.slides.tiling import tile

        self.review = DEFAULT_THRESHOLDS
        self.quality = DEFAULT_QUALITY  # as the real client's default
        self.min_familiarity = DEFAULT_MIN_FAMILIARITY  # as the real client's default
        with open_slide(folder) as local:
            self.fields = {f.data: f for f in tile(local, "auto")}
        self.cells = [c for image in patient["images"] for c in image["cells"]]
        self.unknown = 0

    async def analyse_image(self, data: bytes, name: str):
        import asyncio

        from marrowdx import taxonomy
        from marrowdx.client.report import Cell, ImageResult

        await asyncio.sleep(0)
        field = self.fields.get(data)
        if field is None:
            self.unknown += 1
            raise AssertionError(f"{name}: a field the slide folder does not have")
        x0, y0, x1, y1 = field.box
        found = tuple(
            Cell(field.to_field(tuple(c["box"])), c["label"], 0.9, dict(c["attributes"]))
            for c in self.cells
            if c["box"][0] >= x0 and c["box"][1] >= y0 and c["box"][2] <= x1 and c["box"][3] <= y1
        )
        counts = {k: 0 for k in taxonomy.CLASSES}
        for c in found:
            counts[c.label] += 1
        return ImageResult(name, found, counts, (1024, 1024))

    #: A slide's fields go as they are (``AsyncMarrowClient.analyse_field``), answered alike.
    analyse_field = analyse_image

    async def diagnose_counts(self, counts, labs):
        from marrowdx import taxonomy

        return {d: 1.0 / len(taxonomy.DIAGNOSES) for d in taxonomy.DIAGNOSES}, None
