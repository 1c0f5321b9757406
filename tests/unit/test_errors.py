"""One error hierarchy, and one place (``marrowdx.cli.main``) that turns it into a message on
stderr and the exit code."""

from __future__ import annotations

import argparse

import pytest

from marrowdx import cli, errors

#: Every per-part class, the exit code the CLI gives it, and the builtin callers may still
#: catch it as (the classes were plain ValueError/RuntimeError before the hierarchy).
PARTS = [
    (errors.InputError, errors.EXIT_CANNOT_START, ValueError),
    (errors.CohortError, errors.EXIT_CANNOT_START, ValueError),
    (errors.ImageRejected, errors.EXIT_CANNOT_START, ValueError),
    (errors.RepositoryError, errors.EXIT_CANNOT_START, RuntimeError),
    (errors.ServerError, errors.EXIT_FAILED, RuntimeError),
    (errors.TritonNotInstalled, errors.EXIT_FAILED, RuntimeError),
    (errors.ClientError, errors.EXIT_FAILED, Exception),
    (errors.ServerNotReady, errors.EXIT_CANNOT_START, Exception),
    (errors.BadServerOutput, errors.EXIT_FAILED, ValueError),
    (errors.ExportError, errors.EXIT_FAILED, RuntimeError),
    (errors.TensorRTUnavailable, errors.EXIT_UNAVAILABLE, RuntimeError),
    (errors.EngineMismatch, errors.EXIT_CANNOT_START, RuntimeError),
    (errors.MissingExtra, errors.EXIT_CANNOT_START, Exception),
]


@pytest.mark.parametrize("cls, code, builtin", PARTS, ids=lambda v: getattr(v, "__name__", v))
def test_every_part_derives_from_the_base_with_its_exit_code(cls, code, builtin) -> None:
    assert issubclass(cls, errors.MarrowdxError) and issubclass(cls, builtin)
    assert cls.exit_code == code


def test_the_modules_raise_the_same_classes_they_always_named() -> None:
    """Old import paths keep working and name the one class, not a copy."""
    from marrowdx import image_checks
    from marrowdx.serving import repository, server, triton_install

    assert repository.RepositoryError is errors.RepositoryError
    assert server.ServerError is errors.ServerError
    assert triton_install.TritonNotInstalled is errors.TritonNotInstalled
    assert image_checks.ImageRejected is errors.ImageRejected


def test_request_failed_keeps_its_reason_and_status() -> None:
    exc = errors.RequestFailed("UNAVAILABLE: down", status="StatusCode.UNAVAILABLE", attempts=3)
    assert str(exc) == exc.reason == "UNAVAILABLE: down"
    assert (exc.status, exc.attempts) == ("StatusCode.UNAVAILABLE", 3)
    assert isinstance(exc, errors.ClientError)


#: A ``marrowdx simulate`` command line that parses; its run is replaced by one that raises.
SIMULATE_ARGV = ["simulate", "--patients", "1", "--out", "unused"]


def _run_raising(monkeypatch, exc: BaseException) -> None:
    """Make ``marrowdx simulate`` raise ``exc`` instead of simulating."""

    def run(_args: argparse.Namespace) -> int:
        raise exc

    import marrowdx.simulate.cli as simulate_cli

    monkeypatch.setattr(simulate_cli, "run_simulate", run)


@pytest.mark.parametrize("cls, code, _builtin", PARTS, ids=lambda v: getattr(v, "__name__", v))
def test_main_prints_the_message_and_returns_the_code(
    monkeypatch, capsys, cls, code, _builtin
) -> None:
    _run_raising(monkeypatch, cls("something the user can fix"))
    assert cli.main(SIMULATE_ARGV) == code
    err = capsys.readouterr().err
    assert err.strip() == "marrowdx simulate: something the user can fix"


def test_a_missing_third_party_module_names_the_extra(monkeypatch, capsys) -> None:
    _run_raising(monkeypatch, ModuleNotFoundError("No module named 'torch'", name="torch"))
    monkeypatch.setitem(
        cli.COMMANDS, "simulate", cli.Command("marrowdx.simulate.cli", ("export",), "simulate")
    )
    assert cli.main(SIMULATE_ARGV) == errors.EXIT_CANNOT_START
    err = capsys.readouterr().err
    assert "'torch'" in err and "pip install 'marrowdx[export]'" in err
    assert "not built" not in err


def test_a_missing_marrowdx_module_is_a_bug_and_keeps_its_traceback(monkeypatch) -> None:
    _run_raising(monkeypatch, ModuleNotFoundError("gone", name="marrowdx.nothing"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(SIMULATE_ARGV)


def test_unexpected_errors_are_not_swallowed(monkeypatch) -> None:
    _run_raising(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        cli.main(SIMULATE_ARGV)


def test_every_command_names_existing_extras() -> None:
    """The extras a message names must exist in the distribution's metadata."""
    from importlib import metadata

    provided = set(metadata.metadata("marrowdx").get_all("Provides-Extra") or [])
    for name, command in cli.COMMANDS.items():
        assert set(command.extras) <= provided, (name, command.extras, provided)
