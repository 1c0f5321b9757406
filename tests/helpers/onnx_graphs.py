"""Tiny ONNX graphs that honour the tensor contract exactly (names, dtypes, shapes), for
serving tests that must not wait for training. Their outputs depend on the input pixels, so a
wrong routing of tensors through Triton changes results; they are not meant to be accurate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from marrowdx import config, contract

T = config.TENSORS
K = config.MAX_DETECTIONS
OPSET = [helper.make_opsetid("", 17)]


def _const(name: str, value: np.ndarray):
    return numpy_helper.from_array(np.asarray(value), name)


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _io(model: str) -> tuple[list, list]:
    """Graph inputs and outputs as the contract declares them (fixed box axis: the serving
    side then runs every slot, which these graphs' constants assume)."""

    def info(spec: contract.TensorSpec):
        dtype = helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype.numpy))
        return helper.make_tensor_value_info(spec.name, dtype, ["N", *spec.dims])

    m = contract.model(model)
    return [info(t) for t in m.inputs], [info(t) for t in m.outputs]


def _normalised_pixels() -> list:
    """UINT8 PIXELS -> float "px" in [0, 1], as the real graphs start (needs const inv255)."""
    return [
        helper.make_node("Cast", [T.pixels], ["px_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["px_f", "inv255"], ["px"]),
    ]


def detector(path: Path) -> Path:
    rng = np.random.default_rng(1)
    base = np.sort(rng.uniform(0, 400, (K, 2)).astype(np.float32), axis=0)
    boxes0 = np.concatenate([base, base + 30.0], axis=1)[None]  # [1,K,4]
    scores0 = np.linspace(1.0, 0.01, K, dtype=np.float32)[None]  # [1,K] sorted desc
    nodes = [
        *_normalised_pixels(),
        helper.make_node("ReduceMean", ["px"], ["m4"], axes=[1, 2, 3], keepdims=0),  # [N]
        helper.make_node("Unsqueeze", ["m4", "ax1"], ["m"]),  # [N,1]
        helper.make_node("Mul", ["m", "k40"], ["shift"]),
        helper.make_node("Unsqueeze", ["shift", "ax2"], ["shift3"]),  # [N,1,1]
        helper.make_node("Add", ["boxes0", "shift3"], [T.boxes]),
        helper.make_node("Mul", ["scores0", "m"], [T.scores]),
        helper.make_node("Mul", ["m", "k200"], ["nf"]),
        helper.make_node("Floor", ["nf"], ["nfl"]),
        helper.make_node("Clip", ["nfl", "zero", "kmax"], ["nclip"]),
        helper.make_node("Cast", ["nclip"], [T.num_detections], to=TensorProto.INT32),
    ]
    inits = [
        _const("inv255", np.array(1 / 255, np.float32)),
        _const("ax1", np.array([1], np.int64)),
        _const("ax2", np.array([2], np.int64)),
        _const("k40", np.array(40.0, np.float32)),
        _const("k200", np.array(200.0, np.float32)),
        _const("zero", np.array(0.0, np.float32)),
        _const("kmax", np.array(float(K), np.float32)),
        _const("boxes0", boxes0),
        _const("scores0", scores0),
    ]
    graph = helper.make_graph(nodes, "detector", *_io(config.MODELS.detector), inits)
    return _save(graph, path)


def classifier(path: Path) -> Path:
    rng = np.random.default_rng(2)
    nc, na = config.N_CLASSES, config.N_ATTRIBUTES
    nodes = [
        *_normalised_pixels(),
        helper.make_node("ReduceMean", ["px"], ["m4"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Reshape", ["m4", "shape_n11"], ["m"]),  # [N,1,1]
        helper.make_node("Mul", [T.boxes, "kscale"], ["b"]),
        helper.make_node("Add", ["b", "m"], ["bm"]),
        helper.make_node("MatMul", ["bm", "wc"], ["lc"]),
        helper.make_node("Softmax", ["lc"], ["pc"], axis=-1),
        helper.make_node("MatMul", ["bm", "wa"], ["la"]),
        helper.make_node("Sigmoid", ["la"], ["pa"]),
        helper.make_node("Cast", [T.num_detections], ["nf"], to=TensorProto.FLOAT),  # [N,1]
        helper.make_node("Less", ["idx", "nf"], ["valid"]),  # [N,K]
        helper.make_node("Cast", ["valid"], ["vf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["vf", "ax2"], ["v3"]),  # [N,K,1]
        helper.make_node("Mul", ["pc", "v3"], [T.class_probs]),
        helper.make_node("Mul", ["pa", "v3"], [T.attribute_probs]),
        helper.make_node("ArgMax", ["pc"], ["am"], axis=-1, keepdims=0),  # [N,K]
        helper.make_node("OneHot", ["am", "depth", "onoff"], ["oh"], axis=-1),  # [N,K,C]
        helper.make_node("Mul", ["oh", "v3"], ["ohv"]),
        helper.make_node("ReduceSum", ["ohv", "ax1"], [T.class_counts], keepdims=0),
        helper.make_node("Identity", ["vf"], [T.familiarity]),  # 1 on valid rows: familiar
    ]
    inits = [
        _const("inv255", np.array(1 / 255, np.float32)),
        _const("shape_n11", np.array([-1, 1, 1], np.int64)),
        _const("kscale", np.array(1.0 / config.INPUT_SIZE, np.float32)),
        _const("wc", rng.normal(0, 3, (4, nc)).astype(np.float32)),
        _const("wa", rng.normal(0, 3, (4, na)).astype(np.float32)),
        _const("idx", np.arange(K, dtype=np.float32)),
        _const("ax1", np.array([1], np.int64)),
        _const("ax2", np.array([2], np.int64)),
        _const("depth", np.array(nc, np.int64)),
        _const("onoff", np.array([0.0, 1.0], np.float32)),
    ]
    graph = helper.make_graph(nodes, "classifier", *_io(config.MODELS.classifier), inits)
    return _save(graph, path)


def diagnosis(path: Path) -> Path:
    rng = np.random.default_rng(3)
    width = config.N_CLASSES + 1 + 2 * config.N_LAB_VALUES
    nodes = [
        helper.make_node(
            "Concat", [T.fractions, T.total_cells, T.lab_values, T.lab_mask], ["x"], axis=1
        ),
        helper.make_node("MatMul", ["x", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [T.diagnosis_probs], axis=-1),
    ]
    inits = [_const("w", rng.normal(0, 1, (width, config.N_DIAGNOSES)).astype(np.float32))]
    graph = helper.make_graph(nodes, "diagnosis", *_io(config.MODELS.diagnosis), inits)
    return _save(graph, path)


def write_all(folder: Path) -> dict[str, Path]:
    """Write one graph per exported model into ``folder``; returns {model name: path}."""
    writers = {
        config.MODELS.detector: detector,
        config.MODELS.classifier: classifier,
        config.MODELS.diagnosis: diagnosis,
    }
    return {name: writers[name](folder / f"{name}.onnx") for name in contract.EXPORTED_MODELS}
