"""The torch models follow their device, and the classifier's work follows the cells present.

Runs on CPU-only hosts: the ``meta`` device stands in for CUDA (a tensor made on the host
inside ``forward`` cannot meet a meta tensor, exactly as it cannot meet a CUDA one), and the
compacting classifier is compared with the fixed-slot path in torch and in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from marrowdx import config
from marrowdx.export import trt_ops
from marrowdx.export.onnx_export import IO_NAMES, export_onnx, random_inputs
from marrowdx.models.networks import (
    CellClassifier,
    CellDetector,
    ClassifierSpec,
    DetectorSpec,
    DiagnosisModel,
    PixelNormalizer,
)
from marrowdx.serving.onnx_artifacts import ort_session

SMALL_DET = DetectorSpec(width4=8, width8=8, width16=8, head=8)
SMALL_CLS = ClassifierSpec(widths=(8, 8, 8), hidden=8)
#: NUM_DETECTIONS patterns of a batch of three: mixed, all empty, one full image, all full.
COUNT_PATTERNS = ([[5], [0], [17]], [[0], [0], [0]], [[config.MAX_DETECTIONS], [3], [1]])


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "detector": CellDetector(SMALL_DET),
        "classifier": CellClassifier(SMALL_CLS),
        "diagnosis": DiagnosisModel(),
    }


def _on(device: str, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in tensors)


@pytest.mark.parametrize("kind", ["detector", "classifier", "diagnosis"])
def test_every_model_runs_on_a_device_without_host_constants(kind: str) -> None:
    model = _models()[kind].eval().to("meta")
    with torch.no_grad():
        outputs = model(*_on("meta", random_inputs(kind, 2)))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert all(t.device.type == "meta" for t in outputs)
    assert len(outputs) == len(IO_NAMES[kind][1])


def test_the_meta_check_catches_a_tensor_made_on_the_host_in_forward() -> None:
    """What the test above guards against: the old normalisation built its constants on
    the CPU at every call, which fails next to meta (or CUDA) tensors."""

    class HostConstant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float() - torch.tensor(config.NORM_MEAN).reshape(1, 3, 1, 1)

    with pytest.raises((RuntimeError, NotImplementedError)):
        HostConstant()(torch.zeros(1, 3, 4, 4, device="meta"))


def test_normalisation_constants_are_buffers_outside_checkpoints() -> None:
    norm = PixelNormalizer()
    assert {name for name, _ in norm.named_buffers()} == {
        "mean",
        "inv_std",
        "stain.target",
        "stain.light_terms",
        "stain.light_fit",
    }
    assert norm.state_dict() == {}  # constants come from code, not from training
    plain = PixelNormalizer(stain=False)
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = (pixels.float() - torch.tensor(config.NORM_MEAN).reshape(1, 3, 1, 1)) / torch.tensor(
        config.NORM_STD
    ).reshape(1, 3, 1, 1)
    assert torch.allclose(plain(pixels), expected, atol=1e-5)


@pytest.mark.parametrize("counts", COUNT_PATTERNS)
def test_compacting_classifier_equals_the_fixed_slot_path_in_torch(counts) -> None:
    model = _models()["classifier"].eval()
    pixels, boxes, _ = random_inputs("classifier", 3, seed=1)
    num = torch.tensor(counts, dtype=torch.int32)
    with torch.no_grad():
        compact = model(pixels, boxes, num)
        slots = model.forward_slots(pixels, boxes, num)
    for got, ref in zip(compact, slots, strict=True):
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-6)
    assert compact[2].sum(dim=1).tolist() == [float(min(c[0], boxes.shape[1])) for c in counts]


def test_compacting_classifier_only_computes_the_batch_largest_count(monkeypatch) -> None:
    model = _models()["classifier"].eval()
    seen: list[int] = []
    original = model.classify_crops_with_features

    def spy(crops, boxes):
        seen.append(boxes.shape[1])
        return original(crops, boxes)

    monkeypatch.setattr(model, "classify_crops_with_features", spy)
    pixels, boxes, _ = random_inputs("classifier", 2, seed=2)
    with torch.no_grad():
        model(pixels, boxes, torch.tensor([[7], [19]], dtype=torch.int32))
        model(pixels, boxes, torch.tensor([[0], [0]], dtype=torch.int32))
    assert seen == [19, 1]  # an empty batch still runs one row: no zero-sized engine tensor


@pytest.fixture(scope="module")
def classifier_onnx(tmp_path_factory) -> tuple[nn.Module, object]:
    model = _models()["classifier"].eval()
    path = export_onnx(model, "classifier", tmp_path_factory.mktemp("gpu") / "c.onnx", {})
    return model, path


@pytest.mark.parametrize("counts", COUNT_PATTERNS)
def test_compacting_classifier_equals_the_fixed_slot_path_in_onnx_runtime(
    classifier_onnx, counts
) -> None:
    model, path = classifier_onnx
    names_in, names_out = IO_NAMES["classifier"]
    pixels, boxes, _ = random_inputs("classifier", 3, seed=5)
    num = torch.tensor(counts, dtype=torch.int32)
    with torch.no_grad():
        slots = model.forward_slots(pixels, boxes, num)
    feeds = {n: t.numpy() for n, t in zip(names_in, (pixels, boxes, num), strict=True)}
    got = ort_session(path).run(list(names_out), feeds)
    for name, g, r in zip(names_out, got, slots, strict=True):
        assert g.shape == tuple(r.shape), name
        np.testing.assert_allclose(g, r.numpy(), atol=1e-5, err_msg=name)


def test_exported_classifier_cuts_in_graph_with_tensorrt_ops_only(classifier_onnx) -> None:
    _, path = classifier_onnx
    proto = onnx.load(str(path))
    assert trt_ops.unsupported_ops(trt_ops.graph_ops(proto)) == []
    produced_by = {out: node for node in proto.graph.node for out in node.output}
    # the cut: a Slice of BOXES whose end is computed from NUM_DETECTIONS (not a constant)
    cuts = [n for n in proto.graph.node if n.op_type == "Slice" and config.TENSORS.boxes in n.input]
    assert len(cuts) == 1
    end = cuts[0].input[2]
    frontier, seen = [end], set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in produced_by:
            frontier.extend(produced_by[name].input)
    assert config.TENSORS.num_detections in seen
    # outputs keep the contract's fixed rows for the ensemble's batching (box axis from BOXES)
    out_dims = {o.name: len(o.type.tensor_type.shape.dim) for o in proto.graph.output}
    assert out_dims[config.TENSORS.class_probs] == 3


@pytest.mark.gpu
def test_models_run_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible (torch.cuda.is_available() is False)")
    for kind, model in _models().items():
        model = model.eval().cuda()
        with torch.no_grad():
            outputs = model(*_on("cuda", random_inputs(kind, 2)))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        assert all(t.is_cuda for t in outputs), kind
