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
