"""``marrowdx evaluate --shifts``: the same held-out cohort under each lab/scanner shift.

Why re-simulate instead of transforming the cached pixels: a shift acts on the full-size field
before JPEG encoding, the preprocessing resize and the decoder, as another lab's images
would; and the shifted cohort holds exactly the cells of the unshifted one (the shift draws
from its own random stream, :mod:`marrowdx.simulate.lab_variation`), so every row of the table
differs from the first only by the shift. Shifted cohorts are cached under the work dir.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marrowdx.errors import InputError
from marrowdx.serving.onnx_artifacts import OnnxModels
from marrowdx.simulate.cohort import RENDERER_VERSION
from marrowdx.training.evaluate import TARGETS, EvaluationReport, evaluate_cohort

#: The goals under each shift: the held-out detection and classification targets, a
#: looser count TVD and a stricter diagnosis F1.
SHIFT_TARGETS = {
    **{k: TARGETS[k] for k in ("detection_ap50", "cell_macro_f1")},
    "count_tv_distance": ("<=", 0.06),
    "diagnosis_macro_f1": (">=", 0.95),
}
#: Table columns (short names of the goal metrics).
COLUMNS = dict(zip(SHIFT_TARGETS, ("AP50", "macro-F1", "count TVD", "diag F1"), strict=True))


@dataclass
class ShiftResult:
    """One row: the cohort evaluated under one shift kind (``none`` = unshifted)."""

    shift: str
    strength: float
    cohort: str
    report: EvaluationReport

    def meets_goals(self) -> bool:
        ok = True
        for key, (op, bound) in SHIFT_TARGETS.items():
            v = getattr(self.report, key)
            ok &= bool(v >= bound) if op == ">=" else bool(v <= bound)
        return ok

    def as_dict(self) -> dict:
        return {
            "shift": self.shift,
            "strength": self.strength,
            "cohort": self.cohort,
            "meets_goals": self.meets_goals(),
            **{k: getattr(self.report, k) for k in COLUMNS},
            "n_images": self.report.n_images,
            "n_cells": self.report.n_cells,
        }


def simulator_settings(gt: dict, cohort_dir: Path) -> dict:
    """The simulate parameters a cohort was made with; InputError if it was not simulated."""
    sim = gt.get("simulator")
    if not sim or "seed" not in sim:
        raise InputError(
            f"{cohort_dir} was not written by `marrowdx simulate` (no 'simulator' section in "
            "ground_truth.json): --shifts re-renders the cohort, so it needs a simulated one"
        )
    if sim.get("shift", "none") != "none":
        raise InputError(f"{cohort_dir} is already shifted ({sim['shift']}): give an unshifted one")
    first = gt["patients"][0]["patient_id"] if gt["patients"] else "P0001"
    if first != "P0001":
        raise InputError(f"{cohort_dir} starts at {first}: --shifts needs one starting at P0001")
    return sim


def shifted_cohort(
    cohort_dir: Path, kind: str, strength: float, work_dir: Path, log: Callable[[str], None]
) -> Path:
    """The shifted twin of a simulated cohort (rendered once, then reused)."""
    from marrowdx.simulate import simulate_cohort
    from marrowdx.training.data import read_ground_truth

    gt = read_ground_truth(cohort_dir)
    sim = simulator_settings(gt, cohort_dir)
    w, h = sim["size"]
    name = (
        f"shift-{kind}-x{strength:g}-seed{sim['seed']}-p{len(gt['patients'])}"
        f"-i{sim['images_per_patient']}-{w}x{h}-{sim['image_format']}-r{RENDERER_VERSION}"
    )
    out = Path(work_dir) / "cohorts" / name
    if (out / "ground_truth.json").exists():
        return out
    log(f"simulating {name}")
    partial = out.with_name(out.name + ".partial")
    simulate_cohort(
        partial,
        len(gt["patients"]),
        int(sim["seed"]),
        images_per_patient=int(sim["images_per_patient"]),
        size=(int(w), int(h)),
        image_format=sim["image_format"],
        class_floor=float(sim.get("class_floor", 0.008)),
        shift=kind,
        shift_strength=strength,
    )
    partial.replace(out)
    return out


def evaluate_shifts(
    cohort_dir: Path,
    models: OnnxModels,
    work_dir: Path,
    kinds: Sequence[str],
    strength: float = 1.0,
    log: Callable[[str], None] = lambda _m: None,
) -> list[ShiftResult]:
    """The unshifted cohort first, then one shifted twin per kind."""
    results = []
    for kind in ("none", *[k for k in kinds if k != "none"]):
        path = (
            Path(cohort_dir)
            if kind == "none"
            else shifted_cohort(cohort_dir, kind, strength, work_dir, log)
        )
        log(f"evaluating {path.name} ({kind})")
        results.append(
            ShiftResult(kind, strength, path.name, evaluate_cohort(path, models, work_dir))
        )
    return results


def _fmt(v: float) -> str:
    return "—" if v is None or np.isnan(v) else f"{v:.3f}"


def format_shift_table(results: Sequence[ShiftResult], preset: str = "") -> str:
    """Markdown table: one row per shift, the goals in the header."""
    goals = ", ".join(f"{COLUMNS[k]} {op} {b}" for k, (op, b) in SHIFT_TARGETS.items())
    head = "| cohort | " + " | ".join(COLUMNS.values()) + " | goals |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in results:
        label = "unshifted" if r.shift == "none" else f"{r.shift} (strength {r.strength:g})"
        cells = " | ".join(_fmt(getattr(r.report, k)) for k in COLUMNS)
        lines.append(f"| {label} | {cells} | {'met' if r.meets_goals() else 'MISSED'} |")
    n = results[0].report if results else None
    if n is not None:
        lines.append(
            f"\n({preset + ' build; ' if preset else ''}each cohort {n.n_patients} patients, "
            f"{n.n_images} images, {n.n_cells} cells; goals: {goals})"
        )
    return "\n".join(lines)
