"""The tensor contract's command line and its markdown table.

``python -m marrowdx.serving.contract_cli check`` is ``marrowdx build``'s check of the
source configs against the table, ``write`` rewrites their io blocks from it
(:mod:`marrowdx.serving.model_config`), ``models [--exported]`` lists model names for
scripts (the engine-build Job), ``table`` prints the tables of
``model_repository/README.md`` (a test keeps them equal). Here rather than in
:mod:`marrowdx.contract` because it needs the repository's location, which the serving
layer owns; the table itself stays in the core.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from marrowdx.contract import EXPORTED_MODELS, MODELS, TensorSpec
from marrowdx.errors import RepositoryError
from marrowdx.serving import repository
from marrowdx.serving.model_config import CLI, check_repository, write_repository


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=CLI,
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
    repo = args.repository or repository.source_repository()
    try:
        if args.command == "write":
            for path in write_repository(repo):
                print(f"rewrote {path}")
        check_repository(repo)
    except RepositoryError as exc:  # a config that disagrees, or one a write cannot place
        print(exc, file=sys.stderr)
        return exc.exit_code
    print(f"{repo}: every config follows the tensor contract")
    return 0


if __name__ == "__main__":
    sys.exit(main())
