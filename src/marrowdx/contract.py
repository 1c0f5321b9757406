"""The served tensor contract: one typed table of every Triton model's inputs and outputs.

Why one table: the tensors between preprocess, detector, classifier, the ``pipeline``
ensemble and the diagnosis model are read by the Triton configs, the ONNX export, the gRPC
client, the in-process pipeline and the tests. Each used to spell out its own copy; now each
reads :data:`MODELS` here (name, dtype for Triton and numpy, dims built from
``marrowdx.config``'s sizes, the axes the ONNX graph leaves dynamic), so a tensor is changed
in one place. Names stay in ``config.TENSORS`` / ``config.MODELS``; this module gives them
types and shapes and defines neither twice.

How the ``config.pbtxt`` files relate: CHECKED against the table, and rewritable from it.
They stay hand-written Triton configs, because batching, instances and the one-line reason
beside each setting are deployment choices the table does not own, and Triton's own format
is what operators read. Their ``input``/``output`` blocks must say exactly what
:meth:`ModelSpec.config_io` says for their target. Reading, checking and rewriting them
(through Triton's own ``ModelConfig`` protobuf) is :mod:`marrowdx.serving.model_config`'s
job; the command line (``python -m marrowdx.serving.contract_cli check|write|models|table``)
and the markdown table of ``model_repository/README.md`` are
:mod:`marrowdx.serving.contract_cli`'s.

Adding a tensor: add its name to ``config.TensorNames``, its :class:`TensorSpec` below, put
it in the models that carry it (for an ensemble output, also in :data:`PIPELINE`'s outputs
and the ensemble step's ``output_map``), run ``python -m marrowdx.serving.contract_cli write``.
Serving a dynamic axis as -1 on one target (say, the gpu classifier's box axis): add the
target to that model's ``dynamic_on`` and run ``write``.

Stdlib only (plus ``marrowdx.config``): the thin client and the core import it, and it
imports nothing above the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from marrowdx import config

T, M = config.TENSORS, config.MODELS

#: Repository targets: ``cpu`` (python backend, the embedded default), ``gpu`` (DALI backend
#: and TensorRT engines, production).
TARGETS = ("cpu", "gpu")
#: Where each model's gpu config lives (Triton's ``configs/<name>.pbtxt`` layout); the cpu
#: config is ``config.pbtxt``. An ensemble has one config for both targets.
CPU_CONFIG = Path("config.pbtxt")
GPU_CONFIG = Path("configs") / "gpu.pbtxt"
#: Triton's "any size" dim.
VARIABLE = -1
#: ONNX symbol of the batch axis (dynamic in every exported graph).
BATCH_DIM = "batch"
#: ONNX symbol of the classifier's box axis: left dynamic so the serving side runs only the
#: box slots a batch fills (cropping every one of MAX_DETECTIONS slots dominates on a CPU).
BOX_DIM = "boxes"


# ------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class DType:
    """One element type under the names each side uses for it."""

    triton: str  # config.pbtxt ``data_type``
    numpy: str  # ``np.dtype(...)`` name

    @property
    def wire(self) -> str:
        """The name in Triton's inference protocol (``InferInput`` datatype, metadata API)."""
        return self.triton.removeprefix("TYPE_")


