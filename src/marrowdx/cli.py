"""The ``marrowdx`` console script: one subcommand per part of the pipeline.

Each subcommand lives next to the part it drives (``<module>.configure_<cmd>(parser)`` and
``<module>.run_<cmd>(args) -> int``); this file only routes. Command modules import their
heavy dependencies (torch, DALI, tritonclient) inside ``run_*``, so ``marrowdx --help`` and
the thin client stay fast and light.

This is also the one place where an expected failure (``marrowdx.errors.MarrowdxError``)
becomes a message on stderr and its exit code, and where a missing optional dependency
becomes "install the extra ``marrowdx[...]``" instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from marrowdx import __version__
from marrowdx.errors import EXIT_INTERRUPTED, MarrowdxError, MissingExtra


@dataclass(frozen=True)
class Command:
    module: str
    #: The pip extras (``pyproject.toml``) that install what the command imports; named in
    #: the message when one of its third-party modules is missing. Empty: the core suffices.
    extras: tuple[str, ...]
    help: str


COMMANDS: dict[str, Command] = {
    "simulate": Command("marrowdx.simulate.cli", (), "write a synthetic cohort"),
    "sheet": Command("marrowdx.simulate.cli", (), "write a PNG sheet, one cell per class"),
    "train": Command("marrowdx.training.cli", ("export",), "train detector, classifier, diagnosis"),
    "evaluate": Command(
        "marrowdx.training.cli", ("export", "server"), "paper metrics on a held-out cohort"
    ),
    "export": Command("marrowdx.export.cli", ("export",), "export ONNX (and TensorRT engines)"),
    "build": Command(
        "marrowdx.export.cli",
        ("server", "export"),
        "train if needed, export, write the model repository",
    ),
    "serve": Command("marrowdx.serving.cli", ("server",), "run Triton on the model repository"),
    "diagnose": Command(
        "marrowdx.client.cli", ("client",), "diagnose every patient folder of a cohort"
    ),
    "bench": Command("marrowdx.bench.cli", ("server",), "limit vs peer vs served throughput"),
    "idc": Command(
        "marrowdx.slides.idc",
        ("slides",),
        "list or download the paper's slides and labels from NCI Imaging Data Commons",
    ),
    "data": Command(
        "marrowdx.datasets.cli",
        (),
        "public annotated data sets: list them, declare one, check a data folder",
    ),
}


def _load(name: str, what: str) -> Callable | None:
    """``<module>.<what>_<name>``; the command modules are part of the distribution, so a
    failed import here is a bug and propagates."""
    module = importlib.import_module(COMMANDS[name].module)
    return getattr(module, f"{what}_{name}", None)


def missing_extra(command: str, exc: ModuleNotFoundError) -> MissingExtra | None:
    """The user-facing error for a third-party module a command needs but cannot import, or
    None when the missing module is marrowdx's own (a packaging bug: keep the traceback)."""
    missing = (exc.name or "").split(".")[0]
    if not missing or missing == "marrowdx":
        return None
    extras = COMMANDS[command].extras
    hint = f"pip install 'marrowdx[{','.join(extras)}]'" if extras else f"pip install {missing}"
    return MissingExtra(f"needs the Python module '{missing}', which is not installed: {hint}")


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
        if run is None:
            raise RuntimeError(f"{cmd.module} has no run_{name}")
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if configure is not None:
            configure(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; expected failures become ``marrowdx CMD: message`` on stderr and
    the error's exit code (``marrowdx.errors``), anything else keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MarrowdxError as exc:
        print(f"marrowdx {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        error = missing_extra(args.command, exc)
        if error is None:
            raise
        print(f"marrowdx {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
