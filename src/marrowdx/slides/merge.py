"""One cell, one count: merge detections of overlapping fields into base-level slide pixels.

A ROI is tiled into fields that overlap (so that every cell lies whole inside at least one
field); a cell in an overlap is therefore detected once per field that sees it, and near a
field's edge it may be cut (its box then covers only the part inside the field). Counting
it once per field would inflate the cells on every seam and twice so at every corner.

Rule (pure numpy, no slide reading, so the thin client and the unit tests use it freely):

1. Map every field's boxes to base-level pixels (``marrowdx.slides.base.Field.to_base``).
2. Drop cells whose centre lies outside the ROI (the ROI is what is counted; a field at the
   ROI's border may see a little beyond it).
3. Rank detections by their *margin*: the distance from the box to the nearest edge of its
   field that is a seam (an edge inside the ROI; edges on the ROI's border are the same for
   every field that could see the cell, so they do not discriminate). A cell far from a
   seam was seen whole; one touching a seam may be cut. Ties go to the higher score.
Fields that abut without overlapping (the slide's own tile frames, sent as they are stored:
``SlideSource.frame_fields``) see a cell on their shared edge cut in two (four at a corner):
before step 3 such pieces are joined (``join_seams``): pieces in abutting fields that both
touch the shared edge (within ``SEAM_TOLERANCE`` base pixels) and share at least half of the
smaller piece's extent along it are one cell, whose box is their union and whose label is
the largest piece's.

Before step 3, a detection touching a seam of its field (within ``SEAM_TOLERANCE``) whose
box lies inside another field is dropped (``cut_at_seam``): fields overlap by at least the
largest cell, so that other field saw the cell whole, and a cut piece's box, often a few
pixels off, can share too little with the whole box for the tests of step 4.

4. Greedily keep detections in that order; a detection is a duplicate of a kept one from a
   *different* field when their boxes overlap by IoU >= ``iou``, when the smaller box lies
   mostly inside the larger (intersection over the smaller >= ``containment``: a cut box
   inside the whole one), or when each box holds the other's centre (two loose boxes of one
   cell; touching cells never do). Detections of the same field never suppress each other:
   the detector already separated touching cells there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: IoU above which two boxes from different fields are the same cell. Two distinct touching
#: cells rarely overlap by more than a few percent of their area.
DEFAULT_IOU = 0.3
#: Share of the smaller box inside the larger above which they are the same (cut) cell.
DEFAULT_CONTAINMENT = 0.6
#: How far (base pixels) a cut piece's box may end from the field edge that cut it: the
#: detector's boxes at an image border land within a few pixels of it.
SEAM_TOLERANCE = 6.0
#: Share of the smaller piece's extent along the seam that two pieces must share.
SEAM_SHARED = 0.5

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class MergeResult:
    """Which detections survive: ``kept`` indices into the concatenated input, in input
    order; ``duplicates`` maps each suppressed index to the kept index it duplicates;
    ``outside_roi`` lists the indices dropped because their centre lies outside the ROI;
    ``joined`` maps each piece of a cell cut by abutting fields to the piece that stands for
    the joined cell; ``boxes`` [N, 4] are the input boxes with each joined cell's union box
    in its standing piece's row (report ``boxes[kept]``); ``cut_at_seam`` lists detections
    dropped because they touch a seam of their field and lie inside another field, which
    saw that cell whole (step 0)."""

    kept: np.ndarray
    duplicates: dict[int, int]
    outside_roi: np.ndarray
    joined: dict[int, int] = field(default_factory=dict)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    cut_at_seam: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def seam_margins(boxes: np.ndarray, field_box: Sequence[float], roi: Sequence[float]) -> np.ndarray:
    """Per box, the distance (base pixels, >= 0) to the nearest field edge that is a seam.

    Field edges on (or beyond) the ROI's border are not seams; a field with no seam (the
    ROI fits in one field) gives every box an infinite margin.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    fx0, fy0, fx1, fy1 = (float(v) for v in field_box)
    rx0, ry0, rx1, ry1 = (float(v) for v in roi)
    margin = np.full(len(boxes), np.inf)
    if fx0 > rx0:
        margin = np.minimum(margin, boxes[:, 0] - fx0)
    if fy0 > ry0:
        margin = np.minimum(margin, boxes[:, 1] - fy0)
    if fx1 < rx1:
        margin = np.minimum(margin, fx1 - boxes[:, 2])
    if fy1 < ry1:
        margin = np.minimum(margin, fy1 - boxes[:, 3])
    return np.maximum(margin, 0.0)


