"""In-graph ROI cropping by bilinear grid sampling.

Why grid_sample: ONNX ``RoiAlign`` is not in TensorRT's supported-operator list, while
``GridSample`` (opset 16+) is, and one GridSample call can crop every box of every image at
once, so the classifier graph stays a plain tensor program with a fixed number of boxes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Crops are squares around the box centre, this much wider than the box's longer side,
#: so the classifier also sees the cell's rim and a little of its neighbourhood.
CROP_CONTEXT_MARGIN = 1.25
#: Smallest crop side (input pixels), so padded all-zero boxes still give a finite grid.
MIN_CROP_SIDE = 1.0


def square_crop_windows(boxes: torch.Tensor, margin: float = CROP_CONTEXT_MARGIN) -> torch.Tensor:
    """Boxes [..., 4] (x0,y0,x1,y1) -> square windows [..., 3] (cx, cy, side) in pixels."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    side = torch.maximum(x1 - x0, y1 - y0) * margin
    side = torch.clamp(side, min=MIN_CROP_SIDE)
    return torch.stack(((x0 + x1) * 0.5, (y0 + y1) * 0.5, side), dim=-1)


def crop_offsets(crop_size: int) -> torch.Tensor:
    """Sample positions across a crop, as fractions of its side centred on 0 ([S])."""
    return (torch.arange(crop_size, dtype=torch.float32) + 0.5) / crop_size - 0.5


def crop_boxes(
    pixels: torch.Tensor,
    boxes: torch.Tensor,
    steps: torch.Tensor,
    image_hw: tuple[int, int],
    margin: float = CROP_CONTEXT_MARGIN,
) -> torch.Tensor:
    """Crop every box of every image: pixels [B,C,H,W], boxes [B,K,4] -> [B*K, C, S, S].

    ``steps`` is :func:`crop_offsets` (a constant, so the graph holds no Range op) and
    ``image_hw`` the fixed input size (a constant, so the graph holds no shape arithmetic).
    Pixel-centre convention of ``align_corners=False``: pixel i covers [i, i+1), so a box
    in continuous pixel coordinates maps to normalised x = 2*x/W - 1 without off-by-half.
    """
    b, c = pixels.shape[0], pixels.shape[1]
    h, w = image_hw
    k = boxes.shape[1]
    crop_size = steps.shape[0]
    win = square_crop_windows(boxes, margin)  # [B,K,3]
    cx, cy, side = win[..., 0:1], win[..., 1:2], win[..., 2:3]  # [B,K,1]
    gx = (cx + side * steps) * (2.0 / w) - 1.0  # [B,K,S]
    gy = (cy + side * steps) * (2.0 / h) - 1.0  # [B,K,S]
    grid_x = gx.unsqueeze(2).expand(b, k, crop_size, crop_size)
    grid_y = gy.unsqueeze(3).expand(b, k, crop_size, crop_size)
    grid = torch.stack((grid_x, grid_y), dim=-1).reshape(b, k * crop_size, crop_size, 2)
    crops = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    crops = crops.reshape(b, c, k, crop_size, crop_size).permute(0, 2, 1, 3, 4)
    return crops.reshape(b * k, c, crop_size, crop_size)
