"""``marrowdx simulate --format dicom``: each patient as one DICOM whole-slide image.

Shaped like the slides of the IDC collection ``bonemarrowwsi_pediatricleukemia``: a canvas
larger than the counted areas, with a thick (dense, overlapping, uncountable) band and empty
glass, and several monolayer ROIs rendered by the same field renderer as the JPEG cohorts
(``simulate.field.render_field``); a JPEG-Baseline YBR_FULL_422 tiled pyramid with
PixelSpacing (``slides.wsi_writer``); annotation series for the ROIs, the Consensus labels
and two annotator sessions that disagree with it on a few cells, with the collection's coded
concepts (``slides.annotations``). ``ground_truth.json`` holds each ROI as an image with its
cells in base-level slide pixels: what reading Consensus gives back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marrowdx import config, taxonomy
from marrowdx.simulate import cohort as co
from marrowdx.simulate import field as fl

#: Default canvas (width, height) and ROI size: CI-sized (a few seconds per slide on one core)
#: yet shaped like the collection (ROIs a fraction of the slide, thick and empty areas).
DEFAULT_CANVAS = (4096, 3072)
DEFAULT_ROI_SIZE = (1280, 1280)
DEFAULT_ROIS = 3
#: Annotator sessions written beside Consensus, and the share of cells each relabels.
SESSIONS = ("0", "1")
DISAGREEMENT = 0.04
MIN_DISAGREEMENTS = 2
#: Width of the thick band on the left, as a fraction of the canvas width.
THICK_FRACTION = 0.16
_MARGIN = 64


@dataclass(frozen=True)
class DicomCohortSpec:
    """How every slide of a DICOM cohort is rendered."""

    seed: int
    canvas: tuple[int, int] = DEFAULT_CANVAS
    n_rois: int = DEFAULT_ROIS
    roi_size: tuple[int, int] = DEFAULT_ROI_SIZE
    tile: int = 1024
    um_per_pixel: float = config.MODEL_UM_PER_PIXEL
    cells_per_field: tuple[int, int] | None = None  # per 1024x1024 of ROI, default 15-40
    class_floor: float = co.CLASS_FLOOR
    #: Outline graphic of the annotation objects (``annotations.GRAPHIC_TYPES``); None: the
    #: writer's default (POLYGON; RECTANGLE gives the IDC collection's exact shape).
    graphic: str | None = None

    def validate(self) -> None:
        from marrowdx.slides.annotations import GRAPHIC_TYPES

        if self.graphic is not None and self.graphic not in GRAPHIC_TYPES:
            raise ValueError(f"graphic {self.graphic!r}: choose one of {', '.join(GRAPHIC_TYPES)}")
        w, h = self.canvas
        rw, rh = self.roi_size
        if self.n_rois < 1:
            raise ValueError(f"a slide needs at least one ROI, got {self.n_rois}")
        if rw < config.MIN_IMAGE_SIDE or rh < config.MIN_IMAGE_SIDE:
            raise ValueError(f"ROI size {rw}x{rh} below the minimum side {config.MIN_IMAGE_SIDE}")
        if len(roi_slots(self)) < self.n_rois:
            raise ValueError(
                f"{self.n_rois} ROIs of {rw}x{rh} do not fit beside the thick band of a "
                f"{w}x{h} canvas; use a larger --size or fewer/smaller ROIs"
            )


def roi_slots(spec: DicomCohortSpec) -> list[tuple[int, int]]:
    """Top-left corners where a ROI fits (a grid right of the thick band, with margins)."""
    w, h = spec.canvas
    rw, rh = spec.roi_size
    x_start = int(w * THICK_FRACTION) + _MARGIN
    cols = (w - x_start) // (rw + _MARGIN)
    rows = h // (rh + _MARGIN)
    return [
        (x_start + c * (rw + _MARGIN), _MARGIN + r * (rh + _MARGIN))
        for r in range(max(rows, 0))
        for c in range(max(cols, 0))
        if x_start + c * (rw + _MARGIN) + rw <= w - _MARGIN // 2
        and _MARGIN + r * (rh + _MARGIN) + rh <= h - _MARGIN // 2
    ]


def _glass(h: int, w: int, style: fl.SlideStyle, rng: np.random.Generator) -> np.ndarray:
    """Empty glass: the slide's illumination with sensor noise and nothing on it."""
    level = np.clip(np.asarray(style.illumination) * 0.97, fl.NOISE_CLAMP, 255 - fl.NOISE_CLAMP)
    glass = np.empty((h, w, 3), np.uint8)
    glass[:] = level.astype(np.uint8)
    # the renderer's sensor noise: one lookup per pixel, a wrapping uint8 add (no overflow)
    lut = fl._noise_lut(style.noise_sigma)
    glass += np.take(lut, np.frombuffer(rng.bytes(h * w), np.uint8)).reshape(h, w, 1)
    return glass


