"""Training/evaluation data: a simulated (or COCO) cohort, preprocessed once and cached.

Images go through :class:`marrowdx.preprocess.CpuPreprocessor`, the same DALI pipeline the
server runs, so the models train on exactly what they will be fed. Its PIXELS are uint8
(the models normalise in their first op), cached as ``.npy`` keyed by a hash of the ground
truth and one of the image bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marrowdx import config, taxonomy

#: Bump when the cache layout or preprocessing changes, so stale caches are rebuilt.
CACHE_FORMAT = 1
#: Images sent through DALI per call while preparing a cohort.
PREPROCESS_BATCH = 8
#: Diagnosis index of a patient whose diagnosis is not given (COCO input may lack it).
UNKNOWN_DIAGNOSIS = -1


@dataclass
class CellTable:
    """All cells of a cohort, flat: one row per cell, boxes in letterboxed input pixels."""

    image_index: np.ndarray  # int32 [N]
    boxes: np.ndarray  # float32 [N, 4]
    labels: np.ndarray  # int64 [N]
    attributes: np.ndarray  # float32 [N, N_ATTRIBUTES] (0/1)


@dataclass
class PreparedCohort:
    """A preprocessed cohort: pixels of every image plus its cells and patients."""

    pixels: np.ndarray  # uint8 [I, 3, S, S], PIXELS as the preprocess step sends them
    letterbox: np.ndarray  # float32 [I, 4]
    image_patient: np.ndarray  # int32 [I]
    image_files: list[str]
    cells: CellTable
    patient_ids: list[str]
    diagnoses: np.ndarray  # int64 [P], index into taxonomy.DIAGNOSES (UNKNOWN_DIAGNOSIS if absent)
    description: dict

    @property
    def n_images(self) -> int:
        return int(self.pixels.shape[0])

    def image_pixels(self, index: np.ndarray | list[int]) -> np.ndarray:
        """PIXELS of the given images, uint8 [n, 3, S, S] (a copy: the cache is memory-mapped)."""
        return np.ascontiguousarray(self.pixels[index])

    def cells_of(self, image: int) -> np.ndarray:
        return np.flatnonzero(self.cells.image_index == image)

    def true_counts(self) -> np.ndarray:
        """Per-patient true class counts [P, N_CLASSES]."""
        counts = np.zeros((len(self.patient_ids), config.N_CLASSES), np.float64)
        patient_of_cell = self.image_patient[self.cells.image_index]
        np.add.at(counts, (patient_of_cell, self.cells.labels), 1.0)
        return counts


def attribute_bits(cell_attributes: dict) -> list[float]:
    """Cell attribute dict (value names like "big", or booleans) -> 0/1 per taxonomy order."""
    bits = []
    for name in taxonomy.ATTRIBUTE_NAMES:
        value = cell_attributes.get(name, taxonomy.ATTRIBUTES[name][0])
        if isinstance(value, str):
            if value not in taxonomy.ATTRIBUTES[name]:
                raise ValueError(f"attribute {name!r} has unknown value {value!r}")
            bits.append(float(taxonomy.ATTRIBUTES[name].index(value)))
        else:
            bits.append(float(bool(value)))
    return bits


def read_ground_truth(cohort_dir: Path) -> dict:
    """DIR/ground_truth.json (schema: docs/contracts.md), with a clear error when it is missing."""
    path = Path(cohort_dir) / "ground_truth.json"
    if not path.exists():
        raise FileNotFoundError(f"{cohort_dir} is not a cohort: {path.name} is missing")
    return json.loads(path.read_text())


def cohort_from_coco(coco_json: Path, images_dir: Path, work_dir: Path) -> Path:
    """Turn COCO + its image folder into a cohort folder (ground_truth.json only, with
    absolute image paths), so COCO data trains and evaluates through the same code path."""
    from marrowdx.simulate import read_coco

    images_dir = Path(images_dir).resolve()
    gt = read_coco(coco_json, images_dir)
    for patient in gt["patients"]:
        for image in patient["images"]:
            image["file"] = str(images_dir / image["file"])
    out = Path(work_dir) / "cohorts" / f"coco-{ground_truth_key(gt)}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ground_truth.json").write_text(json.dumps(gt))
    return out


def ground_truth_key(gt: dict) -> str:
    blob = json.dumps(gt, sort_keys=True).encode()
    return hashlib.sha256(blob + f"format={CACHE_FORMAT}".encode()).hexdigest()[:16]


def images_key(cohort_dir: Path, files: list[str]) -> str:
    """Hash of the cohort's image bytes. Why beside :func:`ground_truth_key`: the same
    annotations over other pixels (fields re-scanned, re-exported, shifted by another tool)
    must not reuse cached pixels; reading the bytes costs far less than decoding them."""
    digest = hashlib.blake2b(digest_size=8)
    for name in files:
        digest.update(name.encode() + b"\0")
        digest.update((cohort_dir / name).read_bytes())
    return digest.hexdigest()


def _check_vocabulary(gt: dict) -> None:
    if list(gt.get("classes", taxonomy.CLASSES)) != list(taxonomy.CLASSES):
        raise ValueError("ground truth class list differs from marrowdx.taxonomy.CLASSES")
    if list(gt.get("diagnoses", taxonomy.DIAGNOSES)) != list(taxonomy.DIAGNOSES):
        raise ValueError("ground truth diagnosis list differs from marrowdx.taxonomy.DIAGNOSES")


def prepare_cohort(
    cohort_dir: Path,
    cache_dir: Path,
    *,
    gt: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> PreparedCohort:
    """Preprocess every image of a cohort (cached) and tabulate its cells."""
    from marrowdx.preprocess import CpuPreprocessor

    cohort_dir = Path(cohort_dir)
    gt = gt if gt is not None else read_ground_truth(cohort_dir)
    _check_vocabulary(gt)
    key = ground_truth_key(gt)
    files, image_patient, cell_rows = [], [], []
    patient_ids, diagnoses = [], []
    for p, patient in enumerate(gt["patients"]):
        patient_ids.append(str(patient["patient_id"]))
        diagnoses.append(taxonomy.DIAGNOSIS_INDEX.get(patient.get("diagnosis"), UNKNOWN_DIAGNOSIS))
        for image in patient["images"]:
            index = len(files)
            files.append(str(image["file"]))
            image_patient.append(p)
            for cell in image["cells"]:
                label = taxonomy.CLASS_INDEX[cell["label"]]
                bits = attribute_bits(cell.get("attributes", {}))
                cell_rows.append((index, [float(v) for v in cell["box"]], label, bits))

    cache = Path(cache_dir) / f"cohort-{key}-{images_key(cohort_dir, files)}"
    pixels_path, letterbox_path = cache / "pixels.npy", cache / "letterbox.npy"
    if pixels_path.exists() and letterbox_path.exists():
        pixels = np.load(pixels_path, mmap_mode="r")
        letterbox = np.load(letterbox_path)
    else:
        started = time.monotonic()
        pre = CpuPreprocessor(max_batch_size=PREPROCESS_BATCH)
        pixels = np.zeros((len(files), 3, config.INPUT_SIZE, config.INPUT_SIZE), np.uint8)
        letterbox = np.zeros((len(files), 4), np.float32)
        for start in range(0, len(files), PREPROCESS_BATCH):
            chunk = files[start : start + PREPROCESS_BATCH]
            encoded = [(cohort_dir / f).read_bytes() for f in chunk]
            px, lb, *_ = pre(encoded)
            pixels[start : start + len(chunk)] = px
            letterbox[start : start + len(chunk)] = lb
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / "pixels.tmp.npy", pixels)
        np.save(letterbox_path, letterbox)
        (cache / "pixels.tmp.npy").replace(pixels_path)
        if log is not None:
            log(
                f"preprocessed {len(files)} images of {cohort_dir}"
                f" in {time.monotonic() - started:.1f}s"
            )

    n = len(cell_rows)
    image_index = np.array([r[0] for r in cell_rows], np.int32).reshape(n)
    boxes = np.array([r[1] for r in cell_rows], np.float32).reshape(n, 4)
    if n:
        lb = letterbox[image_index]
        boxes[:, [0, 2]] = boxes[:, [0, 2]] * lb[:, 0:1] + lb[:, 2:3]
        boxes[:, [1, 3]] = boxes[:, [1, 3]] * lb[:, 1:2] + lb[:, 3:4]
    cells = CellTable(
        image_index=image_index,
        boxes=boxes,
        labels=np.array([r[2] for r in cell_rows], np.int64).reshape(n),
        attributes=np.array([r[3] for r in cell_rows], np.float32).reshape(n, config.N_ATTRIBUTES),
    )
    description = {
        "cohort": cohort_dir.name,
        "ground_truth_sha": key,
        "patients": len(patient_ids),
        "images": len(files),
        "cells": n,
    }
    return PreparedCohort(
        pixels=pixels,
        letterbox=letterbox,
        image_patient=np.array(image_patient, np.int32),
        image_files=files,
        cells=cells,
        patient_ids=patient_ids,
        diagnoses=np.array(diagnoses, np.int64),
        description=description,
    )
