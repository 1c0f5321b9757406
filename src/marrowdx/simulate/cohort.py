"""Synthetic patient cohorts: diagnosis -> class fractions -> fields of view -> ground_truth.json.

Each patient gets its own numpy Generator derived from (seed, patient number), so patients can
be rendered independently (in parallel) and the same seed always gives the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marrowdx import config, taxonomy
from marrowdx.encoding import encode
from marrowdx.simulate import field as fl
from marrowdx.simulate.lab_variation import LabShift, shift_rng

#: Every class keeps at least this probability for every patient, so all 33 occur regularly.
CLASS_FLOOR = 0.008
#: Bump whenever the rendered pixels change for the same seed: trained weights record it, so
#: a build retrains instead of serving models fitted to an older look.
RENDERER_VERSION = 2
#: Dirichlet concentration around a diagnosis's mean composition (higher = less variation).
CONCENTRATION = 60.0
#: Weight of a class not named in a diagnosis template (before normalisation).
BACKGROUND_WEIGHT = 0.3
#: Entropy tag separating the cohort-level stream (diagnosis assignment) from patient streams.
_COHORT_STREAM = 0x5EED

#: Mean composition (relative weights) per diagnosis; unnamed classes get BACKGROUND_WEIGHT.
# fmt: off
DIAGNOSIS_TEMPLATES: dict[str, dict[str, float]] = {
    "AML": {
        "myelocytic_blast": 42, "unknown_blast": 3, "monocytic_blast": 3, "promyelocyte": 4,
        "myeloid_precursor_cell": 4, "neutrophilic_myelocyte": 3,
        "neutrophilic_metamyelocyte": 2, "neutrophilic_band": 2, "segmented_neutrophil": 3,
        "basophilic_erythroblast": 2, "polychromatic_erythroblast": 4,
        "orthochromatic_erythroblast": 3, "lymphocyte": 5, "monocyte": 2, "thrombocyte": 3,
    },
    "ALL": {
        "lymphocytic_blast": 50, "lymphoid_precursor_cell": 4, "unknown_blast": 3,
        "lymphocyte": 6, "prolymphocyte": 2, "neutrophilic_myelocyte": 1.5,
        "neutrophilic_band": 1.5, "segmented_neutrophil": 3, "polychromatic_erythroblast": 3,
        "orthochromatic_erythroblast": 2, "smudge_cell": 3, "thrombocyte": 2,
    },
    "CML": {
        "myelocytic_blast": 2, "promyelocyte": 5, "myeloid_precursor_cell": 4,
        "neutrophilic_myelocyte": 14, "neutrophilic_metamyelocyte": 11, "neutrophilic_band": 11,
        "segmented_neutrophil": 13, "eosinophilic_myelocyte": 3,
        "eosinophilic_metamyelocyte": 2, "eosinophilic_band": 2, "segmented_eosinophil": 4,
        "basophil_precursor": 3, "segmented_basophil": 4, "megakaryocyte": 1.5,
        "polychromatic_erythroblast": 3, "orthochromatic_erythroblast": 2, "lymphocyte": 3,
        "thrombocyte": 5,
    },
}

_BLASTS = ("myelocytic_blast", "lymphocytic_blast", "monocytic_blast", "unknown_blast")
_NEUTRO = (
    "neutrophilic_myelocyte", "neutrophilic_metamyelocyte", "neutrophilic_band",
    "segmented_neutrophil",
)
_EOS_BASO = (
    "eosinophilic_myelocyte", "eosinophilic_metamyelocyte", "eosinophilic_band",
    "segmented_eosinophil", "basophil_precursor", "segmented_basophil",
)
# fmt: on
#: What each diagnosis is meant to look like: (group of classes, mean fraction range). Tests
#: check cohort averages against these.
INTENDED_RANGES: dict[str, list[tuple[tuple[str, ...], tuple[float, float]]]] = {
    "AML": [(("myelocytic_blast",), (0.25, 0.55)), (_BLASTS, (0.3, 0.65))],
    "ALL": [(("lymphocytic_blast",), (0.3, 0.6)), (_BLASTS, (0.35, 0.7))],
    "CML": [(_BLASTS, (0.0, 0.1)), (_NEUTRO, (0.3, 0.6)), (_EOS_BASO, (0.1, 0.3))],
}

#: Lab values per diagnosis: (mean, sd) of a normal draw, kept > 0 (config.LAB_VALUE_NAMES order).
LAB_DISTRIBUTIONS: dict[str, tuple[tuple[float, float], ...]] = {
    "ALL": ((40.0, 30.0), (8.0, 1.8), (60.0, 40.0), (900.0, 400.0)),
    "AML": ((35.0, 30.0), (8.0, 1.6), (50.0, 30.0), (800.0, 350.0)),
    "CML": ((150.0, 80.0), (10.5, 1.5), (450.0, 200.0), (700.0, 300.0)),
}


def mean_fractions(diagnosis: str, floor: float = CLASS_FLOOR) -> np.ndarray:
    """Expected class fractions of a diagnosis (template mixed with the per-class floor)."""
    tpl = DIAGNOSIS_TEMPLATES[diagnosis]
    w = np.array([tpl.get(c, BACKGROUND_WEIGHT) for c in taxonomy.CLASSES], np.float64)
    return (1 - floor * taxonomy.N_CLASSES) * w / w.sum() + floor


def draw_fractions(
    diagnosis: str, rng: np.random.Generator, floor: float = CLASS_FLOOR
) -> np.ndarray:
    """One patient's class fractions: Dirichlet around the template, plus the floor."""
    if not 0 <= floor * taxonomy.N_CLASSES < 1:
        raise ValueError(f"class floor {floor} too large for {taxonomy.N_CLASSES} classes")
    tpl = DIAGNOSIS_TEMPLATES[diagnosis]
    w = np.array([tpl.get(c, BACKGROUND_WEIGHT) for c in taxonomy.CLASSES], np.float64)
    p = rng.dirichlet(CONCENTRATION * w / w.sum())
    p = (1 - floor * taxonomy.N_CLASSES) * p + floor
    return p / p.sum()


