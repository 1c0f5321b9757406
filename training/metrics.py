"""Evaluation metrics in plain numpy (no scikit-learn dependency for five formulas).

Detection AP50 follows PASCAL VOC's all-point interpolation; AUC is the Mann-Whitney rank
statistic (ties averaged); macro scores average over classes present in the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IOU_MATCH = 0.5


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between boxes a [N,4] and b [M,4] (x0,y0,x1,y1) -> [N,M]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@dataclass
class Matches:
    """Greedy score-ordered matching of one image's detections to its ground truth."""

    true_positive: np.ndarray  # bool [n_pred], in the order given
    pred_index: np.ndarray  # int [n_matched]
    gt_index: np.ndarray  # int [n_matched]


def match_detections(
    pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, iou: float = IOU_MATCH
) -> Matches:
    order = np.argsort(-np.asarray(scores), kind="stable")
    ious = iou_matrix(pred, gt)
    taken = np.zeros(len(gt), bool)
    tp = np.zeros(len(pred), bool)
    pi, gi = [], []
    for p in order:
        if len(gt) == 0:
            break
        cand = np.where(taken, -1.0, ious[p])
        g = int(np.argmax(cand))
        if cand[g] >= iou:
            taken[g] = True
            tp[p] = True
            pi.append(int(p))
            gi.append(g)
    return Matches(tp, np.array(pi, np.int64), np.array(gi, np.int64))


def average_precision(scores: np.ndarray, true_positive: np.ndarray, n_ground_truth: int) -> float:
    """Area under the (monotone) precision-recall curve over all detections of a dataset."""
    if n_ground_truth == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.asarray(true_positive, np.float64)[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = ctp / n_ground_truth
    precision = ctp / np.maximum(ctp + cfp, 1e-12)
    r = np.concatenate([[0.0], recall, [recall[-1] if len(recall) else 0.0]])
    p = np.concatenate([[1.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    return float(np.sum((r[1:] - r[:-1]) * p[1:]))


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Binary ROC AUC by ranks; NaN when only one class is present."""
    y = np.asarray(y_true, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    s = np.asarray(score, np.float64)
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    values = [roc_auc(labels == c, probs[:, c]) for c in np.unique(labels)]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def per_class_f1(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """F1 per class [n_classes]; NaN for classes absent from the ground truth."""
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        t, p = labels == c, predicted == c
        if not t.any():
            continue
        tp = float(np.sum(t & p))
        out[c] = 2 * tp / max(float(t.sum() + p.sum()), 1e-12)
    return out


def macro_f1(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    f1 = per_class_f1(labels, predicted, n_classes)
    return float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan")


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total-variation distance between rows of two distributions (0 = equal, 1 = disjoint)."""
    return 0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum(axis=-1)