def _thick(h: int, w: int, style: fl.SlideStyle, rng: np.random.Generator) -> np.ndarray:
    """A thick area: cells packed on dense red cells, darker (too thick to count)."""
    dense = dataclasses.replace(style, rbc_coverage=(0.85, 0.9))
    lo, hi = fl.cells_for_area(w, h)
    labels = [taxonomy.CLASSES[i] for i in rng.integers(0, taxonomy.N_CLASSES, 2 * hi)]
    image = fl.render_field(labels, (w, h), dense, rng).image.astype(np.float32)
    return np.clip(image * 0.82, 0, 255).astype(np.uint8)


def _disagree(cells: list[dict], rng: np.random.Generator, taken: set[int]) -> list[dict]:
    """A session's labels: Consensus with a few cells (not in ``taken``) relabelled."""
    free = [i for i in range(len(cells)) if i not in taken]
    k = min(len(free), max(MIN_DISAGREEMENTS, round(DISAGREEMENT * len(cells))))
    chosen = set(int(i) for i in rng.choice(free, size=k, replace=False)) if k else set()
    taken |= chosen
    out = []
    for i, c in enumerate(cells):
        if i in chosen:
            others = [x for x in taxonomy.CLASSES if x != c["label"]]
            c = {**c, "label": others[int(rng.integers(len(others)))]}
        out.append(c)
    return out


