"""Cells seen by overlapping fields are counted once (marrowdx.slides.merge), with synthetic
fields: cells on seams, on corners where four fields meet, cut at field edges, at several
resampling scales. No slide reading involved."""

from __future__ import annotations

import numpy as np
import pytest

from marrowdx.slides.base import Field, Roi
from marrowdx.slides.merge import (
    MIN_MIRROR_SUPPORT,
    merge_fields,
    seam_margins,
    unseen_mirror_images,
)

ROI = (1000.0, 2000.0, 1000.0 + 1800.0, 2000.0 + 1500.0)
CELL = 60.0  # base pixels, a cell's diameter (about what a 10 um cell spans at 0.17 um/px)


def tile(roi, field: float, overlap: float) -> np.ndarray:
    """Fields of side ``field`` covering ``roi`` with at least ``overlap`` between neighbours,
    the last row/column flush with the ROI's far edge (as a tiler does)."""

    def starts(lo: float, hi: float) -> list[float]:
        out, x = [], lo
        while True:
            if x + field >= hi:
                out.append(max(lo, hi - field))
                return sorted(set(out))
            out.append(x)
            x += field - overlap

    xs, ys = starts(roi[0], roi[2]), starts(roi[1], roi[3])
    boxes = [(x, y, min(x + field, roi[2]), min(y + field, roi[3])) for y in ys for x in xs]
    return np.array(boxes)


def cells_on_grid(roi, rng, n_random: int, extra: list[tuple[float, float]]) -> np.ndarray:
    """Non-overlapping cell boxes: the given centres plus random ones kept a cell apart."""
    centres = list(extra)
    while len(centres) < len(extra) + n_random:
        c = (rng.uniform(roi[0] + CELL, roi[2] - CELL), rng.uniform(roi[1] + CELL, roi[3] - CELL))
        if all(np.hypot(c[0] - x, c[1] - y) > 1.3 * CELL for x, y in centres):
            centres.append(c)
    c = np.asarray(centres)
    h = CELL / 2
    return np.stack([c[:, 0] - h, c[:, 1] - h, c[:, 0] + h, c[:, 1] + h], axis=1)


def detect(cells: np.ndarray, fields: np.ndarray, scale: float, rng, min_visible: float = 0.25):
    """What a detector reports per field, in field pixels: every cell with at least
    ``min_visible`` of its area inside the field, its box cut at the field's edge, jittered."""
    out = []
    for f, (fx0, fy0, fx1, fy1) in enumerate(fields):
        cut = np.stack(
            [
                np.maximum(cells[:, 0], fx0),
                np.maximum(cells[:, 1], fy0),
                np.minimum(cells[:, 2], fx1),
                np.minimum(cells[:, 3], fy1),
            ],
            axis=1,
        )
        w = np.clip(cut[:, 2] - cut[:, 0], 0, None)
        h = np.clip(cut[:, 3] - cut[:, 1], 0, None)
        visible = w * h / CELL**2
        for i in np.flatnonzero(visible >= min_visible):
            box = cut[i] + rng.normal(0, 1.0, 4)
            field_px = (box - [fx0, fy0, fx0, fy0]) / scale
            out.append((f, int(i), field_px, float(rng.uniform(0.5, 0.99))))
    return out


