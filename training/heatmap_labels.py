"""Detector training targets and losses (CenterNet: Gaussian centre heatmap + size/offset).

Targets are dense maps at the detector's output stride, computed once per image; random
crops aligned to the stride and flips then only slice/flip arrays.
"""

from __future__ import annotations

import numpy as np
import torch

from marrowdx.models.networks import DETECTOR_STRIDE

#: Gaussian sigma as a fraction of the cell's size on the heatmap (CenterNet uses ~1/6 diameter).
SIGMA_PER_SIZE = 1.0 / 6.0
MIN_SIGMA = 0.7
#: Focal-loss exponents of CenterNet (alpha on the prediction, beta on the negative target).
FOCAL_ALPHA = 2.0
FOCAL_BETA = 4.0
SIZE_LOSS_WEIGHT = 0.1
OFFSET_LOSS_WEIGHT = 1.0


def heatmap_labels(boxes: np.ndarray, input_size: int) -> np.ndarray:
    """Boxes [N,4] (input pixels) -> targets [6, n, n]: heat, w, h, off_x, off_y, mask."""
    n = input_size // DETECTOR_STRIDE
    out = np.zeros((6, n, n), np.float32)
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    for x0, y0, x1, y1 in boxes:
        w, h = (x1 - x0) / DETECTOR_STRIDE, (y1 - y0) / DETECTOR_STRIDE
        if w <= 0 or h <= 0:
            continue
        cx, cy = (x0 + x1) / 2 / DETECTOR_STRIDE, (y0 + y1) / 2 / DETECTOR_STRIDE
        ix, iy = int(np.clip(np.floor(cx), 0, n - 1)), int(np.clip(np.floor(cy), 0, n - 1))
        sigma = max(MIN_SIGMA, SIGMA_PER_SIZE * min(w, h))
        r = int(np.ceil(3 * sigma))
        sl = np.s_[max(0, iy - r) : iy + r + 1, max(0, ix - r) : ix + r + 1]
        g = np.exp(-((xs[sl] - ix) ** 2 + (ys[sl] - iy) ** 2) / (2 * sigma**2))
        out[0][sl] = np.maximum(out[0][sl], g)
        out[0, iy, ix] = 1.0
        out[1:6, iy, ix] = (w, h, cx - ix, cy - iy, 1.0)
    return out


def flip_heatmap_labels(t: np.ndarray, horizontal: bool) -> np.ndarray:
    """Flip a target stack [6,h,w]; the sub-cell offset along the flipped axis becomes 1 - off."""
    axis = 2 if horizontal else 1
    out = np.flip(t, axis=axis).copy()
    ch = 3 if horizontal else 4
    mask = out[5] > 0
    out[ch][mask] = 1.0 - out[ch][mask]
    return out


def transpose_heatmap_labels(t: np.ndarray) -> np.ndarray:
    """Transpose a target stack [6,h,w] (rows become columns): widths and heights swap, and
    so do the sub-cell offsets along x and y."""
    return np.ascontiguousarray(t[[0, 2, 1, 4, 3, 5]].transpose(0, 2, 1))


def detector_loss(
    logits: torch.Tensor, regress: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Focal heatmap loss + masked L1 on sizes and offsets, normalised by the cell count."""
    heat_t, mask = target[:, 0:1], target[:, 5:6]
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = (heat_t >= 1.0).to(p.dtype)
    n_pos = pos.sum().clamp(min=1.0)
    pos_loss = -(torch.log(p) * (1 - p) ** FOCAL_ALPHA * pos).sum()
    neg_loss = -(torch.log(1 - p) * p**FOCAL_ALPHA * (1 - heat_t) ** FOCAL_BETA * (1 - pos)).sum()
    size_loss = (torch.abs(regress[:, 0:2] - target[:, 1:3]) * mask).sum()
    off_loss = (torch.abs(regress[:, 2:4] - target[:, 3:5]) * mask).sum()
    return (
        pos_loss + neg_loss + SIZE_LOSS_WEIGHT * size_loss + OFFSET_LOSS_WEIGHT * off_loss
    ) / n_pos
