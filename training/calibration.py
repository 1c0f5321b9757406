"""Temperature scaling fitted on a held-out cohort, and expected calibration error (ECE).

Why temperature scaling: one scalar per head divides the logits before softmax/sigmoid, so
the argmax (labels, counts, diagnosis) never changes, only how confident the probabilities
are. It is fitted on data the weights never saw (a held-out simulated cohort, simulated with
another seed), because on training data a network is over-confident by construction.

The fitted temperatures are written into each model's ``Temperature`` buffers
(:mod:`marrowdx.models.networks`), so the exported ONNX graph and the TensorRT engine built
from it serve calibrated probabilities with no extra code; the numbers behind them go into
the checkpoint's (and so the ONNX file's) metadata under ``calibration``.

The fit and ECE are plain numpy; collecting held-out logits uses the torch models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from marrowdx import config

#: Bump when the fitting or the held-out data change, so existing checkpoints are recalibrated.
CALIBRATION_VERSION = 2
#: Metadata key (checkpoint metadata and ONNX metadata_props) holding the fitted numbers.
METADATA_KEY = "calibration"
#: Range the fitted temperature is kept in: outside it the held-out data say nothing useful
#: (all correct and separable drives T to 0; all wrong drives it to infinity).
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
#: Bisection steps on log(1/T): 60 halvings of a width-6 interval is far below float noise.
FIT_STEPS = 60
#: Equal-width confidence bins of the ECE (15 is the usual choice since Guo et al. 2017).
ECE_BINS = 15


@dataclass(frozen=True)
class HeldOutSettings:
    """The held-out cohort a preset is calibrated on (never its training cohort).

    ``diagnosis_patients`` synthetic patients are drawn with the classifier's confusion
    measured on the held-out cohort, as the diagnosis model's training patients are drawn
    with the training confusion; a cohort of a few dozen real patients is too few to fit on.
    """

    patients: int
    images_per_patient: int
    seed_offset: int = 7919
    diagnosis_patients: int = 4000

    def seed(self, training_seed: int) -> int:
        return training_seed + self.seed_offset


#: Per training preset; an unknown preset uses "tiny"'s small cohort.
HELD_OUT: dict[str, HeldOutSettings] = {
    "reference": HeldOutSettings(patients=24, images_per_patient=4),
    "tiny": HeldOutSettings(patients=2, images_per_patient=2, diagnosis_patients=400),
}


def held_out_settings(preset: str) -> HeldOutSettings:
    return HELD_OUT.get(preset, HELD_OUT["tiny"])


# --------------------------------------------------------------------------------- maths
def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def binary_as_two_class(logits: np.ndarray) -> np.ndarray:
    """Sigmoid logits [N] -> two-class logits [N, 2] (0, z): sigmoid(z/T) = softmax((0,z)/T)[1],
    so one fitting routine serves both the softmax and the sigmoid heads."""
    z = np.asarray(logits, np.float64).reshape(-1)
    return np.stack((np.zeros_like(z), z), axis=1)


def _paired(values: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """values [N, C] as float64 and labels [N] as int64, or ValueError naming the mismatch."""
    v = np.asarray(values, np.float64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if v.ndim != 2 or v.shape[0] != y.shape[0]:
        raise ValueError(f"{what} {list(v.shape)} and labels {list(y.shape)} do not pair up")
    return v, y


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z, y = _paired(logits, labels, "logits")
    if len(y) == 0:
        raise ValueError("no held-out samples to calibrate on")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels outside 0..{z.shape[1] - 1}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinity")
    return z, y


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of softmax(logits / T) at the true labels."""
    z, y = _check(logits, labels)
    s = z / temperature
    s = s - s.max(axis=1, keepdims=True)
    lse = np.log(np.exp(s).sum(axis=1))
    return float(np.mean(lse - s[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the held-out NLL of softmax(logits / T).

    With b = 1/T the NLL is convex in b (log-sum-exp of a linear function), and its
    derivative E_p[z] - z_y is increasing, so bisection on the derivative's sign finds the
    minimum exactly and deterministically; no optimiser settings to tune.
    """
    z, y = _check(logits, labels)
    z_true = z[np.arange(len(y)), y]

    def slope(log_b: float) -> float:
        p = softmax(z * np.exp(log_b))
        return float(np.mean((p * z).sum(axis=1) - z_true))

    lo, hi = np.log(1.0 / MAX_TEMPERATURE), np.log(1.0 / MIN_TEMPERATURE)
    if slope(lo) >= 0:
        return MAX_TEMPERATURE
    if slope(hi) <= 0:
        return MIN_TEMPERATURE
    for _ in range(FIT_STEPS):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    return float(1.0 / np.exp(0.5 * (lo + hi)))


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (share of samples) x
    |accuracy - mean confidence|. 0 = the confidence says exactly how often it is right."""
    p, y = _paired(probs, labels, "probabilities")
    if len(y) == 0:
        return float("nan")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of 0 goes to the first
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def uncalibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits) back from served softmax(logits / T): softmax(T * log p).

    Lets ``evaluate`` report the ECE before calibration from the calibrated outputs alone.
    Probabilities that underflowed to 0 are floored, which only affects classes that had no
    chance either way.
    """
    logp = np.log(np.maximum(np.asarray(probs, np.float64), np.finfo(np.float32).tiny))
    return softmax(logp * float(temperature))


@dataclass(frozen=True)
class HeadCalibration:
    """One head's fitted temperature and what it did on the held-out samples."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n_samples: int
    separable: bool = False

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def calibrate_head(logits: np.ndarray, labels: np.ndarray) -> HeadCalibration:
    """Fit T on held-out logits and measure ECE/NLL before (T = 1) and after.

    When the fit reaches MIN_TEMPERATURE, every held-out sample is answered right with a
    margin (``separable``): such data set no limit on how sharp the model may be, and
    sharpening it would only make its rare errors, on data unlike the held-out cohort,
    certain. T stays 1 then (the diagnosis model on simulated patients is such a case).
    """
    fitted = fit_temperature(logits, labels)
    separable = fitted <= MIN_TEMPERATURE
    t = 1.0 if separable else fitted
    return HeadCalibration(
        temperature=t,
        ece_before=expected_calibration_error(softmax(logits), labels),
        ece_after=expected_calibration_error(softmax(np.asarray(logits) / t), labels),
        nll_before=negative_log_likelihood(logits, labels, 1.0),
        nll_after=negative_log_likelihood(logits, labels, t),
        n_samples=int(len(labels)),
        separable=bool(separable),
    )


# --------------------------------------------------------------- held-out logits (torch)
@dataclass
class HeldOutCells:
    """Classifier logits on the held-out cohort's detected cells that match a true cell."""

    class_logits: np.ndarray  # [N, 33]
    labels: np.ndarray  # [N]
    attribute_logits: np.ndarray  # [N, 7]
    attributes: np.ndarray  # [N, 7] 0/1

    def confusion(self) -> np.ndarray:
        """Row-normalised [true, predicted] confusion; identity rows for unseen classes."""
        k = config.N_CLASSES
        conf = np.zeros((k, k), np.float64)
        np.add.at(conf, (self.labels, self.class_logits.argmax(1)), 1.0)
        rows = conf.sum(1, keepdims=True)
        return np.where(rows > 0, conf / np.maximum(rows, 1), np.eye(k))


def held_out_cells(detector, classifier, data) -> HeldOutCells:
    """Run the torch detector and classifier over a prepared held-out cohort, as served:
    the classifier sees the detector's boxes, and a box counts when it matches a true cell
    at IoU 0.5 (the evaluation's rule), so detector error is part of what is calibrated."""
    import torch
    from marrowdx.training import metrics

    cls_out, att_out, labels, attrs = [], [], [], []
    with torch.no_grad():
        for i in range(data.n_images):
            pixels = torch.from_numpy(data.image_pixels([i]))
            boxes, scores, num = detector(pixels)
            n = int(num[0, 0])
            gt = data.cells_of(i)
            match = metrics.match_detections(
                boxes[0, :n].numpy(), scores[0, :n].numpy(), data.cells.boxes[gt]
            )
            if len(match.pred_index) == 0:
                continue
            picked = boxes[:, torch.from_numpy(match.pred_index)]
            cls, att = classifier.logits(classifier.normalize(pixels), picked)
            cls_out.append(cls[0].numpy())
            att_out.append(att[0].numpy())
            labels.append(data.cells.labels[gt][match.gt_index])
            attrs.append(data.cells.attributes[gt][match.gt_index])
    if not labels:
        raise ValueError("the detector matched no cell of the held-out cohort: nothing to fit")
    return HeldOutCells(
        class_logits=np.concatenate(cls_out).astype(np.float64),
        labels=np.concatenate(labels),
        attribute_logits=np.concatenate(att_out).astype(np.float64),
        attributes=np.concatenate(attrs),
    )


def diagnosis_logits(model, confusion: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, ...]:
    """Logits and true diagnoses of ``n`` synthetic patients drawn with ``confusion``."""
    import torch
    from marrowdx.training.train import synthetic_patients

    f, t, labs, mask, y = synthetic_patients(confusion, n, np.random.default_rng(seed))
    with torch.no_grad():
        z = model.logits(*(torch.from_numpy(a) for a in (f, t, labs, mask)))
    return z.numpy().astype(np.float64), y


@dataclass(frozen=True)
class ModelCalibration:
    """Everything one calibration run fitted, ready for the checkpoints' metadata."""

    classes: HeadCalibration
    attributes: HeadCalibration
    diagnosis: HeadCalibration
    cohort: dict

    def classifier_metadata(self) -> dict:
        return {
            "version": CALIBRATION_VERSION,
            "cohort": dict(self.cohort),
            "classes": self.classes.as_dict(),
            "attributes": self.attributes.as_dict(),
        }

    def diagnosis_metadata(self) -> dict:
        return {
            "version": CALIBRATION_VERSION,
            "cohort": dict(self.cohort),
            "diagnosis": self.diagnosis.as_dict(),
        }


def calibrate_models(
    detector,
    classifier,
    diagnosis,
    data,
    settings: HeldOutSettings,
    seed: int,
    log: Callable[[str], None] = lambda _m: None,
) -> ModelCalibration:
    """Fit the classifier's class and attribute temperatures and the diagnosis model's on a
    prepared held-out cohort, and write them into the models' buffers (in place)."""
    cells = held_out_cells(detector, classifier, data)
    classes = calibrate_head(cells.class_logits, cells.labels)
    attributes = calibrate_head(
        binary_as_two_class(cells.attribute_logits), cells.attributes.reshape(-1) > 0.5
    )
    z, y = diagnosis_logits(diagnosis, cells.confusion(), settings.diagnosis_patients, seed)
    diag = calibrate_head(z, y)
    classifier.class_temperature.set(classes.temperature)
    classifier.attribute_temperature.set(attributes.temperature)
    diagnosis.temperature.set(diag.temperature)
    for name, head in (("classes", classes), ("attributes", attributes), ("diagnosis", diag)):
        log(
            f"calibrated {name}: T={head.temperature:.3f}, held-out ECE"
            f" {head.ece_before:.3f} -> {head.ece_after:.3f} ({head.n_samples} samples)"
        )
    cohort = {
        **{k: data.description[k] for k in ("patients", "images", "cells", "ground_truth_sha")},
        "seed": seed,
        "matched_cells": int(len(cells.labels)),
        "diagnosis_patients": settings.diagnosis_patients,
    }
    return ModelCalibration(classes, attributes, diag, cohort)


def is_calibrated(metadata: dict | None) -> bool:
    """True when a checkpoint's metadata carries a calibration of this code's version."""
    fitted = (metadata or {}).get(METADATA_KEY) or {}
    return fitted.get("version") == CALIBRATION_VERSION


def served_temperature(calibration: dict | None, head: str) -> float:
    """The temperature a served model applies to ``head`` ("classes", "attributes",
    "diagnosis") according to its stored calibration; 1 for an uncalibrated model."""
    return float(((calibration or {}).get(head) or {}).get("temperature", 1.0))


def ece_before_after(
    probs: np.ndarray, labels: np.ndarray, temperature: float
) -> tuple[float, float]:
    """(ECE of the uncalibrated probabilities, ECE of the served ones), from served
    probabilities softmax(z / T) alone (see :func:`uncalibrate`)."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    return (
        expected_calibration_error(uncalibrate(probs, temperature), labels),
        expected_calibration_error(probs, labels),
    )