UINT8 = DType("TYPE_UINT8", "uint8")
INT32 = DType("TYPE_INT32", "int32")
FP32 = DType("TYPE_FP32", "float32")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor, per item (the batch axis, first and dynamic everywhere, is not listed)."""

    name: str
    dtype: DType
    dims: tuple[int, ...]
    doc: str
    #: (axis within ``dims``, ONNX symbol) of axes the exported graph leaves dynamic; configs
    #: declare them at their ``dims`` size unless the model lists the target in ``dynamic_on``.
    dynamic_axes: tuple[tuple[int, str], ...] = ()
    #: Items differ in length (encoded bytes): the config sets ``allow_ragged_batch``.
    ragged: bool = False

    def config_dims(self, dynamic: bool) -> tuple[int, ...]:
        """Dims as a config declares them; ``dynamic``: dynamic axes as -1."""
        axes = {axis for axis, _ in self.dynamic_axes} if dynamic else set()
        return tuple(VARIABLE if i in axes else d for i, d in enumerate(self.dims))

    def onnx_dims(self) -> tuple[int | str, ...]:
        """Dims of the exported graph, batch first: a symbol where the axis is dynamic."""
        symbols = dict(self.dynamic_axes)
        return (BATCH_DIM, *(symbols.get(i, d) for i, d in enumerate(self.dims)))


@dataclass(frozen=True)
class ModelSpec:
    """One Triton model: its tensors in config order."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str
    #: An ONNX graph exported from torch (python backend + ONNX Runtime on cpu, a TensorRT
    #: engine on gpu).
    exported: bool = False
    #: An ensemble: its member models in step order.
    steps: tuple[str, ...] = ()
    #: Targets whose config declares the tensors' dynamic axes as -1 (default: fixed sizes,
    #: which the python backend pads back to).
    dynamic_on: frozenset[str] = field(default_factory=frozenset)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def config_path(self, target: str) -> Path:
        """The config file of ``target``, relative to the model's folder."""
        _check_target(target)
        return GPU_CONFIG if target == "gpu" and not self.steps else CPU_CONFIG

    def config_io(self, target: str) -> tuple[list[ConfigTensor], list[ConfigTensor]]:
        """Inputs and outputs as ``target``'s config must declare them."""
        dynamic = _check_target(target) in self.dynamic_on
        # an ensemble has no batcher of its own: ragged batching is its members' business
        ragged = not self.steps
        return (
            [ConfigTensor.of(t, dynamic, ragged) for t in self.inputs],
            [ConfigTensor.of(t, dynamic, ragged) for t in self.outputs],
        )


@dataclass(frozen=True)
class ConfigTensor:
    """What one config ``input``/``output`` entry must say (Triton's field names and enum
    names, so :mod:`marrowdx.serving.model_config` maps it onto ``ModelInput``/``ModelOutput``
    field by field); plain data, so the table needs no protobuf."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    allow_ragged_batch: bool = False

    @classmethod
    def of(cls, spec: TensorSpec, dynamic: bool, ragged: bool = True) -> ConfigTensor:
        return cls(spec.name, spec.dtype.triton, spec.config_dims(dynamic), spec.ragged and ragged)


def _check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    return target


def _per_box(spec: TensorSpec) -> TensorSpec:
    """``spec`` as the classifier's graph sees it: its first axis is the dynamic box axis."""
    return replace(spec, dynamic_axes=((0, BOX_DIM),))


# ------------------------------------------------------------------------------- table
S, K = config.INPUT_SIZE, config.MAX_DETECTIONS
NC, NA, ND = config.N_CLASSES, config.N_ATTRIBUTES, config.N_DIAGNOSES
#: LETTERBOX's fields; an input pixel = original pixel * scale + pad.
LETTERBOX_FIELDS = ("scale_x", "scale_y", "pad_x", "pad_y")
#: IMAGE_SIZE's fields, of the original image.
IMAGE_SIZE_FIELDS = ("height", "width")
#: FIELD_QUALITY's fields, measured by the preprocessing graph on the resized field
#: (``marrowdx.preprocess.QualitySpec`` says how; ``marrowdx.client.quality`` judges them).
QUALITY_FIELDS = (
    "focus",
    "foreground",
    "thick",
    "brightness",
    "stain_colour",
    "background",
    "flat",
    "fine_focus",
    "green",
    "thick_wide",
    "clipped",
)