def draw_lab_values(diagnosis: str, rng: np.random.Generator) -> dict[str, float]:
    vals = [max(0.1, rng.normal(m, s)) for m, s in LAB_DISTRIBUTIONS[diagnosis]]
    return {n: round(float(v), 1) for n, v in zip(config.LAB_VALUE_NAMES, vals, strict=True)}


def patient_id(index: int) -> str:
    return f"P{index + 1:04d}"


def diagnosis_for(seed: int, index: int) -> str:
    """Balanced assignment: each block of three patients holds each diagnosis once, shuffled.

    Depends only on (seed, index), so patient i's diagnosis does not change with cohort size.
    """
    block = index // taxonomy.N_DIAGNOSES
    rng = np.random.default_rng(np.random.SeedSequence([seed, _COHORT_STREAM, block]))
    order = rng.permutation(taxonomy.N_DIAGNOSES)
    return taxonomy.DIAGNOSES[int(order[index % taxonomy.N_DIAGNOSES])]


@dataclass(frozen=True)
class CohortSpec:
    """How a cohort is rendered (all patients share it)."""

    seed: int
    images_per_patient: int = 8
    size: tuple[int, int] = config.FIELD_SIZE  # (width, height)
    image_format: str = "jpg"
    cells_per_image: tuple[int, int] | None = None  # default: 15-40 scaled by field area
    class_floor: float = CLASS_FLOOR
    shift: str = "none"  # per-slide lab/scanner variation (simulate.lab_variation)
    shift_strength: float = 1.0


