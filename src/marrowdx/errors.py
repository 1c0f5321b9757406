"""One exception hierarchy for every part of marrowdx, and the exit code each one means.

Why one module: callers (the CLI, the demo, a lab script around the client) can catch
``MarrowdxError`` and know it is an expected failure with a message written for a user, not
a bug; and ``marrowdx.cli.main`` is the one place that turns such an error into a line on
stderr and an exit code, so each command does not repeat its own ``try/except/print``.

Each part of the system has one class here (``InputError``, ``RepositoryError``,
``ServerError``, ``ClientError``, ``ExportError``); a part that needs a finer distinction
subclasses its part's class (e.g. ``CohortError(InputError)``), in its own module if the
class is only raised there. The classes that were plain ``ValueError``/``RuntimeError``
before still derive from those, so existing ``except ValueError`` callers keep working.

This module imports nothing: the thin client installs ``marrowdx`` with only numpy and
tritonclient, and must be able to import it.
"""

from __future__ import annotations

from typing import ClassVar

#: Exit codes of the ``marrowdx`` console script. 0 is success; commands that finish with a
#: partial result (``diagnose`` with failed images) return ``EXIT_FAILED`` themselves.
EXIT_OK = 0
#: Something ran and failed: Triton died or did not come up, a request failed.
EXIT_FAILED = 1
#: The command could not start: its input or its prerequisites are wrong, and the message
#: says what to fix (a folder that is not a cohort, an unbuilt repository, a bad flag value).
EXIT_CANNOT_START = 2
#: This host lacks a capability the command needs (TensorRT, a CUDA GPU).
EXIT_UNAVAILABLE = 3
#: Interrupted by the user (SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


class MarrowdxError(Exception):
    """An expected failure whose message is written for the user; ``exit_code`` is what the
    CLI returns for it. Unexpected failures stay ordinary exceptions with a traceback."""

    exit_code: ClassVar[int] = EXIT_FAILED


class InputError(MarrowdxError, ValueError):
    """The user's input is unusable: a cohort folder, an image, ground truth, a flag value."""

    exit_code: ClassVar[int] = EXIT_CANNOT_START


class MissingExtra(MarrowdxError):
    """A command's third-party dependency is not installed: the message names the pip extra
    (``marrowdx[server]``, ...) that installs it."""

    exit_code: ClassVar[int] = EXIT_CANNOT_START


class CohortError(InputError):
    """The folder is not a cohort the client can interpret; the message says how to fix it."""


class ImageRejected(InputError):
    """The encoded bytes are not an image the pipeline accepts; the message says why."""


class RepositoryError(MarrowdxError, RuntimeError):
    """The model repository cannot be built or is incomplete (``marrowdx build``/``serve``)."""

    exit_code: ClassVar[int] = EXIT_CANNOT_START


class ServerError(MarrowdxError, RuntimeError):
    """Triton failed to start, did not become ready, or died."""

    exit_code: ClassVar[int] = EXIT_FAILED


class TritonNotInstalled(ServerError):
    """The nvidia-pytriton wheel (and with it the server binary) is missing."""


class ClientError(MarrowdxError):
    """The client could not get a usable answer from the server."""

    exit_code: ClassVar[int] = EXIT_FAILED


class RequestFailed(ClientError):
    """A request that did not succeed (transport error or the server's refusal); ``str()``
    is the reason shown to users, ``status`` the gRPC status when there was one."""

    def __init__(self, reason: str, *, status: str | None = None, attempts: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.attempts = attempts


class ServerNotReady(ClientError):
    """The server never became ready within the retry budget: nothing was diagnosed."""

    exit_code: ClassVar[int] = EXIT_CANNOT_START


class BadServerOutput(ClientError, ValueError):
    """The server answered with tensors that break the contract (shape, range)."""


class ExportError(MarrowdxError, RuntimeError):
    """Checkpoints cannot be turned into servable artefacts (ONNX, TensorRT engines)."""

    exit_code: ClassVar[int] = EXIT_FAILED


class TensorRTUnavailable(ExportError):
    """TensorRT or a CUDA GPU is missing: engines cannot be built or run here."""

    exit_code: ClassVar[int] = EXIT_UNAVAILABLE


class EngineMismatch(ExportError):
    """A plan was built for another GPU or TensorRT version."""

    exit_code: ClassVar[int] = EXIT_CANNOT_START