IMAGE = TensorSpec(T.image, UINT8, (VARIABLE,), "encoded JPEG/PNG bytes", ragged=True)
PIXELS = TensorSpec(
    T.pixels, UINT8, (3, S, S), "letterboxed RGB, not normalised (the models normalise)"
)
LETTERBOX = TensorSpec(
    T.letterbox,
    FP32,
    (len(LETTERBOX_FIELDS),),
    ", ".join(LETTERBOX_FIELDS) + ": input pixel = original pixel * scale + pad",
)
IMAGE_SIZE = TensorSpec(
    T.image_size, INT32, (len(IMAGE_SIZE_FIELDS),), "original " + ", ".join(IMAGE_SIZE_FIELDS)
)
FIELD_QUALITY = TensorSpec(
    T.field_quality,
    FP32,
    (len(QUALITY_FIELDS),),
    ", ".join(QUALITY_FIELDS) + ": cheap per-field measures for quality gating",
)
BOXES = TensorSpec(T.boxes, FP32, (K, 4), "x0, y0, x1, y1 in letterboxed pixels, by score")
SCORES = TensorSpec(T.scores, FP32, (K,), "detection score per box")
NUM_DETECTIONS = TensorSpec(T.num_detections, INT32, (1,), "rows of BOXES that are valid")
CLASS_PROBS = TensorSpec(T.class_probs, FP32, (K, NC), "per cell; rows >= NUM_DETECTIONS are 0")
ATTRIBUTE_PROBS = TensorSpec(T.attribute_probs, FP32, (K, NA), "per cell, 7 binary attributes")
CLASS_COUNTS = TensorSpec(T.class_counts, FP32, (NC,), "per-image counts of valid cells")
FAMILIARITY = TensorSpec(
    T.familiarity,
    FP32,
    (K,),
    "per cell: 1 at a class mean, 0 at the fitted limit, < 0 unfamiliar; rows >= "
    "NUM_DETECTIONS are 0",
)
FRACTIONS = TensorSpec(T.fractions, FP32, (NC,), "a patient's class fractions")
TOTAL_CELLS = TensorSpec(T.total_cells, FP32, (1,), "a patient's cell count")
LAB_VALUES = TensorSpec(
    T.lab_values, FP32, (config.N_LAB_VALUES,), "optional lab values (0 when absent)"
)
LAB_MASK = TensorSpec(T.lab_mask, FP32, (config.N_LAB_VALUES,), "1 where a lab value is present")
DIAGNOSIS_PROBS = TensorSpec(T.diagnosis_probs, FP32, (ND,), "ALL, AML, CML")

PREPROCESS = ModelSpec(
    M.preprocess,
    (IMAGE,),
    (PIXELS, LETTERBOX, IMAGE_SIZE, FIELD_QUALITY),
    "DALI decode, RGB, letterbox, field quality measures",
)
DETECTOR = ModelSpec(
    M.detector,
    (PIXELS,),
    (BOXES, SCORES, NUM_DETECTIONS),
    "anchor-free heatmap detector, top-K decoded in-graph",
    exported=True,
)
CLASSIFIER = ModelSpec(
    M.classifier,
    (PIXELS, _per_box(BOXES), NUM_DETECTIONS),
    (_per_box(CLASS_PROBS), _per_box(ATTRIBUTE_PROBS), CLASS_COUNTS, _per_box(FAMILIARITY)),
    "ROI crops by grid sampling, 33 classes + 7 attributes, familiarity",
    exported=True,
)
DIAGNOSIS = ModelSpec(
    M.diagnosis,
    (FRACTIONS, TOTAL_CELLS, LAB_VALUES, LAB_MASK),
    (DIAGNOSIS_PROBS,),
    "per patient: class fractions to ALL/AML/CML",
    exported=True,
)
PIPELINE = ModelSpec(
    M.pipeline,
    (IMAGE,),
    (
        BOXES,
        SCORES,
        NUM_DETECTIONS,
        CLASSIFIER.outputs[0],
        CLASSIFIER.outputs[1],
        CLASS_COUNTS,
        LETTERBOX,
        IMAGE_SIZE,
        FIELD_QUALITY,
        CLASSIFIER.outputs[3],
    ),
    "ensemble, one request per image",
    steps=(M.preprocess, M.detector, M.classifier),
)

#: Every served model, in build order (the ensemble after its members).
MODELS: dict[str, ModelSpec] = {
    m.name: m for m in (PREPROCESS, DETECTOR, CLASSIFIER, DIAGNOSIS, PIPELINE)
}
#: Models exported from torch to ONNX (and to TensorRT engines on gpu), in export order.
EXPORTED_MODELS: tuple[str, ...] = tuple(n for n, m in MODELS.items() if m.exported)
#: The ensemble outputs the client reads, in config order.
PIPELINE_OUTPUTS: tuple[str, ...] = PIPELINE.output_names


def model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; the contract has {', '.join(MODELS)}") from None


def io_names(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) of one model, in config and ONNX graph order."""
    spec = model(name)
    return spec.input_names, spec.output_names