def _abutting(a: np.ndarray, b: np.ndarray, tol: float) -> int | None:
    """The axis of the edge field ``b`` shares with field ``a`` when ``b`` lies right of
    (0) or below (1) ``a`` without overlapping it, else None."""
    for axis in (0, 1):
        other = 1 - axis
        along = min(a[2 + other], b[2 + other]) - max(a[other], b[other])
        if abs(a[2 + axis] - b[axis]) <= tol and along > 0:
            return axis
    return None


def join_seams(
    boxes: np.ndarray,
    field_ids: np.ndarray,
    field_boxes: np.ndarray,
    *,
    tol: float = SEAM_TOLERANCE,
    shared: float = SEAM_SHARED,
) -> list[list[int]]:
    """Groups (>= 2 indices each) of pieces of one cell cut by the edge of abutting fields."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    field_ids = np.asarray(field_ids, dtype=np.int64).reshape(-1)
    field_boxes = np.asarray(field_boxes, dtype=np.float64).reshape(-1, 4)
    parent = list(range(len(boxes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in range(len(field_boxes)):
        for b in range(len(field_boxes)):
            axis = _abutting(field_boxes[a], field_boxes[b], tol) if a != b else None
            if axis is None:
                continue
            edge, other = field_boxes[a][2 + axis], 1 - axis
            left = np.flatnonzero((field_ids == a) & (boxes[:, 2 + axis] >= edge - tol))
            right = np.flatnonzero((field_ids == b) & (boxes[:, axis] <= edge + tol))
            for i in left:
                lo = np.maximum(boxes[i, other], boxes[right, other])
                hi = np.minimum(boxes[i, 2 + other], boxes[right, 2 + other])
                extent = np.minimum(
                    boxes[i, 2 + other] - boxes[i, other],
                    boxes[right, 2 + other] - boxes[right, other],
                )
                for j in right[(hi - lo) >= shared * extent]:
                    parent[root(int(j))] = root(int(i))
    groups: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _overlaps(box: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and intersection-over-the-smaller of ``box`` against each row of ``others``
    (broadcast over leading axes: ``box`` [B, 1, 4] against ``others`` [M, 4] gives [B, M])."""
    ix0 = np.maximum(box[..., 0], others[..., 0])
    iy0 = np.maximum(box[..., 1], others[..., 1])
    ix1 = np.minimum(box[..., 2], others[..., 2])
    iy1 = np.minimum(box[..., 3], others[..., 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = np.maximum((box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1]), 0.0)
    areas = np.clip(others[..., 2] - others[..., 0], 0, None) * np.clip(
        others[..., 3] - others[..., 1], 0, None
    )
    union = area + areas - inter
    smaller = np.minimum(area, areas)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    iom = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
    return iou, iom


def _centres_inside_each_other(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Per row of ``others``: does each box hold the other's centre? Two looser boxes of one
    cell (a few pixels off each way, IoU under the threshold) do; two distinct cells, even
    touching ones, do not (each would have to cover half of the other on both axes)."""
    cx, cy = (box[..., 0] + box[..., 2]) / 2, (box[..., 1] + box[..., 3]) / 2
    ox0, oy0, ox1, oy1 = (others[..., k] for k in range(4))
    ocx, ocy = (ox0 + ox1) / 2, (oy0 + oy1) / 2
    mine = (ox0 <= cx) & (cx < ox1) & (oy0 <= cy) & (cy < oy1)
    theirs = (box[..., 0] <= ocx) & (ocx < box[..., 2]) & (box[..., 1] <= ocy) & (ocy < box[..., 3])
    return mine & theirs


def merge_fields(
    boxes: np.ndarray,
    scores: np.ndarray,
    field_ids: np.ndarray,
    field_boxes: np.ndarray,
    roi: Sequence[float],
    *,
    iou: float = DEFAULT_IOU,
    containment: float = DEFAULT_CONTAINMENT,
) -> MergeResult:
    """Deduplicate the detections of one ROI's fields (see the module docstring).

    ``boxes`` [N, 4] in base-level pixels, ``scores`` [N], ``field_ids`` [N] index rows of
    ``field_boxes`` [F, 4] (base-level pixels each field covers), ``roi`` the ROI's box.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    field_ids = np.asarray(field_ids, dtype=np.int64).reshape(-1)
    field_boxes = np.asarray(field_boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    if len(scores) != n or len(field_ids) != n:
        raise ValueError(f"{n} boxes but {len(scores)} scores and {len(field_ids)} field ids")
    if n and (field_ids.min() < 0 or field_ids.max() >= len(field_boxes)):
        raise ValueError(f"field ids must index the {len(field_boxes)} field boxes")
    if not 0 < iou <= 1 or not 0 < containment <= 1:
        raise ValueError(f"iou and containment must be in (0, 1], got {iou}, {containment}")
    boxes = boxes.copy()
    joined: dict[int, int] = {}
    for group in join_seams(boxes, field_ids, field_boxes):
        pieces = boxes[group]
        areas = (pieces[:, 2] - pieces[:, 0]) * (pieces[:, 3] - pieces[:, 1])
        stand = group[int(np.argmax(areas))]
        boxes[stand] = [*pieces[:, :2].min(axis=0), *pieces[:, 2:].max(axis=0)]
        joined.update({i: stand for i in group if i != stand})
    active = np.ones(n, dtype=bool)
    active[list(joined)] = False
    rx0, ry0, rx1, ry1 = (float(v) for v in roi)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (cx >= rx0) & (cx < rx1) & (cy >= ry0) & (cy < ry1)

    margins = np.empty(n)
    for f in np.unique(field_ids):
        rows = field_ids == f
        margins[rows] = seam_margins(boxes[rows], field_boxes[f], roi)
    cut = _cut_and_seen_whole(boxes, field_ids, field_boxes, margins) & active
    active &= ~cut
    candidates = np.flatnonzero(inside & active)
    # Highest margin first, then highest score, then input order (stable, reproducible).
    order = candidates[np.lexsort((candidates, -scores[candidates], -margins[candidates]))]

    kept, duplicates = _keep_one_per_cell(boxes[order], field_ids[order], iou, containment)
    return MergeResult(
        kept=np.sort(order[kept]),
        duplicates={int(order[a]): int(order[b]) for a, b in duplicates.items()},
        outside_roi=np.flatnonzero(~inside & active),
        joined=joined,
        boxes=boxes,
        cut_at_seam=np.flatnonzero(cut),
    )


#: Rows of the pairwise same-cell test computed at once in :func:`_keep_one_per_cell`: bounds
#: its memory (a block of rows against every box) on a ROI of thousands of detections.
SAME_CELL_BLOCK = 256


def _keep_one_per_cell(
    boxes: np.ndarray, field_ids: np.ndarray, iou: float, containment: float
) -> tuple[np.ndarray, dict[int, int]]:
    """Step 4 of the module docstring over ``boxes`` [M, 4] in priority order: a box is kept
    unless it is the cell of a box kept before it from another field, then it is that box's
    duplicate (the kept box it overlaps most, by IoU; the earliest on a tie). Returns the
    kept positions and {duplicate position: kept position}. Why by blocks of the pairwise
    test instead of box by box against the boxes kept so far: the same decisions at a tenth
    of the client's CPU, which a slide's fields share with the server on a small host. A
    block is tested against the boxes up to its end only: a box is judged by earlier ones."""
    m = len(boxes)
    kept = np.zeros(m, dtype=bool)
    duplicates: dict[int, int] = {}
    for start in range(0, m, SAME_CELL_BLOCK):
        rows = slice(start, min(m, start + SAME_CELL_BLOCK))
        earlier = boxes[: rows.stop]
        same, overlap_iou = _same_cell(boxes[rows, None, :], earlier, iou, containment)
        same &= field_ids[rows, None] != field_ids[None, : rows.stop]
        for r, a in enumerate(range(rows.start, rows.stop)):
            hits = same[r, :a] & kept[:a]
            if hits.any():
                duplicates[a] = int(np.argmax(np.where(hits, overlap_iou[r, :a], -1)))
            else:
                kept[a] = True
    return np.flatnonzero(kept), duplicates


def _same_cell(
    box: np.ndarray, others: np.ndarray, iou: float, containment: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``others``: is it ``box``'s cell (step 4 of the module docstring)? With
    the IoUs, which pick the likeliest of several."""
    overlap_iou, overlap_min = _overlaps(box, others)
    same = (
        (overlap_iou >= iou)
        | (overlap_min >= containment)
        | _centres_inside_each_other(box, others)
    )
    return same, overlap_iou


#: Share of a cell's mirror images (wholly in the padding) the detector must find for the
#: cell to count when the image itself showed no detection of it, and the share of a mirror
#: image's box (or of the found cell's, the smaller) over a found cell beyond which it is
#: that cell. On the held-out real marrow crops, those without their centre cell 6.3% ->
#: 4.9%; the blood fields unchanged (docs/real_cells.md).
MIN_MIRROR_SUPPORT = 0.1
MAX_MIRROR_OVERLAP = 0.25


def unseen_mirror_images(
    kept: np.ndarray,
    mirrored: np.ndarray,
    scores: np.ndarray,
    copies: np.ndarray,
    *,
    min_support: float = MIN_MIRROR_SUPPORT,
    max_overlap: float = MAX_MIRROR_OVERLAP,
    iou: float = DEFAULT_IOU,
    containment: float = DEFAULT_CONTAINMENT,
) -> np.ndarray:
    """Which detections of mirror images (``mirrored`` [M, 4], folded back onto the image:
    ``tiling.FieldPlan.fold_into_image``) show a cell where no ``kept`` box [K, 4] lies
    (overlapping none by ``max_overlap`` of the smaller box): indices into ``mirrored``,
    one per such cell (the highest-scoring of its images; its images are one cell by the
    rule that merges fields, :func:`merge_fields` step 4), kept only when at least
    ``min_support`` of the cell's ``copies`` (mirror images of each detection's box wholly
    in its field: ``FieldPlan.mirror_copies``) were detected.

    Why: a field mirror-pads an image smaller than itself, so each cell appears there
    many times, flipped (a marrow crop about 100 times); the detector, finding a cell in
    some of its copies, can miss the original (a dense cell filling a crop). Such a cell is
    counted once, from its best copy. Why the support: a faint object (a platelet or debris
    in a blood field, just below the detector's threshold) passes it in one copy of many by
    chance. Why the overlap: a box beside a found cell is most often a second peak of that
    same cell, which the detector's own overlap rules drop on the image but not always on
    every copy."""
    kept = np.asarray(kept, dtype=np.float64).reshape(-1, 4)
    mirrored = np.asarray(mirrored, dtype=np.float64).reshape(-1, 4)
    copies = np.asarray(copies, dtype=np.int64).reshape(-1)
    if len(copies) != len(mirrored):
        raise ValueError(f"{len(mirrored)} mirror images but {len(copies)} copy counts")
    # every pair tested once: the mirror images are the detections in an image's padding,
    # at most the detector's 256 boxes per field
    same = _same_cell(mirrored[:, None, :], mirrored, iou, containment)[0]
    support = same.sum(axis=1)
    over_found = np.zeros(len(mirrored), dtype=bool)
    if len(kept):
        over_found = (_overlaps(mirrored[:, None, :], kept)[1] >= max_overlap).any(axis=1)
    chosen: list[int] = []
    for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        if over_found[i]:
            continue  # over a found cell: a copy of it, or of a second peak inside it
        if same[i, chosen].any():
            continue  # another copy of a cell already taken
        if support[i] >= min_support * max(int(copies[i]), 1):
            chosen.append(int(i))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _cut_and_seen_whole(
    boxes: np.ndarray, field_ids: np.ndarray, field_boxes: np.ndarray, margins: np.ndarray
) -> np.ndarray:
    """Detections touching a seam of their field (margin <= SEAM_TOLERANCE) whose box lies
    inside another field: with fields overlapping by at least a cell, that field holds the
    whole cell, so the piece is not a cell of its own. The overlap tests cannot be trusted
    with such pieces: a sliver's box, a few pixels off, shares too little with the whole
    cell's box to be recognised as part of it, and was counted twice."""
    cut = margins <= SEAM_TOLERANCE
    out = np.zeros(len(boxes), dtype=bool)
    for i in np.flatnonzero(cut):
        others = np.arange(len(field_boxes)) != field_ids[i]
        fb = field_boxes[others]
        b = boxes[i]
        within = (
            (fb[:, 0] <= b[0] + SEAM_TOLERANCE)
            & (fb[:, 1] <= b[1] + SEAM_TOLERANCE)
            & (fb[:, 2] >= b[2] - SEAM_TOLERANCE)
            & (fb[:, 3] >= b[3] - SEAM_TOLERANCE)
        )
        out[i] = bool(within.any())
    return out
