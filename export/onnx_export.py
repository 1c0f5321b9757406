"""ONNX export (opset 17, dynamic batch, contract tensor names, metadata) and verification.

The TorchScript-based exporter (``dynamo=False``) is used because it yields a flat opset-17
graph with exactly the named inputs/outputs and a symbolic batch dimension; every export is
checked with the ONNX checker, against TensorRT's operator list, and against torch.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from marrowdx import config, contract, taxonomy
from marrowdx.export import trt_ops
from marrowdx.serving.onnx_artifacts import (
    CALIBRATION_KEY,
    METADATA_KEY,
    metadata_props,
    ort_session,
)

OPSET = 17
#: Symbols of the dynamic axes (batch everywhere, the classifier's box axis): see
#: ``marrowdx.contract``, whose table says which tensor has which.
BATCH_DIM, BOX_DIM = contract.BATCH_DIM, contract.BOX_DIM
#: Tensors whose box axis the exported classifier leaves dynamic (``contract.CLASSIFIER``).
BOX_AXIS_TENSORS = frozenset(
    t.name
    for t in contract.CLASSIFIER.inputs + contract.CLASSIFIER.outputs
    if BOX_DIM in dict(t.dynamic_axes).values()
)
#: Agreement required between torch and ONNX Runtime on probabilities and scores.
PROB_TOLERANCE = 1e-4
#: Agreement on box coordinates (input pixels) for rows whose scores are not tied.
BOX_TOLERANCE = 1e-2
#: metadata_props key of the graph's tensor contract; bump EXPORT_FORMAT when the exported
#: graph changes without the weights changing (2: PIXELS uint8, normalised in-graph; 3: the
#: classifier cuts its box axis at the batch's largest NUM_DETECTIONS in-graph; 4: the
#: classifier returns FAMILIARITY per cell; 5: its class temperature is gated per cell,
#: ``RealCellTemperature``; 6: the stain normaliser follows uneven light,
#: ``StainNormalizer.light_deficit``), so a build re-exports from the existing checkpoints
#: instead of retraining.
FORMAT_KEY = "export_format"
EXPORT_FORMAT = 6

T = config.TENSORS
#: (input names, output names) per exported model, in graph order: from the contract.
IO_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    name: contract.io_names(name) for name in contract.EXPORTED_MODELS
}


def random_pixels(batch: int, generator: torch.Generator) -> torch.Tensor:
    """PIXELS as the preprocess step sends them: uint8 [B, 3, S, S]."""
    s = config.INPUT_SIZE
    return torch.randint(0, 256, (batch, 3, s, s), generator=generator, dtype=torch.uint8)


def random_inputs(kind: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Contract-shaped random inputs (valid boxes, counts in range) for export and checks."""
    g = torch.Generator().manual_seed(seed)
    s, k = config.INPUT_SIZE, config.MAX_DETECTIONS
    if kind == "detector":
        return (random_pixels(batch, g),)
    if kind == "classifier":
        xy = torch.rand(batch, k, 2, generator=g) * (s - 64)
        wh = 8 + torch.rand(batch, k, 2, generator=g) * 56
        n = torch.randint(0, k + 1, (batch, 1), generator=g, dtype=torch.int32)
        return (random_pixels(batch, g), torch.cat((xy, xy + wh), -1), n)
    if kind == "diagnosis":
        f = torch.rand(batch, config.N_CLASSES, generator=g)
        mask = (torch.rand(batch, config.N_LAB_VALUES, generator=g) < 0.5).float()
        return (
            f / f.sum(1, keepdim=True),
            torch.randint(1, 3000, (batch, 1), generator=g).float(),
            torch.rand(batch, config.N_LAB_VALUES, generator=g) * 10 * mask,
            mask,
        )
    raise ValueError(f"unknown model kind {kind!r}")


def export_onnx(model: nn.Module, kind: str, path: Path, metadata: dict) -> Path:
    """Export one model with contract names, dynamic batch and metadata; returns the path."""
    inputs, outputs = IO_NAMES[kind]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model = model.eval()
    examples = random_inputs(kind, 2)
    with torch.no_grad():
        result = model(*examples)
    _check_output_shapes(kind, result if isinstance(result, tuple) else (result,))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            examples,
            str(tmp),
            input_names=list(inputs),
            output_names=list(outputs),
            opset_version=OPSET,
            dynamic_axes=_dynamic_axes(kind),
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx

    proto = onnx.load(str(tmp))
    _pin_output_shapes(proto, kind)
    props = {
        METADATA_KEY: json.dumps(metadata, sort_keys=True),
        FORMAT_KEY: str(EXPORT_FORMAT),
        "taxonomy": json.dumps(taxonomy.as_metadata()),
        "classes": json.dumps(list(taxonomy.CLASSES)),
        "attributes": json.dumps(list(taxonomy.ATTRIBUTE_NAMES)),
        "diagnoses": json.dumps(list(taxonomy.DIAGNOSES)),
    }
    if metadata.get(CALIBRATION_KEY):
        # the fitted temperatures (already constants in the graph) and their held-out ECE,
        # readable by any ONNX tool without parsing the whole checkpoint metadata
        props[CALIBRATION_KEY] = json.dumps(metadata[CALIBRATION_KEY], sort_keys=True)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "marrowdx"
    proto.doc_string = f"marrowdx {kind}: {metadata.get('preset', '?')} preset"
    onnx.checker.check_model(proto, full_check=True)
    bad = trt_ops.unsupported_ops(trt_ops.graph_ops(proto))
    if bad:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{kind} graph uses ops TensorRT does not support: {bad}")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def _dynamic_axes(kind: str) -> dict[str, dict[int, str]]:
    """The axes the contract leaves symbolic: batch everywhere, the classifier's box axis."""
    spec = contract.model(kind)
    return {
        t.name: {axis: d for axis, d in enumerate(t.onnx_dims()) if isinstance(d, str)}
        for t in spec.inputs + spec.outputs
    }