def simulate_patient(out_dir: Path, index: int, spec: CohortSpec) -> dict:
    """Render one patient's images into out_dir/<patient_id>/ and return its ground truth."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, index + 1]))
    pid = patient_id(index)
    diagnosis = diagnosis_for(spec.seed, index)
    fractions = draw_fractions(diagnosis, rng, spec.class_floor)
    style = fl.SlideStyle.draw(rng)
    labs = draw_lab_values(diagnosis, rng)
    # Own stream: the renderer's draws (cells, boxes) are the same with and without a shift.
    lab_rng = shift_rng(spec.seed, index)
    lab_shift = LabShift.draw(spec.shift, spec.shift_strength, lab_rng)
    w, h = spec.size
    lo, hi = spec.cells_per_image or fl.cells_for_area(w, h)
    (out_dir / pid).mkdir(parents=True, exist_ok=True)
    ext = "jpg" if spec.image_format in ("jpg", "jpeg") else spec.image_format
    images = []
    for k in range(spec.images_per_patient):
        n = int(rng.integers(lo, hi + 1))
        idx = rng.choice(taxonomy.N_CLASSES, size=n, p=fractions)
        labels = [taxonomy.CLASSES[i] for i in idx]
        render = fl.render_field(labels, (w, h), style, rng)
        rel = f"{pid}/img_{k:03d}.{ext}"
        if lab_shift.is_identity:
            encoded = encode(render.image, spec.image_format)
        else:
            encoded = lab_shift.encode(lab_shift.apply(render.image, lab_rng), spec.image_format)
        (out_dir / rel).write_bytes(encoded)
        images.append(
            {
                "file": rel,
                "width": w,
                "height": h,
                "cells": [
                    {"box": list(c.box), "label": c.label, "attributes": c.attributes}
                    for c in render.cells
                ],
            }
        )
    patient = {
        "patient_id": pid,
        "diagnosis": diagnosis,
        "fractions": {
            c: round(float(p), 6) for c, p in zip(taxonomy.CLASSES, fractions, strict=True)
        },
        "lab_values": labs,
        "slide": style.as_dict(),
        "images": images,
    }
    if spec.shift != "none":  # unshifted ground truth stays byte-identical to earlier versions
        patient["lab_shift"] = lab_shift.as_dict()
    return patient


def _simulate_patient_star(args: tuple[Path, int, CohortSpec]) -> dict:
    return simulate_patient(*args)


def render_patients(
    render: Callable[[tuple], dict],
    jobs: Sequence[tuple],
    *,
    workers: int = 1,
    progress: bool = False,
    desc: str = "simulate",
) -> list[dict]:
    """Run ``render`` over the per-patient jobs, in order, in ``workers`` processes (> 1)
    or here, with an optional progress bar; the results are the same either way. Shared by
    the JPEG/PNG and the DICOM cohorts (``render`` must be a module-level function)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="patient", desc=desc)
    patients: list[dict] = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(render, jobs)
            for p in results:
                patients.append(p)
                if bar:
                    bar.update(1)
    else:
        for job in jobs:
            patients.append(render(job))
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return patients


