"""ONNX export (names, dtypes, dynamic batch, metadata, TensorRT op list, torch agreement),
the tiny-preset ``build_onnx_models`` (idempotence, simulated inputs, evaluation) and the
TensorRT paths (skipped with the reason where TensorRT or a GPU is missing).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from marrowdx import cli, config, contract, taxonomy
from marrowdx.export import onnx_export, tensorrt_build, trt_ops
from marrowdx.models.networks import (
    CellClassifier,
    CellDetector,
    ClassifierSpec,
    DetectorSpec,
    DiagnosisModel,
    DiagnosisSpec,
)
from marrowdx.serving import onnx_artifacts

T = config.TENSORS
from tests.helpers import TEST_CACHE  # noqa: E402

SMALL = {
    "detector": lambda: CellDetector(DetectorSpec(width4=8, width8=8, width16=8, head=8)),
    "classifier": lambda: CellClassifier(ClassifierSpec(widths=(8, 8, 8), hidden=8)),
    "diagnosis": lambda: DiagnosisModel(DiagnosisSpec(hidden=8)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Untrained small models exported once (export semantics do not depend on weights)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("onnx")
    result = {}
    for kind, make in SMALL.items():
        model = make().eval()
        meta = {"preset": "test", "kind": kind, **taxonomy.as_metadata()}
        result[kind] = (model, onnx_export.export_onnx(model, kind, out / f"{kind}.onnx", meta))
    return result


@pytest.mark.parametrize("kind", list(SMALL))
def test_onnx_graph_contract(exported, kind: str) -> None:
    _model, path = exported[kind]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}.get("", None) == onnx_export.OPSET
    spec = contract.model(kind)
    for values, specs in ((proto.graph.input, spec.inputs), (proto.graph.output, spec.outputs)):
        assert [v.name for v in values] == [t.name for t in specs]
        for v, t in zip(values, specs, strict=True):
            # batch first and dynamic; the classifier's box axis dynamic too (contract)
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            assert dims == list(t.onnx_dims()), v.name
            elem = helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype.numpy))
            assert v.type.tensor_type.elem_type == elem, v.name
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == list(taxonomy.CLASSES)
    assert json.loads(props["taxonomy"]) == taxonomy.as_metadata()
    assert onnx_artifacts.read_onnx_metadata(path)["kind"] == kind


def test_export_from_an_earlier_format_is_not_current(exported, tmp_path) -> None:
    """A build re-exports (without retraining) an ONNX file of an older tensor contract."""
    path = exported["detector"][1]
    assert onnx_export.export_is_current(path)
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != onnx_export.FORMAT_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    assert not onnx_export.export_is_current(old)
    assert not onnx_export.export_is_current(tmp_path / "missing.onnx")


@pytest.mark.parametrize("kind", list(SMALL))
def test_onnx_graph_uses_only_tensorrt_supported_ops(exported, kind: str) -> None:
    ops = trt_ops.graph_ops(onnx.load(str(exported[kind][1])))
    assert trt_ops.unsupported_ops(ops) == [], f"{kind} uses ops outside TensorRT's list"


def test_tensorrt_op_check_catches_unsupported_op(tmp_path) -> None:
    """The guard itself: a graph with NonZero (not allowed) is reported, and export refuses it."""
    node = helper.make_node("NonZero", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, None])],
    )
    assert trt_ops.unsupported_ops(trt_ops.graph_ops(helper.make_model(graph))) == ["NonZero"]

    class Bad(torch.nn.Module):
        def forward(self, fractions, total, labs, mask):
            return (
                torch.nonzero(fractions).float().sum().reshape(1, 1).expand(fractions.shape[0], 3)
            )

    with pytest.raises(ValueError, match="NonZero"):
        onnx_export.export_onnx(Bad(), "diagnosis", tmp_path / "bad.onnx", {})
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("kind", list(SMALL))
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_matches_torch_on_random_inputs(exported, kind: str, batch: int) -> None:
    model, path = exported[kind]
    report = onnx_export.compare_with_torch(
        model, kind, path, [onnx_export.random_inputs(kind, batch, seed=7)]
    )
    assert report.ok, report.failures
    for name, diff in report.max_abs.items():
        if name not in (T.boxes, T.class_counts):
            assert diff <= onnx_export.PROB_TOLERANCE, (name, diff)


@pytest.mark.parametrize("kind", ["classifier", "diagnosis"])
def test_calibrated_export_serves_the_temperature_and_carries_it(kind: str, tmp_path) -> None:
    """The fitted temperature is a constant of the exported graph (so ONNX Runtime and a
    TensorRT engine built from it serve calibrated probabilities) and its numbers are in the
    ONNX metadata under ``calibration``."""
    torch.manual_seed(0)
    model = SMALL[kind]().eval()
    if kind == "classifier":
        model.class_temperature.set(3.0)
        model.attribute_temperature.set(0.5)
    else:
        model.temperature.set(3.0)
    head = "classes" if kind == "classifier" else "diagnosis"
    fitted = {"version": 1, head: {"temperature": 3.0}}
    meta = {"preset": "test", "kind": kind, "calibration": fitted}
    path = onnx_export.export_onnx(model, kind, tmp_path / f"{kind}.onnx", meta)
    assert onnx_artifacts.read_calibration(path) == fitted
    assert onnx_artifacts.read_onnx_metadata(path)["calibration"] == fitted
    inputs = onnx_export.random_inputs(kind, 2, seed=3)
    report = onnx_export.compare_with_torch(model, kind, path, [inputs])
    assert report.ok, report.failures  # ONNX Runtime == torch's calibrated outputs
    names_in, names_out = onnx_export.IO_NAMES[kind]
    feeds = {n: t.numpy() for n, t in zip(names_in, inputs, strict=True)}
    served = onnx_artifacts.ort_session(path).run([names_out[0]], feeds)[0]
    with torch.no_grad():
        if kind == "classifier":
            logits = model.logits(model.normalize(inputs[0]), inputs[1])[0]
            valid = torch.arange(logits.shape[1])[None, :] < inputs[2]
            want = (torch.softmax(logits / 3.0, -1) * valid[..., None]).numpy()
        else:
            want = torch.softmax(model.logits(*inputs) / 3.0, -1).numpy()
    np.testing.assert_allclose(served, want, atol=onnx_export.PROB_TOLERANCE)
    # an uncalibrated export (T = 1) carries no calibration entry
    plain = onnx_export.export_onnx(SMALL[kind]().eval(), kind, tmp_path / "plain.onnx", {})
    assert onnx_artifacts.read_calibration(plain) is None


def test_real_cell_temperature_is_part_of_the_exported_graph(tmp_path) -> None:
    """With a real-cell gate fitted, ONNX Runtime serves each cell at its own temperature, as
    torch does, and the probabilities differ from one temperature's (the gate is in the
    graph, not dropped as a constant)."""
    torch.manual_seed(0)
    model = SMALL["classifier"]().eval()
    model.class_temperature.set(0.5)
    inputs = onnx_export.random_inputs("classifier", 2, seed=3)
    plain = onnx_export.export_onnx(model, "classifier", tmp_path / "one_t.onnx", {})
    model.class_temperature.set_real(3.0, torch.randn(model.spec.hidden) * 2.0, 0.0)
    gated = onnx_export.export_onnx(model, "classifier", tmp_path / "gated.onnx", {})
    report = onnx_export.compare_with_torch(model, "classifier", gated, [inputs])
    assert report.ok, report.failures
    assert report.max_abs[T.class_probs] <= onnx_export.PROB_TOLERANCE
    names_in, names_out = onnx_export.IO_NAMES["classifier"]
    feeds = {n: t.numpy() for n, t in zip(names_in, inputs, strict=True)}
    one_t, per_cell = (
        onnx_artifacts.ort_session(path).run([names_out[0]], feeds)[0] for path in (plain, gated)
    )
    assert np.abs(one_t - per_cell).max() > 10 * onnx_export.PROB_TOLERANCE


# ------------------------------------------------------------------- tiny trained models
@pytest.fixture(scope="session")
def tiny_models():
    from marrowdx.export import build_onnx_models

    return build_onnx_models(TEST_CACHE, "tiny", progress=False)


def test_build_onnx_models_is_idempotent(tiny_models) -> None:
    from marrowdx.export import build_onnx_models
    from marrowdx.export.build import BuildLayout

    layout = BuildLayout(TEST_CACHE, "tiny")
    before = {
        p: p.stat().st_mtime_ns
        for p in [*tiny_models.paths().values(), layout.checkpoint("detector")]
    }
    again = build_onnx_models(TEST_CACHE, "tiny", progress=False)
    assert again.paths() == tiny_models.paths()
    assert {p: p.stat().st_mtime_ns for p in before} == before, (
        "second build retrained or re-exported"
    )
    meta = tiny_models.metadata
    assert meta["classes"] == list(taxonomy.CLASSES) and meta["diagnoses"] == list(
        taxonomy.DIAGNOSES
    )
    assert meta["input_size"] == config.INPUT_SIZE and meta["training_data"]["cells"] > 0
    # the build calibrated both probability models on its held-out cohort (once)
    for path, head in ((tiny_models.classifier, "classes"), (tiny_models.diagnosis, "diagnosis")):
        fitted = onnx_artifacts.read_calibration(path)
        assert fitted is not None and fitted[head]["temperature"] > 0, path
        assert fitted["cohort"]["ground_truth_sha"] != meta["training_data"]["ground_truth_sha"]


def test_trained_models_agree_with_torch_on_simulated_images(tiny_models) -> None:
    from marrowdx.export.build import BuildLayout
    from marrowdx.models.checkpoints import load_checkpoint
    from marrowdx.training.data import prepare_cohort

    layout = BuildLayout(TEST_CACHE, "tiny")
    data = prepare_cohort(layout.training_cohort(_tiny_seed()), layout.cache_dir)
    pixels = torch.from_numpy(data.image_pixels(np.arange(min(2, data.n_images))))
    det = load_checkpoint(layout.checkpoint("detector")).model
    report = onnx_export.compare_with_torch(det, "detector", tiny_models.detector, [(pixels,)])
    assert report.ok, report.failures
    # classifier on the ground-truth boxes of those images, padded to K
    k = config.MAX_DETECTIONS
    boxes = np.zeros((len(pixels), k, 4), np.float32)
    num = np.zeros((len(pixels), 1), np.int32)
    for i in range(len(pixels)):
        b = data.cells.boxes[data.cells_of(i)][:k]
        boxes[i, : len(b)], num[i, 0] = b, len(b)
    cls = load_checkpoint(layout.checkpoint("classifier")).model
    inputs = (pixels, torch.from_numpy(boxes), torch.from_numpy(num))
    report = onnx_export.compare_with_torch(cls, "classifier", tiny_models.classifier, [inputs])
    assert report.ok, report.failures
    assert report.max_abs[T.class_probs] <= onnx_export.PROB_TOLERANCE


def _tiny_seed() -> int:
    from marrowdx.training.presets import PRESETS

    return PRESETS["tiny"].seed


def test_evaluate_reports_every_metric(tiny_models) -> None:
    from marrowdx.export.build import BuildLayout
    from marrowdx.training.evaluate import evaluate_cohort, format_table

    cohort = BuildLayout(TEST_CACHE, "tiny").training_cohort(_tiny_seed())
    report = evaluate_cohort(cohort, tiny_models, TEST_CACHE)
    assert report.n_images > 0 and report.n_cells > 0
    assert 0.0 <= report.detection_ap50 <= 1.0
    assert 0.0 <= report.count_tv_distance <= 1.0
    assert 0.0 <= report.diagnosis_macro_f1 <= 1.0
    table = format_table(report, "tiny")
    for label in ("detection AP50", "macro AUC", "macro F1", "attribute accuracy", "diagnosis"):
        assert label in table
    assert "0.960" in table and "0.610" in table  # the paper's column


def test_cli_train_and_export_without_tensorrt(tiny_models, capsys) -> None:
    assert cli.main(["train", "--work-dir", str(TEST_CACHE), "--preset", "tiny", "--quiet"]) == 0
    assert str(tiny_models.detector) in capsys.readouterr().out
    try:
        tensorrt_build.require_tensorrt()
    except tensorrt_build.TensorRTUnavailable as exc:
        code = cli.main(
            ["export", "--work-dir", str(TEST_CACHE), "--preset", "tiny", "--quiet", "--tensorrt"]
        )
        assert code == 3
        assert str(exc) in capsys.readouterr().err
    else:
        pytest.skip("TensorRT is available here; the refusal path is not reachable")


# -------------------------------------------------------------------------------- TensorRT
def test_engine_sidecar_refuses_other_gpu_or_tensorrt(tmp_path) -> None:
    plan = tmp_path / "detector.fp16.plan"
    plan.write_bytes(b"not really an engine")
    info = tensorrt_build.EngineInfo(
        model="detector",
        precision="fp16",
        tensorrt_version="10.5.0",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        batch_profile={"min": 1, "opt": 4, "max": 8},
        onnx_sha256="0" * 64,
    )
    tensorrt_build.sidecar_path(plan).write_text(json.dumps(info.__dict__))
    ok = tensorrt_build.check_engine_info(plan, "10.5.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert ok.precision == "fp16"
    with pytest.raises(tensorrt_build.EngineMismatch, match="TensorRT 10.5.0"):
        tensorrt_build.check_engine_info(plan, "10.6.0", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(tensorrt_build.EngineMismatch, match="GPU"):
        tensorrt_build.check_engine_info(plan, "10.5.0", "NVIDIA L4", "8.9")
    tensorrt_build.sidecar_path(plan).unlink()
    with pytest.raises(tensorrt_build.EngineMismatch, match="rebuild"):
        tensorrt_build.check_engine_info(plan, "10.5.0", "NVIDIA L4", "8.9")


def test_batch_profile_from_triton_config(tmp_path) -> None:
    pbtxt = tmp_path / "config.pbtxt"
    pbtxt.write_text(
        'name: "detector"\nmax_batch_size: 16\n'
        "dynamic_batching { preferred_batch_size: [ 4, 8 ] }\n"
    )
    assert tensorrt_build.triton_batch_profile(pbtxt) == tensorrt_build.BatchProfile(1, 8, 16)
    pbtxt.write_text('name: "detector"\nmax_batch_size: 0\n')
    with pytest.raises(tensorrt_build.ExportError, match="max_batch_size"):
        tensorrt_build.triton_batch_profile(pbtxt)


def _tensorrt_reason() -> str | None:
    try:
        tensorrt_build.require_tensorrt()
    except tensorrt_build.TensorRTUnavailable as exc:
        return str(exc)
    return None


@pytest.mark.gpu
@pytest.mark.skipif(
    _tensorrt_reason() is not None, reason=f"TensorRT engines: {_tensorrt_reason()}"
)
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_tensorrt_engines_match_onnx_runtime(tiny_models, tmp_path, fp16: bool) -> None:
    batch = tensorrt_build.BatchProfile(1, 2, 4)
    for kind, path in tiny_models.paths().items():
        plan = tensorrt_build.build_engine(path, tmp_path / f"{kind}.plan", kind, batch, fp16=fp16)
        diffs = tensorrt_build.verify_engine(plan, path, kind)
        assert diffs, kind
        info = json.loads(tensorrt_build.sidecar_path(plan).read_text())
        assert info["precision"] == ("fp16" if fp16 else "fp32") and info["gpu_name"]


@pytest.mark.gpu
@pytest.mark.skipif(_tensorrt_reason() is not None, reason=f"torch-tensorrt: {_tensorrt_reason()}")
def test_torch_tensorrt_matches_onnx_runtime(tiny_models, tmp_path) -> None:
    batch = tensorrt_build.BatchProfile(1, 2, 4)
    for kind in tiny_models.paths():
        out = tensorrt_build.compile_torch_tensorrt(TEST_CACHE, "tiny", kind, batch, tmp_path)
        assert out.exists()


def test_no_tensorrt_message_is_clear() -> None:
    reason = _tensorrt_reason()
    if reason is None:
        pytest.skip("TensorRT is available here")
    assert "TensorRT" in reason or "GPU" in reason


def test_coco_cohort_prepares_like_ground_truth(tiny_models, tmp_path) -> None:
    from marrowdx.export.build import BuildLayout
    from marrowdx.simulate import write_coco
    from marrowdx.training.data import cohort_from_coco, prepare_cohort, read_ground_truth

    layout = BuildLayout(TEST_CACHE, "tiny")
    cohort = layout.training_cohort(_tiny_seed())
    coco = write_coco(read_ground_truth(cohort), tmp_path / "coco.json")
    converted = cohort_from_coco(coco, cohort, tmp_path)
    a = prepare_cohort(cohort, layout.cache_dir)
    b = prepare_cohort(converted, tmp_path / "cache")
    assert b.n_images == a.n_images
    np.testing.assert_allclose(np.sort(b.cells.boxes, axis=0), np.sort(a.cells.boxes, axis=0))
    np.testing.assert_array_equal(b.pixels, a.pixels)


def test_classifier_runs_on_fewer_box_slots_with_identical_rows(exported) -> None:
    """The dynamic box axis lets serving run only filled slots; valid rows must not change."""
    _model, path = exported["classifier"]
    session = onnx_artifacts.ort_session(path, threads=1)
    pixels, boxes, num = (t.numpy() for t in onnx_export.random_inputs("classifier", 2))
    num[:] = np.array([[5], [20]], dtype=num.dtype)
    feeds = {T.pixels: pixels, T.boxes: boxes, T.num_detections: num}
    full = session.run(None, feeds)
    cut = session.run(None, {**feeds, T.boxes: np.ascontiguousarray(boxes[:, :32])})
    for a, b in zip(full[:2], cut[:2], strict=True):
        assert b.shape[1] == 32
        np.testing.assert_allclose(a[:, :32], b, atol=1e-6)
    np.testing.assert_array_equal(full[2], cut[2])