def run_merge(cells, fields, scale, rng, roi_box=ROI, **kw):
    dets = detect(cells, fields, scale, rng, **kw)
    roi = Roi(0, tuple(int(v) for v in roi_box))
    views = [Field(roi, tuple(f), b"", scale) for f in fields]
    base = np.array([views[d[0]].to_base(tuple(d[2])) for d in dets])
    result = merge_fields(
        base,
        np.array([d[3] for d in dets]),
        np.array([d[0] for d in dets]),
        fields,
        roi_box,
    )
    truth = np.array([d[1] for d in dets])
    return result, truth, base


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0 / 3.0])
def test_every_cell_counted_once_on_seams_and_corners(scale: float) -> None:
    rng = np.random.default_rng(3)
    field, overlap = 512.0, 96.0
    fields = tile(ROI, field, overlap)
    assert len(fields) >= 12  # several seams and inner corners
    # Cells centred exactly on seams (overlap middles) and on corners where 4 fields meet.
    x_seam = fields[0][2] - overlap / 2
    y_seam = fields[0][3] - overlap / 2
    extra = [
        (x_seam, ROI[1] + 300),  # vertical seam
        (ROI[0] + 250, y_seam),  # horizontal seam
        (x_seam, y_seam),  # corner: four fields
        (fields[0][2] - 5, ROI[1] + 700),  # straddles the edge of field 0, deep in field 1
        (x_seam + 40, y_seam - 40),  # near a corner, off-centre
    ]
    cells = cells_on_grid(ROI, rng, 120, extra)
    result, truth, base = run_merge(cells, fields, scale, rng)
    kept_truth = truth[result.kept]
    assert sorted(kept_truth.tolist()) == list(range(len(cells))), "each cell exactly once"
    # Seen by several fields: the corner cell was detected in four, kept once.
    assert (truth == 2).sum() == 4
    # The kept box is the whole one (not a cut one): its area is the cell's, within jitter.
    kept = base[result.kept]
    areas = (kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1])
    assert np.allclose(areas, CELL**2, rtol=0.1)
    assert len(result.duplicates) + len(result.cut_at_seam) == len(truth) - len(cells)


def test_frames_cells_cut_on_seams_are_joined_once() -> None:
    """Abutting fields (the slide's own tile frames, no overlap): a cell on a seam is seen
    cut in two, on a corner in four; each is one cell with its whole box."""
    rng = np.random.default_rng(11)
    frame = 512.0
    roi = (1024.0, 2048.0, 1024.0 + 4 * frame, 2048.0 + 3 * frame)
    fields = np.array(
        [
            (
                roi[0] + i * frame,
                roi[1] + j * frame,
                roi[0] + (i + 1) * frame,
                roi[1] + (j + 1) * frame,
            )
            for j in range(3)
            for i in range(4)
        ]
    )
    seam_x, seam_y = roi[0] + frame, roi[1] + frame
    extra = [
        (seam_x, roi[1] + 200),  # halved by a vertical seam
        (roi[0] + 300, seam_y),  # halved by a horizontal seam
        (seam_x, seam_y),  # quartered at a corner
        (seam_x + 20, roi[1] + 900),  # a third / two thirds
    ]
    cells = cells_on_grid(roi, rng, 90, extra)
    result, truth, _ = run_merge(cells, fields, 1.0, rng, roi_box=roi, min_visible=0.05)
    assert sorted(truth[result.kept].tolist()) == list(range(len(cells)))
    assert (truth == 2).sum() == 4 and len(result.joined) >= 1 + 1 + 3 + 1
    kept = result.boxes[result.kept]
    areas = (kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1])
    assert np.allclose(areas, CELL**2, rtol=0.15)


def test_touching_cells_on_a_frame_seam_stay_two() -> None:
    """Two cells side by side on either side of a seam, each whole: not one cell (they
    touch the seam but do not share it along half their height)."""
    fields = np.array([[1000, 2000, 1512, 2512], [1512, 2000, 2024, 2512]], dtype=float)
    boxes = np.array([[1452, 2100, 1512, 2160], [1512, 2140, 1572, 2200]], dtype=float)
    result = merge_fields(boxes, np.array([0.9, 0.9]), np.array([0, 1]), fields, ROI)
    assert result.kept.tolist() == [0, 1] and not result.joined


def test_touching_cells_in_one_field_are_not_merged() -> None:
    """Two distinct cells that overlap a little inside one field stay two."""
    fields = np.array([ROI])
    boxes = np.array([[1100, 2100, 1160, 2160], [1150, 2100, 1210, 2160]], dtype=float)
    result = merge_fields(boxes, np.array([0.9, 0.8]), np.array([0, 0]), fields, ROI)
    assert result.kept.tolist() == [0, 1]


def test_adjacent_cells_from_two_fields_stay_two() -> None:
    """Neighbouring distinct cells on a seam, each seen by a different field, are not merged
    (a few percent overlap is below both thresholds)."""
    fields = np.array([[1000, 2000, 1512, 2512], [1416, 2000, 1928, 2512]], dtype=float)
    boxes = np.array([[1400, 2100, 1460, 2160], [1455, 2100, 1515, 2160]], dtype=float)
    result = merge_fields(boxes, np.array([0.9, 0.9]), np.array([0, 1]), fields, ROI)
    assert result.kept.tolist() == [0, 1]


