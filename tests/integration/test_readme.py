"""The README's commands are real: every ``marrowdx`` line parses with the actual CLI, every
``make`` target it names exists, and its library example runs against the served stack."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from marrowdx import cli, config

README = config.project_root() / "README.md"


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _bash_lines(prefix: str) -> list[list[str]]:
    """The README's bash lines that start with ``prefix``, comments cut, split as a shell
    would."""
    lines = []
    for block in _code_blocks("bash"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith(prefix):
                lines.append(shlex.split(line))
    return lines


def _marrowdx_lines() -> list[list[str]]:
    return [argv[1:] for argv in _bash_lines(".venv/bin/marrowdx ")]


def _python_module_lines() -> list[list[str]]:
    return [argv[2:] for argv in _bash_lines(".venv/bin/python -m marrowdx.")]


@pytest.mark.parametrize("argv", _python_module_lines(), ids=lambda a: a[0])
def test_every_readme_python_module_command_exists(argv: list[str]) -> None:
    """``.venv/bin/python -m marrowdx.X ...``: the module imports, and where it builds its
    parser apart from running (``_parser``), the line parses with it."""
    import importlib

    module = importlib.import_module(argv[0])
    assert callable(getattr(module, "main", None)), f"{argv[0]} has no main()"
    if hasattr(module, "_parser"):
        module._parser().parse_args(argv[1:])


def test_readme_names_the_two_commands_first() -> None:
    first_block = _code_blocks("bash")[0]
    assert "make demo" in first_block and "make test" in first_block


@pytest.mark.parametrize("argv", _marrowdx_lines(), ids=lambda a: a[0])
def test_every_readme_marrowdx_command_parses(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)
    assert args.command == argv[0]
    assert callable(args._run)


def test_every_make_target_named_in_readme_exists() -> None:
    named = set(re.findall(r"`make ([a-z-]+)`", README.read_text()))
    assert {"demo", "test"} <= named
    for target in sorted(named):
        dry = subprocess.run(
            ["make", "-n", target], cwd=README.parent, capture_output=True, text=True
        )
        assert dry.returncode == 0, f"make {target}: {dry.stderr}"


def test_readme_client_example_runs(triton_server, simulated_images, tmp_path: Path) -> None:
    (example,) = _code_blocks("python")
    files = []
    for i, data in enumerate(simulated_images[:2], start=1):
        path = tmp_path / f"field_{i:02d}.jpg"
        path.write_bytes(data)
        files.append(path.name)
    code = example.replace("localhost:8001", triton_server.grpc_url)
    code = code.replace('["field_01.jpg", "field_02.jpg"]', repr(files))
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the example printed nothing"
