"""The ``marrowdx`` console script: one subcommand per part of the pipeline.

Each subcommand lives next to the part it drives (``<module>.configure_<cmd>(parser)`` and
``<module>.run_<cmd>(args) -> int``); this file only routes. Command modules import their
heavy dependencies (torch, DALI, tritonclient) inside ``run_*``, so ``marrowdx --help`` and
the thin client stay fast and light.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from marrowdx import __version__


@dataclass(frozen=True)
class Command:
    module: str
    part: str  # which part of the system provides it, named in "not built" messages
    help: str


COMMANDS: dict[str, Command] = {
    "simulate": Command("marrowdx.simulate.cli", "simulator", "write a synthetic cohort"),
    "sheet": Command("marrowdx.simulate.cli", "simulator", "write a PNG sheet, one cell per class"),
    "train": Command("marrowdx.training.cli", "models", "train detector, classifier, diagnosis"),
    "evaluate": Command("marrowdx.training.cli", "models", "paper metrics on a held-out cohort"),
    "export": Command("marrowdx.export.cli", "models", "export ONNX (and TensorRT engines)"),
    "build": Command(
        "marrowdx.serving.cli",
        "model repository",
        "train if needed, export, write the model repository",
    ),
    "serve": Command(
        "marrowdx.serving.cli", "model repository", "run Triton on the model repository"
    ),
    "diagnose": Command(
        "marrowdx.client.cli", "client", "diagnose every patient folder of a cohort"
    ),
    "bench": Command("marrowdx.bench.cli", "benchmarks", "limit vs peer vs served throughput"),
}


def _load(name: str, what: str) -> Callable | None:
    cmd = COMMANDS[name]
    try:
        module = importlib.import_module(cmd.module)
    except ModuleNotFoundError as exc:
        if exc.name and cmd.module.startswith(exc.name):
            return None
        raise
    return getattr(module, f"{what}_{name}", None)


def _not_built(name: str) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        part = COMMANDS[name].part
        print(f"marrowdx {name}: not built yet: the {part} part is missing", file=sys.stderr)
        return 2

    run.not_built = True  # type: ignore[attr-defined]
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marrowdx",
        description="Bone-marrow smear images to differential counts and a leukemia diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"marrowdx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        configure = _load(name, "configure")
        run = _load(name, "run")
        help_text = cmd.help if run else f"{cmd.help} [not built yet: {cmd.part} missing]"
        p = sub.add_parser(name, help=help_text, description=help_text)
        if configure is not None:
            configure(p)
        p.set_defaults(_run=run or _not_built(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