def test_cut_box_loses_to_the_whole_one() -> None:
    """A cell cut by field 0's right edge (half its box) and whole in field 1: one cell, the
    whole box, even though the cut detection scored higher."""
    fields = np.array([[1000, 2000, 1512, 2512], [1416, 2000, 1928, 2512]], dtype=float)
    cut = [1482, 2200, 1512, 2260]
    whole = [1482, 2200, 1542, 2260]
    result = merge_fields(
        np.array([cut, whole], dtype=float), np.array([0.99, 0.6]), np.array([0, 1]), fields, ROI
    )
    assert result.kept.tolist() == [1]
    assert result.cut_at_seam.tolist() == [0]  # a piece at a seam, inside field 1: dropped


def test_cells_outside_the_roi_are_not_counted() -> None:
    fields = np.array([[900, 1900, 1412, 2412]], dtype=float)  # field reaches beyond the ROI
    boxes = np.array([[950, 2100, 990, 2140], [1010, 2100, 1050, 2140]], dtype=float)
    result = merge_fields(boxes, np.array([0.9, 0.9]), np.array([0, 0]), fields, ROI)
    assert result.kept.tolist() == [1]
    assert result.outside_roi.tolist() == [0]


def test_seam_margins_ignore_the_roi_border() -> None:
    roi = (0, 0, 1000, 1000)
    boxes = np.array([[2, 400, 40, 440], [460, 400, 498, 440]], dtype=float)
    # Field flush with the ROI's left edge: its left edge is no seam, its right edge is.
    margins = seam_margins(boxes, (0, 0, 500, 1000), roi)
    assert margins.tolist() == [460.0, 2.0]
    assert np.isinf(seam_margins(boxes, roi, roi)).all()


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="field ids"):
        merge_fields(np.zeros((1, 4)), np.ones(1), np.array([3]), np.zeros((1, 4)), ROI)
    with pytest.raises(ValueError, match="scores"):
        merge_fields(np.zeros((2, 4)), np.ones(1), np.zeros(2), np.zeros((1, 4)), ROI)


def test_no_detections() -> None:
    result = merge_fields(np.zeros((0, 4)), np.zeros(0), np.zeros(0), np.array([ROI]), ROI)
    assert result.kept.size == 0 and not result.duplicates


def test_a_sliver_at_a_seam_with_a_loose_box_is_not_a_second_cell() -> None:
    """A cell whole in the left field, a sliver at the right field's seam edge: the sliver's
    box (as detectors draw them on a cut cell: a few pixels off) shares too little with the
    whole box for the overlap tests, yet it is no cell of its own: the right field lies
    inside the ROI's fields, so the left one saw that cell whole."""
    roi = (0.0, 0.0, 1800.0, 1000.0)
    fields = np.array([(0.0, 0.0, 1000.0, 1000.0), (800.0, 0.0, 1800.0, 1000.0)])
    whole = (770.0, 400.0, 830.0, 460.0)  # right field's seam at x=800 cuts it
    sliver = (800.0, 380.0, 834.0, 416.0)  # its piece in the right field, loosely boxed
    boxes = np.array([whole, sliver])
    merged = merge_fields(boxes, np.array([0.9, 0.95]), np.array([0, 1]), fields, roi)
    assert merged.kept.tolist() == [0]
    assert merged.cut_at_seam.tolist() == [1]


def test_two_loose_boxes_of_one_cell_are_one_and_touching_cells_stay_two() -> None:
    """Boxes of one cell from two overlapping fields, each a few pixels off (IoU and
    containment under the thresholds) hold each other's centres: one cell. Two distinct
    cells touching across the overlap do not: two."""
    roi = (0.0, 0.0, 1800.0, 1000.0)
    fields = np.array([(0.0, 0.0, 1000.0, 1000.0), (800.0, 0.0, 1800.0, 1000.0)])
    a = (880.0, 500.0, 920.0, 560.0)
    b = (865.0, 522.0, 945.0, 542.0)  # the same cell, boxed wide and flat in the other field
    merged = merge_fields(np.array([a, b]), np.array([0.9, 0.9]), np.array([0, 1]), fields, roi)
    assert len(merged.kept) == 1
    left = (850.0, 300.0, 910.0, 360.0)
    right = (905.0, 300.0, 965.0, 360.0)  # touching, overlapping by 5 px
    merged = merge_fields(
        np.array([left, right]), np.array([0.9, 0.9]), np.array([0, 1]), fields, roi
    )
    assert len(merged.kept) == 2