def simulate_cohort(
    out_dir: Path,
    n_patients: int,
    seed: int,
    *,
    images_per_patient: int = 8,
    size: tuple[int, int] = config.FIELD_SIZE,
    image_format: str = "jpg",
    progress: bool = False,
    cells_per_image: tuple[int, int] | None = None,
    class_floor: float = CLASS_FLOOR,
    workers: int = 1,
    patient_offset: int = 0,
    shift: str = "none",
    shift_strength: float = 1.0,
) -> dict:
    """Write a synthetic cohort to out_dir and return its ground truth (also in ground_truth.json).

    ``size`` is (width, height). ``patient_offset`` starts numbering at P{offset+1}, so disjoint
    cohorts (train / validation) can come from one seed. ``workers`` > 1 renders patients in
    parallel processes; the bytes are identical either way. ``shift`` (one of
    ``lab_variation.SHIFT_KINDS``) applies per-slide lab/scanner variation of ``shift_strength``.
    """
    if n_patients < 0 or images_per_patient < 1:
        raise ValueError("n_patients must be >= 0 and images_per_patient >= 1")
    if image_format not in ("jpg", "jpeg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    w, h = size
    if w < config.MIN_IMAGE_SIDE or h < config.MIN_IMAGE_SIDE:
        raise ValueError(f"image size {w}x{h} below the minimum side {config.MIN_IMAGE_SIDE}")
    if cells_per_image is not None and not 0 < cells_per_image[0] <= cells_per_image[1]:
        raise ValueError(f"cells_per_image must be (lo, hi) with 0 < lo <= hi: {cells_per_image}")
    LabShift.draw(shift, shift_strength, np.random.default_rng(0))  # validates both, early
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = CohortSpec(
        seed=seed,
        images_per_patient=images_per_patient,
        size=(int(w), int(h)),
        image_format=image_format,
        cells_per_image=tuple(cells_per_image) if cells_per_image else None,
        class_floor=class_floor,
        shift=shift,
        shift_strength=float(shift_strength),
    )
    jobs = [(out_dir, patient_offset + i, spec) for i in range(n_patients)]
    patients = render_patients(_simulate_patient_star, jobs, workers=workers, progress=progress)
    gt = {
        **taxonomy.as_metadata(),
        "simulator": {
            "renderer_version": RENDERER_VERSION,
            "seed": seed,
            "images_per_patient": images_per_patient,
            "size": [int(w), int(h)],
            "image_format": image_format,
            "class_floor": class_floor,
            **({"shift": shift, "shift_strength": shift_strength} if shift != "none" else {}),
        },
        "patients": patients,
    }
    write_ground_truth(gt, out_dir)
    return gt


def write_ground_truth(gt: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / "ground_truth.json"
    path.write_text(json.dumps(gt, indent=1, sort_keys=False) + "\n")
    return path


_REQUIRED_TOP = ("classes", "attributes", "diagnoses", "patients")


def validate_ground_truth(gt: dict) -> None:
    """Raise ValueError naming the first problem if gt breaks docs/contracts.md's schema."""
    for key in _REQUIRED_TOP:
        if key not in gt:
            raise ValueError(f"ground truth lacks top-level key {key!r}")
    classes = set(gt["classes"])
    attrs = gt["attributes"]
    for p in gt["patients"]:
        for key in ("patient_id", "diagnosis", "images"):
            if key not in p:
                raise ValueError(f"patient entry lacks {key!r}: {str(p)[:80]}")
        for im in p["images"]:
            if "file" not in im or "cells" not in im:
                raise ValueError(f"image entry of {p['patient_id']} lacks 'file' or 'cells'")
            for c in im["cells"]:
                if len(c.get("box", ())) != 4:
                    raise ValueError(f"{im['file']}: a cell box is not [x0, y0, x1, y1]")
                if c.get("label") not in classes:
                    raise ValueError(f"{im['file']}: unknown label {c.get('label')!r}")
                for name, value in (c.get("attributes") or {}).items():
                    if name not in attrs or value not in attrs[name]:
                        raise ValueError(f"{im['file']}: bad attribute {name}={value!r}")


def load_ground_truth(path: str | Path) -> dict:
    """Read DIR/ground_truth.json (or the JSON file itself) and check its schema."""
    path = Path(path)
    if path.is_dir():
        path = path / "ground_truth.json"
    if not path.exists():
        raise FileNotFoundError(f"no ground truth at {path}")
    gt = json.loads(path.read_text())
    validate_ground_truth(gt)
    return gt


def iter_cells(gt: dict, labels: Sequence[str] | None = None):
    """Yield (patient, image, cell) over a ground truth, optionally only some labels."""
    for p in gt["patients"]:
        for im in p["images"]:
            for c in im["cells"]:
                if labels is None or c["label"] in labels:
                    yield p, im, c