def _check_output_shapes(kind: str, result: tuple[torch.Tensor, ...]) -> None:
    """Refuse a model whose outputs break the contract (a wrong size would otherwise only
    show when Triton loads the model or a client reads the answer)."""
    for spec, tensor in zip(contract.model(kind).outputs, result, strict=True):
        want = spec.onnx_dims()
        got = tuple(tensor.shape)
        fixed = [(a, d) for a, d in enumerate(want) if isinstance(d, int)]
        if len(got) != len(want) or any(got[a] != d for a, d in fixed):
            raise ValueError(
                f"{kind} output {spec.name} has shape {list(got)}, the contract says {list(want)}"
            )


def _pin_output_shapes(proto, kind: str) -> None:
    """Declare the contract's dims on every output: the tracer leaves data-flow dims
    symbolic, but TensorRT and Triton shape checks want them fixed, apart from the
    contract's dynamic axes (batch; the classifier's box axis, which follows BOXES)."""
    specs = {t.name: t for t in contract.model(kind).outputs}
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in specs[value.name].onnx_dims():
            if isinstance(d, str):
                dims.add().dim_param = d
            else:
                dims.add().dim_value = d


def export_is_current(path: Path) -> bool:
    """True when ``path`` was exported with this code's tensor contract (EXPORT_FORMAT)."""
    try:
        return metadata_props(path).get(FORMAT_KEY) == str(EXPORT_FORMAT)
    except Exception:  # missing or unreadable file: export again
        return False


@dataclass
class Agreement:
    """Largest torch-vs-ONNX Runtime differences, per output name."""

    kind: str
    max_abs: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _detector_diffs(ref: list[np.ndarray], got: list[np.ndarray], out: Agreement) -> None:
    boxes_r, scores_r, n_r = ref
    boxes_g, scores_g, n_g = got
    out.max_abs[T.scores] = max(
        out.max_abs.get(T.scores, 0.0), float(np.abs(scores_r - scores_g).max())
    )
    if not np.array_equal(n_r, n_g):
        out.failures.append(
            f"{T.num_detections} differ: torch {n_r.ravel().tolist()}"
            f" vs onnx {n_g.ravel().tolist()}"
        )
    # rows whose score has a near-tie may legitimately swap places: compare the others
    gaps = np.minimum(
        np.abs(np.diff(scores_r, axis=1, prepend=np.inf)),
        np.abs(np.diff(scores_r, axis=1, append=-np.inf)),
    )
    rows = gaps > PROB_TOLERANCE
    diff = float(np.abs(boxes_r - boxes_g)[rows].max()) if rows.any() else 0.0
    out.max_abs[T.boxes] = max(out.max_abs.get(T.boxes, 0.0), diff)
    if diff > BOX_TOLERANCE:
        out.failures.append(f"{T.boxes} differ by {diff:.4g} px")


def output_difference(name: str, ref: np.ndarray, got: np.ndarray) -> float:
    """Largest difference of one output between two runtimes. FAMILIARITY is compared
    relative to its size (``|a - b| / max(1, |a|)``): random test inputs lie far from every
    trained cell, where the score is large and negative and only its sign matters, and a
    distance summed over 128 features carries rounding in proportion to its size."""
    if not ref.size:
        return 0.0
    a, b = ref.astype(np.float64), np.asarray(got, np.float64).reshape(ref.shape)
    if name == T.familiarity:
        return float((np.abs(a - b) / np.maximum(1.0, np.abs(a))).max())
    return float(np.abs(a - b).max())


def compare_with_torch(
    model: nn.Module, kind: str, path: Path, batches: list[tuple[torch.Tensor, ...]]
) -> Agreement:
    """Run torch and ONNX Runtime on the same inputs and compare every output."""
    inputs, outputs = IO_NAMES[kind]
    session = ort_session(path)
    report = Agreement(kind=kind)
    model = model.eval()
    for batch in batches:
        with torch.no_grad():
            result = model(*batch)
        ref = [t.numpy() for t in (result if isinstance(result, tuple) else (result,))]
        got = session.run(list(outputs), {n: t.numpy() for n, t in zip(inputs, batch, strict=True)})
        if kind == "detector":
            _detector_diffs(ref, got, report)
            if got[2].dtype != np.int32:
                report.failures.append(f"{T.num_detections} dtype {got[2].dtype}, expected int32")
            continue
        for name, r, g in zip(outputs, ref, got, strict=True):
            diff = output_difference(name, r, g)
            report.max_abs[name] = max(report.max_abs.get(name, 0.0), diff)
            tol = 0.5 if name == T.class_counts else PROB_TOLERANCE  # counts: argmax ties only
            if diff > tol:
                report.failures.append(f"{name} differs by {diff:.3g} (tolerance {tol})")
    return report