# ------------------------------------------------------------ cells seen only in mirror images
def test_a_cell_seen_only_in_its_mirror_images_counts_once_from_its_best_copy() -> None:
    cell = np.array([40.0, 40.0, 60.0, 60.0])
    copies = np.stack([cell + d for d in (0.0, 1.0, -1.0, 0.5)])  # four detected copies
    chosen = unseen_mirror_images(np.zeros((0, 4)), copies, np.array([0.5, 0.9, 0.6, 0.4]), [8] * 4)
    assert chosen.tolist() == [1]  # one cell, its highest-scoring copy


def test_a_mirror_image_over_a_found_cell_is_that_cell() -> None:
    """A copy of a found cell, or a box a quarter over it (a second peak of a large cell
    that the detector's own rules dropped on the image but not on a copy), adds nothing."""
    found = np.array([[100.0, 100.0, 200.0, 200.0]])
    copy = np.array([[102.0, 99.0, 201.0, 203.0]])
    strip = np.array([[110.0, 70.0, 190.0, 110.0]])  # 10 of its 40 rows over the cell
    apart = np.array([[300.0, 300.0, 340.0, 340.0]])
    for box in (copy, strip):
        assert unseen_mirror_images(found, box, np.array([0.9]), [1]).size == 0
    assert unseen_mirror_images(found, apart, np.array([0.9]), [1]).tolist() == [0]


def test_a_faint_object_found_in_few_of_its_copies_is_not_counted() -> None:
    """Passing the detector's threshold in 1 of 100 copies is chance; in 10 of them, not."""
    box = np.array([10.0, 10.0, 20.0, 20.0])
    assert unseen_mirror_images(np.zeros((0, 4)), box[None], np.array([0.4]), [100]).size == 0
    n = int(np.ceil(MIN_MIRROR_SUPPORT * 100))
    seen = np.repeat(box[None], n, axis=0)
    assert unseen_mirror_images(np.zeros((0, 4)), seen, np.full(n, 0.4), [100] * n).size == 1
    with pytest.raises(ValueError, match="copy counts"):
        unseen_mirror_images(np.zeros((0, 4)), seen, np.full(n, 0.4), [100])


def _keep_box_by_box(boxes, field_ids, iou, containment):
    """The rule of step 4 as first written: each box against the boxes kept before it."""
    from marrowdx.slides.merge import _same_cell

    kept: list[int] = []
    duplicates: dict[int, int] = {}
    for i in range(len(boxes)):
        k = np.asarray(kept, dtype=np.int64)
        other = k[field_ids[k] != field_ids[i]] if len(k) else k
        if len(other):
            same, overlap = _same_cell(boxes[i], boxes[other], iou, containment)
            if same.any():
                duplicates[i] = int(other[np.argmax(np.where(same, overlap, -1))])
                continue
        kept.append(i)
    return kept, duplicates


@pytest.mark.parametrize("block", [1, 7, 256])
def test_blocks_of_the_pairwise_test_decide_as_box_by_box(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge tests a block of boxes against all at once (a tenth of the client's CPU on a
    slide); the decisions, and the kept box each duplicate is assigned to, are the ones the
    box-by-box rule makes, across block edges too."""
    from marrowdx.slides import merge

    monkeypatch.setattr(merge, "SAME_CELL_BLOCK", block)
    rng = np.random.default_rng(5)
    n = 120
    centres = rng.uniform(0, 400, (n, 2))
    sizes = rng.uniform(10, 40, (n, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1)
    field_ids = rng.integers(0, 3, n)
    twins = rng.integers(0, n, 40)  # the same cells seen again from another field
    boxes[twins] += rng.normal(0, 3, (40, 4))
    field_ids[twins] = (field_ids[twins] + 1) % 3
    kept, duplicates = merge._keep_one_per_cell(boxes, field_ids, 0.5, 0.8)
    want_kept, want_duplicates = _keep_box_by_box(boxes, field_ids, 0.5, 0.8)
    assert kept.tolist() == want_kept and duplicates == want_duplicates
    assert len(duplicates) >= 10  # the test holds duplicates to decide
