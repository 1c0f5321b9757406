"""The three networks, in-graph decoding/cropping/masking, targets, metrics, training determinism.

Everything here runs on random tensors or tiny hand-made data (no simulator, no DALI), so
it is fast and pins down the graph semantics the exported models inherit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from marrowdx import config, taxonomy
from marrowdx.models import roi
from marrowdx.models.checkpoints import checkpoint_metadata, load_checkpoint, save_checkpoint
from marrowdx.models.networks import (
    DETECTOR_STRIDE,
    CellClassifier,
    CellDetector,
    ClassifierSpec,
    DetectorSpec,
    DiagnosisModel,
    DiagnosisSpec,
)
from marrowdx.training import metrics, train
from marrowdx.training.data import CellTable, PreparedCohort, attribute_bits
from marrowdx.training.heatmap_labels import (
    flip_heatmap_labels,
    heatmap_labels,
    transpose_heatmap_labels,
)

SMALL_DET = DetectorSpec(width4=8, width8=8, width16=8, head=8)
SMALL_CLS = ClassifierSpec(widths=(8, 8, 8), hidden=8)
S, K = config.INPUT_SIZE, config.MAX_DETECTIONS


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_detector_contract_shapes_and_zero_detections_flow() -> None:
    det = CellDetector(SMALL_DET).eval()
    with torch.no_grad():
        boxes, scores, num = det(torch.zeros(2, 3, S, S))
    assert boxes.shape == (2, K, 4) and scores.shape == (2, K) and num.shape == (2, 1)
    assert num.dtype == torch.int32
    # an untrained head starts at the heatmap prior (~0.1) < threshold: nothing detected
    assert num.tolist() == [[0], [0]]
    assert float(boxes.abs().sum()) == 0.0 and float(scores.abs().sum()) == 0.0


def test_detector_decode_recovers_planted_peaks() -> None:
    det = CellDetector(SMALL_DET).eval()
    n = S // DETECTOR_STRIDE
    logits = torch.full((1, 1, n, n), -10.0)
    regress = torch.zeros(1, 4, n, n)
    planted = [(10, 20, 0.9, (6.0, 8.0), (0.5, 0.25)), (100, 50, 0.6, (10.0, 4.0), (0.0, 0.75))]
    for x, y, p, (w, h), (ox, oy) in planted:
        logits[0, 0, y, x] = float(np.log(p / (1 - p)))
        regress[0, :, y, x] = torch.tensor([w, h, ox, oy])
    logits[0, 0, 21, 10] = 0.0  # neighbour of the first peak (p=0.5): suppressed by max-pool
    with torch.no_grad():
        boxes, scores, num = det.decode(logits, regress)
    assert int(num) == 2
    assert scores[0, :2].tolist() == pytest.approx([0.9, 0.6], abs=1e-6)
    for row, (x, y, _p, (w, h), (ox, oy)) in enumerate(planted):
        cx, cy = (x + ox) * DETECTOR_STRIDE, (y + oy) * DETECTOR_STRIDE
        hw, hh = w * DETECTOR_STRIDE / 2, h * DETECTOR_STRIDE / 2
        assert boxes[0, row].tolist() == pytest.approx(
            [cx - hw, cy - hh, cx + hw, cy + hh], abs=1e-4
        )
    assert float(boxes[0, 2:].abs().sum()) == 0.0 and float(scores[0, 2:].abs().sum()) == 0.0


def square_peaks(planted: list[tuple[int, int, float, float]]) -> tuple[torch.Tensor, ...]:
    """Detector heads with a peak of probability p and a square box of ``size`` stride units
    at each planted (x, y, p, size); nothing elsewhere."""
    n = S // DETECTOR_STRIDE
    logits = torch.full((1, 1, n, n), -10.0)
    regress = torch.zeros(1, 4, n, n)
    for x, y, p, size in planted:
        logits[0, 0, y, x] = float(np.log(p / (1 - p)))
        regress[0, :2, y, x] = size
    return logits, regress


def test_detector_drops_a_second_box_over_one_large_cell() -> None:
    """Two peaks inside one large cell, each boxing all of it: the weaker box goes and the
    rows stay sorted with the valid ones first; a touching neighbour (IoU 0) stays, and
    with ``overlap_threshold`` 1.0 every peak is kept."""
    # (x, y, p, size): a 40-unit cell with a second peak 4 cells off, a small neighbour
    logits, regress = square_peaks([(40, 40, 0.9, 40.0), (44, 40, 0.8, 40.0), (70, 40, 0.7, 8.0)])
    with torch.no_grad():
        boxes, scores, num = CellDetector(SMALL_DET).eval().decode(logits, regress)
        keep_all = dataclasses.replace(SMALL_DET, overlap_threshold=1.0)
        _, _, all_peaks = CellDetector(keep_all).decode(logits, regress)
    assert int(num) == 2 and int(all_peaks) == 3
    assert scores[0, :2].tolist() == pytest.approx([0.9, 0.7], abs=1e-6)
    assert float(boxes[0, 1, 0]) == pytest.approx((70 - 4) * DETECTOR_STRIDE)
    assert float(boxes[0, 2:].abs().sum()) == 0.0


def test_detector_drops_a_small_box_lying_inside_a_larger_cell() -> None:
    """A weaker peak boxing a part of a large cell (IoU far below the overlap threshold) is
    dropped when most of its area lies inside the cell's box; a neighbour that only touches
    the cell stays, and so does the small box when containment is off."""
    # (x, y, p, size): a 40-unit cell, an 8-unit box inside it, an 8-unit neighbour at its edge
    logits, regress = square_peaks([(40, 40, 0.9, 40.0), (45, 42, 0.6, 8.0), (62, 40, 0.7, 8.0)])
    contained = dataclasses.replace(SMALL_DET, containment_threshold=0.6)
    with torch.no_grad():
        boxes, scores, num = CellDetector(contained).eval().decode(logits, regress)
        _, _, without = CellDetector(SMALL_DET).eval().decode(logits, regress)
    assert int(without) == 3 and int(num) == 2
    assert scores[0, :2].tolist() == pytest.approx([0.9, 0.7], abs=1e-6)
    assert float(boxes[0, 1, 0]) == pytest.approx((62 - 4) * DETECTOR_STRIDE)


def test_roi_crop_matches_direct_slice() -> None:
    pixels = torch.rand(2, 3, S, S)
    steps = roi.crop_offsets(64)
    boxes = torch.tensor([[[10.0, 20.0, 74.0, 84.0]], [[100.0, 200.0, 164.0, 264.0]]])
    crops = roi.crop_boxes(pixels, boxes, steps, (S, S), margin=1.0)
    assert crops.shape == (2, 3, 64, 64)
    torch.testing.assert_close(crops[0], pixels[0, :, 20:84, 10:74], atol=1e-5, rtol=0)
    torch.testing.assert_close(crops[1], pixels[1, :, 200:264, 100:164], atol=1e-5, rtol=0)


def test_classifier_masks_padded_rows_and_counts_argmax() -> None:
    cls = CellClassifier(SMALL_CLS).eval()
    pixels = torch.randint(0, 256, (2, 3, S, S), dtype=torch.uint8)
    xy = torch.rand(2, K, 2) * 400
    boxes = torch.cat((xy, xy + 30), -1)
    num = torch.tensor([[5], [0]], dtype=torch.int32)
    with torch.no_grad():
        probs, attrs, counts, _ = cls(pixels, boxes, num)
        logits, _ = cls.logits(cls.normalize(pixels), boxes)
    assert probs.shape == (2, K, config.N_CLASSES) and attrs.shape == (2, K, config.N_ATTRIBUTES)
    assert counts.shape == (2, config.N_CLASSES)
    assert probs[0, :5].sum(-1).tolist() == pytest.approx([1.0] * 5, abs=1e-5)
    assert float(probs[0, 5:].abs().sum()) == 0.0 and float(attrs[0, 5:].abs().sum()) == 0.0
    assert float(probs[1].abs().sum()) == 0.0 and float(counts[1].sum()) == 0.0
    expected = np.bincount(logits[0, :5].argmax(-1).numpy(), minlength=config.N_CLASSES)
    assert counts[0].numpy().tolist() == expected.astype(np.float32).tolist()


def test_diagnosis_ignores_masked_lab_values() -> None:
    model = DiagnosisModel(DiagnosisSpec(hidden=8)).eval()
    f = torch.softmax(torch.rand(3, config.N_CLASSES), -1)
    total = torch.tensor([[100.0], [500.0], [0.0]])
    mask = torch.tensor([[0.0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    with torch.no_grad():
        a = model(f, total, torch.rand(3, config.N_LAB_VALUES) * mask, mask)
        b = model(
            f, total, torch.rand(3, config.N_LAB_VALUES) * 50 * (1 - mask) + a.new_zeros(1), mask
        )
    assert a.shape == (3, config.N_DIAGNOSES)
    assert a.sum(-1).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    torch.testing.assert_close(
        a[[0, 2]], b[[0, 2]]
    )  # unmasked rows differ only where values present


def test_heatmap_labels_peak_size_offset_and_flip() -> None:
    boxes = np.array([[40.0, 60.0, 70.0, 86.0]], np.float32)  # centre (55, 73), size 30x26
    t = heatmap_labels(boxes, S)
    cx, cy = 55 / DETECTOR_STRIDE, 73 / DETECTOR_STRIDE
    iy, ix = int(cy), int(cx)
    assert t[0, iy, ix] == 1.0 and t[5].sum() == 1.0
    assert t[1:5, iy, ix].tolist() == pytest.approx([30 / 4, 26 / 4, cx - ix, cy - iy])
    flipped = flip_heatmap_labels(t, horizontal=True)
    n = S // DETECTOR_STRIDE
    mirror = np.array([[S - 70.0, 60.0, S - 40.0, 86.0]], np.float32)
    np.testing.assert_allclose(flipped[1:6], heatmap_labels(mirror, S)[1:6], atol=1e-5)
    assert flipped.shape == (6, n, n)


def test_transposed_targets_are_the_targets_of_the_transposed_boxes() -> None:
    """A window turned by a right angle (transposed, then flipped) keeps every cell a target,
    with its width and height, and its sub-cell offsets, swapped: the detector's eighth
    orientations are exact."""
    boxes = np.array([[40.0, 60.0, 70.0, 86.0], [101.0, 13.0, 117.0, 41.0]], np.float32)
    t = heatmap_labels(boxes, S)
    swapped = boxes[:, [1, 0, 3, 2]]
    np.testing.assert_allclose(transpose_heatmap_labels(t), heatmap_labels(swapped, S), atol=1e-5)
    x = np.random.default_rng(0).random((3, S, S)).astype(np.float32)
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(64):
        turned, targets = train.random_orientation(x, t, rng, transpose=True)
        seen.add(turned.tobytes()[:64])
        assert targets[5].sum() == 2 and targets[0].max() == 1.0
    assert len(seen) == 8  # all eight orientations of the square


def test_attribute_bits_reads_value_names_and_rejects_unknown() -> None:
    names = {k: v[1] for k, v in taxonomy.ATTRIBUTES.items()}
    assert attribute_bits(names) == [1.0] * config.N_ATTRIBUTES
    with pytest.raises(ValueError, match="cell_size"):
        attribute_bits({"cell_size": "huge"})


def test_metrics_on_known_cases() -> None:
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    pred = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [21, 21, 31, 31]], np.float32)
    m = metrics.match_detections(pred, np.array([0.9, 0.8, 0.7]), gt)
    assert m.true_positive.tolist() == [True, False, True]
    ap = metrics.average_precision(np.array([0.9, 0.8, 0.7]), m.true_positive, 2)
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert metrics.roc_auc(
        np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    ) == pytest.approx(0.75)
    assert metrics.macro_f1(np.array([0, 0, 1]), np.array([0, 1, 1]), 3) == pytest.approx(
        (2 / 3 + 2 / 3) / 2
    )
    assert metrics.total_variation(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(0.5)


def test_checkpoint_round_trip_carries_metadata(tmp_path) -> None:
    model = CellClassifier(SMALL_CLS).eval()
    meta = checkpoint_metadata("classifier", "tiny", "abc", {"cohort": "x", "cells": 3})
    path = save_checkpoint(tmp_path / "classifier.pt", "classifier", model, meta)
    ckpt = load_checkpoint(path)
    assert ckpt.metadata["classes"] == list(taxonomy.CLASSES)
    assert ckpt.metadata["attribute_names"] == list(taxonomy.ATTRIBUTE_NAMES)
    assert ckpt.metadata["diagnoses"] == list(taxonomy.DIAGNOSES)
    assert (
        ckpt.metadata["input_size"] == config.INPUT_SIZE
        and ckpt.metadata["training_data"]["cells"] == 3
    )
    assert "marrowdx_version" in ckpt.metadata
    for a, b in zip(model.state_dict().values(), ckpt.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def _toy_cohort(n_images: int = 3, seed: int = 0) -> PreparedCohort:
    """Bright squares on grey: enough for a training step, no DALI needed."""
    rng = np.random.default_rng(seed)
    pixels = np.full((n_images, 3, S, S), 114, np.uint8)
    rows = []
    for i in range(n_images):
        for _ in range(6):
            x, y = rng.integers(20, S - 60, 2)
            label = int(rng.integers(0, config.N_CLASSES))
            pixels[i, :, y : y + 30, x : x + 30] = (label * 7) % 255
            rows.append((i, [x, y, x + 30, y + 30], label))
    cells = CellTable(
        image_index=np.array([r[0] for r in rows], np.int32),
        boxes=np.array([r[1] for r in rows], np.float32),
        labels=np.array([r[2] for r in rows], np.int64),
        attributes=rng.integers(0, 2, (len(rows), config.N_ATTRIBUTES)).astype(np.float32),
    )
    return PreparedCohort(
        pixels=pixels,
        letterbox=np.tile(np.array([[0.5, 0.5, 0, 0]], np.float32), (n_images, 1)),
        image_patient=np.zeros(n_images, np.int32),
        image_files=[f"img{i}.png" for i in range(n_images)],
        cells=cells,
        patient_ids=["P1"],
        diagnoses=np.array([0]),
        description={"cohort": "toy"},
    )


def test_training_is_deterministic() -> None:
    import dataclasses

    from marrowdx.training import train
    from marrowdx.training.presets import PRESETS

    preset = dataclasses.replace(
        PRESETS["tiny"], det_steps=2, cls_steps=2, det_batch=2, det_crop=128
    )
    data = _toy_cohort()
    runs = [train.train_detector(data, preset) for _ in range(2)]
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    runs = [train.train_classifier(data, preset) for _ in range(2)]
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_classifier_restart_continues_from_the_first_cycle() -> None:
    """A preset with a warm restart trains its first cycle exactly as the preset without one
    (same draws, so presets without a restart keep their weights and fingerprint) and then
    moves the weights on from there; the restart's learning rate scale is what it trains with."""
    import dataclasses

    from marrowdx.training import train
    from marrowdx.training.presets import PRESETS

    plain = dataclasses.replace(PRESETS["tiny"], cls_steps=2)
    restarted = dataclasses.replace(plain, cls_restart_steps=2)
    frozen = dataclasses.replace(restarted, cls_restart_lr_scale=0.0)
    data = _toy_cohort()
    first = train.train_classifier(data, plain)
    both = train.train_classifier(data, restarted)
    again = train.restart_classifier(train.train_classifier(data, plain), data, restarted)
    for a, b in zip(both.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    moved = [
        not torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), both.state_dict().values(), strict=True)
    ]
    assert any(moved)
    # at a zero rate only batch normalisation's running statistics move, never a weight
    still = train.train_classifier(data, frozen)
    for name, value in first.named_parameters():
        torch.testing.assert_close(value, dict(still.named_parameters())[name], rtol=0, atol=0)
    # without a restart its rate is never used, and the fingerprint leaves both out
    assert dataclasses.replace(plain, cls_restart_lr_scale=0.5).fingerprint() == plain.fingerprint()
    assert restarted.fingerprint() != plain.fingerprint()
    assert frozen.fingerprint() != restarted.fingerprint()


def test_models_take_uint8_pixels_and_normalise_like_training() -> None:
    """The served contract sends PIXELS as uint8; forward() must equal the float path the
    layers were trained on (the model's normalize then features/logits)."""
    det = CellDetector(DetectorSpec(width4=8, width8=8, width16=8, head=8)).eval()
    pixels = torch.randint(0, 256, (1, 3, S, S), dtype=torch.uint8)
    normalised = det.normalize(pixels)
    assert normalised.dtype == torch.float32
    torch.testing.assert_close(normalised, det.normalize(pixels.float()))
    with torch.no_grad():
        boxes, scores, _ = det(pixels)
        want = det.decode(*det.features(normalised))
    torch.testing.assert_close(boxes, want[0])
    torch.testing.assert_close(scores, want[1])
