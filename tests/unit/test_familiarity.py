"""Unfamiliar cells: the classifier's served familiarity score (fitted after training, in
its graph on both targets), the client rule that lists unfamiliar cells apart and leaves
them out of every count, and the referral reason when many are."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marrowdx import config, taxonomy
from marrowdx.client import aggregate, html_report
from marrowdx.client.review import UNFAMILIAR, ReviewThresholds
from marrowdx.errors import InputError
from marrowdx.models.networks import CellClassifier, ClassifierSpec
from marrowdx.training import calibration as cal

T = config.TENSORS
#: A small classifier: the score's maths do not depend on the widths.
SPEC = ClassifierSpec(widths=(8, 8, 16), hidden=16)


def _clusters(rng: np.random.Generator, n_per: int, classes: int = 4, dim: int = 16, draws=None):
    """In-domain features: one Gaussian cluster per class, correlated within (like ReLU
    features, partly dead: the last dims are always 0). ``draws``: the generator of the
    cells (default ``rng``), so the same clusters can be drawn again."""
    mix = rng.normal(0, 1, (dim, dim))
    mix[:, -3:] = 0.0
    centres = rng.normal(0, 4, (classes, dim))
    centres[:, -3:] = 0.0
    draws = rng if draws is None else draws
    noise = [draws.normal(0, 1, (n_per, dim)) @ mix for _ in range(classes)]
    feats = np.concatenate([centres[c] + noise[c] for c in range(classes)])
    groups = np.repeat(np.arange(classes), n_per)
    return feats, groups


def test_fit_flags_about_the_quantile_in_domain_and_far_cells_always() -> None:
    rng = np.random.default_rng(0)
    feats, groups = _clusters(rng, 400)
    images = np.arange(len(groups)) // 20  # folds by image, as served cells come per field
    fit = cal.fit_familiarity_features(feats, groups, images, n_classes=6)
    assert fit.classes_with_centre == 4  # classes without cells reuse another centre
    assert 0.01 <= fit.flagged_share <= 0.03  # out of fold, at the 0.98 quantile
    # new cells of the same classes: about the quantile flagged, under the 5% goal
    fresh, _ = _clusters(np.random.default_rng(0), 400, draws=np.random.default_rng(9))
    assert np.mean(fit.familiarity(fresh) < 0) <= 0.05
    far = feats[:50] + 40.0  # cells unlike every class
    assert np.all(fit.familiarity(far) < 0)
    with pytest.raises(ValueError, match="quantile"):
        cal.fit_familiarity_features(feats, groups, quantile=1.0)
    with pytest.raises(ValueError, match="pair up"):
        cal.fit_familiarity_features(feats, groups[:-1])


def test_a_small_source_beside_a_large_one_is_not_flagged_wholesale() -> None:
    """Few real cells, a little off the many simulated ones: one pooled quantile is the
    simulated cells' and flags most real ones; with ``sources`` each source's quantile
    bounds the limit, so neither is flagged beyond about 1 - quantile."""
    rng = np.random.default_rng(0)
    sim, groups = _clusters(rng, 400)
    real = sim[rng.choice(len(sim), 60, replace=False)] + 2.5  # a lab a little off
    feats = np.concatenate([sim, real])
    labels = np.concatenate([groups, groups[:60]])
    sources = np.repeat([0, 1], [len(sim), len(real)])
    pooled = cal.fit_familiarity_features(feats, labels)
    by_source = cal.fit_familiarity_features(feats, labels, sources=sources)
    assert np.mean(pooled.distances(real) > pooled.limit) > 0.3
    assert np.mean(by_source.distances(real) > by_source.limit) <= 0.05
    assert by_source.limit >= pooled.limit
    with pytest.raises(ValueError, match="pair up"):
        cal.fit_familiarity_features(feats, labels, sources=sources[:-1])


def test_served_graph_computes_the_fitted_score_and_masks_padding_rows() -> None:
    torch.manual_seed(0)
    model = CellClassifier(SPEC).eval()
    pixels = torch.randint(0, 256, (2, 3, config.INPUT_SIZE, config.INPUT_SIZE), dtype=torch.uint8)
    xy = torch.rand(2, 12, 2) * 400
    boxes = torch.cat((xy, xy + 30), -1)
    num = torch.tensor([[12], [5]], dtype=torch.int32)
    with torch.no_grad():
        unfitted = model(pixels, boxes, num)[3]
    # unfitted: everything at 1 (flags nothing), padding rows 0
    assert torch.all(unfitted[0] == 1) and torch.all(unfitted[1, :5] == 1)
    assert torch.all(unfitted[1, 5:] == 0)
    with torch.no_grad():
        crops = model.crops(model.normalize(pixels), boxes)
        _, _, hidden = model.classify_crops_with_features(crops, boxes)
    feats = hidden[0].numpy().astype(np.float64)
    fit = cal.fit_familiarity_features(feats, np.zeros(len(feats), np.int64), quantile=0.5)
    fit.apply(model)
    with torch.no_grad():
        served = model(pixels, boxes, num)[3]
    np.testing.assert_allclose(served[0].numpy(), fit.familiarity(feats), atol=5e-4)
    assert torch.all(served[1, 5:] == 0)


def test_checkpoints_without_the_buffers_load_unfitted() -> None:
    model = CellClassifier(SPEC)
    state = {k: v for k, v in model.state_dict().items() if "familiarity" not in k}
    fresh = CellClassifier(SPEC)
    fresh.familiarity.limit.fill_(3.0)
    fresh.load_state_dict(state)
    assert float(fresh.familiarity.limit) == 1.0 and not fresh.familiarity.whiten.any()
    with pytest.raises(ValueError, match="limit"):
        fresh.familiarity.set(fresh.familiarity.whiten, fresh.familiarity.centres, 0.0)


def test_exported_graph_serves_the_score_with_tensorrt_ops(tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="ONNX Runtime (server extra) not installed")
    from marrowdx.export import onnx_export

    torch.manual_seed(1)
    model = CellClassifier(SPEC).eval()
    rng = np.random.default_rng(2)
    feats, groups = _clusters(rng, 60, classes=3, dim=SPEC.hidden)
    cal.fit_familiarity_features(np.abs(feats), groups, quantile=0.9).apply(model)
    # export_onnx refuses ops outside TensorRT's list (export/trt_ops.py)
    path = onnx_export.export_onnx(model, "classifier", tmp_path / "c.onnx", {})
    batch = onnx_export.random_inputs("classifier", 2, seed=3)
    report = onnx_export.compare_with_torch(model, "classifier", path, [batch])
    assert report.ok, report.failures
    assert T.familiarity in report.max_abs


# ------------------------------------------------------------------- client: the rule
def _outputs(familiarity: list[float], probs: list[float]) -> dict[str, np.ndarray]:
    k, n = config.MAX_DETECTIONS, len(familiarity)
    labels = [taxonomy.CLASS_INDEX["myelocytic_blast"]] * n
    class_probs = np.zeros((k, config.N_CLASSES), np.float32)
    for i, (label, p) in enumerate(zip(labels, probs, strict=True)):
        class_probs[i] = (1 - p) / (config.N_CLASSES - 1)
        class_probs[i, label] = p
    fam = np.zeros(k, np.float32)
    fam[:n] = familiarity
    boxes = np.zeros((k, 4), np.float32)
    boxes[:n] = [(30 * i, 10, 30 * i + 29, 39) for i in range(n)]
    return {
        T.boxes: boxes,
        T.scores: np.where(np.arange(k) < n, 0.9, 0).astype(np.float32),
        T.num_detections: np.array([n], np.int32),
        T.class_probs: class_probs,
        T.attribute_probs: np.zeros((k, config.N_ATTRIBUTES), np.float32),
        T.class_counts: np.bincount(labels, minlength=config.N_CLASSES).astype(np.float32),
        T.letterbox: np.array([0.5, 0.5, 0, 0], np.float32),
        T.image_size: np.array([1024, 1024], np.int32),
        T.familiarity: fam,
    }


def test_unfamiliar_cells_are_listed_apart_and_never_counted() -> None:
    out = _outputs([0.6, -0.2, 0.3, -1.5, 0.1], [0.99, 0.99, 0.3, 0.3, 0.9])
    image = aggregate.decode_image("a.jpg", out)
    assert [c.unfamiliar for c in image.cells] == [False, True, False, True, False]
    # unidentified (p < 0.5) only where not unfamiliar: the two groups never overlap
    assert [c.unidentified for c in image.cells] == [False, False, True, False, False]
    assert image.counts["myelocytic_blast"] == 2 and image.n_unfamiliar == 2
    cell = image.cells[1].to_dict()
    assert cell["unfamiliar"] is True and cell["familiarity"] == pytest.approx(-0.2)
    assert cell["label"] == "myelocytic_blast"  # the best guess is kept
    # a stricter or a switched-off limit
    assert aggregate.decode_image("a.jpg", out, min_familiarity=0.5).n_unfamiliar == 4
    never = aggregate.decode_image("a.jpg", out, min_familiarity=float("-inf"))
    assert never.n_unfamiliar == 0 and never.n_unidentified == 2
    assert never.counts["myelocytic_blast"] == 3
    with pytest.raises(InputError):
        aggregate.check_min_familiarity(1.5)
    # a server without FAMILIARITY (an older repository) flags nothing
    del out[T.familiarity]
    assert aggregate.decode_image("a.jpg", out).n_unfamiliar == 0


def _patient(unfamiliar_share: float, n: int = 40):
    k = int(round(unfamiliar_share * n))
    images = [
        aggregate.decode_image(f"f{i}.jpg", _outputs([-1.0] * k + [0.5] * (n - k), [0.99] * n))
        for i in range(13)
    ]
    counts = aggregate.sum_counts(images)
    return aggregate.build_report(
        "P1", images, {}, counts, {"ALL": 0.01, "AML": 0.98, "CML": 0.01}, None, min_familiarity=0
    )


def test_many_unfamiliar_cells_refer_the_patient_and_show_apart() -> None:
    few, many = _patient(0.05), _patient(0.25)
    assert UNFAMILIAR not in [r.code for r in few.review_reasons]
    assert UNFAMILIAR in [r.code for r in many.review_reasons]
    assert many.differential.unfamiliar == 13 * 10
    assert many.differential.nucleated_cells == 13 * 30  # the unfamiliar ones left out
    data = many.to_dict()
    assert data["differential"]["unfamiliar"] == 130 and data["min_familiarity"] == 0
    lenient = ReviewThresholds(max_unfamiliar_fraction=0.5)
    from marrowdx.client.review import review_reasons

    assert UNFAMILIAR not in [r.code for r in review_reasons(many, lenient)]
    page = html_report.render_html([many], {})
    assert 'data-gallery="unfamiliar"' in page and 'data-field="unfamiliar">130<' in page


def test_runtimes_are_compared_on_familiarity_relative_to_its_size() -> None:
    from marrowdx.export.onnx_export import output_difference

    far = np.array([-850.0, -40.0, 0.3], np.float32)
    assert output_difference(T.familiarity, far, far * 1.0001) < 1e-3  # rounding of big values
    assert output_difference(T.familiarity, far, far + [0, 0, 0.05]) == pytest.approx(0.05)
    probs = np.array([0.2, 0.8], np.float32)
    assert output_difference(T.class_probs, probs, probs + 0.01) == pytest.approx(0.01)
