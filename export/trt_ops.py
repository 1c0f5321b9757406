"""ONNX operators TensorRT's ONNX parser supports, for an automatic check of exported graphs.

Source: the operator support matrix of onnx-tensorrt (``docs/operators.md``) for the
TensorRT 10.x line (the NGC ``tritonserver:24.10-py3`` container ships TensorRT 10.5),
restricted to the operators that are marked supported there without plugin fallback.
Operators that were added late or have narrow restrictions (Mod, NonZero, OneHot,
RoiAlign, NonMaxSuppression, loops/sequences) are deliberately left out: if one enters
a graph the test fails and someone has to look at the restriction before allowing it.
"""

from __future__ import annotations

from collections.abc import Iterable

TENSORRT_VERSION_LINE = "10.x"

TENSORRT_SUPPORTED_OPS: frozenset[str] = frozenset(
    {
        "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan",
        "Atanh", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Celu", "Clip",
        "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh",
        "CumSum", "DepthToSpace", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp",
        "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND",
        "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
        "GridSample", "HardSigmoid", "Identity", "InstanceNormalization", "LayerNormalization",
        "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "MatMul", "Max", "MaxPool",
        "Mean", "Min", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "PRelu", "Range",
        "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
        "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu",
        "Reshape", "Resize", "Round", "ScatterElements", "ScatterND", "Selu", "Shape",
        "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign",
        "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile",
        "TopK", "Transpose", "Unsqueeze", "Where", "Xor",
    }
)  # fmt: skip


def graph_ops(model) -> set[str]:
    """Every op type in an ONNX ModelProto, including nested subgraphs (If/Loop bodies)."""
    ops: set[str] = set()

    def walk(graph) -> None:
        for node in graph.node:
            ops.add(
                node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            )
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return ops


def unsupported_ops(ops: Iterable[str]) -> list[str]:
    """Ops outside TensorRT's supported list (sorted), empty when the graph is fine."""
    return sorted(set(ops) - TENSORRT_SUPPORTED_OPS)
