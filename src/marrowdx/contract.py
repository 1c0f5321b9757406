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
is what operators read. Their ``input``/``output`` blocks must say exactly what the table
says for their target:

- :func:`check_repository` (run by ``marrowdx build`` before it writes anything, and by the
  unit tests) refuses configs that disagree, naming file, model, tensor and field;
- ``python -m marrowdx.contract write`` rewrites the io blocks of the configs from the table
  and leaves every other line alone; ``python -m marrowdx.contract check`` is ``build``'s check.

Adding a tensor: add its name to ``config.TensorNames``, its :class:`TensorSpec` below, put
it in the models that carry it (for an ensemble output, also in :data:`PIPELINE`'s outputs
and the ensemble step's ``output_map``), run ``python -m marrowdx.contract write``.
Serving a dynamic axis as -1 on one target (say, the gpu classifier's box axis): add the
target to that model's ``dynamic_on`` and run ``write``.

Stdlib only (plus ``marrowdx.config``/``errors``): the thin client imports it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from marrowdx import config
from marrowdx.errors import RepositoryError

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


class ContractError(RepositoryError):
    """A model config disagrees with the tensor contract; ``problems`` has one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            "model configs disagree with the tensor contract (marrowdx.contract):\n"
            f"{lines}\n"
            "fix the config or the table; `python -m marrowdx.contract write` rewrites the "
            "input/output blocks from the table"
        )


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
    """What one config entry (``{ name: ... data_type: ... dims: [...] }``) says."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    allow_ragged_batch: bool = False

    @classmethod
    def of(cls, spec: TensorSpec, dynamic: bool, ragged: bool = True) -> ConfigTensor:
        return cls(spec.name, spec.dtype.triton, spec.config_dims(dynamic), spec.ragged and ragged)

    def render(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        ragged = " allow_ragged_batch: true" if self.allow_ragged_batch else ""
        return f'{{ name: "{self.name}" data_type: {self.data_type} dims: [ {dims} ]{ragged} }}'


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


# ------------------------------------------------------------- reading config.pbtxt
_TOKEN = re.compile(
    r"""(?P<skip>\s+|\#[^\n]*)
    |(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    |(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    |(?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
    |(?P<punct>[{}\[\]<>:,;])""",
    re.X,
)
_CLOSE = {"{": "}", "<": ">"}


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    start: int
    end: int


class PbtxtError(ValueError):
    """Text that is not protobuf text format (as Triton's config.pbtxt uses it)."""


def _tokens(text: str) -> list[_Token]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            line = text.count("\n", 0, pos) + 1
            raise PbtxtError(f"line {line}: unexpected character {text[pos]!r}")
        if m.lastgroup != "skip":
            out.append(_Token(m.lastgroup or "", m.group(), m.start(), m.end()))
        pos = m.end()
    return out


class _Parser:
    """A small reader of protobuf text format: messages become dicts of field -> list of
    values (repeated and ``[a, b]`` fields alike), enums and booleans stay identifiers.
    Stdlib only, so the check runs where protobuf and tritonclient are not installed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.pos = 0
        #: top-level field name -> (start, end) character spans, for rewriting
        self.spans: dict[str, list[tuple[int, int]]] = {}

    def _peek(self) -> _Token | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def _next(self, what: str) -> _Token:
        tok = self._peek()
        if tok is None:
            raise PbtxtError(f"unexpected end of text, expected {what}")
        self.pos += 1
        return tok

    def _fail(self, tok: _Token, what: str) -> PbtxtError:
        line = self.text.count("\n", 0, tok.start) + 1
        return PbtxtError(f"line {line}: expected {what}, found {tok.text!r}")

    def message(self, closer: str | None = None) -> dict[str, list]:
        fields: dict[str, list] = {}
        while True:
            tok = self._peek()
            if tok is None:
                if closer is not None:
                    raise PbtxtError(f"unexpected end of text, expected {closer!r}")
                return fields
            if tok.text == closer:
                self.pos += 1
                return fields
            name = self._next("a field name")
            if name.kind != "ident":
                raise self._fail(name, "a field name")
            nxt = self._peek()
            if nxt is not None and nxt.text == ":":
                self.pos += 1
            value = self._value()
            values = fields.setdefault(name.text, [])
            if isinstance(value, _List):
                values.extend(value)
            else:
                values.append(value)
            if closer is None:
                end = self.toks[self.pos - 1].end
                self.spans.setdefault(name.text, []).append((name.start, end))
            sep = self._peek()
            if sep is not None and sep.text in (",", ";"):
                self.pos += 1

    def _value(self):
        tok = self._next("a value")
        if tok.text in _CLOSE:
            return self.message(_CLOSE[tok.text])
        if tok.text == "[":
            items = _List()
            while (nxt := self._peek()) is not None and nxt.text != "]":
                items.append(self._value())
                if (sep := self._peek()) is not None and sep.text == ",":
                    self.pos += 1
            self._next("']'")
            return items
        if tok.kind == "string":
            return tok.text[1:-1].encode().decode("unicode_escape")
        if tok.kind == "number":
            return float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
        if tok.kind == "ident":
            return tok.text
        raise self._fail(tok, "a value")


class _List(list):
    """A bracketed ``[a, b]`` value (merged into the field's values)."""


def parse_pbtxt(text: str) -> dict[str, list]:
    """A config.pbtxt as nested dicts: every field maps to the list of its values."""
    return _Parser(text).message()


def _one(fields: dict[str, list], key: str, default=None):
    values = fields.get(key, [])
    return values[-1] if values else default


def config_tensors(entries: Iterable[dict[str, list]]) -> list[ConfigTensor]:
    """The ``input``/``output`` entries of a parsed config."""
    return [
        ConfigTensor(
            name=str(_one(e, "name", "")),
            data_type=str(_one(e, "data_type", "TYPE_INVALID")),
            dims=tuple(int(d) for d in e.get("dims", [])),
            allow_ragged_batch=_one(e, "allow_ragged_batch", "false") in ("true", "True", 1),
        )
        for e in entries
    ]


# ------------------------------------------------------------------------ checking
def check_config(text: str, name: str, target: str, where: str = "config") -> list[str]:
    """Problems of one model's config against the table (empty when it agrees)."""
    spec = model(name)
    try:
        cfg = parse_pbtxt(text)
    except PbtxtError as exc:
        return [f"{where}: cannot read it: {exc}"]
    problems = []
    if _one(cfg, "name") != name:
        problems.append(f"{where}: name is {_one(cfg, 'name')!r}, expected {name!r}")
    want_in, want_out = spec.config_io(target)
    for kind, want, got in (
        ("input", want_in, config_tensors(cfg.get("input", []))),
        ("output", want_out, config_tensors(cfg.get("output", []))),
    ):
        problems += _compare_tensors(f"{where}: {name} {kind}", want, got)
    if spec.steps:
        problems += _check_ensemble(cfg, spec, where)
    return problems


def _compare_tensors(prefix: str, want: list[ConfigTensor], got: list[ConfigTensor]) -> list[str]:
    if [t.name for t in got] != [t.name for t in want]:
        return [
            f"{prefix}s are {[t.name for t in got]}, the contract has {[t.name for t in want]}"
            " (same names, same order)"
        ]
    problems = []
    for w, g in zip(want, got, strict=True):
        for fld in ("data_type", "dims", "allow_ragged_batch"):
            gv, wv = getattr(g, fld), getattr(w, fld)
            if gv != wv:
                show = (lambda v: list(v)) if fld == "dims" else (lambda v: v)
                problems.append(
                    f"{prefix} {w.name}: {fld} is {show(gv)}, the contract says {show(wv)}"
                )
    return problems


def _check_ensemble(cfg: dict[str, list], spec: ModelSpec, where: str) -> list[str]:
    """Steps in the table's order, maps naming the members' real tensors, every ensemble
    output produced by the member output of the same name (so its type is the member's)."""
    steps = _one(cfg, "ensemble_scheduling", {}).get("step", [])
    names = [_one(s, "model_name") for s in steps]
    if names != list(spec.steps):
        return [f"{where}: ensemble steps are {names}, the contract has {list(spec.steps)}"]
    problems, produced = [], set()
    for step, member in zip(steps, spec.steps, strict=True):
        m = MODELS[member]
        for kind, names_, known in (
            ("input_map", step.get("input_map", []), m.input_names),
            ("output_map", step.get("output_map", []), m.output_names),
        ):
            for entry in names_:
                key = _one(entry, "key")
                if key not in known:
                    problems.append(f"{where}: step {member} {kind} key {key!r} is not its tensor")
                elif kind == "output_map" and _one(entry, "value") == key:
                    produced.add(key)
    missing = [n for n in spec.output_names if n not in produced]
    if missing:
        problems.append(
            f"{where}: ensemble outputs {missing} are not routed from the member output of the "
            "same name (add an output_map to its step)"
        )
    return problems


def check_repository(repo: Path, targets: Sequence[str] = TARGETS) -> None:
    """Raise :class:`ContractError` listing every config of ``repo`` (a source repository:
    ``<model>/config.pbtxt`` and ``<model>/configs/gpu.pbtxt``) that disagrees with the
    table for ``targets``; a missing config is a problem too."""
    problems = []
    for target in targets:
        for name, spec in MODELS.items():
            path = Path(repo) / name / spec.config_path(target)
            if not path.is_file():
                problems.append(f"{path}: missing ({target} config of {name})")
                continue
            problems += check_config(path.read_text(), name, target, str(path))
    if problems:
        raise ContractError(sorted(set(problems), key=problems.index))


# ------------------------------------------------------------------------ rewriting
def render_io(name: str, target: str) -> dict[str, str]:
    """The ``input [...]`` and ``output [...]`` blocks of ``target``'s config."""
    blocks = {}
    for kind, tensors in zip(("input", "output"), model(name).config_io(target), strict=True):
        rows = ",\n".join(f"  {t.render()}" for t in tensors)
        blocks[kind] = f"{kind} [\n{rows}\n]"
    return blocks


def rewrite_config(text: str, name: str, target: str) -> str:
    """``text`` with its io blocks replaced by :func:`render_io`; nothing else changes."""
    parser = _Parser(text)
    parser.message()
    blocks = render_io(name, target)
    edits = []
    for kind, block in blocks.items():
        spans = parser.spans.get(kind, [])
        if len(spans) != 1:
            raise PbtxtError(
                f"{name} ({target}): expected one top-level {kind} block, found {len(spans)}"
            )
        edits.append((*spans[0], block))
    for start, end, block in sorted(edits, reverse=True):
        text = text[:start] + block + text[end:]
    return text


def write_repository(repo: Path) -> list[Path]:
    """Rewrite the io blocks of every config in ``repo``; returns the files that changed."""
    changed = []
    for name, spec in MODELS.items():
        # an ensemble's one config serves both targets: written once, as the cpu one
        paths = {Path(repo) / name / spec.config_path(t): t for t in reversed(TARGETS)}
        for path, target in paths.items():
            old = path.read_text()
            new = rewrite_config(old, name, target)
            if new != old:
                path.write_text(new)
                changed.append(path)
    return changed


# --------------------------------------------------------------------------- docs
def markdown_table() -> str:
    """The model and tensor tables of model_repository/README.md (a test keeps them equal)."""

    def names(specs: tuple[TensorSpec, ...]) -> str:
        return ", ".join(f"`{t.name}`" for t in specs)

    def dims(t: TensorSpec) -> str:
        return "[" + ", ".join(map(str, t.dims)) + "]"

    rows = ["| model | what it does | inputs | outputs |", "| --- | --- | --- | --- |"]
    tensors: dict[str, TensorSpec] = {}
    dynamic: dict[str, set[str]] = {}
    for spec in MODELS.values():
        io = f"{names(spec.inputs)} | {names(spec.outputs)}"
        rows.append(f"| `{spec.name}` | {spec.doc} | {io} |")
        for t in spec.inputs + spec.outputs:
            tensors.setdefault(t.name, t)
            if t.dynamic_axes and spec.exported:
                dynamic.setdefault(spec.name, set()).add(t.name)
    rows += ["", "| tensor | type | dims per item | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| `{t.name}` | {t.dtype.wire} | {dims(t)} | {t.doc} |" for t in tensors.values()]
    for name, which in dynamic.items():
        listed = ", ".join(f"`{n}`" for n in tensors if n in which)
        served = sorted(MODELS[name].dynamic_on)
        where = f"; the {'/'.join(served)} config serves it as -1" if served else ""
        text = f"The exported `{name}` graph leaves the first axis of {listed} dynamic{where}."
        rows += ["", text]
    return "\n".join(rows)


# ---------------------------------------------------------------------------- CLI
def _default_repository() -> Path:
    from marrowdx.serving.repository import source_repository

    return source_repository()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m marrowdx.contract",
        description="The served tensor contract: check or rewrite the model configs from it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd, text in (
        ("check", "check every config.pbtxt and configs/gpu.pbtxt against the table"),
        ("write", "rewrite the input/output blocks of every config from the table"),
    ):
        p = sub.add_parser(cmd, help=text, description=text)
        p.add_argument("--repository", type=Path, help="source model repository")
    p = sub.add_parser("models", help="print model names, one a line")
    p.add_argument("--exported", action="store_true", help="only those exported to ONNX")
    sub.add_parser("table", help="print the markdown tensor table")
    args = parser.parse_args(argv)
    if args.command == "models":
        print("\n".join(EXPORTED_MODELS if args.exported else MODELS))
        return 0
    if args.command == "table":
        print(markdown_table())
        return 0
    repo = args.repository or _default_repository()
    if args.command == "write":
        for path in write_repository(repo):
            print(f"rewrote {path}")
    try:
        check_repository(repo)
    except ContractError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    print(f"{repo}: every config follows the tensor contract")
    return 0


if __name__ == "__main__":
    sys.exit(main())