def simulate_dicom_patient(out_dir: Path, index: int, spec: DicomCohortSpec) -> dict:
    """Render one patient's slide into out_dir/<patient_id>/ and return its ground truth."""
    from marrowdx.slides.annotations import (
        CONSENSUS_DESCRIPTION,
        session_description,
        write_cell_annotations,
        write_roi_annotations,
    )
    from marrowdx.slides.base import Roi, SlideCell
    from marrowdx.slides.wsi_writer import SlideIdentity, write_wsi

    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, index + 1, 0xD1C0]))
    pid = co.patient_id(index)
    diagnosis = co.diagnosis_for(spec.seed, index)
    fractions = co.draw_fractions(diagnosis, rng, spec.class_floor)
    style = fl.SlideStyle.draw(rng)
    labs = co.draw_lab_values(diagnosis, rng)
    w, h = spec.canvas
    canvas = _glass(h, w, style, rng)
    thick_w = int(w * THICK_FRACTION)
    canvas[:, :thick_w] = _thick(h, thick_w, style, rng)
    slots = roi_slots(spec)
    picks = sorted(int(i) for i in rng.choice(len(slots), size=spec.n_rois, replace=False))
    rw, rh = spec.roi_size
    lo, hi = fl.cells_for_area(rw, rh, spec.cells_per_field or fl.DEFAULT_CELLS)
    rois: list[Roi] = []
    images = []
    for k, slot in enumerate(picks, start=1):
        x0, y0 = slots[slot]
        n = int(rng.integers(lo, hi + 1))
        labels = [taxonomy.CLASSES[i] for i in rng.choice(taxonomy.N_CLASSES, n, p=fractions)]
        render = fl.render_field(labels, (rw, rh), style, rng)
        canvas[y0 : y0 + rh, x0 : x0 + rw] = render.image
        roi = Roi(index=k, box=(x0, y0, x0 + rw, y0 + rh))
        rois.append(roi)
        cells = [
            {
                "box": [c.box[0] + x0, c.box[1] + y0, c.box[2] + x0, c.box[3] + y0],
                "label": c.label,
                "attributes": c.attributes,
            }
            for c in render.cells
        ]
        images.append(
            {"file": pid, "roi": list(roi.box), "width": rw, "height": rh, "cells": cells}
        )
    folder = Path(out_dir) / pid
    ident = SlideIdentity.new(pid, diagnosis, seed=f"marrowdx-{spec.seed}")
    write_wsi(canvas, folder, ident, um_per_pixel=spec.um_per_pixel, tile=spec.tile)
    import pydicom

    base = pydicom.dcmread(folder / "level_0.dcm", stop_before_pixels=True)
    graphic = {} if spec.graphic is None else {"graphic": spec.graphic}
    write_roi_annotations(base, rois, folder, **graphic)
    consensus = [c for im in images for c in im["cells"]]

    def as_cells(items: list[dict]) -> list[SlideCell]:
        return [SlideCell(tuple(c["box"]), c["label"], None, dict(c["attributes"])) for c in items]

    write_cell_annotations(
        base,
        as_cells(consensus),
        folder,
        description=CONSENSUS_DESCRIPTION,
        rois=rois,
        session="consensus",
        **graphic,
    )
    taken: set[int] = set()
    disagreements = {}
    for session in SESSIONS:
        labels = _disagree(consensus, rng, taken)
        disagreements[session] = sum(
            a["label"] != b["label"] for a, b in zip(consensus, labels, strict=True)
        )
        write_cell_annotations(
            base,
            as_cells(labels),
            folder,
            description=session_description(session),
            rois=rois,
            session=session,
            **graphic,
        )
    return {
        "patient_id": pid,
        "diagnosis": diagnosis,
        "fractions": {
            c: round(float(p), 6) for c, p in zip(taxonomy.CLASSES, fractions, strict=True)
        },
        "lab_values": labs,
        "slide": {
            **style.as_dict(),
            "width": w,
            "height": h,
            "um_per_pixel": spec.um_per_pixel,
            "session_disagreements": disagreements,
        },
        "images": images,
        "unmapped_labels": {},
    }


def _star(args: tuple[Path, int, DicomCohortSpec]) -> dict:
    return simulate_dicom_patient(*args)


def simulate_dicom_cohort(
    out_dir: Path,
    n_patients: int,
    spec: DicomCohortSpec,
    *,
    workers: int = 1,
    progress: bool = False,
    patient_offset: int = 0,
) -> dict:
    """Write a DICOM slide cohort (one slide folder per patient) and its ground_truth.json."""
    if n_patients < 0:
        raise ValueError(f"n_patients must be >= 0, got {n_patients}")
    spec.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, patient_offset + i, spec) for i in range(n_patients)]
    patients = co.render_patients(
        _star, jobs, workers=workers, progress=progress, desc="simulate dicom"
    )
    gt = {
        **taxonomy.as_metadata(),
        "simulator": {
            "renderer_version": co.RENDERER_VERSION,
            "seed": spec.seed,
            "format": "dicom",
            "canvas": list(spec.canvas),
            "rois": spec.n_rois,
            "roi_size": list(spec.roi_size),
            "tile": spec.tile,
            "um_per_pixel": spec.um_per_pixel,
            "class_floor": spec.class_floor,
        },
        "patients": patients,
    }
    co.write_ground_truth(gt, out_dir)
    return gt
