"""Held-out evaluation of the exported models, side by side with the paper's numbers.

Runs the ONNX files (what the server runs) with ONNX Runtime over a cohort that went
through the same DALI preprocessing, matches detections to ground truth at IoU 0.5 and
computes: detection AP50, 33-class macro AUC / macro F1 and attribute accuracy on matched
cells, per-patient count total-variation distance, and diagnosis macro F1 from the
predicted counts (as the paper does: the diagnosis never sees ground-truth labels).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from marrowdx import config, differential, taxonomy
from marrowdx.serving.onnx_artifacts import OnnxModels
from marrowdx.training import metrics
from marrowdx.training.data import PreparedCohort

T = config.TENSORS
#: Images per ONNX Runtime call during evaluation.
EVAL_BATCH = 4

#: Höfener et al. 2025 (arXiv 2509.15895); None = not reported.
PAPER = {
    "detection_ap50": 0.96,
    "cell_macro_auc": 0.98,
    "cell_macro_f1": 0.61,
    "attribute_accuracy": None,
    "count_tv_distance": None,
    "diagnosis_macro_f1": 0.90,
    "cell_ece_uncalibrated": None,
    "cell_ece": None,
    "diagnosis_ece_uncalibrated": None,
    "diagnosis_ece": None,
    "unidentified_fraction": None,
    "unidentified_catches": None,
}
#: What the reference build must reach on a held-out simulated cohort.
TARGETS = {
    "detection_ap50": (">=", 0.95),
    "cell_macro_f1": (">=", 0.90),
    "count_tv_distance": ("<=", 0.05),
    "diagnosis_macro_f1": (">=", 0.90),
    # probabilities that mean what they say, after temperature scaling
    "cell_ece": ("<=", 0.05),
    "diagnosis_ece": ("<=", 0.05),
}
LABELS = {
    "detection_ap50": "detection AP50",
    "cell_macro_auc": "cell 33-class macro AUC",
    "cell_macro_f1": "cell 33-class macro F1",
    "attribute_accuracy": "attribute accuracy (7 binary)",
    "count_tv_distance": "count distribution TV distance",
    "diagnosis_macro_f1": "diagnosis macro F1 (predicted counts)",
    "cell_ece_uncalibrated": "cell ECE before calibration (T = 1)",
    "cell_ece": "cell ECE (served, calibrated)",
    "diagnosis_ece_uncalibrated": "diagnosis ECE before calibration",
    "diagnosis_ece": "diagnosis ECE (served, calibrated)",
    "unidentified_fraction": f"cells unidentified (p < {config.UNIDENTIFIED_BELOW:g})",
    "unidentified_catches": "wrong labels caught as unidentified",
}


@dataclass
class EvaluationReport:
    detection_ap50: float
    cell_macro_auc: float
    cell_macro_f1: float
    attribute_accuracy: float
    count_tv_distance: float
    diagnosis_macro_f1: float
    n_patients: int
    n_images: int
    n_cells: int
    n_matched: int
    seconds: float
    per_class_f1: dict[str, float] = field(default_factory=dict)
    diagnosis_confusion: list[list[int]] = field(default_factory=list)
    # calibration (expected calibration error, top label, 15 bins) and the unidentified
    # rule at config.UNIDENTIFIED_BELOW: share of detected cells it flags, and share of the
    # misclassified matched cells it flags (what it catches for review)
    cell_ece: float = float("nan")
    cell_ece_uncalibrated: float = float("nan")
    diagnosis_ece: float = float("nan")
    diagnosis_ece_uncalibrated: float = float("nan")
    unidentified_fraction: float = float("nan")
    unidentified_catches: float = float("nan")

    def meets_targets(self) -> dict[str, bool]:
        out = {}
        for key, (op, bound) in TARGETS.items():
            value = getattr(self, key)
            out[key] = bool(value >= bound) if op == ">=" else bool(value <= bound)
        return out

    def as_dict(self) -> dict:
        return {**asdict(self), "meets_targets": self.meets_targets()}


@dataclass
class CohortPredictions:
    boxes: list[np.ndarray]  # per image [n,4] input px
    scores: list[np.ndarray]
    class_probs: list[np.ndarray]
    attribute_probs: list[np.ndarray]
    class_counts: np.ndarray  # [I, 33]


def predict(data: PreparedCohort, models: OnnxModels, threads: int = 2) -> CohortPredictions:
    """Detector then classifier over every image of a prepared cohort, with ONNX Runtime."""
    from marrowdx.serving.onnx_artifacts import ort_session

    det, cls = ort_session(models.detector, threads), ort_session(models.classifier, threads)
    out = CohortPredictions([], [], [], [], np.zeros((data.n_images, config.N_CLASSES), np.float32))
    for start in range(0, data.n_images, EVAL_BATCH):
        idx = np.arange(start, min(start + EVAL_BATCH, data.n_images))
        pixels = data.image_pixels(idx)
        boxes, scores, num = det.run([T.boxes, T.scores, T.num_detections], {T.pixels: pixels})
        probs, attrs, counts = cls.run(
            [T.class_probs, T.attribute_probs, T.class_counts],
            {T.pixels: pixels, T.boxes: boxes, T.num_detections: num},
        )
        for j in range(len(idx)):
            n = int(num[j, 0])
            out.boxes.append(boxes[j, :n])
            out.scores.append(scores[j, :n])
            out.class_probs.append(probs[j, :n])
            out.attribute_probs.append(attrs[j, :n])
        out.class_counts[idx] = counts
    return out


def diagnose_counts(models: OnnxModels, counts: np.ndarray) -> np.ndarray:
    """Diagnosis probabilities [P,3] from per-patient predicted counts [P,33] (no lab values)."""
    from marrowdx.serving.onnx_artifacts import ort_session

    # The same inputs the client sends; a patient without cells is still scored (zeros).
    inputs = differential.diagnosis_inputs(counts)
    (probs,) = ort_session(models.diagnosis).run([T.diagnosis_probs], inputs.tensors())
    return probs


def evaluate(data: PreparedCohort, models: OnnxModels) -> EvaluationReport:
    started = time.monotonic()
    pred = predict(data, models)
    cells = data.cells
    all_scores, all_tp, labels, probs, attr_true, attr_prob = [], [], [], [], [], []
    for i in range(data.n_images):
        gt_idx = data.cells_of(i)
        m = metrics.match_detections(pred.boxes[i], pred.scores[i], cells.boxes[gt_idx])
        all_scores.append(pred.scores[i])
        all_tp.append(m.true_positive)
        labels.append(cells.labels[gt_idx][m.gt_index])
        probs.append(pred.class_probs[i][m.pred_index])
        attr_true.append(cells.attributes[gt_idx][m.gt_index])
        attr_prob.append(pred.attribute_probs[i][m.pred_index])
    scores, tp = np.concatenate(all_scores), np.concatenate(all_tp)
    labels, probs = np.concatenate(labels), np.concatenate(probs).reshape(-1, config.N_CLASSES)
    attr_true = np.concatenate(attr_true).reshape(-1, config.N_ATTRIBUTES)
    attr_prob = np.concatenate(attr_prob).reshape(-1, config.N_ATTRIBUTES)
    predicted = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    f1 = metrics.per_class_f1(labels, predicted, config.N_CLASSES)

    n_patients = len(data.patient_ids)
    counts = np.zeros((n_patients, config.N_CLASSES))
    np.add.at(counts, data.image_patient, pred.class_counts)
    truth = data.true_counts()
    pred_frac = differential.fractions(counts)
    true_frac = differential.fractions(truth)
    diag_probs = diagnose_counts(models, counts)
    diag = diag_probs.argmax(1)
    known = data.diagnoses >= 0
    confusion = np.zeros((config.N_DIAGNOSES, config.N_DIAGNOSES), np.int64)
    np.add.at(confusion, (data.diagnoses[known], diag[known]), 1)
    return EvaluationReport(
        detection_ap50=metrics.average_precision(scores, tp, len(cells.labels)),
        cell_macro_auc=metrics.macro_auc(labels, probs),
        cell_macro_f1=float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan"),
        attribute_accuracy=float(((attr_prob > 0.5) == (attr_true > 0.5)).mean())
        if len(attr_true)
        else float("nan"),
        count_tv_distance=float(metrics.total_variation(pred_frac, true_frac).mean()),
        diagnosis_macro_f1=metrics.macro_f1(data.diagnoses[known], diag[known], config.N_DIAGNOSES),
        n_patients=n_patients,
        n_images=data.n_images,
        n_cells=len(cells.labels),
        n_matched=len(labels),
        seconds=time.monotonic() - started,
        per_class_f1={taxonomy.CLASSES[c]: float(v) for c, v in enumerate(f1) if np.isfinite(v)},
        diagnosis_confusion=confusion.tolist(),
        **calibration_fields(models, pred, probs, labels, diag_probs[known], data.diagnoses[known]),
    )


def calibration_fields(
    models: OnnxModels,
    pred: CohortPredictions,
    probs: np.ndarray,
    labels: np.ndarray,
    diag_probs: np.ndarray,
    diagnoses: np.ndarray,
) -> dict[str, float]:
    """ECE before/after calibration for cells (matched ``probs`` vs true ``labels``) and
    patients, and what the unidentified rule flags; "before" is recovered from the served
    probabilities and the temperatures stored in the ONNX files (the cells' with the
    simulated cells' T: exact where the real-cell gate is shut, as on simulated cohorts,
    where it averages 0.02)."""
    from marrowdx.serving.onnx_artifacts import read_calibration
    from marrowdx.training import calibration as cal

    t_cells = cal.served_temperature(read_calibration(models.classifier), "classes")
    t_diag = cal.served_temperature(read_calibration(models.diagnosis), "diagnosis")
    cell_before, cell_after = cal.ece_before_after(probs, labels, t_cells)
    diag_before, diag_after = cal.ece_before_after(diag_probs, diagnoses, t_diag)
    top = np.concatenate([p.max(1) for p in pred.class_probs if len(p)] or [np.zeros(0)])
    wrong = probs.argmax(1) != labels if len(labels) else np.zeros(0, bool)
    flagged = probs.max(1) < config.UNIDENTIFIED_BELOW if len(labels) else np.zeros(0, bool)
    return {
        "cell_ece": cell_after,
        "cell_ece_uncalibrated": cell_before,
        "diagnosis_ece": diag_after,
        "diagnosis_ece_uncalibrated": diag_before,
        "unidentified_fraction": float(np.mean(top < config.UNIDENTIFIED_BELOW))
        if len(top)
        else float("nan"),
        "unidentified_catches": float(flagged[wrong].mean()) if wrong.any() else float("nan"),
    }


def evaluate_cohort(
    cohort_dir: Path, models: OnnxModels, work_dir: Path, um_per_pixel: float | None = None
) -> EvaluationReport:
    """``um_per_pixel``: the cohort images' pixel spacing; away from the models' spacing the
    images are evaluated as the model fields the client sends (:func:`spaced_cohort`)."""
    from marrowdx import spacing
    from marrowdx.training.data import prepare_cohort

    cohort_dir = Path(cohort_dir)
    if um_per_pixel is not None and not spacing.at_model_spacing(um_per_pixel):
        cohort_dir = spaced_cohort(cohort_dir, um_per_pixel, Path(work_dir) / "cohorts")
    data = prepare_cohort(cohort_dir, Path(work_dir) / "cache")
    return evaluate(data, models)


def spaced_cohort(cohort_dir: Path, um_per_pixel: float, out_root: Path) -> Path:
    """The cohort as the fields the client sends for images at ``um_per_pixel`` (the same
    ``marrowdx.spacing`` plan and ``client.fields`` encoder): each field is an image of a new
    cohort, its cells those it shows (mirror images in the padding included, cut cells
    clipped) in field pixels, so the metrics score what the models are given. Written once
    under ``out_root`` per cohort and spacing."""
    import hashlib
    import json

    from PIL import Image

    from marrowdx import spacing
    from marrowdx.client.fields import encode_field
    from marrowdx.slides import tiling
    from marrowdx.training.data import read_ground_truth

    gt = read_ground_truth(cohort_dir)
    key = hashlib.sha256(f"{json.dumps(gt, sort_keys=True)}|{um_per_pixel!r}".encode())
    out = Path(out_root) / f"spaced-{key.hexdigest()[:16]}"
    if (out / "ground_truth.json").exists():
        return out
    patients = []
    for patient in gt["patients"]:
        images = []
        for image in patient["images"]:
            with Image.open(Path(cohort_dir) / image["file"]) as source:
                width, height = source.size
                resampled = np.asarray(spacing.resample(source.convert("RGB"), um_per_pixel))
            boxes = np.array([c["box"] for c in image["cells"]], np.float64).reshape(-1, 4)
            for f, plan in enumerate(tiling.plan_fields(width, height, um_per_pixel)):
                name = f"{Path(image['file']).with_suffix('')}_f{f}.jpg"
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(encode_field(np.ascontiguousarray(plan.render(resampled))))
                index, shown = plan.shown(boxes)
                cells = [
                    {**image["cells"][i], "box": [round(float(v), 2) for v in box]}
                    for i, box in zip(index, shown, strict=True)
                ]
                images.append({"file": name, "width": plan.size[0], "height": plan.size[1],
                               "cells": cells})  # fmt: skip
        patients.append({**patient, "images": images})
    (out / "ground_truth.json").write_text(json.dumps({**gt, "patients": patients}))
    return out


def _fmt(value: float | None) -> str:
    return (
        "—" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"
    )


def format_table(report: EvaluationReport, preset: str = "") -> str:
    """The paper's table next to this build's numbers (and the targets)."""
    met = report.meets_targets()
    head = f"{'metric':40s} {'paper':>7s} {'this build':>10s}  target"
    lines = [head, "-" * len(head)]
    for key, label in LABELS.items():
        target = ""
        if key in TARGETS:
            op, bound = TARGETS[key]
            target = f"{op} {bound:.2f} {'ok' if met[key] else 'MISSED'}"
        lines.append(
            f"{label:40s} {_fmt(PAPER[key]):>7s} {_fmt(getattr(report, key)):>10s}  {target}"
        )
    lines.append(
        f"({preset + ' build; ' if preset else ''}{report.n_patients} patients, "
        f"{report.n_images} images, "
        f"{report.n_cells} cells, {report.n_matched} matched; {report.seconds:.0f}s)"
    )
    return "\n".join(lines)
