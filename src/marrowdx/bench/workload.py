"""The simulated image set every measurement shares (limit, peer, served, locust).

Comparisons are only fair on identical inputs: the same encoded bytes (same JPEG sizes,
same numbers of cells) go through the in-process pipeline, the peer server and Triton.
Cohorts are written once by the simulator and cached, because simulating is slower than
serving on 2 cores and would otherwise dominate a short bench.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from marrowdx import config
from marrowdx.image_checks import SERVED_SUFFIXES

#: A standard patient for the patients/hour figure: 40 fields of view of FIELD_SIZE.
STANDARD_PATIENT_FIELDS = 40
#: Simulated images per patient folder (the simulator's default).
IMAGES_PER_PATIENT = 8
#: Seed of the shared bench/locust workload, so reruns compare like with like.
WORKLOAD_SEED = 7007
#: Distinct images a locust run cycles through (requests pick among them at random).
DEFAULT_LOADTEST_IMAGES = 16


@dataclass(frozen=True)
class Workload:
    images: tuple[bytes, ...]
    #: Cells the simulator drew (ground truth), for a sanity check against detections.
    true_cells: int
    size: tuple[int, int]
    source: Path
    files: tuple[Path, ...] = ()  # the images' files, for workers that read them themselves

    @property
    def encoded_bytes(self) -> int:
        return sum(len(x) for x in self.images)

    def describe(self) -> dict:
        """The JSON's ``workload`` entry."""
        return {
            "images": len(self.images),
            "size": list(self.size),
            "encoded_mb": self.encoded_bytes / 1e6,
            "true_cells": self.true_cells,
            "source": str(self.source),
        }


def cache_dir() -> Path:
    return config.default_work_dir() / "bench-cache"


def simulated_workload(
    n_images: int,
    *,
    seed: int = WORKLOAD_SEED,
    size: tuple[int, int] = config.FIELD_SIZE,
    root: Path | None = None,
) -> Workload:
    """``n_images`` simulated fields of view (JPEG), simulated once and cached under ``root``."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    n_patients = math.ceil(n_images / IMAGES_PER_PATIENT)
    out = (root or cache_dir()) / f"workload-p{n_patients}-s{seed}-{size[0]}x{size[1]}"
    if not (out / "ground_truth.json").exists():
        from marrowdx.simulate import simulate_cohort

        simulate_cohort(
            out,
            n_patients,
            seed,
            images_per_patient=IMAGES_PER_PATIENT,
            size=size,
            image_format="jpg",
        )
    from marrowdx.simulate import load_ground_truth

    gt = load_ground_truth(out)
    entries = [image for patient in gt["patients"] for image in patient["images"]][:n_images]
    files = tuple(out / e["file"] for e in entries)
    images = tuple(f.read_bytes() for f in files)
    true_cells = sum(len(e["cells"]) for e in entries)
    return Workload(images=images, true_cells=true_cells, size=size, source=out, files=files)


def load_images_dir(folder: str | Path) -> list[bytes]:
    """Every JPEG/PNG under ``folder`` (recursively, sorted), for a user-supplied image set."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SERVED_SUFFIXES)
    return [p.read_bytes() for p in files]
