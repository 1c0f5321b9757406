"""Triton model configs (``config.pbtxt``) read, checked and rewritten against the typed
tensor table (:mod:`marrowdx.contract`).

Why protobuf: a config is Triton's ``ModelConfig`` message in protobuf text format, and
``google.protobuf.text_format`` with the ``model_config_pb2`` that tritonclient ships parses
and prints it exactly as Triton does (pytriton reads and writes its configs the same way).
So the check sees what the server will see: an unknown field, a field set twice or a bad
enum is refused here as Triton would refuse it at load time.

Why a rewrite replaces only the io blocks: the configs are hand-written, with the one-line
reason beside each deployment setting (batching, instances), and text_format drops
comments. :func:`rewrite_config` therefore replaces the text of the top-level ``input`` and
``output`` fields with the table's (printed by text_format, one tensor a line) and leaves
every other line byte for byte; it then parses the result and refuses it unless it equals
the old config with exactly those two fields replaced.

- :func:`check_repository` (run by ``marrowdx build`` before it writes anything, and by the
  unit tests) refuses configs that disagree, naming file, model, tensor and field;
- :func:`write_repository` rewrites the io blocks of every config from the table.
  The command line for both is :mod:`marrowdx.serving.contract_cli`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc

from marrowdx.contract import MODELS, TARGETS, ConfigTensor, ModelSpec, model
from marrowdx.errors import RepositoryError

#: The command that checks and rewrites the configs (named in error messages).
CLI = "python -m marrowdx.serving.contract_cli"
#: The fields of an io entry the table owns; :func:`check_config` refuses any other.
TABLE_FIELDS = ("name", "data_type", "dims", "allow_ragged_batch")
#: The top-level io fields :func:`rewrite_config` replaces.
IO_FIELDS = ("input", "output")


class ContractError(RepositoryError):
    """A model config disagrees with the tensor contract; ``problems`` has one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            "model configs disagree with the tensor contract (marrowdx.contract):\n"
            f"{lines}\n"
            f"fix the config or the table; `{CLI} write` rewrites the input/output blocks "
            "from the table"
        )


class ConfigTextError(RepositoryError):
    """Config text that protobuf's text format (as Triton reads it) refuses, or whose io
    blocks a rewrite cannot place."""


# ------------------------------------------------------------------------- reading
def parse_config(text: str, where: str = "config") -> mc.ModelConfig:
    """``text`` as Triton's ``ModelConfig``; :class:`ConfigTextError` names line and column."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigTextError(f"{where}: cannot read it: {_describe(exc)}") from None


def load_config(path: Path) -> mc.ModelConfig:
    """The config file at ``path`` as Triton's ``ModelConfig``."""
    return parse_config(Path(path).read_text(), str(path))


def _describe(exc: text_format.ParseError) -> str:
    line, column = exc.GetLine(), exc.GetColumn()
    if line is None:
        return str(exc)
    return f"line {line}, column {column}: {str(exc).removeprefix(f'{line}:{column} : ')}"


def config_tensors(entries: Iterable[Message]) -> list[ConfigTensor]:
    """A config's ``input`` or ``output`` entries in the table's terms."""
    return [
        ConfigTensor(
            t.name,
            mc.DataType.Name(t.data_type),
            tuple(t.dims),
            getattr(t, "allow_ragged_batch", False),  # inputs only
        )
        for t in entries
    ]


# --------------------------------------------------------------- the table's part
def _entry(kind: type[Message], tensor: ConfigTensor) -> Message:
    entry = kind(name=tensor.name, data_type=mc.DataType.Value(tensor.data_type))
    entry.dims.extend(tensor.dims)
    if tensor.allow_ragged_batch:
        if kind is not mc.ModelInput:
            raise ValueError(f"{tensor.name}: Triton allows ragged batches on inputs only")
        entry.allow_ragged_batch = True
    return entry


def table_io(name: str, target: str) -> tuple[list[mc.ModelInput], list[mc.ModelOutput]]:
    """The ``input`` and ``output`` entries ``target``'s config of ``name`` must hold."""
    inputs, outputs = model(name).config_io(target)
    return [_entry(mc.ModelInput, t) for t in inputs], [_entry(mc.ModelOutput, t) for t in outputs]


def table_config(name: str, target: str) -> mc.ModelConfig:
    """The part of ``target``'s config of ``name`` the table owns: its name and io."""
    inputs, outputs = table_io(name, target)
    return mc.ModelConfig(name=name, input=inputs, output=outputs)


def render_io(name: str, target: str) -> dict[str, str]:
    """The ``input [...]`` and ``output [...]`` blocks of ``target``'s config, printed by
    text_format one tensor a line (``dims: [3, 512, 512]``), the layout of the sources."""
    cfg = table_config(name, target)
    blocks = {}
    for kind in IO_FIELDS:
        rows = ",\n".join(
            "  { "
            + text_format.MessageToString(t, as_one_line=True, use_short_repeated_primitives=True)
            + " }"
            for t in getattr(cfg, kind)
        )
        blocks[kind] = f"{kind} [\n{rows}\n]"
    return blocks


