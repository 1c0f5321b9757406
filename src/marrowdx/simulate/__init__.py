"""Synthetic bone-marrow aspirate cohorts with exact ground truth, and dataset formats (COCO).

API: simulate_cohort, load_ground_truth, write_coco, read_coco (schema: docs/contracts.md).
Heavy-free: numpy, Pillow and tqdm only.
"""

from marrowdx.simulate.coco import read_coco, to_coco, write_coco
from marrowdx.simulate.cohort import (
    load_ground_truth,
    simulate_cohort,
    validate_ground_truth,
    write_ground_truth,
)

__all__ = [
    "load_ground_truth",
    "read_coco",
    "simulate_cohort",
    "to_coco",
    "validate_ground_truth",
    "write_coco",
    "write_ground_truth",
]
