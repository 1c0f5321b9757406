"""The skeleton: taxonomy sizes, CLI routing, the README's commands."""

from __future__ import annotations

import subprocess
import sys

from marrowdx import cli, config, taxonomy


def test_taxonomy_sizes_and_uniqueness() -> None:
    assert taxonomy.N_CLASSES == 33 and len(set(taxonomy.CLASSES)) == 33
    assert taxonomy.N_ATTRIBUTES == 7
    assert all(len(v) == 2 for v in taxonomy.ATTRIBUTES.values())
    assert taxonomy.DIAGNOSES == ("ALL", "AML", "CML")
    assert taxonomy.attribute_value("cell_size", True) == "big"


def test_cli_lists_every_design_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "marrowdx", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("simulate", "build", "serve", "diagnose", "bench"):
        assert name in out
    assert set(cli.COMMANDS) >= {"simulate", "build", "serve", "diagnose", "bench"}


def test_model_and_tensor_names_are_unique() -> None:
    names = [getattr(config.MODELS, f) for f in config.MODELS.__dataclass_fields__]
    assert len(names) == len(set(names))