# ------------------------------------------------------------------------ checking
def check_config(text: str, name: str, target: str, where: str = "config") -> list[str]:
    """Problems of one model's config against the table (empty when it agrees)."""
    spec = model(name)
    try:
        cfg = parse_config(text, where)
    except ConfigTextError as exc:
        return [str(exc)]
    problems = []
    if cfg.name != name:
        problems.append(f"{where}: name is {cfg.name!r}, expected {name!r}")
    want_in, want_out = table_io(name, target)
    problems += _compare_entries(f"{where}: {name} input", want_in, cfg.input)
    problems += _compare_entries(f"{where}: {name} output", want_out, cfg.output)
    if spec.steps:
        problems += _check_ensemble(cfg, spec, where)
    return problems


def _shown(entry: Message, fld: str) -> object:
    value = getattr(entry, fld)
    if fld == "data_type":
        return mc.DataType.Name(value)
    return list(value) if fld == "dims" else value


def _compare_entries(prefix: str, want: list[Message], got: Sequence[Message]) -> list[str]:
    if [t.name for t in got] != [t.name for t in want]:
        return [
            f"{prefix}s are {[t.name for t in got]}, the contract has {[t.name for t in want]}"
            " (same names, same order)"
        ]
    problems = []
    for w, g in zip(want, got, strict=True):
        for fld in TABLE_FIELDS[1:]:
            if fld not in w.DESCRIPTOR.fields_by_name:
                continue
            gv, wv = _shown(g, fld), _shown(w, fld)
            if gv != wv:
                problems.append(f"{prefix} {w.name}: {fld} is {gv}, the contract says {wv}")
        extra = [f.name for f, _ in g.ListFields() if f.name not in TABLE_FIELDS]
        if extra:
            problems.append(
                f"{prefix} {w.name}: sets {', '.join(extra)}, which the contract does not "
                "(a write drops it)"
            )
    return problems


def _check_ensemble(cfg: mc.ModelConfig, spec: ModelSpec, where: str) -> list[str]:
    """Steps in the table's order, maps naming the members' real tensors, every ensemble
    output produced by the member output of the same name (so its type is the member's)."""
    steps = cfg.ensemble_scheduling.step
    names = [s.model_name for s in steps]
    if names != list(spec.steps):
        return [f"{where}: ensemble steps are {names}, the contract has {list(spec.steps)}"]
    problems, produced = [], set()
    for step, member in zip(steps, spec.steps, strict=True):
        m = MODELS[member]
        for kind, mapping, known in (
            ("input_map", step.input_map, m.input_names),
            ("output_map", step.output_map, m.output_names),
        ):
            # a protobuf map has no order: report in the member's tensor order
            order = {n: i for i, n in enumerate(known)}
            for key in sorted(mapping, key=lambda k: (order.get(k, len(order)), k)):
                if key not in order:
                    problems.append(f"{where}: step {member} {kind} key {key!r} is not its tensor")
                elif kind == "output_map" and mapping[key] == key:
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
def _field_lines(lines: list[str], kind: str) -> list[tuple[int, int]]:
    """(first, end) line ranges of each top-level ``kind`` field: it starts a line at the
    first column, and ends at the first line where text_format reads the lines so far as
    that one field (so comments and line breaks inside it are its own)."""
    start = re.compile(rf"{kind}\s*:?\s*[\[{{<]")
    spans = []
    for first, line in enumerate(lines):
        if not start.match(line):
            continue
        for end in range(first + 1, len(lines) + 1):
            try:
                text_format.Parse("".join(lines[first:end]), mc.ModelConfig())
            except text_format.ParseError:
                continue
            spans.append((first, end))
            break
    return spans


def rewrite_config(text: str, name: str, target: str) -> str:
    """``text`` with its io blocks replaced by :func:`render_io`; nothing else changes."""
    where = f"{name} ({target})"
    old = parse_config(text, where)
    lines = text.splitlines(keepends=True)
    edits = []
    for kind, block in render_io(name, target).items():
        spans = _field_lines(lines, kind)
        if len(spans) != 1:
            raise ConfigTextError(
                f"{where}: expected one top-level {kind} block (`{kind} [` at the start of a "
                f"line), found {len(spans)}"
            )
        edits.append((*spans[0], block))
    for first, end, block in sorted(edits, reverse=True):
        lines[first:end] = [block + ("\n" if lines[end - 1].endswith("\n") else "")]
    new = "".join(lines)
    want = mc.ModelConfig()
    want.CopyFrom(old)
    for kind, entries in zip(IO_FIELDS, table_io(name, target), strict=True):
        want.ClearField(kind)
        getattr(want, kind).extend(entries)
    if parse_config(new, where) != want:
        raise ConfigTextError(
            f"{where}: replacing the input/output blocks would change other settings; "
            "fix the blocks by hand"
        )
    return new


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
